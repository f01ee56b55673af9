import torch

from ttt_train.data.documents import document_ids_from_position_ids, document_ids_from_tokens

EOD = 9


def test_doc_ids_from_tokens_eod_belongs_to_the_document_it_ends():
    tokens = torch.tensor([[1, 2, EOD, 3, EOD, EOD, 4], [EOD, 1, 2, 3, 4, 5, EOD]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])
    ids = document_ids_from_tokens(tokens, EOD)
    assert ids.dtype == torch.int64 and torch.equal(ids, expected)


def test_doc_ids_from_tokens_any_leading_shape():
    tokens = torch.randint(0, 12, (2, 3, 50))
    ids = document_ids_from_tokens(tokens, EOD)
    assert ids.shape == tokens.shape
    assert (ids[..., 0] == 0).all() and (ids.diff(dim=-1) >= 0).all()
    assert torch.equal(ids[0, 1], document_ids_from_tokens(tokens[0, 1], EOD))


def test_doc_ids_from_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [5, 6, 0, 1, 2, 3, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 3], [0, 0, 1, 1, 1, 1, 2]])
    assert torch.equal(document_ids_from_position_ids(positions), expected)


def test_token_and_position_doc_ids_agree_on_megatron_layout():
    """With megatron's reset_position_ids, positions restart after each EOD."""
    tokens = torch.tensor([[4, EOD, 5, 6, EOD, 7, 8, 8, EOD, 1]])
    positions = torch.tensor([[0, 1, 0, 1, 2, 0, 1, 2, 3, 0]])
    assert torch.equal(document_ids_from_position_ids(positions), document_ids_from_tokens(tokens, EOD))

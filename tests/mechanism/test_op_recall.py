"""Associative recall through the TTT op itself (fast ``inplace_ttt`` and its ``naive`` reference) with
``LMAlignedTarget(init="next_token")`` and hand-set keys: random unit codes per token id in ``h = 128``
dimensions (cross-talk ~ 1/sqrt(h) per stored token), token vectors ~ unit norm, ``W_down`` of the
usual init scale (std 0.02). The check passes on the real op and rejects every mutant
(``tests/mechanism/mutants.py``) for the reason it is built to catch.
"""

import types

import pytest
import torch

from tests.mechanism import mutants, scenario
from ttt_train.ops import LMAlignedTarget, inplace_ttt, inplace_ttt_reference

D, H, VOCAB = 64, 128, 64
OPS = {"fast": inplace_ttt, "naive": inplace_ttt_reference}


def _weights(seed: int = 1):
    """Token vectors ``[VOCAB, D]`` (~ unit norm), unit key codes ``[VOCAB, H]`` and ``W_down`` ``[D, H]``."""
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(VOCAB, D, generator=g, dtype=torch.float64) / D ** 0.5
    codes = torch.randn(VOCAB, H, generator=g, dtype=torch.float64)
    codes = codes / codes.norm(dim=1, keepdim=True)
    return embeddings, codes, 0.02 * torch.randn(D, H, generator=g, dtype=torch.float64)


def layer_outputs(op, lr: float = 1.0, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's outputs on the scenario ``[len(CASES), SEQ, D]`` and the token vectors they are judged by."""
    embeddings, codes, w_down = _weights(seed)
    tokens, doc_ids = scenario.batch()
    target = LMAlignedTarget(D, kernel_size=5, init="next_token", dtype=torch.float64)
    with torch.no_grad():
        v = target(embeddings[tokens], scenario.CHUNK, doc_ids)
        out = op(codes[tokens], v, w_down, chunk_size=scenario.CHUNK, lr=lr, doc_ids=doc_ids)
    return out, embeddings


def test_next_token_target_is_the_next_tokens_vector_inside_chunk_and_document():
    embeddings, _, _ = _weights()
    tokens, doc_ids = scenario.batch()
    x = embeddings[tokens]
    with torch.no_grad():
        v = LMAlignedTarget(D, kernel_size=5, init="next_token", dtype=torch.float64)(x, scenario.CHUNK, doc_ids)
    pos = torch.arange(scenario.SEQ - 1)
    inside = ((pos + 1) % scenario.CHUNK != 0) & (doc_ids[:, 1:] == doc_ids[:, :-1])  # [B, SEQ-1]
    torch.testing.assert_close(v[:, :-1][inside], x[:, 1:][inside], rtol=0, atol=0)
    assert v[:, :-1][~inside].abs().max() == 0 and v[:, -1].abs().max() == 0


@pytest.mark.parametrize("op", OPS)
def test_later_key_recalls_its_value_only_where_it_should(op):
    out, embeddings = layer_outputs(OPS[op])
    assert scenario.failures(out, embeddings) == {}


@pytest.mark.parametrize("kind", mutants.REJECTED_BY)
@pytest.mark.parametrize("op", OPS)
def test_check_rejects_mutant(op, kind):
    owner = types.SimpleNamespace(op=OPS[op])
    with mutants.installed(kind, ops=[(owner, "op")]):
        out, embeddings = layer_outputs(owner.op)
    bad = scenario.failures(out, embeddings)
    assert mutants.REJECTED_BY[kind] <= bad.keys(), bad


def test_value_dominates_once_the_update_outweighs_w_down():
    """The recalled part ``lr ||z||^2 ||v|| = lr`` here against ``||W_down z|| ~ 0.02 sqrt(D) = 0.16``:
    at lr 0.03 it is lost, from lr 0.3 (about twice the W_down part) it dominates."""
    weak, embeddings = layer_outputs(inplace_ttt, lr=0.03)
    assert scenario.failures(weak, embeddings).keys() == {"recall_far", "recall_next_chunk", "second_document"}
    strong, _ = layer_outputs(inplace_ttt, lr=0.3)
    assert scenario.failures(strong, embeddings) == {}


def _recalled_cosine(h: int, stored: int, seed: int, d: int = 64, chunk: int = 64, vocab: int = 8192) -> float:
    """Cosine with the value's vector of the output at a key whose pair opens a document of ``stored``
    tokens of random ids before the key's chunk (random unit codes in ``h`` dims, ``W_down = 0``)."""
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    codes = torch.randn(vocab, h, generator=g, dtype=torch.float64)
    codes = codes / codes.norm(dim=1, keepdim=True)
    tokens = torch.randint(3, vocab, (1, stored + chunk), generator=g)
    tokens[0, 0], tokens[0, 1], tokens[0, -1] = scenario.KEY, scenario.VALUE, scenario.KEY
    with torch.no_grad():
        v = LMAlignedTarget(d, kernel_size=5, init="next_token", dtype=torch.float64)(embeddings[tokens], chunk)
        out = inplace_ttt(codes[tokens], v, torch.zeros(d, h, dtype=torch.float64), chunk_size=chunk, lr=1.0)
    return scenario.cosines(out[0, -1], embeddings)[scenario.VALUE].item()


@pytest.mark.parametrize("stored", [64, 1024])
def test_recall_fades_as_a_linear_memory_of_h_random_keys(stored):
    """Every stored token adds its value times ``<z_s, z_key> ~ N(0, 1/h)``: after ``n`` of them the value's
    cosine is about ``(1 + n/h)^-1/2`` whatever lr (0.82 at n = h/2, 0.33 at n = 8h for h = 128)."""
    h = 128
    measured = sum(_recalled_cosine(h, stored, seed) for seed in range(10)) / 10
    assert measured == pytest.approx((1 + stored / h) ** -0.5, abs=0.05)

import json

import pytest
import tokenizers

from ttt_train.data.tokenizer import BYTE_TOKENIZER_PATH, build_byte_tokenizer, load_tokenizer

TEXTS = [
    "",
    "hello world",
    "héllo 🤖 東京\n\t  x\r\n",
    "a literal <|endoftext|> and <|pad|> stay text",
    "\x00\x7f\u2028",
]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip_and_ids_are_bytes(byte_tokenizer, text):
    ids = byte_tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert byte_tokenizer.decode(ids) == text


def test_byte_special_ids(byte_tokenizer):
    assert (byte_tokenizer.vocab_size, byte_tokenizer.eod_id, byte_tokenizer.pad_id) == (258, 256, 257)
    assert byte_tokenizer.decode([104, 256, 105]) == "h<|endoftext|>i"
    assert byte_tokenizer.encode_batch(["ab", "c"]) == [[97, 98], [99]]


def test_shipped_asset_is_the_built_tokenizer():
    assert json.loads(BYTE_TOKENIZER_PATH.read_text()) == json.loads(build_byte_tokenizer().to_str())


def test_tokenizer_json_file_and_hf_directory(tmp_path, byte_tokenizer):
    file = tmp_path / "tok.json"
    file.write_text(BYTE_TOKENIZER_PATH.read_text())
    from_file = load_tokenizer(str(file))
    assert (from_file.eod_id, from_file.pad_id, from_file.fingerprint) == (
        256,
        257,
        byte_tokenizer.fingerprint,
    )

    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "tokenizer.json").write_text(BYTE_TOKENIZER_PATH.read_text())
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": "<|pad|>", "pad_token": "<|pad|>", "tokenizer_class": "PreTrainedTokenizerFast"}
        )
    )
    hf = load_tokenizer(str(directory))
    # "<|endoftext|>" is preferred over an eos that is not a document end; a pad equal to EOD is no pad.
    assert (hf.eod_id, hf.vocab_size) == (256, 258)
    # The directory form (to which transformers adds a post-processor) is the same tokenizer as its file.
    assert hf.fingerprint == byte_tokenizer.fingerprint and hf.spec == str(directory.resolve())
    assert hf.decode(hf.encode(TEXTS[2])) == TEXTS[2]
    explicit = load_tokenizer(str(directory), eod_token="<|pad|>")
    assert (explicit.eod_id, explicit.pad_id) == (257, None)


def test_eod_falls_back_to_eos_and_unknown_eod_is_refused(tmp_path):
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"a": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>")
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    assert load_tokenizer(str(tmp_path)).eod_id == 1
    with pytest.raises(ValueError, match="no EOD token '<nope>'"):
        load_tokenizer(str(tmp_path), eod_token="<nope>")


def test_missing_and_unreadable_tokenizers_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        load_tokenizer(str(tmp_path / "no/such/dir"))
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(str(bad))
    with pytest.raises(ValueError, match="could not be loaded"):
        load_tokenizer(str(tmp_path))  # a directory with no tokenizer in it

import json

import numpy
import pytest
from data_helpers import write_jsonl, write_permuted_byte_tokenizer

from data_tools import inspect_dataset, tokenize
from ttt_train.data import indexed
from ttt_train.data.tokenizer import BYTE_TOKENIZER_PATH


def test_histogram_bins_are_powers_of_two():
    assert inspect_dataset.length_histogram(numpy.array([1, 2, 3, 3, 9, 0])) == [
        (0, 1, 1),
        (1, 2, 1),
        (2, 4, 3),
        (8, 16, 1),
    ]
    assert inspect_dataset.length_histogram(numpy.array([], dtype=numpy.int64)) == []


def test_inspect_reports_counts_histogram_and_sample(tmp_path, capsys):
    texts = ["short", "a bit longer text", "x" * 100]
    write_jsonl(tmp_path / "in.jsonl", texts)
    assert tokenize.main([str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "ds")]) == 0
    capsys.readouterr()

    assert inspect_dataset.main([str(tmp_path / "ds"), "--json", "--sample", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["documents"], report["tokens"], report["max_token_id"]) == (3, 6 + 18 + 101, 256)
    assert (
        report["length"]["max"] == 101 and report["documents_without_eod"] == 0 and report["ids_within_vocab"]
    )
    assert report["sample"]["text"] == "a bit longer text<|endoftext|>"
    assert sum(n for _, _, n in report["histogram"]) == 3

    assert inspect_dataset.main([str(tmp_path / "ds"), "--max-chars", "8"]) == 0
    out = capsys.readouterr().out
    assert "documents: 3  tokens: 125" in out and "[       64,       128)" in out and "    short<|e" in out


@pytest.fixture
def dataset_with_file_tokenizer(tmp_path):
    """A dataset tokenized with tokenizer file tok/t.json (a copy of the byte tokenizer)."""
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "t.json").write_text(BYTE_TOKENIZER_PATH.read_text())
    write_jsonl(tmp_path / "in.jsonl", ["hello", "world"])
    argv = [
        str(tmp_path / "in.jsonl"),
        "--output-prefix",
        str(tmp_path / "ds"),
        "--tokenizer",
        str(tmp_path / "tok" / "t.json"),
    ]
    assert tokenize.main(argv) == 0
    return tmp_path / "ds"


def test_inspect_refuses_another_tokenizer_of_the_same_size(dataset_with_file_tokenizer, tmp_path, capsys):
    permuted = write_permuted_byte_tokenizer(tmp_path / "permuted.json")
    capsys.readouterr()
    assert inspect_dataset.main([str(dataset_with_file_tokenizer), "--tokenizer", permuted]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "was tokenized with tokenizer" in err and "permuted.json" in err
    assert "use the tokenizer it was built with, or re-tokenize it" in err
    assert inspect_dataset.main([str(tmp_path / "missing")]) == 2
    assert "missing.bin not found" in capsys.readouterr().err


def test_old_relative_tokenizer_path_resolves_beside_the_meta(
    dataset_with_file_tokenizer, tmp_path, capsys, monkeypatch
):
    prefix = str(dataset_with_file_tokenizer)
    meta = indexed.read_sidecar(prefix)
    meta["tokenizer"] = "tok/t.json"  # as an older tokenize wrote it (relative, as typed)
    indexed.write_sidecar(prefix, meta)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert inspect_dataset.main([prefix, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["tokenizer"]["name"] == str(tmp_path / "tok" / "t.json")
        and report["sample"]["text"] == "hello<|endoftext|>"
    )

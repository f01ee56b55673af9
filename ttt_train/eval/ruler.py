"""RULER-style synthetic tasks (Hsieh et al., 2024; NVIDIA/RULER), generated offline and
deterministically from a seed, each fitted to a target length in the evaluated model's tokenizer.

RULER's default tasks with its settings (options in configs/eval/suite/ruler.yaml):

| task            | haystack          | keys      | values        | needles                         |
|-----------------|-------------------|-----------|---------------|---------------------------------|
| niah_single_1   | noise             | words     | 7-digit       | 1                               |
| niah_single_2   | essay             | words     | 7-digit       | 1                               |
| niah_single_3   | essay             | words     | UUIDs         | 1                               |
| niah_multikey_1 | essay             | words     | 7-digit       | 4 keys, one asked               |
| niah_multikey_2 | needles (others)  | words     | 7-digit       | 1 among needles for other keys  |
| niah_multikey_3 | needles (others)  | UUIDs     | UUIDs         | 1 among needles for other keys  |
| niah_multivalue | essay             | words     | 7-digit       | 4 values of the one key         |
| niah_multiquery | essay             | words     | 7-digit       | 4 keys, all asked               |

- needle: "One special magic number for KEY is: VALUE."; words: adjective-noun compounds from
  wonderwords' lists ("quizzical-aardvark").
- vt: variable tracking: 1 chain "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... of 4 hops in the
  noise haystack; all 5 variables holding the value are asked for; after one solved example of
  about 500 tokens (3-letter names), as RULER prepends.
- cwe: common-words extraction from a numbered list of English words: 10 words appear 30 times, the
  others 3 (below 4096 tokens RULER's short setting: 6 and 1); after one solved example.
- fwe: frequent-words extraction: random 6-letter codes with counts N * k^-2 / zeta(2) by rank k, the
  top rank written "..." (to be ignored); the 3 next most frequent are asked for.
- qa_1 (SQuAD), qa_2 (HotpotQA): need those data sets and are refused (`QA_TASKS`).
- passkey: the training data's passkey task (ttt_train.data.synthetic), not a RULER task.

Texts paraphrase RULER's templates; every prompt ends with its answer prefix (appended for base
models as RULER does; suite.answer_prefix). A sample of length L has prompt tokens +
max_new_tokens <= L with as much haystack (or list) as fits, fitted per sample.
"""

from __future__ import annotations

import math
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy

from ttt_train.data.synthetic import TASKS as TRAINING_TASKS
from ttt_train.eval.haystack import NoiseHaystack, TextHaystack, insert_between_lines
from ttt_train.eval.wordlists import compounds, distinct, english_words

_LETTERS = numpy.array(list("abcdefghijklmnopqrstuvwxyz"))
QA_TASKS = {"qa_1": "SQuAD", "qa_2": "HotpotQA"}  # RULER tasks that need data sets not available offline


@dataclass(frozen=True)
class Prompt:
    """A task instance: `body` (context and question), `answer_prefix` (the answer's opening words)
    and the reference strings the output must contain."""

    body: str
    answer_prefix: str
    references: list[str]


@dataclass(frozen=True)
class Setting:
    """What a task reads besides its options: its haystack (None for tasks without a text one), the
    sample's length, its prompt budget (length - generation budget) and the token counter."""

    haystack: NoiseHaystack | TextHaystack | None
    length: int
    budget: int
    count_tokens: Callable[[str], int]


@dataclass(frozen=True)
class Sample:
    task: str
    length: int
    index: int
    prompt: str
    references: list[str]
    max_new_tokens: int
    prompt_tokens: int


def _codes(rng: numpy.random.Generator, count: int, length: int, upper: bool = False) -> list[str]:
    """`count` distinct strings of `length` random letters."""
    letters = numpy.char.upper(_LETTERS) if upper else _LETTERS
    return distinct(lambda k: ["".join(row) for row in letters[rng.integers(0, 26, size=(k, length))]], count)


def _numbers(rng: numpy.random.Generator, count: int, digits: int,
             taken: frozenset[str] = frozenset()) -> list[str]:
    low = 10 ** (digits - 1)
    return distinct(lambda k: [str(v) for v in rng.integers(low, 10 * low, size=k).tolist()], count, taken)


def _draw(rng: numpy.random.Generator, kind: str, count: int, taken: frozenset[str] = frozenset()) -> list[str]:
    """`count` distinct needle keys or values of `kind` (words, numbers or uuids), none in `taken`."""
    if kind == "words":
        return compounds(rng, count, taken)
    if kind == "uuids":
        return distinct(lambda k: [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(k)], count, taken)
    return _numbers(rng, count, 7, taken)


def _spoken_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _interleave(lists: list[list[str]], rng: numpy.random.Generator) -> list[str]:
    """The items of `lists` merged in a random order that keeps each list's own order."""
    order = rng.permutation(numpy.repeat(numpy.arange(len(lists)), [len(x) for x in lists]))
    heads = [iter(x) for x in lists]
    return [next(heads[i]) for i in order]


VALUE_NOUNS = {"numbers": ("number", "numbers"), "uuids": ("UUID", "UUIDs")}


def _needle(noun: str, key: str, value: str) -> str:
    return f"One special magic {noun} for {key} is: {value}."


def niah(rng, n: int, setting: Setting, *, keys: str = "words", values: str = "numbers", num_keys: int = 1,
         num_values: int = 1, num_queries: int = 1, needle_haystack: bool = False) -> Prompt:
    """Needles for max(num_keys, num_queries) keys with `num_values` values each, in random order in
    n units of the haystack (with `needle_haystack`: among n needles for other keys); `num_queries`
    of the keys are asked for and all their values are the references."""
    num_keys = max(num_keys, num_queries)
    key_list = _draw(rng, keys, num_keys)
    value_lists = [_draw(rng, values, num_values) for _ in key_list]
    one, many = VALUE_NOUNS[values]
    needles = [_needle(one, k, v) for k, vs in zip(key_list, value_lists) for v in vs]
    needles = [needles[i] for i in rng.permutation(len(needles))]
    asked = rng.choice(num_keys, size=num_queries, replace=False).tolist()
    if needle_haystack:
        others = zip(_draw(rng, keys, n, frozenset(key_list)), _draw(rng, values, n))
        context = insert_between_lines([_needle(one, k, v) for k, v in others], needles, rng)
    else:
        context = setting.haystack.weave(n, needles, rng)
    query = _spoken_list([key_list[i] for i in asked])
    if num_queries * num_values == 1:
        body = (f"A special magic {one} is hidden in the text below. Memorize it; you will be asked about the "
                f"{one} afterwards.\n{context}\nWhich special magic {one} for {query} appears in the text above?")
        prefix = f" The special magic {one} for {query} in the text above is"
    else:
        body = (f"Some special magic {many} are hidden in the text below. Memorize them; you will be asked about "
                f"the {many} afterwards.\n{context}\n"
                f"Which special magic {many} for {query} appear in the text above?")
        prefix = f" The special magic {many} for {query} in the text above are"
    return Prompt(body, prefix, [v for i in asked for v in value_lists[i]])


def _vt_instance(rng, n: int, haystack, num_chains: int, num_hops: int, name_length: int) -> Prompt:
    """`num_chains` chains of `num_hops` re-assignments in n haystack units; the first chain's value
    is asked for and its variables are the references."""
    names = _codes(rng, num_chains * (num_hops + 1), name_length, upper=True)
    values = _numbers(rng, num_chains, 5)
    chains = [names[c * (num_hops + 1):(c + 1) * (num_hops + 1)] for c in range(num_chains)]
    statements = [[f"VAR {chain[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(chain, chain[1:])]
                  for chain, value in zip(chains, values)]
    merged = _interleave(statements, rng)
    if not haystack.by_lines:  # between sentences they end as sentences
        merged = [s + "." for s in merged]
    context = haystack.weave(n, merged, rng)
    body = ("Memorize the chains of variable assignments hidden in the text below and follow them.\n\n"
            f"{context}\nQuestion: Which variables are assigned the value {values[0]} in the text above?")
    prefix = (" Answer: Following the chains of assignments in the text above, "
              f"{num_hops + 1} variables are assigned the value {values[0]}; they are: ")
    return Prompt(body, prefix, chains[0])


def _vt_example(seed: int, setting: Setting, num_chains: int, num_hops: int, tokens: int) -> str:
    """A solved vt instance of at most `tokens` tokens with 3-letter names, its answer after its
    prefix (RULER's in-context example)."""
    def text(k: int) -> str:
        p = _vt_instance(numpy.random.default_rng(seed), k, setting.haystack, num_chains, num_hops, 3)
        return f"{p.body}{p.answer_prefix}{' '.join(p.references)}\n"

    k = largest_fitting(lambda k: setting.count_tokens(text(k)), tokens, guess=8)
    if k is None:
        raise ValueError(f"suite.vt.example_tokens={tokens}: too few for the solved example; "
                         "raise it, or 0 for none")
    return text(k)


def variable_tracking(rng, n: int, setting: Setting, *, num_chains: int = 1, num_hops: int = 4,
                      example_tokens: int = 500) -> Prompt:
    """vt in n haystack units, after a solved example of about `example_tokens` tokens (0: none)."""
    example_seed = int(rng.integers(2**63))
    prompt = _vt_instance(rng, n, setting.haystack, num_chains, num_hops, 5)
    if not example_tokens:
        return prompt
    example = _vt_example(example_seed, setting, num_chains, min(num_hops, 10), example_tokens)
    return Prompt(f"{example}\n{prompt.body}", prompt.answer_prefix, prompt.references)


def _cwe_instance(rng, words: list[str], num_common: int, freq_common: int, freq_uncommon: int) -> Prompt:
    """A numbered list where words[:num_common] appear freq_common times and the rest freq_uncommon
    times, shuffled; the common words are asked for."""
    listed = words[:num_common] * freq_common + words[num_common:] * freq_uncommon
    listed = [listed[i] for i in rng.permutation(len(listed))]
    body = ("Below is a numbered list of words, some of which occur more often than others. Memorize the ones "
            f"that occur most often.\n{_numbered(listed)}\n"
            f"Question: Which {num_common} words occur most often in the list above?")
    prefix = f" Answer: The {num_common} words that occur most often in the list above are:"
    return Prompt(body, prefix, words[:num_common])


def common_words(rng, n: int, setting: Setting, *, num_common: int = 10, freq_common: int = 30,
                 freq_uncommon: int = 3, examples: int = 1, short_below: int = 4096) -> Prompt:
    """cwe with n uncommon words after `examples` solved examples of num_common + 30 words (common
    ones 10 times, others 3); below `short_below` tokens RULER's short setting: examples of
    num_common + 10 words (3 and 1 times) and the sample's words 6 and 1 times."""
    short = setting.length < short_below
    shots = []
    for _ in range(examples):
        shot = _cwe_instance(rng, english_words(rng, num_common + (10 if short else 30)), num_common,
                             *((3, 1) if short else (10, 3)))
        shots.append(f"{shot.body}{shot.answer_prefix} {_numbered(shot.references)}\n")
    prompt = _cwe_instance(rng, english_words(rng, num_common + n), num_common,
                           *((6, 1) if short else (freq_common, freq_uncommon)))
    return Prompt("".join(shots) + prompt.body, prompt.answer_prefix, prompt.references)


def zeta(s: float) -> float:
    """The Riemann zeta function for s > 1 (Euler-Maclaurin after 100 terms; error below 1e-12)."""
    k = 100
    return (sum(i**-s for i in range(1, k)) + k ** (1 - s) / (s - 1) + k**-s / 2 + s * k ** (-s - 1) / 12
            - s * (s + 1) * (s + 2) * k ** (-s - 3) / 720)


def zipf_counts(total: int, alpha: float, size: int) -> list[int]:
    """RULER's fwe counts: int(total * k^-alpha / zeta(alpha)) for ranks k = 1..size."""
    norm = zeta(alpha)
    return [int(total * k**-alpha / norm) for k in range(1, size + 1)]


def frequent_words(rng, n: int, setting: Setting, *, alpha: float = 2.0, vocab_size: int | None = None,
                   num_answers: int = 3, word_length: int = 6) -> Prompt:
    """Coded words with `zipf_counts` over a vocabulary of `vocab_size` (None: budget // 50, as
    RULER) random codes, rank 1 written "..."; ranks 2..num_answers+1 are asked for. The count total
    is n plus the least for which those ranks are strictly more frequent than every other code."""
    if alpha <= 1:
        raise ValueError(f"suite.fwe.alpha={alpha}: a Zipf exponent > 1 is needed")
    size = max(vocab_size or setting.budget // 50, num_answers + 2)
    vocab = ["..."] + _codes(rng, size - 1, word_length)
    norm = zeta(alpha)
    least = math.ceil(norm / ((num_answers + 1) ** -alpha - (num_answers + 2) ** -alpha))
    counts = zipf_counts(least + n, alpha, size)
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    words = [words[i] for i in rng.permutation(len(words))]
    body = ("Read the coded text below and count how often each coded word occurs; find the "
            f"{num_answers} coded words that occur most often. {' '.join(words)}\n"
            f"Question: Give no explanation and ignore the dots '...'. Which {num_answers} words occur most "
            "often in the coded text above?")
    prefix = f" Answer: In the coded text above, the {num_answers} most frequent words are:"
    return Prompt(body, prefix, vocab[1:num_answers + 1])


def passkey(rng, n: int, setting: Setting | None) -> Prompt:
    """The training data's passkey record with n filler sentences (its own filler: no haystack),
    prompted as training wrote it: "...\nWhat is the pass key? The pass key is"."""
    context, query, key = TRAINING_TASKS["passkey"][0](int(rng.integers(2**31)), n)
    question, _, prefix = query.partition("? ")
    return Prompt(f"{context}\n{question}?", f" {prefix}", [key])


@dataclass(frozen=True)
class Task:
    build: Callable[..., Prompt]  # build(rng, n, setting, **options)
    section: str                  # its options section in the suite config
    haystack: str | None          # RULER's: noise or essay (a text haystack, see suite.haystack), else None
    metric: str = "string_match_all"  # RULER's metric for it (suite.metric=ruler)
    words: bool = True            # draws words from wonderwords


def _niah_task(haystack: str | None, keys: str = "words", values: str = "numbers",
               varies: str | None = None) -> Task:
    """A niah variant; `varies`: the one of num_keys / num_values / num_queries it takes from the
    `niah` options (the others are 1); haystack None: needles for other keys."""
    def build(rng, n, setting, *, num_keys=4, num_values=4, num_queries=4):
        given = {"num_keys": num_keys, "num_values": num_values, "num_queries": num_queries}
        counts = {name: value if name == varies else 1 for name, value in given.items()}
        return niah(rng, n, setting, keys=keys, values=values, needle_haystack=haystack is None, **counts)

    return Task(build, "niah", haystack, words=keys == "words")


TASKS: dict[str, Task] = {
    "niah_single_1": _niah_task("noise"),
    "niah_single_2": _niah_task("essay"),
    "niah_single_3": _niah_task("essay", values="uuids"),
    "niah_multikey_1": _niah_task("essay", varies="num_keys"),
    "niah_multikey_2": _niah_task(None),
    "niah_multikey_3": _niah_task(None, keys="uuids", values="uuids"),
    "niah_multivalue": _niah_task("essay", varies="num_values"),
    "niah_multiquery": _niah_task("essay", varies="num_queries"),
    "vt": Task(variable_tracking, "vt", "noise", words=False),
    "cwe": Task(common_words, "cwe", None),
    "fwe": Task(frequent_words, "fwe", None, words=False),
    "passkey": Task(passkey, "passkey", None, words=False),
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


def make_sample(task: str, options: dict, *, length: int, index: int, seed: int,
                haystack: NoiseHaystack | TextHaystack | None, count_tokens: Callable[[str], int],
                max_new_tokens: int, answer_prefix: bool, guess: int = 64) -> tuple[Sample, int]:
    """Sample `index` of `task` at `length` tokens and the unit count n it used (a good `guess`
    for the next sample); `haystack`: the task's text haystack (None for tasks without one).
    Raises ValueError when even the smallest instance does not fit."""
    build = TASKS[task].build
    seed_seq = sample_seed(seed, task, length, index)
    setting = Setting(haystack, length, length - max_new_tokens, count_tokens)

    def prompt(n: int) -> tuple[str, Prompt]:
        p = build(numpy.random.default_rng(seed_seq), n, setting, **options)
        return p.body + (p.answer_prefix if answer_prefix else ""), p

    n = largest_fitting(lambda k: count_tokens(prompt(k)[0]), setting.budget, guess)
    if n is None:
        raise ValueError(
            f"task {task} does not fit {length} tokens (prompt + {max_new_tokens} new tokens) even with "
            "no haystack: use a longer length or smaller task options (configs/eval/suite/ruler.yaml)"
        )
    text, p = prompt(n)
    return Sample(task, length, index, text, p.references, max_new_tokens, count_tokens(text)), n

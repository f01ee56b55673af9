"""Synthetic long-context retrieval tasks with checkable answers, deterministic from a seed.

- passkey: a 5-digit pass key hidden at a random depth in repeated filler sentences.
- multikey: lines "The value of key <uuid> is <7 digits>." fill the context (multi-key associative
  recall); the query asks for the values of some keys, answered in query order.
- variable_tracking: chains "VAR ABCDE = 12345." then "VAR FGHIJ = VAR ABCDE." ... hidden in filler;
  the query asks which variables hold a value, answered in assignment order.
- mqar: multi-query associative recall (Zoology's MQAR): `num_pairs` pairs "Kv" (distinct one-byte
  keys: upper-case letters, digits, symbols, none of them in the filler; random lower-case values),
  then filler, then every pair again in a random order: each value in that last section is
  answerable only by recalling its pair from the first.
- copy: a random string of `copy_length` lower-case letters in angle brackets, filler, then the
  string again: every letter of the second copy is answerable only by recalling the first.

A record is {"task", "context", "query", "answer", "recall_spans", "length_tokens", "seed", "text"}
with text = context + "\\n" + query + separator + answer (separator " ", none for mqar and copy), the
training form; an evaluation prompts with context + "\\n" + query and scores the continuation with
`score_exact_match`. `recall_spans` lists the [start, end) character ranges of `text` that only a
memory of the context can predict (the answer; for mqar every queried value, for copy the second
copy). `length_tokens` is the length of `text` in tokens of the given tokenizer: the largest
context not exceeding the target, so it falls short of the target by less than one filler sentence.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import NamedTuple

import numpy

from ttt_train.data.tokenizer import Tokenizer, load_tokenizer

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# mqar's keys: upper-case letters, digits and symbols that never occur in its filler (one byte each).
KEY_LETTERS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#$%&*+/:;<=>@^_~" if c not in "".join(FILLER))
VALUE_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class Sample(NamedTuple):
    """A task instance. `recall_spans`: [start, end) offsets within `query` + `separator` + `answer`
    of the text only a memory of the context predicts; None means the answer."""

    context: str
    query: str
    answer: str
    separator: str = " "
    recall_spans: list[tuple[int, int]] | None = None


# A task maps (seed, n, options) to a Sample (or (context, query, answer)); n (>= its minimum) sets the length.
TaskFn = Callable[..., Sample | tuple[str, str, str]]


def _passkey(seed: int, n: int, depth: float | None = None) -> tuple[str, str, str]:
    rng = numpy.random.default_rng(seed)
    key = int(rng.integers(10000, 100000))
    depth = float(rng.uniform()) if depth is None else depth
    sentences = [FILLER[i % len(FILLER)] for i in range(n)]
    sentences.insert(round(depth * n), f"The pass key is {key}. Remember it. {key} is the pass key.")
    return " ".join(sentences), "What is the pass key? The pass key is", str(key)


def _multikey(seed: int, n: int, num_queries: int = 2) -> tuple[str, str, str]:
    rng = numpy.random.default_rng(seed)
    keys = [str(uuid.UUID(bytes=rng.bytes(16))) for _ in range(n)]
    values = rng.integers(1_000_000, 10_000_000, size=n)
    asked = rng.choice(n, size=num_queries, replace=False)
    context = "\n".join(f"The value of key {k} is {v}." for k, v in zip(keys, values))
    query = f"What are the values of the keys {', '.join(keys[i] for i in asked)}? The values are"
    return context, query, " ".join(str(values[i]) for i in asked)


def _variable_tracking(seed: int, n: int, num_chains: int = 2, num_hops: int = 4) -> tuple[str, str, str]:
    rng = numpy.random.default_rng(seed)
    names = _unique_names(rng, num_chains * (num_hops + 1))
    values = rng.choice(numpy.arange(10000, 100000), size=num_chains, replace=False)
    chains = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        chains.append(
            [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        )
    # Statements at random places, each chain's in order: deal chain labels in a random order.
    order = rng.permutation(numpy.repeat(numpy.arange(num_chains), num_hops + 1))
    statements = [chains[c].pop(0) for c in order]
    slots = numpy.sort(rng.integers(0, n + 1, size=len(statements)))
    sentences = [FILLER[i % len(FILLER)] for i in range(n)]
    for offset, (slot, statement) in enumerate(zip(slots, statements)):
        sentences.insert(int(slot) + offset, statement)
    query = f"Which variables are assigned the value {values[0]}? They are"
    return " ".join(sentences), query, " ".join(names[: num_hops + 1])


def _mqar(seed: int, n: int, num_pairs: int = 16) -> Sample:
    if not 1 <= num_pairs <= len(KEY_LETTERS):
        raise ValueError(f"mqar: num_pairs must be in 1..{len(KEY_LETTERS)} (distinct keys), got {num_pairs}")
    rng = numpy.random.default_rng(seed)
    keys = rng.choice(list(KEY_LETTERS), size=num_pairs, replace=False)
    values = rng.choice(list(VALUE_LETTERS), size=num_pairs)
    pairs = [f"{k}{v}" for k, v in zip(keys, values)]
    order = rng.permutation(num_pairs)
    filler = " ".join(FILLER[i % len(FILLER)] for i in range(n))
    asked = " ".join(pairs[i] for i in order)
    # every queried value sits 1 character after its key, pairs 3 characters apart ("Kv ")
    return Sample(f"{' '.join(pairs)}\n{filler}", asked[:-1], asked[-1], "",
                  [(3 * j + 1, 3 * j + 2) for j in range(num_pairs)])


def _copy(seed: int, n: int, copy_length: int = 64) -> Sample:
    if copy_length < 1:
        raise ValueError(f"copy: copy_length must be >= 1, got {copy_length}")
    rng = numpy.random.default_rng(seed)
    string = "".join(rng.choice(list(VALUE_LETTERS), size=copy_length))
    filler = " ".join(FILLER[i % len(FILLER)] for i in range(n))
    return Sample(f"<{string}> {filler}", "<", f"{string}>", "", [(1, 1 + copy_length)])


def _unique_names(rng: numpy.random.Generator, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(chr(65 + int(i)) for i in rng.integers(0, 26, size=5))
        if name not in names:
            names.append(name)
    return names


TASKS: dict[str, tuple[TaskFn, Callable[[dict], int]]] = {
    # task -> (generator, smallest n given the options)
    "passkey": (_passkey, lambda options: 0),
    "multikey": (_multikey, lambda options: options.get("num_queries", 2)),
    "variable_tracking": (_variable_tracking, lambda options: 0),
    "mqar": (_mqar, lambda options: 0),
    "copy": (_copy, lambda options: 0),
}


RECALL_ALPHABETS = {"passkey": 10, "mqar": len(VALUE_LETTERS), "copy": len(VALUE_LETTERS)}
"""Tasks whose every recall character is drawn uniformly from an alphabet of this size (chance
accuracy per character: 1 / size); the others' answers mix characters of several kinds."""


def generate(task: str, length_tokens: int, seed: int, tokenizer: Tokenizer | None = None, **options) -> dict:
    """One record of `task` whose `text` is at most `length_tokens` tokens long, as long as possible."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    tokenizer = tokenizer or load_tokenizer("byte")
    fn, smallest = TASKS[task]

    def build(n: int) -> tuple[dict, int]:
        sample = Sample(*fn(seed, n, **options))
        tail = f"{sample.query}{sample.separator}{sample.answer}"
        spans = sample.recall_spans or [(len(tail) - len(sample.answer), len(tail))]
        offset = len(sample.context) + 1
        record = {"task": task, "context": sample.context, "query": sample.query, "answer": sample.answer,
                  "recall_spans": [[offset + a, offset + b] for a, b in spans], "seed": seed,
                  "text": f"{sample.context}\n{tail}"}
        return record, len(tokenizer.encode(record["text"]))

    lo = smallest(options)
    best, size = build(lo)
    if size > length_tokens:
        raise ValueError(f"{task}: target of {length_tokens} tokens is too short, the minimum is {size}")
    hi = max(2 * lo, 16)
    while build(hi)[1] <= length_tokens:  # grow until too long, then bisect on the last fitting n
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if build(mid)[1] <= length_tokens:
            lo = mid
        else:
            hi = mid
    best, size = build(lo)
    return {**best, "length_tokens": size}


def generate_many(
    task: str, num: int, length_tokens: int, seed: int, tokenizer: Tokenizer | None = None, **options
):
    """Records for seeds seed, seed + 1, ..., seed + num - 1."""
    tokenizer = tokenizer or load_tokenizer("byte")
    return [generate(task, length_tokens, seed + i, tokenizer, **options) for i in range(num)]


def score_exact_match(prediction: str, answer: str) -> float:
    """1.0 when the first line of `prediction` equals `answer` up to case, surrounding whitespace,
    repeated spaces and a final period; else 0.0."""

    def normalize(text: str) -> str:
        lines = text.strip().splitlines() or [""]
        return " ".join(lines[0].split()).rstrip(".").casefold()

    return float(normalize(prediction) == normalize(answer))

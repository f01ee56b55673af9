"""English words for the RULER-style tasks, as RULER takes them: the noun, adjective and verb lists
the `wonderwords` package ships (read from its data files; nothing is downloaded).

- keys: adjective-noun compounds ("quizzical-aardvark"), ~6.2M of them;
- common words (cwe): the distinct single words of the three lists (~8.2k), then compounds when a
  sample needs more distinct words than that (RULER then switches to a larger word list of its own,
  kept in Git LFS, which is not available offline).
"""

from __future__ import annotations

import functools
import importlib.resources

import numpy


@functools.cache
def wonderwords_list(kind: str) -> tuple[str, ...]:
    """The words of wonderwords' `{kind}list.txt` (kind: noun, adjective or verb), in file order."""
    try:
        assets = importlib.resources.files("wonderwords.assets")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the RULER-style tasks draw their words from the wonderwords package, which is not installed: "
            "pip install 'wonderwords>=3.0.1,<4' (part of the eval extra)"
        ) from None
    text = (assets / f"{kind}list.txt").read_text(encoding="utf-8")
    return tuple(word.strip() for word in text.splitlines() if word.strip())


@functools.cache
def single_words() -> tuple[str, ...]:
    """The distinct nouns, adjectives and verbs, sorted."""
    return tuple(sorted(set(wonderwords_list("noun") + wonderwords_list("adjective") + wonderwords_list("verb"))))


def distinct(draw, count: int, taken: frozenset[str] = frozenset()) -> list[str]:
    """`count` distinct strings not in `taken`, from batches `draw(k)` of k strings, in draw order."""
    found: dict[str, None] = {}
    while len(found) < count:
        for item in draw(count - len(found)):
            if len(found) < count and item not in taken:
                found[item] = None
    return list(found)


def compounds(rng: numpy.random.Generator, count: int, taken: frozenset[str] = frozenset()) -> list[str]:
    """`count` distinct random adjective-noun compounds, none in `taken`."""
    adjectives, nouns = wonderwords_list("adjective"), wonderwords_list("noun")

    def draw(k):
        return [f"{adjectives[i // len(nouns)]}-{nouns[i % len(nouns)]}"
                for i in rng.integers(0, len(adjectives) * len(nouns), size=k).tolist()]

    return distinct(draw, count, taken)


def english_words(rng: numpy.random.Generator, count: int) -> list[str]:
    """`count` distinct random English words: single words in random order, then (beyond the ~8.2k
    the lists hold) compounds. The words drawn for `count` begin with those drawn for any smaller one."""
    pool = single_words()
    words = [pool[i] for i in rng.permutation(len(pool))[:count]]
    return words + compounds(rng, count - len(words), frozenset(pool)) if count > len(pool) else words

"""RULER's scorers, per sample, in [0, 1] (tables show them x100, averaged over samples, as RULER's
summary does before rounding).

Matching is a case-insensitive substring test of each reference in the model's output, after
RULER's post-processing (ends stripped, control characters \\x00-\\x1f turned into newlines).
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_output(text: str) -> str:
    """RULER's post-processing of a prediction."""
    return _CONTROL.sub("\n", text.strip()).strip()


def _found(output: str, references: list[str], name: str) -> list[bool]:
    if not references:
        raise ValueError(f"{name}: a sample needs at least one reference")
    text = clean_output(output).lower()
    return [ref.lower() in text for ref in references]


def string_match_all(output: str, references: list[str]) -> float:
    """Fraction of `references` found in `output` (RULER's metric for niah, vt, cwe and fwe)."""
    found = _found(output, references, "string_match_all")
    return sum(found) / len(found)


def string_match_part(output: str, references: list[str]) -> float:
    """1.0 if any of `references` is found in `output`, else 0.0 (RULER's metric for its QA tasks,
    whose references are alternative answers; lm-eval's version gives the fraction instead)."""
    return float(any(_found(output, references, "string_match_part")))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}

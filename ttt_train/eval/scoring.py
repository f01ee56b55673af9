"""RULER's scorers, per sample, in [0, 1] (tables show them x100 as RULER does).

Matching is a case-insensitive substring test of each reference in the model's output, after
RULER's post-processing (non-printable characters removed).
"""

from __future__ import annotations

import re

_NON_PRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean_output(text: str) -> str:
    """RULER's post-processing: control characters become spaces, ends stripped."""
    return _NON_PRINTABLE.sub(" ", text).strip()


def string_match_all(output: str, references: list[str]) -> float:
    """Fraction of `references` found in `output` (RULER's niah, vt, cwe, fwe metric)."""
    if not references:
        raise ValueError("string_match_all: a sample needs at least one reference")
    text = clean_output(output).lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def string_match_any(output: str, references: list[str]) -> float:
    """1.0 if any of `references` is found in `output`, else 0.0 (original RULER's QA metric)."""
    if not references:
        raise ValueError("string_match_any: a sample needs at least one reference")
    text = clean_output(output).lower()
    return float(any(ref.lower() in text for ref in references))


METRICS = {"string_match_all": string_match_all, "string_match_any": string_match_any}

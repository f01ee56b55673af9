"""A checkpoint's manifest: what it was trained with (model, TTT, layout, dtype, tokenizer, data),
and the differences from what a caller expects."""

from __future__ import annotations

import dataclasses
from pathlib import Path

# Configuration keys that do not change what the tensors mean: a label.
_MANIFEST_IGNORED = {"model": {"name"}}


def _as_dict(value):
    if value is None or isinstance(value, dict):
        return value
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"expected a config dataclass, a dict or None, got {type(value).__name__}")


def tokenizer_manifest(tokenizer) -> dict | None:
    """{"spec", "fingerprint", "vocab_size"} of a `Tokenizer` (spec made portable: "byte" or an absolute path)."""
    if tokenizer is None or isinstance(tokenizer, dict):
        return tokenizer
    spec = str(getattr(tokenizer, "spec", None) or tokenizer.name)
    if spec != "byte":
        spec = str(Path(spec).expanduser().resolve())
    return {"spec": spec, "fingerprint": tokenizer.fingerprint, "vocab_size": int(tokenizer.vocab_size)}


def build_manifest(model_cfg, ttt_cfg, parallel, dtype: str = "fp32", tokenizer=None,
                   data_fingerprint: str | None = None, datasets: dict[str, str] | None = None) -> dict:
    """What a checkpoint was trained with: model / TTT / parallel config (as dicts), dtype, tokenizer, data.

    `ttt_cfg` None (or disabled) records a model without TTT; `tokenizer` is a `Tokenizer` or its
    manifest dict. `datasets`: {dataset prefix: content identity} of the data it trains on.
    """
    ttt = _as_dict(ttt_cfg)
    if ttt is not None and not ttt.get("enabled", True):
        ttt = None
    return {"model": _as_dict(model_cfg), "ttt": ttt, "parallel": _as_dict(parallel), "dtype": dtype,
            "tokenizer": tokenizer_manifest(tokenizer), "data_fingerprint": data_fingerprint, "datasets": datasets}


def manifest_differences(stored: dict | None, expected: dict) -> list[str]:
    """'section.key: checkpoint X, expected Y' for every model / TTT / tokenizer difference, and
    every dataset both name whose content changed since the checkpoint was saved.

    Only the sections (and, inside `model` and `ttt`, the keys) present in `expected` are compared,
    so a caller can leave out what it means to change (e.g. `model.yarn` at a stage hand-off).
    The parallel layout, dtype and data fingerprint are never compared (loading reshards; a
    resume may change the blend), nor are datasets only one of them names.
    """
    if stored is None:
        return ["manifest: the checkpoint has none (saved without manifest=)"]
    diffs = []
    for section in ("model", "ttt"):
        if section not in expected:
            continue
        want, have = _as_dict(expected[section]), stored.get(section)
        if section == "ttt" and want is not None and not want.get("enabled", True):
            want = None
        if want is None or have is None:
            if (want is None) != (have is None):
                diffs.append(f"{section}: checkpoint {'has no TTT' if have is None else 'has TTT'}, "
                             f"expected {'none' if want is None else 'TTT'}")
            continue
        for key in sorted(set(want) - _MANIFEST_IGNORED.get(section, set())):
            if have.get(key, "<absent>") != want[key]:
                diffs.append(f"{section}.{key}: checkpoint {have.get(key, '<absent>')!r}, expected {want[key]!r}")
    want_tok, have_tok = expected.get("tokenizer"), stored.get("tokenizer")
    if want_tok and have_tok:
        want_tok = tokenizer_manifest(want_tok)
        if want_tok["fingerprint"] != have_tok["fingerprint"]:
            diffs.append(f"tokenizer: checkpoint {have_tok['spec']} (fingerprint {have_tok['fingerprint']}), "
                         f"expected {want_tok['spec']} (fingerprint {want_tok['fingerprint']})")
    have_data, want_data = stored.get("datasets") or {}, expected.get("datasets") or {}
    for prefix in sorted(set(have_data) & set(want_data)):
        if have_data[prefix] != want_data[prefix]:
            diffs.append(f"data: dataset {prefix} (.bin/.idx) changed since the checkpoint was saved (identity "
                         f"{have_data[prefix][:12]}, now {want_data[prefix][:12]}); put the original files back, "
                         f"or train on the new data in a new run folder")
    return diffs

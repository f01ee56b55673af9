"""Turning a plain mapping (YAML, Hydra, OmegaConf) into a config dataclass, refusing unknown keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


def checked_mapping(cls, values: Mapping, section: str) -> dict:
    """`values` as a plain dict after checking every key is a field of dataclass `cls`.

    Raises ValueError naming the unknown keys and the known ones, e.g. "unknown ttt config keys
    ['chunk']; known keys: [...]". OmegaConf nodes are resolved first.
    """
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(values, resolve=True) if OmegaConf.is_config(values) else dict(values)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {section} config keys {unknown}; known keys: {sorted(known)}")
    return values

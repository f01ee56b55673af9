"""Config dataclasses from plain mappings (YAML, Hydra, OmegaConf): unknown keys refused, every value
checked against its field's type annotation (not coerced) and range rule, errors naming `section.key`.

A field's rule lives in its metadata, written with `checked(default, ge=1)` and friends; nested config
dataclasses (e.g. `model.yarn`) are built and checked recursively. Supported annotations: `int`,
`float` (an int is accepted and widened to float), `bool`, `str`, `dict`, `list[T]`, a config
dataclass, and any of these `| None`. A bool is never an int here, and a string never a number or bool.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping


class ConfigError(ValueError):
    """A configuration refused before any compute; the message names the key and a fix."""


def checked(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, gt=None, ge=None, lt=None, le=None,
            choices=None, odd: bool = False, nonempty: bool = False):
    """A dataclass field with a range rule: gt/ge/lt/le bounds (numbers, or each element of a list),
    `choices` (allowed values), `odd` (odd integers only), `nonempty` (lists). None always passes
    (whether None is allowed is the annotation's business)."""
    rules = {k: v for k, v in dict(gt=gt, ge=ge, lt=lt, le=le, choices=choices, odd=odd, nonempty=nonempty).items()
             if v is not None and v is not False}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rules": rules})


def checked_mapping(cls, values: Mapping, section: str) -> dict:
    """`values` as a plain dict after checking every key is a field of dataclass `cls`.

    Raises ValueError naming the unknown keys and the known ones, e.g. "unknown ttt config keys
    ['chunk']; known keys: [...]". OmegaConf nodes are resolved first.
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(values):
        values = OmegaConf.to_container(values, resolve=True)
    if not isinstance(values, Mapping):
        raise ValueError(f"{section}: expected a mapping of {cls.__name__} keys, got {values!r}")
    values = dict(values)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise ValueError(f"unknown {section} config keys {unknown}; known keys: {sorted(known)}")
    return values


def build(cls, values: Mapping, section: str):
    """An instance of config dataclass `cls` from `values`: keys, types and range rules checked
    (nested config dataclasses built from their mappings). Cross-field checks are the caller's."""
    values = checked_mapping(cls, values, section)
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        values[name] = _convert(value, hints[name], f"{section}.{name}")
    obj = cls(**values)
    check_fields(obj, section)
    return obj


def check_fields(obj, section: str) -> None:
    """Check every field of config dataclass `obj` against its annotation and rule (recursively)."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        key = f"{section}.{field.name}"
        value = getattr(obj, field.name)
        _check_type(value, hints[field.name], key)
        _check_rules(value, field.metadata.get("rules", {}), key)
        if dataclasses.is_dataclass(value):
            check_fields(value, key)


def _options(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _describe(annotation) -> str:
    names = []
    for option in _options(annotation):
        if option is type(None):
            names.append("null")
        elif typing.get_origin(option) is list:
            names.append(f"a list of {_describe(typing.get_args(option)[0])}")
        elif dataclasses.is_dataclass(option):
            names.append(f"a mapping of {option.__name__} keys")
        else:
            names.append({int: "an integer", float: "a number", bool: "true/false", str: "a string",
                          dict: "a mapping"}.get(option, getattr(option, "__name__", str(option))))
    return " or ".join(names)


def _fail(value, annotation, key: str):
    raise ValueError(f"{key}: expected {_describe(annotation)}, got {value!r} ({type(value).__name__})")


def _convert(value, annotation, key: str):
    """`value` checked against `annotation`; mappings for config dataclasses become instances."""
    for option in _options(annotation):
        if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
            return build(option, value, key)
        if typing.get_origin(option) is list and isinstance(value, list):
            (element,) = typing.get_args(option)
            return [_convert(item, element, f"{key}[{i}]") for i, item in enumerate(value)]
    _check_type(value, annotation, key)
    return float(value) if float in _options(annotation) and type(value) is int else value


def _matches(value, option) -> bool:
    if option is type(None):
        return value is None
    if option is float:
        return type(value) in (int, float)
    if option is int:
        return type(value) is int
    if typing.get_origin(option) is list:
        (element,) = typing.get_args(option)
        return isinstance(value, list) and all(_matches(item, element) for item in value)
    if option is dict:
        return isinstance(value, dict)
    return isinstance(value, option)


def _check_type(value, annotation, key: str) -> None:
    if not any(_matches(value, option) for option in _options(annotation)):
        _fail(value, annotation, key)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}: must be a finite number, got {value!r}")


def _check_rules(value, rules: dict, key: str) -> None:
    if value is None or not rules:
        return
    if rules.get("nonempty") and isinstance(value, list) and not value:
        raise ValueError(f"{key}: must not be empty")
    for item in value if isinstance(value, list) else [value]:
        bounds = [(op, bound) for op, bound in rules.items() if op in ("gt", "ge", "lt", "le")]
        for op, bound in bounds:
            ok = {"gt": item > bound, "ge": item >= bound, "lt": item < bound, "le": item <= bound}[op]
            if not ok:
                want = " and ".join(f"{_SYMBOL[o]} {b}" for o, b in bounds)
                raise ValueError(f"{key}: must be {want}, got {item!r}")
        if "choices" in rules and item not in rules["choices"]:
            raise ValueError(f"{key}: must be one of {list(rules['choices'])}, got {item!r}")
        if rules.get("odd") and item % 2 == 0:
            raise ValueError(f"{key}: must be odd, got {item!r}")


_SYMBOL = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}

"""Hydra composition for every entry point: every key of the result checked, whatever the override
syntax, and Hydra's errors turned into one line naming the key and the closest known one.

Hydra refuses `key=value` for a key its config lacks (and advises `+key=value`), but `+key=value` and
`++key=value` add any key, so a misspelt `+optimzer.lr=1e-3` would sit in the config and change
nothing. Here every key must belong to the entry point's schema:

- a dataclass schema (the training driver's `TrainConfig`): every key of the composed config is a
  field, recursively (`first_unknown`); a `dict` field whose metadata has `keys_of` (a dataclass, or a
  function returning one) holds some of that dataclass's keys (a stage's overrides of a section);
- a YAML-only config (eval, demo, bench, convert: `compose_yaml`): the schema is what its YAML files
  compose to before the value overrides; the mappings named in `open_keys` take new entries (whose
  own keys are not checked), while the keys of their existing entries are.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ttt_train.config_keys import ConfigError


def parse(overrides: Sequence[str]) -> list:
    """Hydra `Override` objects of `overrides` (ConfigError on a syntax error)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(one_line(err)) from err


def one_line(err: BaseException) -> str:
    """`err`'s message (and its cause's, when not already in it) on one line. A ConfigError's message
    is complete: its cause (Hydra's own wording) is left out."""
    message = " ".join(str(err).split())
    cause = err.__cause__
    if cause is not None and not isinstance(err, ConfigError) and " ".join(str(cause).split()) not in message:
        message += ": " + " ".join(str(cause).split())
    return message


def closest(word: str, choices) -> str | None:
    """The choice most like `word` (a typo's intended key), or None when none is close."""
    choices = [str(c) for c in choices]
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if matches:
        return matches[0]
    started = sorted((c for c in choices if len(word) >= 3 and c.startswith(word)), key=len)  # a shortened key
    return started[0] if started else None


def unknown_key(key: str, depth: int, known) -> ConfigError:
    """The refusal of `key`, whose part number `depth` is not among `known`, naming the closest key."""
    parts = key.split(".")
    guess = closest(parts[depth], known)
    hint = f" (did you mean {'.'.join(parts[:depth] + [guess] + parts[depth + 1:])!r}?)" if guess else ""
    return ConfigError(f"unknown config key {key!r}{hint}; known keys of {'.'.join(parts[:depth]) or 'the root'}: "
                       f"{sorted(map(str, known))}")


# ----------------------------------------------------------------------------- dataclass schemas

def _options(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _dataclass_in(annotation):
    return next((o for o in _options(annotation) if dataclasses.is_dataclass(o)), None)


def _list_element_dataclass(annotation):
    for option in _options(annotation):
        if typing.get_origin(option) is list:
            return _dataclass_in(typing.get_args(option)[0])
    return None


def _keys_of(field: dataclasses.Field):
    target = field.metadata.get("keys_of")
    return target() if callable(target) and not dataclasses.is_dataclass(target) else target


def _child_schema(schema, name: str, index: bool = False):
    """('mapping' | 'list', dataclass) for field `name` of dataclass `schema`, or None (no schema below)."""
    field = {f.name: f for f in dataclasses.fields(schema)}[name]
    annotation = typing.get_type_hints(schema)[name]
    if _keys_of(field) is not None:
        return "mapping", _keys_of(field)
    if _dataclass_in(annotation) is not None:
        return "mapping", _dataclass_in(annotation)
    if _list_element_dataclass(annotation) is not None:
        return "list", _list_element_dataclass(annotation)
    return None


def first_unknown(value, schema, prefix: tuple[str, ...] = ()) -> tuple[str, int, list[str]] | None:
    """(dotted key, depth of its unknown part, the keys known there) of the first key of plain
    mapping `value` that dataclass `schema` does not have (recursively), or None."""
    names = [f.name for f in dataclasses.fields(schema)]
    for key, sub in value.items():
        if key not in names:
            path = (*prefix, str(key))
            while isinstance(sub, Mapping) and len(sub) == 1:  # `+optimzer.lr=1` names optimzer.lr
                (inner, sub), = sub.items()
                path = (*path, str(inner))
            return ".".join(path), len(prefix), names
        child = _child_schema(schema, key)
        if child is None:
            continue
        kind, cls = child
        if kind == "mapping" and isinstance(sub, Mapping):
            found = first_unknown(sub, cls, (*prefix, key))
        elif kind == "list" and isinstance(sub, list):
            found = next((f for i, item in enumerate(sub) if isinstance(item, Mapping)
                          for f in [first_unknown(item, cls, (*prefix, key, str(i)))] if f), None)
        else:
            found = None
        if found:
            return found
    return None


def _steps(schema, parts: list[str]):
    """(depth, dataclass holding `parts[depth]`) along dotted key `parts` from dataclass `schema`
    (list indices skipped); ends after a part the schema lacks or below which it says nothing."""
    cls, expect_index = schema, False
    for depth, part in enumerate(parts):
        if expect_index:
            if not part.isdigit():
                return
            expect_index = False
            continue
        yield depth, cls
        if part not in {f.name for f in dataclasses.fields(cls)}:
            return
        child = _child_schema(cls, part)
        if child is None:
            return
        kind, cls = child
        expect_index = kind == "list"


def _optional_dataclass(cls, name: str):
    """The dataclass field `name` of `cls` holds when typed `X | None`, else None."""
    if name not in {f.name for f in dataclasses.fields(cls)}:
        return None
    annotation = typing.get_type_hints(cls)[name]
    return _dataclass_in(annotation) if type(None) in _options(annotation) else None


def schema_lookup(schema, parts: list[str]) -> tuple[int, list[str]] | None:
    """(depth, known keys) of the first part of key `parts` that dataclass `schema` lacks, or None
    when every part is known (or the schema says nothing below some part)."""
    for depth, cls in _steps(schema, parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if parts[depth] not in names:
            return depth, names
    return None


def nullable_parent(schema, parts: list[str]) -> tuple[str, list[str]] | None:
    """(dotted path, field names) of the first prefix of key `parts` that `schema` types as an optional
    dataclass (null in a config, so a key below it cannot be set alone), or None."""
    for depth, cls in _steps(schema, parts[:-1]):
        found = _optional_dataclass(cls, parts[depth])
        if found is not None:
            return ".".join(parts[:depth + 1]), [f.name for f in dataclasses.fields(found)]
    return None


def optional_dataclass_at(schema, parts: list[str]):
    """The dataclass that `schema` types key `parts` with, when it is optional (`X | None`), else None."""
    steps = list(_steps(schema, parts))
    if not steps or steps[-1][0] != len(parts) - 1:
        return None
    return _optional_dataclass(steps[-1][1], parts[-1])


def check_schema(cfg, schema) -> None:
    """Refuse (ConfigError naming it and the closest known key) any key of composed config `cfg` that
    dataclass `schema` lacks."""
    from omegaconf import OmegaConf

    found = first_unknown(OmegaConf.to_container(cfg, resolve=False), schema)
    if found:
        raise unknown_key(*found)


# ----------------------------------------------------------------------------- Hydra errors

def explain(err: BaseException, lookup: Callable[[list[str]], tuple[int, list[str]] | str | None]) -> str:
    """Hydra's composition error in one line, with the unknown key named (and the closest known one)
    in place of Hydra's advice to append it with `+`. `lookup(parts)`: see `schema_lookup`; a string
    is a complete explanation."""
    message = one_line(err)
    match = re.search(r"Could not override '([^']+)'", message)
    if match:
        key = match.group(1).lstrip("+~")
        found = lookup(key.split("."))
        if isinstance(found, str):
            return found
        if found is not None:
            return str(unknown_key(key, *found))
        return re.sub(r" To append to your config use \+\S+", "", message)
    match = re.search(r"An item is already at '([^']+)'", message)
    if match:
        return f"{match.group(1)} is a key of this config already: set it without the '+' ({match.group(1)}=VALUE)"
    return message


# ----------------------------------------------------------------------------- YAML-only configs

def _node_lookup(reference, open_keys: Sequence[str]):
    """`lookup` for `explain` and the appended-key check, walking composed config `reference`."""
    from omegaconf import DictConfig, ListConfig

    def lookup(parts: list[str]):
        node = reference
        for depth, part in enumerate(parts):
            path = ".".join(parts[:depth])
            if path in open_keys and isinstance(node, DictConfig) and part not in node:
                return f"{path} takes new keys: add one with +{'.'.join(parts)}=VALUE"
            if isinstance(node, DictConfig):
                if part not in node:
                    return depth, list(node.keys())
                node = node._get_node(part)
            elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
                node = node._get_node(int(part))
            else:
                return None
        return None
    return lookup


def compose_yaml(config_dir: str | Path, config_name: str, overrides: Sequence[str], *,
                 open_keys: Sequence[str] = ()):
    """`config_name` of `config_dir` composed with Hydra `overrides` (no Hydra node), refusing
    (ConfigError, one line) an unknown key whatever its syntax: `key=`, `+key=` or `++key=` for a key
    the YAML files do not define, unless under one of `open_keys` (dotted paths of free mappings)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    parsed = parse(overrides)

    def composed(items: list[str]):
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            return compose(config_name, overrides=items, return_hydra_config=True)

    def reference(groups: set[str]):
        cfg = composed([o.input_line for o in parsed if o.key_or_group in groups])
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    try:
        cfg = composed(list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        try:
            groups = set(composed([]).hydra.runtime.choices)
            lookup = _node_lookup(reference(groups), open_keys)
        except (HydraException, OmegaConfBaseException):
            lookup = lambda parts: None  # noqa: E731 - the group choice itself is what failed
        raise ConfigError(explain(err, lookup)) from err
    groups = set(cfg.hydra.runtime.choices)
    appended = [o for o in parsed if (o.is_add() or o.is_force_add()) and o.key_or_group not in groups
                and not o.is_hydra_override()]
    if appended:
        lookup = _node_lookup(reference(groups), open_keys)
        for override in appended:
            found = lookup(override.key_or_group.split("."))
            if isinstance(found, tuple):
                raise unknown_key(override.key_or_group, *found)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.set_struct(cfg, True)
    return cfg

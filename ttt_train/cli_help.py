"""`--help` of the Hydra-configured entry points (train, convert, bench, demo).

`config_help(doc, config_file)` is the entry point's docstring, then its options: the commented YAML
file its `key=value` arguments override (every key with its default and meaning), then the config
groups that file composes (`GROUP=OPTION`) with their options. Reading the files needs no compose
and no megatron, so `--help` answers at once.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
HELP_FLAGS = ("-h", "--help")


def wants_help(argv: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def config_groups(config_file: Path, root: Path = CONFIG_ROOT) -> dict[str, list[str]]:
    """Group -> its options, for the `defaults:` entries of `config_file` that name a folder under `root`."""
    from omegaconf import OmegaConf

    groups = {}
    for entry in OmegaConf.to_container(OmegaConf.load(config_file)).get("defaults") or []:
        if not isinstance(entry, dict):
            continue
        name = next(iter(entry)).removeprefix("override ").lstrip("/").split("@")[0]
        folder = root / name
        if folder.is_dir():
            groups[name] = sorted(p.stem for p in folder.glob("*.yaml"))
    return groups


def config_help(doc: str, config_file: Path, root: Path = CONFIG_ROOT) -> str:
    """The help text (module docstring above): `doc`, `config_file`'s options and its groups."""
    where = config_file.relative_to(root.parent) if config_file.is_relative_to(root.parent) else config_file
    body = [line for line in config_file.read_text().splitlines() if not line.startswith("# @package")]
    lines = [doc.strip(), "", f"Options: KEY=VALUE overrides of {where} (defaults and meaning below):", ""]
    lines += [f"  {line}".rstrip() for line in body]
    groups = config_groups(config_file, root)
    if groups:
        lines += ["", "Config groups: GROUP=OPTION picks configs/GROUP/OPTION.yaml, then GROUP.KEY=VALUE sets its keys:"]
        lines += [f"  {name}: {', '.join(options)}" for name, options in groups.items()]
    return "\n".join(lines)

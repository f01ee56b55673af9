"""The on-disk layout of a checkpoint root: folder names, `latest`, `ttt_meta.json`, completeness.

Everything here reads the file system only (no torch.distributed): tools call it in one process,
the driver on rank 0.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from ttt_train.runtime import megatron_compat

LATEST = "latest"
META = "ttt_meta.json"
RANK_STATES = "rank_states"
FORMAT = 3  # 3: ttt_meta.json records every file's size and crc32 (`integrity`)
_NO_FOLDER = "the folder itself"


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def step_of(name: str) -> int | None:
    """The step of an `iter_XXXXXXX` folder name, None for any other name."""
    if name.startswith("iter_") and name[5:].isdigit():
        return int(name[5:])
    return None


def rank_state_file(folder: Path, rank: int) -> Path:
    return folder / RANK_STATES / f"rank_{rank:05d}.pt"


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` through a temporary file and a rename: readers see the old or the new content."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def missing_parts(path: Path) -> list[str]:
    """What a complete checkpoint folder has and `path` lacks ([] when complete)."""
    if not path.is_dir():
        return [_NO_FOLDER]
    missing = [name for name in (META,) + megatron_compat.dist_checkpoint_files(path) if not (path / name).exists()]
    if META not in missing:
        meta = read_meta(path)
        if meta.get("rank_states"):
            missing += [f"{RANK_STATES}/rank_{r:05d}.pt" for r in range(meta["world_size"])
                        if not rank_state_file(path, r).is_file()]
    return missing


def describe_missing(missing: list[str]) -> str:
    return "no such folder" if missing == [_NO_FOLDER] else f"lacks {', '.join(missing)}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """Path of the checkpoint `root/latest` names, or None if there is no `latest`.

    Raises FileNotFoundError naming the folder and what it lacks if that checkpoint is incomplete.
    A re-save interrupted between its two renames is found in its aside copy.
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.exists():
        asides = sorted(p for p in root.glob(f"{path.name}.old-*") if not missing_parts(p))
        if asides:
            return asides[0]
    missing = missing_parts(path)
    if missing:
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete "
                                f"({describe_missing(missing)}); point {pointer} at a complete iter_* folder "
                                f"or remove it to start afresh")
    return path


def resolve(path: str | os.PathLike) -> Path:
    """The iter_* folder `path` means: itself, or what a checkpoint root's `latest` names."""
    path = Path(path)
    if (path / LATEST).is_file():
        return latest_checkpoint(path)
    missing = missing_parts(path)
    if missing:
        raise FileNotFoundError(f"{path} is not a complete ttt-train checkpoint ({describe_missing(missing)}); "
                                f"give an iter_* folder or a checkpoint root holding '{LATEST}'")
    return path


def read_checkpoint_info(path: str | os.PathLike) -> dict:
    """{"step", "manifest", "metadata", "path"} of a checkpoint (an iter_* folder or a root with `latest`).

    Needs no torch.distributed. `manifest` is None for checkpoints saved without one.
    """
    path = resolve(path)
    meta = read_meta(path)
    return {"step": meta["step"], "manifest": meta.get("manifest"), "metadata": meta.get("metadata", {}),
            "path": path}

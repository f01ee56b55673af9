"""Saving a checkpoint: every rank writes into a temporary folder, rank 0 publishes it by rename."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from ttt_train.checkpoint import integrity, ranks, sharded
from ttt_train.checkpoint.format import (
    FORMAT,
    LATEST,
    META,
    checkpoint_name,
    latest_checkpoint,
    missing_parts,
    rank_state_file,
    read_meta,
    step_of,
    write_atomic,
)
from ttt_train.checkpoint.integrity import ALGORITHM


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank (a full disk, an I/O error); raised alike on every rank.
    Nothing was published: `latest` names the checkpoint it named before, and the partial folder is
    removed. `disk_full` tells a full disk (or quota) from other failures."""

    def __init__(self, message: str, disk_full: bool):
        super().__init__(message)
        self.disk_full = disk_full


_DISK_FULL = ("No space left on device", "Disk quota exceeded")


def save_checkpoint(root: str | os.PathLike, step: int, model_chunks, optimizer=None, metadata: dict | None = None,
                    *, manifest: dict | None = None, rank_state=None, keep_last: int | None = None) -> Path:
    """Save model (and optimizer) state of all ranks as checkpoint `step` under `root`; return its path.

    Collective: every rank calls it. `metadata`: JSON-serialisable step-level state. `manifest`:
    from `build_manifest`. `rank_state`: any torch.save-able object of this rank (RNG states, data
    position), read back with `load_rank_state`. `keep_last`: afterwards keep only the newest K
    complete checkpoints (the one just saved always stays). Every file's size and crc32 go into
    ttt_meta.json (see `integrity`).

    Before writing, the free space of `root` is compared with the checkpoint's expected size (the
    previous checkpoint's, else the tensor bytes to write); too little space, or any write that
    fails on any rank, raises CheckpointSaveError on every rank and leaves `latest` as it was.
    """
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")
    meta_text = json.dumps({"format": FORMAT, "step": step, "metadata": metadata or {}, "manifest": manifest},
                           indent=1)  # fails early, on every rank alike, if not JSON-serialisable
    root = Path(root)
    final = root / checkpoint_name(step)
    state = sharded.model_state(model_chunks)
    model_shapes = sharded.global_shapes(state)
    if optimizer is not None:
        state["optimizer"] = sharded.optimizer_state(optimizer, state, is_loading=False)
    needed = ranks.on_rank0(lambda: _previous_size(root), f"reading the checkpoints of {root}") or \
        sharded.state_bytes(state)
    tmp, files = _write(root, final, state, rank_state, needed)
    has_rank_state = ranks.gather(rank_state is not None)

    def publish() -> str:
        meta = json.loads(meta_text)
        meta.update(world_size=ranks.world(), rank_states=all(has_rank_state), optimizer=optimizer is not None,
                    model_keys=sorted(model_shapes), files=files, checksum=ALGORITHM)
        write_atomic(tmp / META, json.dumps(meta, indent=1))
        aside = None
        if final.exists():  # an older save of the same step: replace it without a gap
            aside = root / f"{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, aside)
        os.replace(tmp, final)
        write_atomic(root / LATEST, final.name + "\n")
        _remove_leftovers(root)
        if keep_last is not None:
            _keep_newest(root, keep_last, final.name)
        return str(final)

    try:
        return Path(ranks.on_rank0(publish, f"publishing checkpoint {final}"))
    except RuntimeError as err:
        raise _save_error(root, final, str(err), needed, tmp) from err


def _write(root: Path, final: Path, state: dict, rank_state, needed: int) -> tuple[Path, dict]:
    """Collective: every rank's part of the checkpoint written into a new temporary folder; returns
    it and its files' record. Raises CheckpointSaveError on every rank if any rank failed."""

    def make_tmp() -> str:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"{_DISK_FULL[0]} (not started: too little free space)", str(root))
        tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return str(tmp)

    try:
        tmp = Path(ranks.on_rank0(make_tmp, f"creating a checkpoint folder under {root}"))
    except RuntimeError as err:
        raise _save_error(root, final, str(err), needed, None) from err
    error = None
    try:
        sharded.save(state, tmp)
        if rank_state is not None:
            _write_rank_state(tmp, rank_state)
    except sharded.write_errors() as err:  # reported on every rank below
        error = sharded.failure_cause(err)
    errors = [(r, e) for r, e in enumerate(ranks.gather(error)) if e]
    if errors:
        raise _save_error(root, final, f"rank {errors[0][0]}: {errors[0][1]}", needed, tmp)
    try:
        return tmp, integrity.record(tmp)
    except (OSError, RuntimeError) as err:
        raise _save_error(root, final, str(err), needed, tmp) from err


def _save_error(root: Path, final: Path, cause: str, needed: int, tmp: Path | None) -> CheckpointSaveError:
    """Collective: the partial folder removed and the message written by rank 0; the error every rank raises."""
    disk_full = any(text in cause for text in _DISK_FULL)

    def clean_up_and_describe() -> str:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            free = None
        pointer = root / LATEST
        kept = f"{pointer} still names {pointer.read_text().strip()}" if pointer.is_file() else "no earlier checkpoint"
        space = f"{_gib(free)} free there, the checkpoint needs about {_gib(needed)}"
        return f"checkpoint {final} not saved ({'disk full' if disk_full else 'failed'}: {cause}); {space}; {kept}"

    return CheckpointSaveError(ranks.on_rank0(clean_up_and_describe, f"cleaning up after a failed save of {final}"),
                               disk_full)


def _gib(size: int | None) -> str:
    return "?" if size is None else f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def _previous_size(root: Path) -> int | None:
    """Bytes of the checkpoint `root/latest` names (from its record), None if unknown."""
    try:
        path = latest_checkpoint(root)
        files = read_meta(path).get("files") if path is not None else None
    except (OSError, ValueError):
        return None
    return sum(size for size, _ in files.values()) if files else None


def _write_rank_state(folder: Path, rank_state) -> None:
    target = rank_state_file(folder, ranks.rank())
    target.parent.mkdir(exist_ok=True)
    buf = io.BytesIO()
    torch.save(rank_state, buf)
    write_atomic(target, buf.getvalue())


def _remove_leftovers(root: Path) -> None:
    """Delete `*.tmp-*` and `*.old-*` folders (crashed or replaced saves) and stray `latest` temp files."""
    for path in root.iterdir():
        if path.is_dir() and (".tmp-" in path.name or ".old-" in path.name) and path.name.startswith("iter_"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name.startswith(f".{LATEST}."):
            path.unlink(missing_ok=True)


def _keep_newest(root: Path, keep: int, current: str) -> None:
    complete = sorted((p for p in root.iterdir() if step_of(p.name) is not None and not missing_parts(p)),
                      key=lambda p: step_of(p.name))
    for path in complete[:-keep]:
        if path.name != current:  # renamed first, so a crash mid-delete leaves no half folder
            aside = root / f"{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, aside)
            shutil.rmtree(aside)

"""Saving a checkpoint: every rank writes into a temporary folder, rank 0 publishes it by rename."""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from ttt_train.checkpoint import ranks, sharded
from ttt_train.checkpoint.format import (
    FORMAT,
    LATEST,
    META,
    checkpoint_name,
    missing_parts,
    rank_state_file,
    step_of,
    write_atomic,
)


def save_checkpoint(root: str | os.PathLike, step: int, model_chunks, optimizer=None, metadata: dict | None = None,
                    *, manifest: dict | None = None, rank_state=None, keep_last: int | None = None) -> Path:
    """Save model (and optimizer) state of all ranks as checkpoint `step` under `root`; return its path.

    Collective: every rank calls it. `metadata`: JSON-serialisable step-level state. `manifest`:
    from `build_manifest`. `rank_state`: any torch.save-able object of this rank (RNG states, data
    position), read back with `load_rank_state`. `keep_last`: afterwards keep only the newest K
    complete checkpoints (the one just saved always stays).
    """
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")
    meta_text = json.dumps({"format": FORMAT, "step": step, "metadata": metadata or {}, "manifest": manifest},
                           indent=1)  # fails early, on every rank alike, if not JSON-serialisable
    root = Path(root)
    final = root / checkpoint_name(step)

    def make_tmp() -> str:
        tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return str(tmp)

    tmp = Path(ranks.on_rank0(make_tmp, f"creating a checkpoint folder under {root}"))
    state = sharded.model_state(model_chunks)
    model_shapes = sharded.global_shapes(state)
    if optimizer is not None:
        state["optimizer"] = sharded.optimizer_state(optimizer, state, is_loading=False)
    sharded.save(state, tmp)
    error = None
    if rank_state is not None:
        try:
            _write_rank_state(tmp, rank_state)
        except Exception as err:  # noqa: BLE001 - reported on every rank by agree
            error = f"{type(err).__name__}: {err}"
    ranks.agree(error, f"writing the rank states of {final}")
    has_rank_state = ranks.gather(rank_state is not None)

    def publish() -> str:
        meta = json.loads(meta_text)
        meta.update(world_size=ranks.world(), rank_states=all(has_rank_state), optimizer=optimizer is not None,
                    model_keys=sorted(model_shapes))
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

    return Path(ranks.on_rank0(publish, f"publishing checkpoint {final}"))


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

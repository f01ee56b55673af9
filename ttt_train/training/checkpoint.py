"""Atomic, resharding checkpoints with megatron's dist_checkpointing.

Layout of a checkpoint root:

    root/
      iter_0000100/          one complete checkpoint (dist_checkpointing torch_dist format)
        ... megatron shards ...
        ttt_meta.json        step and user metadata (written last, inside the temporary folder)
      latest                 text file: name of the newest complete checkpoint

A save writes into `iter_XXXXXXX.tmp-<nonce>`, renames it into place only when every rank has
finished, and then replaces `latest` atomically; a crash at any point leaves the previous
checkpoint and `latest` untouched. Loading works at any TP/PP layout (dist_checkpointing reshards).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch.distributed as dist

LATEST = "latest"
META = "ttt_meta.json"


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def _model_keys(model_chunks) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _sharded_model_state(model_chunks) -> dict:
    """Sharded state dicts of the bare models (wrappers such as DDP and Float16Module removed)."""
    from megatron.core.utils import unwrap_model

    return {key: unwrap_model(chunk).sharded_state_dict()
            for key, chunk in zip(_model_keys(model_chunks), model_chunks)}


def _broadcast_str(value: str | None) -> str:
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def save_checkpoint(root: str | os.PathLike, step: int, model_chunks, optimizer=None,
                    metadata: dict | None = None) -> Path:
    """Save model (and optimizer) state of all ranks as checkpoint `step`; return its final path.

    Collective: every rank calls it. `metadata` (JSON-serialisable) is stored with the step.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = Path(_broadcast_str(str(root / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}") if dist.get_rank() == 0
                              else None))
    if dist.get_rank() == 0:
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _sharded_model_state(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state))
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / META).write_text(json.dumps({"step": step, "metadata": metadata or {}}, indent=1))
        if final.exists():  # an older save of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
    dist.barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """Path of the newest complete checkpoint under `root`, or None if there is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / META).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete; "
                                f"remove {pointer} or point it at a complete iter_* folder")
    return path


def load_checkpoint(path: str | os.PathLike, model_chunks, optimizer=None, *, strict: bool = True) -> dict:
    """Load a checkpoint folder (or a root with `latest`) into `model_chunks` (and `optimizer`).

    Returns the stored {"step", "metadata"}. Works across TP/PP layouts.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if (path / LATEST).is_file():
        path = latest_checkpoint(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete ttt-train checkpoint (no {META})")
    from megatron.core.utils import unwrap_model

    state = _sharded_model_state(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return json.loads((path / META).read_text())

"""The few collectives a checkpoint needs: agreeing on an error, running something on rank 0 only.

Without torch.distributed (a single process, e.g. reading a checkpoint in a tool) they run alone.
"""

from __future__ import annotations

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def gather(value) -> list:
    """Collective: every rank's `value` (a picklable object), in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * world()
    dist.all_gather_object(values, value)
    return values


def agree(error: str | None, what: str) -> None:
    """Collective: raise the same RuntimeError on every rank if any rank reports an error."""
    bad = [(r, e) for r, e in enumerate(gather(error)) if e]
    if bad:
        raise RuntimeError(f"{what} failed on rank {bad[0][0]}: {bad[0][1]}")


def on_rank0(fn, what: str):
    """Run `fn()` on rank 0; every rank raises if it failed. Returns fn's (broadcast) result."""
    holder = [None, None]
    if rank() == 0:
        try:
            holder = [fn(), None]
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            holder = [None, f"{type(err).__name__}: {err}"]
    if dist.is_initialized():
        dist.broadcast_object_list(holder, src=0)
    if holder[1]:
        raise RuntimeError(f"{what} failed on rank 0: {holder[1]}")
    return holder[0]

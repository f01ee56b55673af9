"""The distributed exclusive scan's entry point: one contract, two algorithms (``ring``, ``log``).

All ranks of the group must make the same calls (forward and backward), like any collective,
whatever the data: the messages each rank sends depend only on ``(cp, rank, layout, algorithm)``
and on whether late sums are used.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .layout import num_segments
from .log import LogForward, log_backward
from .messages import ScanStats
from .ring import RingForward, ring_backward

ALGORITHMS = ("ring", "log")
_IMPLEMENTATIONS = {"ring": (RingForward, ring_backward), "log": (LogForward, log_backward)}


class _CPScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys, sums, state, backward):
        pk, ps = state.finish()
        ctx.mark_non_differentiable(pk)
        ctx.save_for_backward((pk == keys).long())  # gates: the segment's prefix carries through it
        ctx.scan_backward = backward
        return pk, ps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_keys, grad_sums):
        (gates,) = ctx.saved_tensors
        return None, ctx.scan_backward(grad_sums.contiguous(), gates), None, None


def cp_exclusive_scan(keys: torch.Tensor, sums: torch.Tensor | list, *, group: Any = None,
                      layout: str = "load_balanced", while_waiting: Callable[[], Any] | None = None,
                      algorithm: str = "ring", stats: ScanStats | None = None,
                      wire_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Exclusive prefix of this rank's segments over the CP ``group`` (None: the default group).

    keys ``[m, B]`` int64 (document id at each local segment's end, non-decreasing along the
    sequence, >= 0), sums ``[m, B, d, h]`` float (the segment's last-document update sum), for the
    rank's ``m`` local segments in local order (m = 1 contiguous, 2 load-balanced: [seg r; seg
    2cp-1-r]). Returns ``(prefix_keys [m, B], prefix_sums [m, B, d, h], extra)``: each local
    segment's exclusive prefix (key -1 and zeros for the first segment of the sequence).
    ``prefix_sums`` is differentiable w.r.t. ``sums`` (backward = the mirror suffix scan); keys get none.

    ``algorithm``: ``"ring"`` (the chain, ``2*(cp-1)`` dependent hops load-balanced, each rank
    sending at most one state per pass) or ``"log"`` (hypercube, ``ceil(log2 cp)`` rounds, +1 in
    the forward with late sums, about two states per round). Both equal the single-process
    reference to rounding. ``stats``: a :class:`ScanStats` filled with this rank's counted rounds,
    messages and bytes (forward by the call, backward when autograd runs it). ``wire_dtype``: the
    dtype partial sums travel in (None: the sums'); e.g. bfloat16 halves the bytes, each message
    rounding what it carries while every sum still accumulates in the sums' dtype.

    ``while_waiting``: called exactly once, with grad mode as at the call site, after this rank
    has sent what it can and posted its first receive, before waiting on it; its result is
    returned as ``extra`` (None without it).

    Late sums: ``sums`` may be a list of m tensors ``[B, d, h]`` whose trailing entries are None
    (the first must be given). Those segments' sums are computed by ``while_waiting``, which then
    returns ``(extra, [late sums in order])``; the scan sends nothing that needs them before they
    exist. Load-balanced, a rank's second segment is first needed on the return pass (ring) or
    in the second round (log: its stream runs one round behind), so its sum (and any work
    producing it) overlaps the wait for the first messages.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown CP scan algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    group = group if group is not None else dist.group.WORLD
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    if cp_rank < 0:
        raise ValueError("this rank is not a member of the given CP group")
    m = num_segments(cp_size, layout) // cp_size
    if keys.dim() != 2 or keys.dtype != torch.int64 or keys.shape[0] != m:
        raise ValueError(f"keys must be int64 [m={m}, B] for layout {layout!r}, got "
                         f"{keys.dtype} {tuple(keys.shape)}")
    parts = list(sums)
    late = [i for i, part in enumerate(parts) if part is None]
    if late and (late[0] == 0 or late != list(range(late[0], len(parts))) or while_waiting is None):
        raise ValueError("late sums: only trailing entries of `sums` may be None, the first must be given, "
                         "and while_waiting must produce them")
    first = parts[0]
    if len(parts) != m or first.dim() != 3 or first.shape[0] != keys.shape[1] or not first.is_floating_point() \
            or any(p is not None and (p.shape, p.dtype) != (first.shape, first.dtype) for p in parts):
        raise ValueError(f"sums must be floating [m={m}, B={keys.shape[1]}, d, h], got "
                         f"{first.dtype} {(len(parts),) + tuple(first.shape)}")
    wire = wire_dtype if wire_dtype is not None else first.dtype
    if not wire.is_floating_point:
        raise ValueError(f"wire_dtype must be a floating dtype, got {wire}")
    stats = stats if stats is not None else ScanStats()
    stats.algorithm, stats.cp = algorithm, cp_size
    forward_cls, backward_fn = _IMPLEMENTATIONS[algorithm]
    state = forward_cls(keys, parts, group, cp_rank, cp_size, layout, stats.forward, wire)
    state.start()
    extra = while_waiting() if while_waiting is not None else None
    if late:
        extra, late_sums = extra
        if len(late_sums) != len(late):
            raise ValueError(f"while_waiting returned {len(late_sums)} late sums for {len(late)} missing")
        parts[late[0]:] = late_sums
    full = torch.stack(parts)
    state.provide(full)
    backward = partial(backward_fn, group=group, cp_rank=cp_rank, cp_size=cp_size, layout=layout,
                       count=stats.backward, wire=wire)
    pk, ps = _CPScan.apply(keys, full, state, backward)
    return pk, ps, extra

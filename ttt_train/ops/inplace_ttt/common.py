"""Input validation, chunk/document bookkeeping and the differentiable clip, shared by the ops.

Conventions (METHOD.md sections 2-5): ``z`` ``[B, T, h]``, ``v`` ``[B, T, d]``, ``weight``
``[d, h]``; chunk ``i`` holds tokens ``[i*C, (i+1)*C)`` of the given sequence; ``doc_ids``
``[B, T]`` is a non-decreasing integer document index and the fast weight resets where it changes.
"""

from __future__ import annotations

import bisect
import math
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the fast-weight state and of update accumulation: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_inputs(z: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, *, chunk_size: int, lr: float,
                 doc_ids: torch.Tensor | None = None, max_update_norm: float | None = None,
                 initial_state: torch.Tensor | None = None) -> tuple[float, float | None]:
    """Validate the arguments of the TTT ops; return ``(lr, max_update_norm)`` as Python floats.

    Raises ValueError naming the argument, what is wrong and what would fix it.
    """
    named = (("z", z), ("v", v), ("weight", weight))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32/float64/bfloat16/float16, got {t.dtype}")
    if z.dim() != 3:
        raise ValueError(f"z must be [B, T, h], got shape {_shape(z)}")
    B, T, h = z.shape
    if T < 1:
        raise ValueError(f"z must hold at least one token (T >= 1), got shape {_shape(z)}")
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be [d, h] with h = z.shape[-1] = {h}, got shape {_shape(weight)}")
    d = weight.shape[0]
    if v.dim() != 3 or tuple(v.shape) != (B, T, d):
        raise ValueError(f"v must be [B, T, d] = {[B, T, d]} (B, T from z, d from weight), got shape {_shape(v)}")
    if len({t.dtype for _, t in named}) > 1:
        raise ValueError("z, v and weight must share one dtype, got " + ", ".join(f"{n} {t.dtype}" for n, t in named))
    if len({t.device for _, t in named}) > 1:
        raise ValueError("z, v and weight must be on one device, got " + ", ".join(f"{n} {t.device}" for n, t in named))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    lr = _finite_float("lr", lr)
    if lr < 0:
        raise ValueError(f"lr (inner learning rate) must be >= 0, got {lr}")
    if max_update_norm is not None:
        max_update_norm = _finite_float("max_update_norm", max_update_norm)
        if max_update_norm <= 0:
            raise ValueError(f"max_update_norm must be > 0 (or None for no clipping), got {max_update_norm}")
    if doc_ids is not None:
        check_doc_ids(doc_ids, B, T, z.device)
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
            raise ValueError("initial_state must be a floating-point tensor [B, d, h] (or None)")
        if tuple(initial_state.shape) != (B, d, h):
            raise ValueError(f"initial_state must be [B, d, h] = {[B, d, h]}, got shape {_shape(initial_state)}")
        if initial_state.device != z.device:
            raise ValueError(f"initial_state must be on {z.device}, got {initial_state.device}")
    return lr, max_update_norm


def check_doc_ids(doc_ids: torch.Tensor, B: int, T: int, device: torch.device) -> None:
    """doc_ids: integer ``[B, T]``, >= 0, non-decreasing along T, on ``device``."""
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex \
            or doc_ids.dtype == torch.bool:
        raise ValueError("doc_ids must be an integer tensor [B, T] (e.g. torch.int64) or None")
    if tuple(doc_ids.shape) != (B, T):
        raise ValueError(f"doc_ids must be [B, T] = {[B, T]}, got shape {_shape(doc_ids)}")
    if doc_ids.device != device:
        raise ValueError(f"doc_ids must be on {device}, got {doc_ids.device}")
    if bool((doc_ids < 0).any()):
        raise ValueError("doc_ids must be >= 0")
    if T > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
        row = int((doc_ids[:, 1:] < doc_ids[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"doc_ids must be non-decreasing along T (documents are contiguous); row {row} decreases")


def _finite_float(name: str, x) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a real number, got {x!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


class TTTStats(NamedTuple):
    """What one call of the TTT op did (``return_stats=True``), detached.

    ``update_norms`` ``[U]``: ``||lr V^T Z||_F`` before clipping (of the whole matrix under
    ``norm_group``) of every update the forward computes: the last document of each chunk, the last
    chunk only with ``output_final_state``; rows in order, chunks in order. ``clipped`` ``[U]`` bool:
    which of them were clipped. ``last_state`` ``[B, d, h]`` (state dtype): the fast weight the last
    chunk applies to its first document's tokens (the tensor the backward keeps anyway).
    """

    update_norms: torch.Tensor
    clipped: torch.Tensor
    last_state: torch.Tensor


class Chunk(NamedTuple):
    """One chunk of one sequence as token offsets ``start <= fresh <= end``, ``start <= last < end``.

    Rows ``[start, fresh)`` are the document running at the chunk start (its state carried from
    earlier chunks, or ``weight`` when ``reset``: the document starts exactly at ``start``); rows
    ``[fresh, end)`` are documents that start inside the chunk (they use ``weight``); rows
    ``[last, end)`` are the chunk's last document, the only piece whose update can matter later.
    ``fresh == end`` iff ``last == start`` (one document). ``doc_chunk`` is the chunk where the
    document of row ``start`` starts; ``first_doc`` says it is the sequence's first document.
    """

    start: int
    fresh: int
    last: int
    end: int
    reset: bool
    doc_chunk: int
    first_doc: bool


def doc_starts(doc_ids: torch.Tensor | None, B: int) -> list[list[int]]:
    """Per row, the sorted token offsets (> 0) where a new document starts."""
    if doc_ids is None or doc_ids.shape[1] < 2:
        return [[] for _ in range(B)]
    rows: list[list[int]] = [[] for _ in range(B)]
    for b, t in (doc_ids[:, 1:] != doc_ids[:, :-1]).nonzero().tolist():
        rows[b].append(t + 1)
    return rows


def chunk_plan(starts: list[int], T: int, C: int) -> list[Chunk]:
    """The chunks of one sequence of length ``T`` with document starts ``starts`` (see :class:`Chunk`)."""
    plan = []
    for s in range(0, T, C):
        e = min(s + C, T)
        lo = bisect.bisect_right(starts, s)  # starts[lo:] are > s
        hi = bisect.bisect_left(starts, e)  # starts[lo:hi] lie strictly inside (s, e)
        p = starts[lo - 1] if lo > 0 else 0  # start of the document of row s
        plan.append(Chunk(start=s, fresh=starts[lo] if lo < hi else e, last=starts[hi - 1] if lo < hi else s,
                          end=e, reset=(s > 0 and p == s), doc_chunk=p // C, first_doc=(p == 0)))
    return plan


def clip_update(m: torch.Tensor, lr: float, max_update_norm: float | None, norm_group=None) -> torch.Tensor:
    """``lr * m`` rescaled to Frobenius norm ``max_update_norm`` when larger (plain autograd).

    With ``norm_group`` the squared norm is summed over the group (``h`` sharded across it), with
    a differentiable all-reduce, so every shard sees the norm of the whole matrix.
    """
    u = lr * m
    if max_update_norm is None:
        return u
    sq = (u * u).sum()
    if norm_group is not None:
        import torch.distributed.nn.functional as dist_fn

        sq = dist_fn.all_reduce(sq, group=norm_group)
    norm = sq.sqrt()
    clipped = norm > max_update_norm
    one = torch.ones_like(norm)
    return u * torch.where(clipped, max_update_norm / torch.where(clipped, norm, one), one)

"""Distributed exclusive scan of segment states over a context-parallel group (ring P2P).

Semantics are those of :func:`naive.exclusive_scan_reference` on the global segment order (see
``layout.py``). The running prefix travels along the chain of segments in global order, one
``isend``/``irecv`` per hop between different ranks: load-balanced, ranks 0 -> 1 -> ... -> cp-1
(first-half shards), then cp-1 -> ... -> 0 (second-half shards). Because it is the same left fold
as the reference (same order of additions), results match it to rounding.

Backward is the mirror-image suffix scan along the reversed chain. With gate
``g_t = [prefix_key_t == key_t]`` (forward: ``P_{t+1} = S_t + g_t P_t``) and ``G_t`` the gradient of
prefix ``t``: ``R_t = G_t + g_t R_{t+1}`` (``R_n = 0``) and ``dL/dS_t = R_{t+1}``. Only ``R`` travels
(the gates are local), so a backward message carries no key.

All ranks of the group must make the same calls (forward and backward), like any collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .layout import chain_walk, num_segments
from .naive import IDENTITY_KEY

_FWD_TAG = 7301
_BWD_TAG = 7302


def _message(batch: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An empty uint8 message ``[key bytes ; S bytes]`` and its key / S views (key first keeps the
    S part aligned); the sender writes the running state straight into it (no extra copy)."""
    msg = torch.empty(8 * batch + state.numel() * state.element_size(), dtype=torch.uint8,
                      device=state.device)
    key, s = _unpack(msg, batch, state.shape, state.dtype)
    return msg, key, s


def _unpack(msg: torch.Tensor, batch: int, shape: torch.Size, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    nk = 8 * batch
    return msg[:nk].view(torch.int64), msg[nk:].view(dtype).view(shape)


class _Chain:
    """Walks this rank's part of the chain; ``step(i, incoming, want_out)`` consumes a received
    message (None: the state is local or the chain starts here) and returns the message to send.

    At most one receive is outstanding and every rank posts its sends / receives in chain order,
    so the per-peer order of P2P operations agrees on both ends (no deadlock on backends such as
    NCCL that serialise P2P operations on a stream)."""

    def __init__(self, group, walk, tag: int, msg_numel: int, msg_dtype: torch.dtype, device,
                 step: Callable[[int, torch.Tensor | None, bool], torch.Tensor | None],
                 ready: Callable[[int], bool] = lambda i: True):
        self.group, self.walk, self.tag, self.step, self.ready = group, walk, tag, step, ready
        self.msg_numel, self.msg_dtype, self.device = msg_numel, msg_dtype, device
        self.pos, self.recv, self.sends = 0, None, []

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r)

    def run(self, block: bool) -> None:
        """Advance; with ``block=False`` stop (receive posted) at the first state from another rank,
        or before a local segment whose sum is not ready yet."""
        while self.pos < len(self.walk):
            i, _, src, dst = self.walk[self.pos]
            if not block and not self.ready(i):
                return
            msg = None
            if src is not None:
                if self.recv is None:
                    buf = torch.empty(self.msg_numel, dtype=self.msg_dtype, device=self.device)
                    self.recv = (buf, dist.irecv(buf, src=self._global(src), group=self.group, tag=self.tag))
                if not block:
                    return
                msg, work = self.recv
                work.wait()
                self.recv = None
            out = self.step(i, msg, dst is not None)
            if dst is not None:
                self.sends.append((out, dist.isend(out, dst=self._global(dst), group=self.group, tag=self.tag)))
            self.pos += 1
        if block:
            for _, work in self.sends:
                work.wait()
            self.sends.clear()


class _Forward:
    """State of one forward call: local inputs (detached), outputs, and the chain."""

    def __init__(self, keys, sums: list, group, cp_rank, cp_size, layout):
        self.keys, self.sums = keys, [s.detach() if s is not None else None for s in sums]
        self.group, self.cp_rank, self.cp_size, self.layout = group, cp_rank, cp_size, layout
        m, b = keys.shape
        first = self.sums[0]
        self.shape, self.dtype = first.shape, first.dtype
        self.out_k: list = [None] * m
        self.out_s: list = [None] * m
        self.carry = None
        nbytes = 8 * b + first.numel() * first.element_size()
        self.chain = _Chain(group, chain_walk(cp_size, layout, cp_rank), _FWD_TAG, nbytes, torch.uint8,
                            first.device, self._step, ready=lambda i: self.sums[i] is not None)

    def _step(self, i: int, msg, want_out: bool):
        if msg is not None:
            pk, ps = _unpack(msg, self.keys.shape[1], self.shape, self.dtype)
        elif self.carry is not None:
            pk, ps = self.carry
        else:  # start of the chain: identity
            pk, ps = torch.full_like(self.keys[i], IDENTITY_KEY), torch.zeros_like(self.sums[i])
        self.out_k[i], self.out_s[i] = pk, ps
        gate = (pk == self.keys[i]).to(ps.dtype)[:, None, None]
        if not want_out:
            self.carry = (self.keys[i], torch.addcmul(self.sums[i], gate, ps))
            return None
        msg, key, s = _message(self.keys.shape[1], ps)
        key.copy_(self.keys[i])
        torch.addcmul(self.sums[i], gate, ps, out=s)
        self.carry = (key, s)
        return msg

    def provide(self, sums: torch.Tensor) -> None:
        """All local sums `[m, B, d, h]`, once the late ones exist."""
        self.sums = list(sums.detach())

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            self.chain.run(block=True)
        return torch.stack(self.out_k), torch.stack(self.out_s)


def _backward(grad: torch.Tensor, gates: torch.Tensor, group, cp_rank, cp_size, layout) -> torch.Tensor:
    """Suffix scan of prefix gradients ``grad`` ``[m, B, d, h]``; returns d loss / d local sums."""
    out: list = [None] * grad.shape[0]
    carry = [None]

    def step(i: int, msg, want_out: bool):
        q = msg.view(grad.shape[1:]) if msg is not None else carry[0]
        if q is None:  # last segment of the sequence: nothing after it
            q = torch.zeros_like(grad[i])
        out[i] = q
        carry[0] = grad[i] + gates[i] * q
        return carry[0].contiguous() if want_out else None

    chain = _Chain(group, chain_walk(cp_size, layout, cp_rank, reverse=True), _BWD_TAG,
                   grad[0].numel(), grad.dtype, grad.device, step)
    chain.run(block=True)
    return torch.stack(out)


class _CPScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys, sums, state: _Forward):
        pk, ps = state.finish()
        ctx.mark_non_differentiable(pk)
        ctx.save_for_backward((pk == keys).to(sums.dtype)[..., None, None])
        ctx.meta = (state.group, state.cp_rank, state.cp_size, state.layout)
        return pk, ps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_keys, grad_sums):
        (gates,) = ctx.saved_tensors
        return None, _backward(grad_sums.contiguous(), gates, *ctx.meta), None


def cp_exclusive_scan(keys: torch.Tensor, sums: torch.Tensor | list, *, group: Any = None,
                      layout: str = "load_balanced", while_waiting: Callable[[], Any] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Exclusive prefix of this rank's segments over the CP ``group`` (None: the default group).

    keys ``[m, B]`` int64 (document id at each local segment's end, non-decreasing along the
    sequence, >= 0), sums ``[m, B, d, h]`` float (the segment's last-document update sum), for the
    rank's ``m`` local segments in local order (m = 1 contiguous, 2 load-balanced: [seg r; seg
    2cp-1-r]). Returns ``(prefix_keys [m, B], prefix_sums [m, B, d, h], extra)``: each local
    segment's exclusive prefix (key -1 and zeros for the first segment of the sequence).
    ``prefix_sums`` is differentiable w.r.t. ``sums`` (backward = reverse ring); keys get none.

    ``while_waiting``: called exactly once, with grad mode as at the call site, after this rank
    has sent what it can and posted its first receive, before waiting on it; its result is
    returned as ``extra`` (None without it).

    Late sums: ``sums`` may be a list of m tensors ``[B, d, h]`` whose trailing entries are None
    (the first must be given). Those segments' sums are computed by ``while_waiting``, which then
    returns ``(extra, [late sums in order])``; the scan sends nothing that needs them before they
    exist. Load-balanced, a rank's second segment is first needed on the return pass, so its sum
    (and any work producing it) overlaps the wait for the first pass.
    """
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
    state = _Forward(keys, parts, group, cp_rank, cp_size, layout)
    with torch.no_grad():
        state.chain.run(block=False)
    extra = while_waiting() if while_waiting is not None else None
    if late:
        extra, late_sums = extra
        if len(late_sums) != len(late):
            raise ValueError(f"while_waiting returned {len(late_sums)} late sums for {len(late)} missing")
        parts[late[0]:] = late_sums
    full = torch.stack(parts)
    state.provide(full)
    pk, ps = _CPScan.apply(keys, full, state)
    return pk, ps, extra

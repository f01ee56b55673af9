"""Distributed exclusive scan of segment states over a context-parallel group (ring P2P).

Semantics are those of :func:`naive.exclusive_scan_reference` on the global segment order (see
``layout.py``). The running prefix travels along the chain of segments in global order, one
``isend``/``irecv`` per hop between different ranks: load-balanced, ranks 0 -> 1 -> ... -> cp-1
(first-half shards), then cp-1 -> ... -> 0 (second-half shards): ``2*(cp-1)`` dependent hops
(``cp-1`` contiguous). Because it is the same left fold as the reference (same order of
additions), results match it to rounding.

Backward is the mirror-image suffix scan along the reversed chain. With gate
``g_t = [prefix_key_t == key_t]`` (forward: ``P_{t+1} = S_t + g_t P_t``) and ``G_t`` the gradient of
prefix ``t``: ``R_t = G_t + g_t R_{t+1}`` (``R_n = 0``) and ``dL/dS_t = R_{t+1}``. Only ``R`` travels
(the gates are local), so a backward message carries no keys. Messages: ``messages.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .layout import chain_walk
from .messages import ScanCount, message_bytes, new_message, views
from .naive import IDENTITY_KEY

_FWD_TAG = 7301
_BWD_TAG = 7302


class _Chain:
    """Walks this rank's part of the chain; ``step(i, incoming, want_out)`` consumes a received
    message (None: the state is local or the chain starts here) and returns the message to send.

    At most one receive is outstanding and every rank posts its sends / receives in chain order,
    so the per-peer order of P2P operations agrees on both ends (no deadlock on backends such as
    NCCL that serialise P2P operations on a stream)."""

    def __init__(self, group, walk, tag: int, msg_bytes: int, device, count: ScanCount,
                 step: Callable[[int, torch.Tensor | None, bool], torch.Tensor | None],
                 ready: Callable[[int], bool] = lambda i: True):
        self.group, self.walk, self.tag, self.step, self.ready = group, walk, tag, step, ready
        self.msg_bytes, self.device, self.count = msg_bytes, device, count
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
                    buf = torch.empty(self.msg_bytes, dtype=torch.uint8, device=self.device)
                    self.recv = (buf, dist.irecv(buf, src=self._global(src), group=self.group, tag=self.tag))
                if not block:
                    return
                msg, work = self.recv
                work.wait()
                self.count.received(msg)
                self.recv = None
            out = self.step(i, msg, dst is not None)
            if dst is not None:
                self.sends.append((out, dist.isend(out, dst=self._global(dst), group=self.group, tag=self.tag)))
                self.count.sent(out)
            self.pos += 1
        if block:
            for _, work in self.sends:
                work.wait()
            self.sends.clear()


class RingForward:
    """State of one forward call: local inputs (detached), outputs, and the chain. Messages carry the
    running prefix in ``wire`` (a narrower dtype rounds it at each hop; it accumulates in the sums' dtype)."""

    def __init__(self, keys, sums: list, group, cp_rank, cp_size, layout, count: ScanCount, wire: torch.dtype):
        self.keys, self.sums = keys, [s.detach() if s is not None else None for s in sums]
        self.count = count
        first = self.sums[0]
        self.shape, self.dtype, self.wire = first.shape, first.dtype, wire
        m, self.batch = keys.shape
        self.out_k: list = [None] * m
        self.out_s: list = [None] * m
        self.carry = None
        nbytes = message_bytes(self.batch, 1, tuple(self.shape), wire)
        self.chain = _Chain(group, chain_walk(cp_size, layout, cp_rank), _FWD_TAG, nbytes, first.device, count,
                            self._step, ready=lambda i: self.sums[i] is not None)

    def _step(self, i: int, msg, want_out: bool):
        if msg is not None:
            _, pk, (ps,) = views(msg, self.batch, 1, self.shape, self.wire)
            ps = ps.to(self.dtype)
        elif self.carry is not None:
            pk, ps = self.carry
        else:  # start of the chain: identity
            pk, ps = torch.full_like(self.keys[i], IDENTITY_KEY), torch.zeros_like(self.sums[i])
        self.out_k[i], self.out_s[i] = pk, ps
        gate = (pk == self.keys[i]).to(ps.dtype)[:, None, None]
        if not want_out:
            self.carry = (self.keys[i], torch.addcmul(self.sums[i], gate, ps))
            return None
        msg, depth, key, (s,) = new_message(self.batch, 1, self.shape, self.wire, ps.device)
        self.count.stamp(depth)
        key.copy_(self.keys[i])
        if self.wire == self.dtype:  # the running state is written straight into the message
            self.carry = (key, torch.addcmul(self.sums[i], gate, ps, out=s))
        else:
            self.carry = (key, torch.addcmul(self.sums[i], gate, ps))
            s.copy_(self.carry[1])
        return msg

    def start(self) -> None:
        """Send what needs no other rank, post the first receive; does not wait."""
        with torch.no_grad():
            self.chain.run(block=False)

    def provide(self, sums: torch.Tensor) -> None:
        """All local sums `[m, B, d, h]`, once the late ones exist."""
        self.sums = list(sums.detach())

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            self.chain.run(block=True)
        return torch.stack(self.out_k), torch.stack(self.out_s)


def ring_backward(grad: torch.Tensor, gates: torch.Tensor, group, cp_rank: int, cp_size: int, layout: str,
                  count: ScanCount, wire: torch.dtype) -> torch.Tensor:
    """Suffix scan of prefix gradients ``grad`` ``[m, B, d, h]`` with gates ``[m, B]`` (int64 0/1),
    messages in ``wire``; returns d loss / d local sums."""
    out: list = [None] * grad.shape[0]
    carry = [None]
    state_shape = grad.shape[1:]
    weights = gates.to(grad.dtype)[..., None, None]

    def step(i: int, msg, want_out: bool):
        q = views(msg, 0, 1, state_shape, wire)[2][0].to(grad.dtype) if msg is not None else carry[0]
        if q is None:  # last segment of the sequence: nothing after it
            q = torch.zeros_like(grad[i])
        out[i] = q
        if not want_out:
            carry[0] = torch.addcmul(grad[i], weights[i], q)
            return None
        buf, depth, _, (s,) = new_message(0, 1, state_shape, wire, grad.device)
        count.stamp(depth)
        if wire == grad.dtype:
            carry[0] = torch.addcmul(grad[i], weights[i], q, out=s)
        else:
            carry[0] = torch.addcmul(grad[i], weights[i], q)
            s.copy_(carry[0])
        return buf

    chain = _Chain(group, chain_walk(cp_size, layout, cp_rank, reverse=True), _BWD_TAG,
                   message_bytes(0, 1, tuple(state_shape), wire), grad.device, count, step)
    with torch.no_grad():
        chain.run(block=True)
    return torch.stack(out)

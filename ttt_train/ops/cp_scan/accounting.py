"""The messages one :func:`cp_exclusive_scan` call moves, predicted without running it.

:func:`scan_traffic` enumerates, for each direction, every message of the call (round, depth,
source, destination, bytes) from the algorithm's static schedule (the ring's chain walk, the log
scan's hypercube plan) and the wire format of ``messages.py``. Its per-rank view has the keys of
:class:`ScanCount` so tests compare it with what the ranks counted on the wire. ``depth`` follows
the counting rule (a message's depth is one more than the deepest message its sender had received),
so ``rounds`` is the number of dependent communication rounds; ``round`` groups messages that are
in flight together (the ring: one hop at a time; the log scan: its synchronous rounds).

Sizes, with a state ``[B, d, h]`` of ``e`` bytes per element (``S = B d h e``):

- ring: forward ``8 + 8B + S`` (depth, keys, state), backward ``8 + S`` per hop; ``2(cp-1)``
  hops each way load-balanced (ranks 0 and cp-1 send one message, the others two), ``cp-1``
  contiguous;
- log: ``8 + p (8B + S)`` with ``p`` = 1 or 2 stream totals per message, ``ceil(log2 cp)``
  rounds (+1 forward with late sums), each rank sending at most about two states per round.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from . import log
from .layout import num_segments, segment_owner
from .messages import message_bytes


@dataclass(frozen=True)
class Message:
    round: int
    depth: int
    src: int
    dst: int
    nbytes: int


@dataclass(frozen=True)
class PassTraffic:
    """All messages of one direction of one call over a group of ``cp`` ranks."""

    cp: int
    messages: tuple[Message, ...]

    @property
    def rounds(self) -> int:
        """Dependent communication rounds (the deepest message)."""
        return max((m.depth for m in self.messages), default=0)

    @property
    def num_rounds(self) -> int:
        """Groups of messages in flight together (``round`` values)."""
        return max((m.round for m in self.messages), default=-1) + 1

    def per_rank(self) -> list[dict]:
        """For each rank, the keys of ``ScanCount.as_dict()``."""
        out = [dict(rounds=0, messages_sent=0, bytes_sent=0, messages_received=0, bytes_received=0)
               for _ in range(self.cp)]
        for m in self.messages:
            out[m.src]["messages_sent"] += 1
            out[m.src]["bytes_sent"] += m.nbytes
            dst = out[m.dst]
            dst["messages_received"] += 1
            dst["bytes_received"] += m.nbytes
            dst["rounds"] = max(dst["rounds"], m.depth)
        return out

    @property
    def max_bytes_sent(self) -> int:
        return max((r["bytes_sent"] for r in self.per_rank()), default=0)

    @property
    def max_bytes_received(self) -> int:
        return max((r["bytes_received"] for r in self.per_rank()), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.messages)


@dataclass(frozen=True)
class ScanTraffic:
    algorithm: str
    cp: int
    layout: str
    forward: PassTraffic
    backward: PassTraffic

    @property
    def max_bytes_sent(self) -> int:
        """Largest forward + backward bytes one rank sends."""
        fwd, bwd = self.forward.per_rank(), self.backward.per_rank()
        return max((f["bytes_sent"] + b["bytes_sent"] for f, b in zip(fwd, bwd)), default=0)


def _ring(cp: int, layout: str, reverse: bool, nbytes: int) -> tuple[Message, ...]:
    """The chain in global order (reversed for the backward): a message per hop between ranks."""
    owner = [r for r, _ in segment_owner(cp, layout)]
    order = list(range(num_segments(cp, layout)))
    if reverse:
        order.reverse()
    depth = [0] * cp
    messages = []
    for a, b in zip(order, order[1:]):
        src, dst = owner[a], owner[b]
        if src != dst:
            m = Message(len(messages), depth[src] + 1, src, dst, nbytes)
            messages.append(m)
            depth[dst] = max(depth[dst], m.depth)
    return tuple(messages)


def _log(cp: int, layout: str, backward: bool, late: bool, batch: int, state_nbytes: int) -> tuple[Message, ...]:
    """Every rank's hypercube plan, with depths by the counting rule (sends stamped before the round's receives)."""
    streams, _ = log._streams(layout, backward, late)
    plans = [log.plan(cp, r, streams) for r in range(cp)]
    depth = [0] * cp
    messages = []
    for j in range(len(plans[0]) if plans else 0):
        sent = []
        for src in range(cp):
            parts: dict[int, int] = {}
            for _, _, sends, _ in plans[src][j]:
                for dst in sends:
                    parts[dst] = parts.get(dst, 0) + 1
            for dst, p in sorted(parts.items()):
                sent.append(Message(j, depth[src] + 1, src, dst, 8 * (1 + p * batch) + p * state_nbytes))
        for m in sent:
            depth[m.dst] = max(depth[m.dst], m.depth)
        messages += sent
    return tuple(messages)


@cache
def _traffic(algorithm: str, cp: int, shape: tuple[int, int, int], dtype: torch.dtype, layout: str,
             late: bool) -> ScanTraffic:
    batch = shape[0]
    if algorithm == "ring":
        fwd = _ring(cp, layout, False, message_bytes(batch, 1, shape, dtype))
        bwd = _ring(cp, layout, True, message_bytes(0, 1, shape, dtype))
    elif algorithm == "log":
        state = message_bytes(0, 1, shape, dtype) - 8
        fwd = _log(cp, layout, False, late and layout == "load_balanced", batch, state)
        bwd = _log(cp, layout, True, False, batch, state)
    else:
        raise ValueError(f"unknown CP scan algorithm {algorithm!r}; expected 'ring' or 'log'")
    return ScanTraffic(algorithm, cp, layout, PassTraffic(cp, fwd), PassTraffic(cp, bwd))


def scan_traffic(cp_size: int, shape: tuple[int, int, int], *, algorithm: str = "ring",
                 layout: str = "load_balanced", dtype: torch.dtype = torch.float32, late: bool = True
                 ) -> ScanTraffic:
    """Messages of one call whose per-segment state has shape ``(B, d, h)`` and travels as ``dtype``
    (the scan's wire dtype) (``late``: the second segment's sum comes from ``while_waiting``, as in
    ``TTTMLP``; it changes only the log forward).
    Multiply by the TTT layers and micro-batches (and forward passes) for a step."""
    return _traffic(algorithm, cp_size, tuple(int(s) for s in shape), dtype, layout, late)

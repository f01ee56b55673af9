"""Log-depth distributed exclusive scan over a context-parallel group (hypercube recursive doubling).

Load-balanced, rank ``r`` holds segments ``A_r = r`` and ``B_r = 2cp-1-r``, and (METHOD.md section 6)

    prefix(A_r) = A_0 (+) ... (+) A_{r-1}
    prefix(B_r) = [A_0 (+) ... (+) A_{cp-1}] (+) B_{cp-1} (+) ... (+) B_{r+1}

so the scan is two scans over the ranks: the A sums in ascending rank order (each rank needs its
exclusive prefix and the grand total) and the B sums in descending rank order (exclusive prefix).
Both run as the classic hypercube scan: at level ``k`` every rank exchanges the running total of
its aligned block of ``2^k`` ranks with the block next to it (partner ``r ^ 2^k``), folds it into its
prefix when that block comes first in the stream's order, and into its total on the correct side
(the combine is associative, not commutative). Reversing the rank order complements the low bits,
so both streams pair the same ranks at each level and travel in one message. With ``L = ceil(log2
cp)`` levels:

- forward, all sums given: ``L`` rounds, one message per round to one partner (A and B totals);
- forward, the second segment's sum late (made by ``while_waiting``): the B stream runs one round
  behind, ``L + 1`` rounds; round 0 (A totals only) is in flight while the second shard runs;
- backward: the mirror suffix scan (reverse global order = B ascending, then A descending) in
  ``L`` rounds, messages of gradients and 0/1 gates (see :func:`gate_merge`).

A last level sends only what the receiver still needs (a descending stream's total is never
needed at the end). ``cp`` need not be a power of two: a rank whose partner ``r ^ 2^k`` does not
exist receives the neighbouring block's total from a member of that block (which sends it twice).
Every rank's schedule depends only on ``(cp, rank)``, never on the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .messages import ScanCount, message_bytes, new_message, views
from .naive import IDENTITY_KEY

ASC, DESC = 0, 1  # stream orders: ascending / descending CP rank
_FWD_TAG = 7303
_BWD_TAG = 7304

Element = tuple[torch.Tensor, torch.Tensor]  # (keys or gates [B] int64, state [B, d, h])
Merge = Callable[[Element, Element], Element]


def num_levels(cp_size: int) -> int:
    """Hypercube levels ``ceil(log2 cp)`` (0 for cp = 1)."""
    return (cp_size - 1).bit_length()


def _precedes(stream: int, a: int, b: int) -> bool:
    return a < b if stream == ASC else a > b


def level_transfers(cp_size: int, rank: int, level: int, stream: int, keep_total: bool
                    ) -> tuple[list[int], list[int]]:
    """(CP ranks ``rank`` sends its running ``stream`` total to, ranks it receives one from) at ``level``.

    ``keep_total``: the stream's grand total is needed after the last level (the A stream's is).
    """
    last = level == num_levels(cp_size) - 1

    def needs(receiver: int, sender: int) -> bool:
        return _precedes(stream, sender, receiver) or not last or keep_total

    bit = 1 << level
    sends, recvs = [], []
    partner = rank ^ bit
    if partner < cp_size:
        if needs(rank, partner):
            recvs.append(partner)
        if needs(partner, rank):
            sends.append(partner)
    else:  # the partner's block [base, base + bit) is cut off by cp: take it from a member that exists
        base = partner & ~(bit - 1)
        members = min(cp_size, base + bit) - base
        if members > 0 and needs(rank, source := base + (rank & (bit - 1)) % members):
            recvs.append(source)
    if rank & bit:  # serve the lower block's ranks whose partner is missing
        base = rank & ~(bit - 1)
        members = min(cp_size, base + bit) - base
        for j in range(members, bit):
            if j % members == rank - base and needs(orphan := base - bit + j, rank):
                sends.append(orphan)
    return sends, recvs


@dataclass(frozen=True)
class Stream:
    """One stream of a call: its order, whether its total is kept, and its round offset (lag)."""

    order: int
    keep_total: bool
    lag: int = 0


def plan(cp_size: int, rank: int, streams: tuple[Stream, ...]) -> list[list[tuple[int, int, list[int], list[int]]]]:
    """Rank ``rank``'s rounds: ``rounds[j]`` = ``[(stream index, level, sends, recvs), ...]``."""
    levels = num_levels(cp_size)
    rounds: list[list] = [[] for _ in range(max(s.lag for s in streams) + levels if levels else 0)]
    for i, s in enumerate(streams):
        for level in range(levels):
            sends, recvs = level_transfers(cp_size, rank, level, s.order, s.keep_total)
            rounds[s.lag + level].append((i, level, sends, recvs))
    return rounds


def key_merge(left: Element, right: Element) -> Element:
    """Forward combine ``(k1, S1) (+) (k2, S2) = (k2, S2 + [k1 == k2] S1)`` (see ``naive.combine``)."""
    same = (left[0] == right[0]).to(right[1].dtype)[:, None, None]
    return right[0], torch.addcmul(right[1], same, left[1])


def gate_merge(left: Element, right: Element) -> Element:
    """Backward combine in reverse global order, elements ``(g, R)`` with ``g`` the 0/1 gate of a span
    (its prefix carries through it) and ``R`` the gradient reaching the span's start from its end:
    ``(g1, R1) (+) (g2, R2) = (g1 g2, R2 + g2 R1)`` (``left`` = the later segments)."""
    return left[0] * right[0], torch.addcmul(right[1], right[0].to(right[1].dtype)[:, None, None], left[1])


def _merge(merge: Merge, left: Element | None, right: Element | None) -> Element | None:
    """``merge`` with None as the identity on both sides (the forward identity key -1 is only a left identity)."""
    if left is None:
        return right
    return left if right is None else merge(left, right)


class Hypercube:
    """One rank's side of the scan of one call: running totals and exclusive prefixes per stream.

    ``elements[i]``: this rank's element of stream ``i`` (None while late: it must be provided
    before the stream's first round). Drive it with :meth:`outgoing` / :meth:`incoming` /
    :meth:`absorb` round by round (over P2P: :class:`LogForward`, :func:`log_backward`; in memory: tests).
    """

    def __init__(self, cp_size: int, rank: int, streams: tuple[Stream, ...], elements: list[Element | None],
                 merge: Merge):
        self.rank, self.streams, self.merge = rank, streams, merge
        self.rounds = plan(cp_size, rank, streams)
        self.total: list[Element | None] = list(elements)
        self.prefix: list[Element | None] = [None] * len(streams)
        self.levels = num_levels(cp_size)

    def outgoing(self, j: int) -> dict[int, list[Element]]:
        """Round ``j``: peer -> the stream totals to send it (stream order)."""
        out: dict[int, list[Element]] = {}
        for i, _, sends, _ in self.rounds[j]:
            if sends and self.total[i] is None:
                raise RuntimeError(f"stream {i} has no element in round {j}: a late sum was not provided")
            for peer in sends:
                out.setdefault(peer, []).append(self.total[i])
        return out

    def incoming(self, j: int) -> dict[int, int]:
        """Round ``j``: peer -> number of stream totals it sends here."""
        counts: dict[int, int] = {}
        for _, _, _, recvs in self.rounds[j]:
            for peer in recvs:
                counts[peer] = counts.get(peer, 0) + 1
        return counts

    def absorb(self, j: int, received: dict[int, list[Element]]) -> None:
        """Fold round ``j``'s received totals (peer -> list in stream order) into prefixes and totals."""
        taken = {peer: iter(parts) for peer, parts in received.items()}
        for i, level, _, recvs in self.rounds[j]:
            for peer in recvs:
                other = next(taken[peer])
                keep = level < self.levels - 1 or self.streams[i].keep_total
                if _precedes(self.streams[i].order, peer, self.rank):
                    self.prefix[i] = _merge(self.merge, other, self.prefix[i])
                    if keep:
                        self.total[i] = _merge(self.merge, other, self.total[i])
                elif keep:
                    self.total[i] = _merge(self.merge, self.total[i], other)


# ----------------------------------------------------------------------------- over P2P


class _Round:
    """The P2P operations of one posted round, its receive buffers and its works."""

    def __init__(self, cube: Hypercube, j: int, group, tag: int, shape: torch.Size, dtype: torch.dtype,
                 wire: torch.dtype, device, batch: int, count: ScanCount):
        ops, self.recv, self.shape, self.dtype, self.wire = [], [], shape, dtype, wire
        self.batch, self.count, self.keep_alive = batch, count, []
        for peer, parts in sorted(cube.outgoing(j).items()):
            buf, depth, keys, states = new_message(batch * len(parts), len(parts), shape, wire, device)
            count.stamp(depth)
            for p, (key, state) in enumerate(parts):
                keys[p * batch:(p + 1) * batch].copy_(key)
                states[p].copy_(state)  # (rounded to the wire dtype)
            ops.append(dist.P2POp(dist.isend, buf, dist.get_global_rank(group, peer), group, tag))
            count.sent(buf)
            self.keep_alive.append(buf)
        for peer, n in sorted(cube.incoming(j).items()):
            buf = torch.empty(message_bytes(batch * n, n, tuple(shape), wire), dtype=torch.uint8, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group, tag))
            self.recv.append((peer, n, buf))
        self.works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> dict[int, list[Element]]:
        for work in self.works:
            work.wait()
        received = {}
        for peer, n, buf in self.recv:
            self.count.received(buf)
            _, keys, states = views(buf, self.batch * n, n, self.shape, self.wire)
            received[peer] = [(keys[p * self.batch:(p + 1) * self.batch], states[p].to(self.dtype)) for p in range(n)]
        return received


def _streams(layout: str, backward: bool, late: bool) -> tuple[tuple[Stream, ...], tuple[int, ...]]:
    """The call's streams and, for each, the local segment index whose element it scans.

    Forward load-balanced: A (local 0) ascending, total kept; B (local 1) descending, lagging one
    round when late. Backward (reverse global order): B gradients ascending with the total kept,
    then A descending. Contiguous: the one segment, ascending forward and descending backward."""
    if layout == "contiguous":
        return (Stream(DESC if backward else ASC, keep_total=False),), (0,)
    if backward:
        return (Stream(ASC, keep_total=True), Stream(DESC, keep_total=False)), (1, 0)
    return (Stream(ASC, keep_total=True), Stream(DESC, keep_total=False, lag=int(late))), (0, 1)


def _results(cube: Hypercube, layout: str, backward: bool) -> list[Element | None]:
    """Each local segment's exclusive result (None: identity), in local order."""
    if layout == "contiguous":
        return [cube.prefix[0]]
    # forward: [prefix(A_r), total(A) (+) prefix(B_r)]; backward: [total(B) (+) prefix(A_r), prefix(B_r)]
    joined = _merge(cube.merge, cube.total[0], cube.prefix[1])
    return [joined, cube.prefix[0]] if backward else [cube.prefix[0], joined]


class LogForward:
    """State of one forward call (the interface ``scan.cp_exclusive_scan`` drives)."""

    def __init__(self, keys: torch.Tensor, sums: list, group, cp_rank: int, cp_size: int, layout: str,
                 count: ScanCount, wire: torch.dtype):
        self.keys, self.layout, self.group, self.count, self.wire = keys, layout, group, count, wire
        first = sums[0].detach()
        self.shape, self.dtype, self.device = first.shape, first.dtype, first.device
        late = any(s is None for s in sums)
        self.streams, self.local = _streams(layout, backward=False, late=late)
        elements = [(keys[i], sums[i].detach()) if sums[i] is not None else None for i in self.local]
        self.cube = Hypercube(cp_size, cp_rank, self.streams, elements, key_merge)
        self.next_round, self.pending = 0, None

    def _post(self) -> None:
        self.pending = _Round(self.cube, self.next_round, self.group, _FWD_TAG, self.shape, self.dtype, self.wire,
                              self.device, self.keys.shape[1], self.count)

    def start(self) -> None:
        """Post round 0 (what can be sent before the late sums exist); does not wait."""
        if self.cube.rounds:
            self._post()

    def provide(self, sums: torch.Tensor) -> None:
        """All local sums ``[m, B, d, h]``, once the late ones exist."""
        for i, seg in enumerate(self.local):
            if self.cube.total[i] is None:
                self.cube.total[i] = (self.keys[seg], sums[seg].detach())

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            while self.pending is not None:
                self.cube.absorb(self.next_round, self.pending.wait())
                self.next_round += 1
                self.pending = None
                if self.next_round < len(self.cube.rounds):
                    self._post()
            out = _results(self.cube, self.layout, backward=False)
        pk = [r[0] if r is not None else torch.full_like(self.keys[i], IDENTITY_KEY) for i, r in enumerate(out)]
        ps = [r[1] if r is not None else torch.zeros(self.shape, dtype=self.dtype, device=self.device)
              for r in out]
        return torch.stack(pk), torch.stack(ps)


def log_backward(grad: torch.Tensor, gates: torch.Tensor, group, cp_rank: int, cp_size: int, layout: str,
                 count: ScanCount, wire: torch.dtype) -> torch.Tensor:
    """Suffix scan of prefix gradients ``grad`` ``[m, B, d, h]`` with gates ``[m, B]`` (int64 0/1:
    the segment's prefix carries through it), messages in ``wire``; returns d loss / d local sums."""
    streams, local = _streams(layout, backward=True, late=False)
    cube = Hypercube(cp_size, cp_rank, streams, [(gates[i], grad[i]) for i in local], gate_merge)
    with torch.no_grad():
        for j in range(len(cube.rounds)):
            cube.absorb(j, _Round(cube, j, group, _BWD_TAG, grad.shape[1:], grad.dtype, wire, grad.device,
                                  grad.shape[1], count).wait())
        out = _results(cube, layout, backward=True)
    return torch.stack([r[1] if r is not None else torch.zeros_like(grad[i]) for i, r in enumerate(out)])

"""Time of the scan's messages on a network (alpha-beta), megatron's rank order, and the ``auto`` choice.

A message of ``n`` bytes over a link costs ``latency + n / bandwidth``; links are intra-node
(NVLink) or inter-node (the NIC of the sending GPU). A pass (forward or backward of one call)
costs the sum over its rounds (``PassTraffic``'s groups of messages in flight together) of the
slowest rank in the round, a rank paying per link kind one latency plus its larger direction's
bytes (sends and receives overlap, several messages on one kind share its bandwidth). The ring's
rounds are its hops (every one on the critical path); the log scan's are synchronous. Compute is
not modelled: the ring's first pass and the log scan's round 0 overlap the second shard's run, so
the estimate is an upper bound of the exposed time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

from .accounting import PassTraffic, ScanTraffic, scan_traffic


@dataclass(frozen=True)
class Link:
    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


def links_of(links) -> tuple[Link, Link]:
    """(intra-node, inter-node) links of a ``LinkConfig`` (``parallel.links``: microseconds, GB/s)."""
    return (Link(links.intra_node_latency_us * 1e-6, links.intra_node_gb_per_s * 1e9),
            Link(links.inter_node_latency_us * 1e-6, links.inter_node_gb_per_s * 1e9))


def megatron_cp_ranks(tp_size: int, cp_size: int, tp_rank: int = 0, outer: int = 0) -> list[int]:
    """Global ranks of one CP group in megatron-core's default rank order ``tp-cp-ep-dp-pp`` (tp varies
    fastest, then cp): CP rank ``c`` is ``tp_rank + tp * (c + cp * outer)``, ``outer`` numbering the
    (data, pipeline) coordinates."""
    return [tp_rank + tp_size * (c + cp_size * outer) for c in range(cp_size)]


def pass_seconds(traffic: PassTraffic, nodes: Sequence[int], intra: Link, inter: Link) -> float:
    """Estimated seconds of one pass; ``nodes[c]``: the node of CP rank ``c``."""
    rounds: dict[int, dict[tuple[int, bool], list[int]]] = {}
    for m in traffic.messages:
        crosses = nodes[m.src] != nodes[m.dst]
        load = rounds.setdefault(m.round, {})
        load.setdefault((m.src, crosses), [0, 0])[0] += m.nbytes
        load.setdefault((m.dst, crosses), [0, 0])[1] += m.nbytes
    return sum(max((inter if crosses else intra).seconds(max(sent, received))
                   for (_, crosses), (sent, received) in load.items()) for load in rounds.values())


def scan_seconds(traffic: ScanTraffic, nodes: Sequence[int], intra: Link, inter: Link) -> tuple[float, float]:
    """(forward, backward) estimated seconds of one call."""
    return (pass_seconds(traffic.forward, nodes, intra, inter), pass_seconds(traffic.backward, nodes, intra, inter))


@cache
def choose_algorithm(cp_size: int, shape: tuple[int, int, int], dtype: torch.dtype, nodes: tuple[int, ...],
                     intra: Link, inter: Link, layout: str = "load_balanced") -> str:
    """``parallel.cp_scan=auto``: the algorithm with the smaller estimated forward + backward time
    (late second sums, as ``TTTMLP`` calls it); the ring on a tie (it sends fewer bytes).
    Deterministic in its arguments, so the ranks of a group agree."""
    seconds = {algorithm: sum(scan_seconds(scan_traffic(cp_size, shape, algorithm=algorithm, layout=layout,
                                                        dtype=dtype), nodes, intra, inter))
               for algorithm in ("ring", "log")}
    return "log" if seconds["log"] < seconds["ring"] else "ring"

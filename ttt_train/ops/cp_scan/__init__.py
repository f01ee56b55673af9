"""Distributed exclusive prefix scan of TTT fast-weight update sums over the CP group (METHOD.md 6).

- :func:`cp_exclusive_scan` (autograd): ``algorithm="ring"`` (``ring.py``, a chain over the
  shards) or ``"log"`` (``log.py``, hypercube recursive doubling); :class:`ScanStats`: what a
  call counted on the wire (rounds, messages, bytes).
- :func:`exclusive_scan_reference`: single-process sequential reference; :func:`combine`.
- :func:`segment_order`, :func:`validate_cp_alignment`: layouts and shard checks.
- :func:`scan_traffic`: every message of a call, predicted; ``cost.py``: its time on a network
  (alpha-beta links, megatron's rank order) and the ``auto`` choice.
"""

from .accounting import PassTraffic, ScanTraffic, scan_traffic
from .cost import Link, choose_algorithm, links_of, megatron_cp_ranks, pass_seconds, scan_seconds
from .layout import LAYOUTS, num_segments, segment_order, validate_cp_alignment
from .messages import ScanCount, ScanStats
from .naive import IDENTITY_KEY, combine, exclusive_scan_reference
from .scan import ALGORITHMS, cp_exclusive_scan

__all__ = [
    "ALGORITHMS",
    "IDENTITY_KEY",
    "LAYOUTS",
    "Link",
    "PassTraffic",
    "ScanCount",
    "ScanStats",
    "ScanTraffic",
    "choose_algorithm",
    "combine",
    "cp_exclusive_scan",
    "exclusive_scan_reference",
    "links_of",
    "megatron_cp_ranks",
    "num_segments",
    "pass_seconds",
    "scan_seconds",
    "scan_traffic",
    "segment_order",
    "validate_cp_alignment",
]

"""Distributed exclusive prefix scan of TTT fast-weight update sums over the CP group (issue #5).

- :func:`cp_exclusive_scan` (ring P2P, autograd): the distributed version.
- :func:`exclusive_scan_reference`: single-process sequential reference; :func:`combine`.
- :func:`segment_order`, :func:`validate_cp_alignment`: layouts and shard checks.
- :func:`bytes_sent_per_call`: communication accounting.
"""

from .accounting import ScanBytes, bytes_sent_per_call
from .layout import LAYOUTS, num_segments, segment_order, validate_cp_alignment
from .naive import IDENTITY_KEY, combine, exclusive_scan_reference
from .ring import cp_exclusive_scan

__all__ = [
    "IDENTITY_KEY",
    "LAYOUTS",
    "ScanBytes",
    "bytes_sent_per_call",
    "combine",
    "cp_exclusive_scan",
    "exclusive_scan_reference",
    "num_segments",
    "segment_order",
    "validate_cp_alignment",
]

"""In-Place TTT down-projection: fast path (:func:`inplace_ttt`), reference, per-call statistics (:class:`TTTStats`)."""

from .chunk import inplace_ttt
from .common import TTTStats
from .naive import inplace_ttt_reference

__all__ = ["TTTStats", "inplace_ttt", "inplace_ttt_reference"]

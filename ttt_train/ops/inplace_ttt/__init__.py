"""In-Place TTT down-projection: fast path (:func:`inplace_ttt`), reference, update sums."""

from .chunk import inplace_ttt
from .naive import inplace_ttt_reference

__all__ = ["inplace_ttt", "inplace_ttt_reference"]

"""Pure-PyTorch In-Place TTT operators (no megatron import): the fast-weight down-projection, its
LM-aligned target (METHOD.md sections 2-5), and the context-parallel prefix scan (section 6).
Each keeps its obviously-correct reference beside the fast version: the TTT op's has the same
signature; the scan's takes every segment in global order on one process."""

from .cp_scan import cp_exclusive_scan, exclusive_scan_reference, validate_cp_alignment
from .inplace_ttt import inplace_ttt, inplace_ttt_reference
from .target import LMAlignedTarget

__all__ = ["LMAlignedTarget", "cp_exclusive_scan", "exclusive_scan_reference", "inplace_ttt",
           "inplace_ttt_reference", "validate_cp_alignment"]

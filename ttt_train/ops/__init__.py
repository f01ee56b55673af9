"""Pure-PyTorch In-Place TTT operators (no megatron import): the fast-weight down-projection and
its LM-aligned target (METHOD.md sections 2-5)."""

from .inplace_ttt import inplace_ttt, inplace_ttt_reference, ttt_update_sum
from .target import LMAlignedTarget

__all__ = ["LMAlignedTarget", "inplace_ttt", "inplace_ttt_reference", "ttt_update_sum"]

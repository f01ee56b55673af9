"""Document ids per token: where the TTT fast weights reset (METHOD.md section 5).

Both functions take `[..., T]` integer tensors and return `[..., T]` int64 ids that start at 0 in
every row and never decrease along T; a new document starts where the id increases.
"""

import torch


def document_ids_from_tokens(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """An EOD token belongs to the document it ends: the id increases on the token after an EOD."""
    ends = (tokens == eod_id).long()
    return torch.cumsum(ends, dim=-1) - ends


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """A position id of 0 after the first token starts a new document (megatron's
    `reset_position_ids` layout); a row may start inside a document."""
    starts = (position_ids == 0).long()
    starts[..., 0] = 0
    return torch.cumsum(starts, dim=-1)

"""Single-process reference of the CP exclusive scan: a sequential loop in global order.

Segment state ``(key, S)``: ``key`` ``[B]`` int64 is the document id at the segment's end,
``S`` ``[B, d, h]`` the (lr-scaled) sum of fast-weight updates of the segment's last document.
Combine (per batch row), associative for non-decreasing ids::

    (k1, S1) (+) (k2, S2) = (k2, S2 + [k1 == k2] * S1)

Identity: ``(-1, 0)`` (document ids are >= 0).
"""

from __future__ import annotations

import torch

IDENTITY_KEY = -1


def combine(k1: torch.Tensor, s1: torch.Tensor, k2: torch.Tensor, s2: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k1, S1) (+) (k2, S2)``; keys ``[..., B]``, sums ``[..., B, d, h]`` (plain autograd)."""
    same = (k1 == k2).to(s1.dtype)[..., None, None]
    return k2, s2 + same * s1


def exclusive_scan_reference(keys: torch.Tensor, sums: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exclusive prefix of every segment, in global order.

    keys ``[n, B]`` int64, sums ``[n, B, d, h]`` -> (prefix_keys ``[n, B]``, prefix_sums
    ``[n, B, d, h]``) with prefix ``s`` = (+) of segments ``0..s-1`` (identity for ``s = 0``).
    """
    if keys.dim() != 2 or sums.dim() != 4 or sums.shape[:2] != keys.shape:
        raise ValueError(f"expected keys [n, B] and sums [n, B, d, h], got {tuple(keys.shape)} "
                         f"and {tuple(sums.shape)}")
    k = torch.full_like(keys[0], IDENTITY_KEY)
    s = torch.zeros_like(sums[0])
    out_k, out_s = [], []
    for i in range(keys.shape[0]):
        out_k.append(k)
        out_s.append(s)
        k, s = combine(k, s, keys[i], sums[i])
    return torch.stack(out_k), torch.stack(out_s)

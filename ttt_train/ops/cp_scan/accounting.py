"""Bytes moved by one :func:`cp_exclusive_scan` call (for logs and benchmarks).

With a segment state of shape ``(B, d, h)`` and element size ``e`` bytes:

- forward message: ``8*B + B*d*h*e`` bytes (the int64 key travels with the sum);
- backward message: ``B*d*h*e`` bytes (gates are local; no key);
- messages per call: one per hop of the chain between different ranks, in each direction:
  ``cp - 1`` contiguous, ``2*(cp - 1)`` load-balanced (ranks 0 and cp-1 send one, the others two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import chain_walk


@dataclass(frozen=True)
class ScanBytes:
    """Bytes sent per CP rank (index = rank in the CP group) in one forward / one backward."""

    forward_per_rank: tuple[int, ...]
    backward_per_rank: tuple[int, ...]
    forward_message: int
    backward_message: int

    @property
    def forward_total(self) -> int:
        return sum(self.forward_per_rank)

    @property
    def backward_total(self) -> int:
        return sum(self.backward_per_rank)

    @property
    def max_per_rank(self) -> int:
        """Largest forward + backward bytes sent by one rank."""
        return max(f + b for f, b in zip(self.forward_per_rank, self.backward_per_rank))


def bytes_sent_per_call(shape: tuple[int, int, int], cp_size: int, layout: str = "load_balanced",
                        dtype: torch.dtype = torch.float32) -> ScanBytes:
    """Accounting for one scan call whose per-segment state ``S`` has shape ``(B, d, h)``.

    Multiply by the number of TTT layers (and micro-batches) for bytes per step.
    """
    b, d, h = shape
    state = b * d * h * torch.empty((), dtype=dtype).element_size()
    fwd_msg, bwd_msg = 8 * b + state, state

    def sends(r: int, reverse: bool) -> int:
        return sum(dst is not None for *_, dst in chain_walk(cp_size, layout, r, reverse))

    return ScanBytes(tuple(sends(r, False) * fwd_msg for r in range(cp_size)),
                     tuple(sends(r, True) * bwd_msg for r in range(cp_size)), fwd_msg, bwd_msg)

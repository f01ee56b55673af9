"""Deliberately broken In-Place TTT, built from the real code, for the mechanism check to reject.

Each mutant is one plausible bug: the update's sign flipped (``sign``); a chunk's update also
applied to its own chunk (``own_chunk``) or to every chunk, later and earlier (``future``); the fast
weights not reset at a document boundary (``no_reset``); the target's conv tap at ``t``
(``tap_t``, an off-by-one) or at ``t-1`` (``tap_prev``: a true convolution where a cross-correlation
is meant, i.e. the kernel flipped); the target's conv running across chunk edges
(``conv_across_chunks``). ``REJECTED_BY`` names the scenario cases each must fail.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

import ttt_train.ops.target as target_module

REJECTED_BY = {
    "sign": {"recall_far", "recall_next_chunk", "second_document"},
    "own_chunk": {"same_chunk"},
    "future": {"before_pair"},
    "no_reset": {"second_document", "other_document_at_edge", "other_document_in_chunk"},
    "tap_t": {"recall_far", "recall_next_chunk", "second_document"},
    "tap_prev": {"recall_far", "recall_next_chunk", "second_document"},
    "conv_across_chunks": {"split_by_chunk_edge"},
}
OP_MUTANTS = ("sign", "own_chunk", "future", "no_reset")


def _leak(z, v, chunk_size, doc_ids, future: bool) -> torch.Tensor:
    """``sum_s <z_s, z_t> v_s`` over the tokens ``s`` of ``t``'s document in ``t``'s chunk (``future``: in
    ``t``'s chunk or any later one) -> ``[B, T, d]``: what a causality bug adds to the output, over ``lr``."""
    T = z.shape[1]
    chunk = torch.arange(T, device=z.device) // chunk_size
    mask = chunk[None, :] >= chunk[:, None] if future else chunk[None, :] == chunk[:, None]
    mask = mask.expand(z.shape[0], T, T)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return ((z @ z.transpose(1, 2)) * mask.to(z.dtype)) @ v


def broken_op(op, kind: str):
    """``op`` (the signature of ``ttt_train.ops.inplace_ttt``) with the bug ``kind`` (unclipped use only)."""
    def mutant(z, v, weight, *, chunk_size, lr, doc_ids=None, **kwargs):
        if kind == "sign":
            return op(z, -v, weight, chunk_size=chunk_size, lr=lr, doc_ids=doc_ids, **kwargs)
        if kind == "no_reset":
            return op(z, v, weight, chunk_size=chunk_size, lr=lr, doc_ids=None, **kwargs)
        result = op(z, v, weight, chunk_size=chunk_size, lr=lr, doc_ids=doc_ids, **kwargs)
        out = result[0] if isinstance(result, tuple) else result
        out = out + (lr * _leak(z, v, chunk_size, doc_ids, future=kind == "future")).to(out.dtype)
        return (out, *result[1:]) if isinstance(result, tuple) else out
    return mutant


def _broken_conv(kind: str):
    real = target_module.chunked_depthwise_conv

    def conv(x, weight, chunk_size, doc_ids=None):
        if kind == "tap_t":
            return real(x, weight.roll(-1, dims=-1), chunk_size, doc_ids)
        if kind == "tap_prev":
            return real(x, weight.flip(-1), chunk_size, doc_ids)
        return real(x, weight, x.shape[1], doc_ids)  # conv_across_chunks: one chunk of the whole sequence
    return conv


@contextlib.contextmanager
def installed(kind: str | None, ops=()):
    """Within the block the mutant ``kind`` (None: none) replaces the real code: op mutants wrap each
    ``(owner, name)`` of ``ops`` (the TTT op as its callers see it), conv mutants replace
    ``ttt_train.ops.target.chunked_depthwise_conv`` (what ``LMAlignedTarget`` calls)."""
    with contextlib.ExitStack() as stack:
        if kind in OP_MUTANTS:
            for owner, name in ops:
                stack.enter_context(mock.patch.object(owner, name, broken_op(getattr(owner, name), kind)))
        elif kind is not None:
            if kind not in REJECTED_BY:
                raise ValueError(f"unknown mutant {kind!r}; known: {sorted(REJECTED_BY)}")
            stack.enter_context(mock.patch.object(target_module, "chunked_depthwise_conv", _broken_conv(kind)))
        yield

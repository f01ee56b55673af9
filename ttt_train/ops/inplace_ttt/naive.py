"""Reference In-Place TTT down-projection: a plain per-chunk, per-document loop with autograd.

Slow and memory-hungry (autograd keeps every per-chunk weight); it exists to be obviously
correct. Same signature and semantics as :func:`ttt_train.ops.inplace_ttt`.
"""

from __future__ import annotations

import torch

from .common import check_inputs, clip_update, state_dtype


def inplace_ttt_reference(z: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, *, chunk_size: int, lr: float,
                          doc_ids: torch.Tensor | None = None, max_update_norm: float | None = None,
                          initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                          norm_group=None):
    """Token ``t`` (chunk ``c``, document ``k``) outputs ``W_k^(c) z_t`` with ``W_k^(c)`` the start
    weight of document ``k`` (``initial_state`` for the row's first document, else ``weight``) plus
    ``clip(lr * V^T Z)`` of document ``k``'s tokens of every chunk before ``c`` (one clip per
    chunk and document). Returns ``[B, T, d]`` in ``z``'s dtype, and with ``output_final_state``
    also the last document's weight after the last chunk, ``[B, d, h]`` float32 (float64 for float64).
    """
    lr, tau = check_inputs(z, v, weight, chunk_size=chunk_size, lr=lr, doc_ids=doc_ids,
                           max_update_norm=max_update_norm, initial_state=initial_state)
    B, T, _ = z.shape
    sdt = state_dtype(z.dtype)
    zs, vs, ws = z.to(sdt), v.to(sdt), weight.to(sdt)
    outs, finals = [], []
    for b in range(B):
        docs = doc_ids[b].tolist() if doc_ids is not None else [0] * T
        start = {docs[0]: initial_state[b].to(sdt) if initial_state is not None else ws}
        state: dict[int, torch.Tensor] = {}  # document -> fast weight after the chunks seen so far
        pieces = []
        for c0 in range(0, T, chunk_size):
            c1 = min(c0 + chunk_size, T)
            for k in sorted(set(docs[c0:c1])):  # documents are contiguous and increasing
                lo = c0 + docs[c0:c1].index(k)
                hi = lo + docs[c0:c1].count(k)
                w = state.get(k, start.get(k, ws))
                zk, vk = zs[b, lo:hi], vs[b, lo:hi]
                pieces.append(zk @ w.T)
                state[k] = w + clip_update(vk.T @ zk, lr, tau, norm_group)
        outs.append(torch.cat(pieces))
        finals.append(state[docs[-1]])
    out = torch.stack(outs).to(z.dtype)
    return (out, torch.stack(finals)) if output_final_state else out

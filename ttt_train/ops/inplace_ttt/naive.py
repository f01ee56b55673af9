"""Reference In-Place TTT down-projection: a plain per-chunk, per-document loop with autograd.

Slow and memory-hungry (autograd keeps every per-chunk weight); it exists to be obviously
correct. Same signature and semantics as :func:`ttt_train.ops.inplace_ttt`.
"""

from __future__ import annotations

import torch

from .common import TTTStats, check_inputs, clip_update, state_dtype


def inplace_ttt_reference(z: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, *, chunk_size: int, lr: float,
                          doc_ids: torch.Tensor | None = None, max_update_norm: float | None = None,
                          initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                          norm_group=None, return_stats: bool = False):
    """Token ``t`` (chunk ``c``, document ``k``) outputs ``W_k^(c) z_t`` with ``W_k^(c)`` the start
    weight of document ``k`` (``initial_state`` for the row's first document, else ``weight``) plus
    ``clip(lr * V^T Z)`` of document ``k``'s tokens of every chunk before ``c`` (one clip per
    chunk and document). Returns ``[B, T, d]`` in ``z``'s dtype, and with ``output_final_state``
    also the last document's weight after the last chunk, ``[B, d, h]`` float32 (float64 for float64),
    and with ``return_stats`` a ``TTTStats`` (see ``inplace_ttt``).
    """
    lr, tau = check_inputs(z, v, weight, chunk_size=chunk_size, lr=lr, doc_ids=doc_ids,
                           max_update_norm=max_update_norm, initial_state=initial_state)
    B, T, _ = z.shape
    sdt = state_dtype(z.dtype)
    zs, vs, ws = z.to(sdt), v.to(sdt), weight.to(sdt)
    outs, finals, norms, lasts = [], [], [], []
    last_chunk = (T - 1) // chunk_size * chunk_size
    for b in range(B):
        docs = doc_ids[b].tolist() if doc_ids is not None else [0] * T
        start = {docs[0]: initial_state[b].to(sdt) if initial_state is not None else ws}
        state: dict[int, torch.Tensor] = {}  # document -> fast weight after the chunks seen so far
        pieces = []
        for c0 in range(0, T, chunk_size):
            c1 = min(c0 + chunk_size, T)
            kept = sorted(set(docs[c0:c1]))  # documents are contiguous and increasing
            for k in kept:
                lo = c0 + docs[c0:c1].index(k)
                hi = lo + docs[c0:c1].count(k)
                w = state.get(k, start.get(k, ws))
                zk, vk = zs[b, lo:hi], vs[b, lo:hi]
                pieces.append(zk @ w.T)
                m = vk.T @ zk
                if c0 == last_chunk and k == kept[0]:
                    lasts.append(w.detach())
                if return_stats and k == kept[-1] and (c0 < last_chunk or output_final_state):
                    norms.append(_frobenius(lr * m.detach(), norm_group))
                state[k] = w + clip_update(m, lr, tau, norm_group)
        outs.append(torch.cat(pieces))
        finals.append(state[docs[-1]])
    out = torch.stack(outs).to(z.dtype)
    result = (out, torch.stack(finals)) if output_final_state else (out,)
    if return_stats:
        norms = torch.stack(norms) if norms else ws.new_zeros(0)
        clipped = norms > tau if tau is not None else torch.zeros_like(norms, dtype=torch.bool)
        result += (TTTStats(norms, clipped, torch.stack(lasts)),)
    return result if len(result) > 1 else out


def _frobenius(u: torch.Tensor, norm_group) -> torch.Tensor:
    """``||u||_F`` of the whole matrix (its columns sharded over ``norm_group`` when given)."""
    sq = (u * u).sum()
    if norm_group is not None:
        torch.distributed.all_reduce(sq, group=norm_group)
    return sq.sqrt()

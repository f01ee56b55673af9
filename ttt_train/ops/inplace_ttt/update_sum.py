"""Per-sequence sum of the last document's fast-weight updates (what context parallelism ships)."""

from __future__ import annotations

import torch

from .common import check_inputs, clip_update, doc_starts, state_dtype


def ttt_update_sum(z: torch.Tensor, v: torch.Tensor, *, chunk_size: int, lr: float,
                   doc_ids: torch.Tensor | None = None, max_update_norm: float | None = None,
                   norm_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last_doc_id [B] int64, S [B, d, h])``: ``S`` is the sum over chunks of ``clip(lr * V^T Z)``
    of the tokens of each row's last document (chunks on the global grid of the given sequence),
    float32 (float64 for float64 inputs), differentiable (plain autograd). So the op's final state
    is ``weight + S`` unless the last document is the first one and an ``initial_state`` was given
    (then ``initial_state + S``). ``last_doc_id`` is ``doc_ids[:, -1]`` (0 without ``doc_ids``).
    Without clipping ``S`` is one GEMM per row; with clipping autograd keeps one ``[d, h]`` product
    per chunk of the last document (fine for a context-parallel shard of a few chunks).
    """
    lr, tau = check_inputs(z, v, None, chunk_size=chunk_size, lr=lr, doc_ids=doc_ids,
                           max_update_norm=max_update_norm)
    B, T, _ = z.shape
    sdt = state_dtype(z.dtype)
    sums = []
    for b, starts in enumerate(doc_starts(doc_ids, B)):
        p = starts[-1] if starts else 0
        zs, vs = z[b, p:].to(sdt), v[b, p:].to(sdt)
        if tau is None:  # no clip: one GEMM over the whole document
            sums.append(lr * (vs.T @ zs))
            continue
        cuts = [p] + list(range((p // chunk_size + 1) * chunk_size, T, chunk_size)) + [T]
        sums.append(sum(clip_update(vs[lo - p:hi - p].T @ zs[lo - p:hi - p], lr, tau, norm_group)
                        for lo, hi in zip(cuts[:-1], cuts[1:])))
    last = doc_ids[:, -1].to(torch.int64) if doc_ids is not None else torch.zeros(B, dtype=torch.int64,
                                                                                  device=z.device)
    return last, torch.stack(sums)

"""Tensor parallelism: ``h`` sharded over 2 gloo ranks with ``norm_group`` equals the unsharded op
and update sum, clipping active (float64, 1e-10). Outputs and dv are partial sums over ranks; z, weight, state
gradients are slices."""

from __future__ import annotations

import pytest
import torch

from ttt_train.ops import inplace_ttt, inplace_ttt_reference
from ttt_train.runtime.local_ranks import run_local_ranks

F64 = torch.float64
WORLD = 2


def _case():
    g = torch.Generator().manual_seed(0)
    B, T, d, h, C = 2, 14, 3, 7, 4
    z, v = torch.randn(B, T, h, generator=g, dtype=F64), torch.randn(B, T, d, generator=g, dtype=F64)
    w, w0 = torch.randn(d, h, generator=g, dtype=F64), torch.randn(B, d, h, generator=g, dtype=F64)
    g_out, g_fin = torch.randn(B, T, d, generator=g, dtype=F64), torch.randn(B, d, h, generator=g, dtype=F64)
    ids = torch.tensor([[0] * 6 + [1] * 8, [2] * 14])
    lr = 0.3
    norms = []  # norms of every (row, chunk, document) update of the whole matrix
    for b in range(B):
        for s in range(0, T, C):
            for k in ids[b, s:s + C].unique():
                m = ids[b, s:s + C] == k
                norms.append((lr * v[b, s:s + C][m].T @ z[b, s:s + C][m]).norm().item())
    tau = sorted(norms)[len(norms) // 2] * 0.999
    kw = dict(chunk_size=C, lr=lr, doc_ids=ids, max_update_norm=tau)
    return z, v, w, w0, g_out, g_fin, kw


def _run(fn, z, v, w, w0, g_out, g_fin, kw, group):
    z, v, w, w0 = (t.clone().requires_grad_() for t in (z, v, w, w0))
    out, fin = fn(z, v, w, initial_state=w0, output_final_state=True, norm_group=group, **kw)
    ((out * g_out).sum() + (fin * g_fin).sum()).backward()
    return {"out": out.detach(), "final": fin.detach(), "dz": z.grad, "dv": v.grad, "dweight": w.grad,
            "dinitial": w0.grad}


def _rank_fn():
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    z, v, w, w0, g_out, g_fin, kw = _case()
    h = z.shape[-1]
    sl = slice(rank * h // world, (rank + 1) * h // world)
    shard = (z[..., sl], v, w[:, sl], w0[..., sl], g_out, g_fin[..., sl], kw)
    return {"fast": _run(inplace_ttt, *shard, group=dist.group.WORLD),
            "reference": _run(inplace_ttt_reference, *shard, group=dist.group.WORLD),
            "local_norms": _run(inplace_ttt, *shard, group=None),
            "stats": {(fn.__name__, tau): _stats(fn, *shard, group=dist.group.WORLD, tau=tau)
                      for fn in (inplace_ttt, inplace_ttt_reference) for tau in (None, kw["max_update_norm"])}}


def _stats(fn, z, v, w, w0, g_out, g_fin, kw, group, tau):
    """The op's statistics; with ``tau`` None the unclipped norms are summed over the group separately."""
    return fn(z, v, w, initial_state=w0, norm_group=group, return_stats=True, **dict(kw, max_update_norm=tau))[-1]


def _gather(per_rank: list[dict]) -> dict:
    """Unshard: sum the partial outputs and dv, concatenate the slices along h."""
    res = {k: sum(r[k] for r in per_rank) for k in ("out", "dv")}
    for k in ("final", "dz", "dweight", "dinitial"):
        res[k] = torch.cat([r[k] for r in per_rank], dim=-1)
    return res


@pytest.mark.slow
def test_tp_sharded_equals_unsharded():
    results = run_local_ranks(_rank_fn, WORLD, timeout=240)
    z, v, w, w0, g_out, g_fin, kw = _case()
    full = _run(inplace_ttt, z, v, w, w0, g_out, g_fin, kw, group=None)
    for impl in ("fast", "reference"):
        got = _gather([r[impl] for r in results])
        for k, ref in full.items():
            err = ((got[k] - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-10, (impl, k, err)
    local = _gather([r["local_norms"] for r in results])  # per-shard norms clip differently
    assert not torch.allclose(local["out"], full["out"], rtol=1e-6, atol=0)
    for (name, tau), _ in results[0]["stats"].items():  # statistics are those of the whole matrix
        want = _stats(inplace_ttt, z, v, w, w0, g_out, g_fin, kw, group=None, tau=tau)
        assert 0 < want.clipped.sum() < len(want.clipped) if tau else not want.clipped.any()
        for r in results:
            got = r["stats"][name, tau]
            assert ((got.update_norms - want.update_norms).abs().max() / want.update_norms.max()).item() < 1e-10
            assert torch.equal(got.clipped, want.clipped)
        last = torch.cat([r["stats"][name, tau].last_state for r in results], dim=-1)
        assert ((last - want.last_state).abs().max() / want.last_state.abs().max()).item() < 1e-10

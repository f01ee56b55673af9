"""Float64 exactness of the In-Place TTT operator (METHOD.md sections 2-5).

fast path (inplace_ttt) == reference (inplace_ttt_reference) == a brute-force token-level formula,
forward and every gradient (z, v, weight, initial_state, final state), relative tolerance 1e-10
(max abs error over max abs value).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from ttt_train.ops import inplace_ttt, inplace_ttt_reference

RTOL = 1e-10
F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def make_doc_ids(mode: str, B: int, T: int, C: int, gen: torch.Generator) -> torch.Tensor | None:
    """Document ids ``[B, T]``; each row gets its own boundaries."""
    if mode == "none":
        return None
    rows = []
    for b in range(B):
        if mode == "edges":  # boundaries exactly at chunk edges
            cuts = [t for t in range(C, T, C) if (t // C + b) % 2 == 0]
        elif mode == "off":  # boundaries strictly inside chunks
            cuts = sorted({min(T - 1, max(1, t + 1 + b % 2)) for t in range(C // 2, T, C)} - set(range(0, T, C)))
        elif mode == "single":  # single-token documents next to long ones
            cuts = sorted({1, 2, T // 2, T // 2 + 1, T - 1} - {0})
        elif mode == "random":
            cuts = sorted(set(torch.randint(1, T, (3,), generator=gen).tolist()))
        else:
            raise ValueError(mode)
        ids = torch.zeros(T, dtype=torch.int64)
        for c in cuts:
            ids[c:] += 1
        rows.append(ids + 3 * b)  # ids need not start at 0
    return torch.stack(rows)


def piece_norms(z, v, lr, C, doc_ids) -> list[float]:
    """Frobenius norms of lr * V^T Z of every (row, chunk, document) piece."""
    B, T, _ = z.shape
    out = []
    for b in range(B):
        docs = doc_ids[b] if doc_ids is not None else torch.zeros(T, dtype=torch.int64)
        for s in range(0, T, C):
            for k in docs[s:s + C].unique():
                m = docs[s:s + C] == k
                out.append((lr * v[b, s:s + C][m].T @ z[b, s:s + C][m]).norm().item())
    return out


def run(fn, z, v, w, w0, *, seed=7, **kw):
    """Outputs and gradients of ``<O, gO> + <final, gF>`` (random gO, gF) w.r.t. every input."""
    z, v, w = (t.detach().clone().requires_grad_() for t in (z, v, w))
    w0 = w0.detach().clone().requires_grad_() if w0 is not None else None
    o, f = fn(z, v, w, initial_state=w0, output_final_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() \
        + (f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum()
    loss.backward()
    res = {"out": o.detach(), "final": f.detach(), "dz": z.grad, "dv": v.grad,
           "dweight": w.grad if w.grad is not None else torch.zeros_like(w)}
    if w0 is not None:
        res["dinitial"] = w0.grad
    return res


def inputs(B, T, d, h, seed=0, init=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, h, generator=g, dtype=F64)
    v = torch.randn(B, T, d, generator=g, dtype=F64)
    w = torch.randn(d, h, generator=g, dtype=F64)
    w0 = torch.randn(B, d, h, generator=g, dtype=F64) if init else None
    return z, v, w, w0


def brute_force(z, v, w, w0, *, chunk_size, lr, doc_ids=None, max_update_norm=None):
    """METHOD.md section 5 as a token-level sum, no chunk loop (plain autograd, float64):
    ``out_t = base z_t + lr sum_{s: chunk(s) < chunk(t), doc(s) = doc(t)} c_{u(s)} (z_s . z_t) v_s`` with
    ``c_u = min(1, tau / ||lr sum_{s in u} v_s z_s^T||)`` per (chunk, document) unit ``u``, the norm
    from Gram matrices. Returns (out, final state)."""
    B, T, _ = z.shape
    outs, finals = [], []
    chunk = torch.arange(T) // chunk_size
    for b in range(B):
        docs = doc_ids[b] if doc_ids is not None else torch.zeros(T, dtype=torch.int64)
        same_doc = docs[:, None] == docs[None, :]
        unit = same_doc & (chunk[:, None] == chunk[None, :])
        kz, kv = z[b] @ z[b].T, v[b] @ v[b].T
        if max_update_norm is None:
            scale = torch.ones(T, dtype=z.dtype)
        else:
            rows = (unit * kz * kv).sum(dim=1)
            sq = lr ** 2 * unit.to(z.dtype) @ rows  # ||update of the unit of token s||^2, per s
            norm = sq.sqrt()
            clipped = norm > max_update_norm
            scale = torch.where(clipped, max_update_norm / torch.where(clipped, norm, 1.0), 1.0)
        first = docs == docs[0]
        base = [w0[b] if (w0 is not None and first[t]) else w for t in range(T)]
        plain = torch.stack([base[t] @ z[b, t] for t in range(T)])
        mask = same_doc & (chunk[None, :] < chunk[:, None])  # [t, s]
        outs.append(plain + lr * (mask * kz * scale[None, :]) @ v[b])
        last = docs == docs[-1]
        fin = (w0[b] if (w0 is not None and bool(first[-1])) else w)
        finals.append(fin + lr * (v[b] * (scale * last)[:, None]).T @ z[b])
    return torch.stack(outs), torch.stack(finals)


SHAPES = [(1, 16, 4, 6), (2, 13, 3, 5), (3, 11, 5, 2)]
CHUNKS = [1, 4, 5, "T", "T+3"]
DOCS = ["none", "edges", "off", "single", "random"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}d{}h{}".format(*s))
@pytest.mark.parametrize("chunk", CHUNKS, ids=str)
@pytest.mark.parametrize("docs", DOCS)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_fast_equals_reference(shape, chunk, docs, clip):
    B, T, d, h = shape
    C = {"T": T, "T+3": T + 3}.get(chunk, chunk)
    seed = zlib.crc32(repr((shape, chunk, docs, clip)).encode()) % 1000
    init = seed % 2 == 0  # half of the cases start the first document from a given state
    z, v, w, w0 = inputs(B, T, d, h, seed=seed, init=init)
    doc_ids = make_doc_ids(docs, B, T, C, torch.Generator().manual_seed(seed))
    lr, tau = 0.3, None
    if clip:
        norms = sorted(piece_norms(z, v, lr, C, doc_ids))
        tau = norms[len(norms) // 2] * 0.999  # about half of the pieces clip
        assert norms[0] < tau < norms[-1] or len(norms) == 1
    kw = dict(chunk_size=C, lr=lr, doc_ids=doc_ids, max_update_norm=tau)
    fast, ref = run(inplace_ttt, z, v, w, w0, **kw), run(inplace_ttt_reference, z, v, w, w0, **kw)
    assert fast.keys() == ref.keys()
    for name in ref:
        assert fast[name].dtype == ref[name].dtype == F64, name
        assert rel_err(fast[name], ref[name]) < RTOL, (name, rel_err(fast[name], ref[name]))


@pytest.mark.parametrize("docs", ["none", "off", "single", "random"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("init", [False, True], ids=["weight", "initial_state"])
def test_reference_equals_brute_force(docs, clip, init):
    B, T, d, h, C = 2, 14, 3, 4, 4
    z, v, w, w0 = inputs(B, T, d, h, seed=11, init=init)
    doc_ids = make_doc_ids(docs, B, T, C, torch.Generator().manual_seed(3))
    lr, tau = 0.4, None
    if clip:
        norms = sorted(piece_norms(z, v, lr, C, doc_ids))
        tau = norms[len(norms) // 2] * 0.999
    kw = dict(chunk_size=C, lr=lr, doc_ids=doc_ids, max_update_norm=tau)
    ref = run(inplace_ttt_reference, z, v, w, w0, **kw)
    brute = run(lambda *a, initial_state, output_final_state, **k: brute_force(*a, initial_state, **k),
                z, v, w, w0, **kw)
    for name in ref:
        assert rel_err(ref[name], brute[name]) < RTOL, (name, rel_err(ref[name], brute[name]))


def test_clip_gradient_is_differentiated():
    """With every piece clipped, the result differs from a detached clip scale: the scale's own
    gradient is part of the fast path's gradients."""
    B, T, d, h, C = 1, 12, 3, 4, 3
    z, v, w, _ = inputs(B, T, d, h, seed=5)
    tau = min(piece_norms(z, v, 0.5, C, None)) * 0.5
    fast = run(inplace_ttt, z, v, w, None, chunk_size=C, lr=0.5, max_update_norm=tau)
    ref = run(inplace_ttt_reference, z, v, w, None, chunk_size=C, lr=0.5, max_update_norm=tau)
    assert rel_err(fast["dz"], ref["dz"]) < RTOL
    # the clip-scale term is not negligible here, so a detached scale would be caught
    unclipped = run(inplace_ttt_reference, z, v, w, None, chunk_size=C, lr=0.5)
    assert rel_err(unclipped["dz"], ref["dz"]) > 1e-3


def test_no_grad_and_output_only():
    """Forward under no_grad, and a backward through the output alone (no final state asked)."""
    z, v, w, _ = inputs(2, 10, 3, 4, seed=2)
    kw = dict(chunk_size=3, lr=0.2, doc_ids=make_doc_ids("off", 2, 10, 3, None), max_update_norm=1.0)
    with torch.no_grad():
        o = inplace_ttt(z, v, w, **kw)
    assert rel_err(o, inplace_ttt_reference(z, v, w, **kw)) < RTOL
    grads = []
    for fn in (inplace_ttt, inplace_ttt_reference):
        zz, vv, ww = (t.clone().requires_grad_() for t in (z, v, w))
        (fn(zz, vv, ww, **kw) ** 2).sum().backward()
        grads.append((zz.grad, vv.grad, ww.grad))
    for a, b in zip(*grads):
        assert rel_err(a, b) < RTOL


def test_final_state_only_gradient():
    """A loss on the final state only (output unused) reaches z, v and weight correctly."""
    z, v, w, _ = inputs(1, 9, 3, 4, seed=4)
    grads = []
    for fn in (inplace_ttt, inplace_ttt_reference):
        zz, vv, ww = (t.clone().requires_grad_() for t in (z, v, w))
        _, f = fn(zz, vv, ww, chunk_size=4, lr=0.3, output_final_state=True, max_update_norm=2.0)
        (f ** 2).sum().backward()
        grads.append((zz.grad, vv.grad, ww.grad))
    for a, b in zip(*grads):
        assert rel_err(a, b) < RTOL


def test_non_contiguous_inputs():
    """Views (transposed batch, sliced features) give the same results as contiguous copies."""
    B, T, d, h = 2, 10, 3, 4
    g = torch.Generator().manual_seed(9)
    z = torch.randn(T, B, h, generator=g, dtype=F64).transpose(0, 1)
    v = torch.randn(B, T, 2 * d, generator=g, dtype=F64)[..., ::2]
    w = torch.randn(h, d, generator=g, dtype=F64).T
    w0 = torch.randn(B, h, d, generator=g, dtype=F64).transpose(1, 2)
    kw = dict(chunk_size=3, lr=0.3, doc_ids=make_doc_ids("off", B, T, 3, g), max_update_norm=1.0)
    fast = run(inplace_ttt, z, v, w, w0, **kw)
    ref = run(inplace_ttt_reference, z.contiguous(), v.contiguous(), w.contiguous(), w0.contiguous(), **kw)
    for name in ref:
        assert rel_err(fast[name], ref[name]) < RTOL, name


def last_piece_norms(z, v, lr, C, doc_ids, with_last_chunk) -> list[float]:
    """Norms of lr * V^T Z of each chunk's last document (the updates the op computes), rows in order."""
    B, T, _ = z.shape
    out = []
    for b in range(B):
        docs = doc_ids[b] if doc_ids is not None else torch.zeros(T, dtype=torch.int64)
        for s in range(0, T, C):
            if s + C >= T and not with_last_chunk:
                break
            m = docs[s:s + C] == docs[min(s + C, T) - 1]
            out.append((lr * v[b, s:s + C][m].T @ z[b, s:s + C][m]).norm().item())
    return out


@pytest.mark.parametrize("docs", DOCS)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("final", [False, True], ids=["out", "final"])
def test_stats_fast_equals_reference_and_definition(docs, clip, final):
    B, T, d, h, C = 3, 13, 3, 5, 4
    z, v, w, w0 = inputs(B, T, d, h, seed=21, init=True)
    doc_ids = make_doc_ids(docs, B, T, C, torch.Generator().manual_seed(2))
    expected = torch.tensor(last_piece_norms(z, v, 0.3, C, doc_ids, final), dtype=F64)
    tau = expected.median().item() if clip else None
    kw = dict(chunk_size=C, lr=0.3, doc_ids=doc_ids, max_update_norm=tau, initial_state=w0,
              output_final_state=final, return_stats=True)
    fast, ref = inplace_ttt(z, v, w, **kw)[-1], inplace_ttt_reference(z, v, w, **kw)[-1]
    for stats in (fast, ref):
        assert rel_err(stats.update_norms, expected) < RTOL
        assert torch.equal(stats.clipped, expected > tau if clip else torch.zeros(len(expected), dtype=torch.bool))
        assert not stats.update_norms.requires_grad and not stats.last_state.requires_grad
    assert 0 < fast.clipped.sum() < len(expected) if clip else not fast.clipped.any()
    assert rel_err(fast.last_state, ref.last_state) < RTOL
    # the last chunk's first document reads the state its output used: out = Z W_last^T there
    out = inplace_ttt(z, v, w, **kw)[0]
    lo = (T - 1) // C * C
    for b in range(B):
        rows = doc_ids[b, lo:] == doc_ids[b, lo] if doc_ids is not None else torch.ones(T - lo, dtype=torch.bool)
        assert rel_err(out[b, lo:][rows], z[b, lo:][rows] @ fast.last_state[b].T) < RTOL

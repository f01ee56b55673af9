"""Properties of the In-Place TTT operator: document isolation, document alone, causality, half
precision, update sums and input validation (float64 tolerances 1e-12 unless stated)."""

from __future__ import annotations

import pytest
import torch

from ttt_train.ops import inplace_ttt, inplace_ttt_reference

F64 = torch.float64
OPS = [inplace_ttt, inplace_ttt_reference]
OP_IDS = ["fast", "reference"]


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ids_from_cuts(T: int, cuts: list[int]) -> torch.Tensor:
    ids = torch.zeros(T, dtype=torch.int64)
    for c in cuts:
        ids[c:] += 1
    return ids


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("clip", [None, 1.5])
def test_document_isolation(op, clip):
    """Perturbing the tokens of one document changes no output of another, and a loss on one
    document's outputs gives zero gradient to every other document's tokens."""
    T, d, h, C = 23, 3, 4, 5
    doc = ids_from_cuts(T, [4, 11, 12, 20])[None]  # boundaries off and at chunk edges, a 1-token doc
    z, v, w = rand(1, T, h, seed=1), rand(1, T, d, seed=2), rand(d, h, seed=3)
    kw = dict(chunk_size=C, lr=0.5, doc_ids=doc, max_update_norm=clip)
    base = op(z, v, w, **kw)
    for k in doc.unique():
        mine = doc[0] == k
        z2, v2 = z.clone(), v.clone()
        z2[0, mine] += rand(int(mine.sum()), h, seed=10)
        v2[0, mine] += rand(int(mine.sum()), d, seed=11)
        out = op(z2, v2, w, **kw)
        torch.testing.assert_close(out[0, ~mine], base[0, ~mine], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out[0, mine], base[0, mine])
        zz, vv = z.clone().requires_grad_(), v.clone().requires_grad_()
        op(zz, vv, w, **kw)[0, mine].sum().backward()
        assert zz.grad[0, ~mine].abs().max() == 0 and vv.grad[0, ~mine].abs().max() == 0


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("clip", [None, 2.0])
def test_document_at_chunk_boundary_equals_alone(op, clip):
    """A document starting at a chunk edge gives the same outputs, final state and gradients as
    the same tokens run alone."""
    T, d, h, C, start = 22, 3, 4, 4, 8
    doc = ids_from_cuts(T, [3, start])[None]
    z, v, w = rand(1, T, h, seed=4), rand(1, T, d, seed=5), rand(d, h, seed=6)
    g = rand(1, T - start, d, seed=7)
    res = []
    for zz, vv, ids in ((z, v, doc), (z[:, start:], v[:, start:], None)):
        zz, vv, ww = zz.clone().requires_grad_(), vv.clone().requires_grad_(), w.clone().requires_grad_()
        out, fin = op(zz, vv, ww, chunk_size=C, lr=0.4, doc_ids=ids, max_update_norm=clip, output_final_state=True)
        out = out[:, -(T - start):]
        ((out * g).sum() + fin.square().sum()).backward()
        res.append((out, fin, zz.grad[:, -(T - start):], vv.grad[:, -(T - start):], ww.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_causality(op, docs, clip):
    """Outputs of chunks < i do not change when tokens of chunks >= i change; chunk i's own
    outputs do not change when only its targets (and later tokens) change."""
    T, d, h, C = 20, 3, 4, 4
    z, v, w = rand(2, T, h, seed=8), rand(2, T, d, seed=9), rand(d, h, seed=10)
    ids = torch.stack([ids_from_cuts(T, [6]), ids_from_cuts(T, [8, 13])]) if docs else None
    kw = dict(chunk_size=C, lr=0.5, doc_ids=ids, max_update_norm=clip)
    base = op(z, v, w, **kw)
    for i in range(T // C):
        s = i * C
        z2, v2 = z.clone(), v.clone()
        z2[:, s:] += 1.0
        v2[:, s:] -= 2.0
        out = op(z2, v2, w, **kw)
        torch.testing.assert_close(out[:, :s], base[:, :s], rtol=0, atol=0)
        if i < T // C - 1:
            assert not torch.allclose(out[:, s + C:], base[:, s + C:])
        z3, v3 = z.clone(), v.clone()
        z3[:, s + C:] += 1.0
        v3[:, s:] -= 2.0
        torch.testing.assert_close(op(z3, v3, w, **kw)[:, :s + C], base[:, :s + C], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_close_to_float64(dtype):
    """Half/float32 inputs: float32 state, outputs and gradients in the input dtype, close to the
    float64 reference on the same (rounded) inputs."""
    B, T, d, h, C = 2, 40, 8, 16, 8
    z, v, w = rand(B, T, h, seed=1).to(dtype), (0.3 * rand(B, T, d, seed=2)).to(dtype), rand(d, h, seed=3).to(dtype)
    doc = torch.stack([ids_from_cuts(T, [13]), ids_from_cuts(T, [])])
    kw = dict(chunk_size=C, lr=0.05, doc_ids=doc, max_update_norm=2.0, output_final_state=True)
    res = []
    for fn, cast in ((inplace_ttt, lambda t: t), (inplace_ttt_reference, lambda t: t.to(F64))):
        zz, vv, ww = (cast(t).clone().requires_grad_() for t in (z, v, w))
        out, fin = fn(zz, vv, ww, **kw)
        assert out.dtype == zz.dtype and fin.dtype == (F64 if zz.dtype == F64 else torch.float32)
        ((out.float() * torch.linspace(-1, 1, d)).sum() + fin.float().sum()).backward()
        assert zz.grad.dtype == vv.grad.dtype == ww.grad.dtype == zz.dtype
        res.append((out, fin, zz.grad, vv.grad, ww.grad))
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-6}[dtype]
    for name, a, b in zip(["out", "final", "dz", "dv", "dweight"], *res):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        # the final state is accumulated in float32 from exact products of the rounded inputs
        assert err < (1e-6 if name == "final" else tol), (name, err)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("cuts", [[], [5], [8], [3, 17]], ids=str)
def test_state_carries_across_a_split(clip, cuts):
    """Running [0, 8) then [8, T) with the first part's final state as the second's initial state
    (when the document continues across the split) equals one run, outputs and gradients. The
    final state minus `weight` is the last document's update sum: what context parallelism ships."""
    T, d, h, C, split = 19, 3, 4, 4, 8
    z, v, w = rand(1, T, h, seed=1), rand(1, T, d, seed=2), rand(d, h, seed=3)
    ids = ids_from_cuts(T, cuts)[None]
    kw = dict(chunk_size=C, lr=0.3, max_update_norm=clip)
    g = rand(1, T, d, seed=4)
    runs = []
    for whole in (True, False):
        zz, vv, ww = (t.clone().requires_grad_() for t in (z, v, w))
        if whole:
            out = inplace_ttt(zz, vv, ww, doc_ids=ids, **kw)
        else:
            first, state = inplace_ttt(zz[:, :split], vv[:, :split], ww, doc_ids=ids[:, :split],
                                       output_final_state=True, **kw)
            continues = bool(ids[0, split] == ids[0, split - 1])
            second = inplace_ttt(zz[:, split:], vv[:, split:], ww, doc_ids=ids[:, split:],
                                 initial_state=state if continues else None, **kw)
            out = torch.cat([first, second], dim=1)
        (out * g).sum().backward()
        runs.append((out, zz.grad, vv.grad, ww.grad))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _args(**over):
    B, T, d, h = 2, 6, 3, 4
    a = dict(z=torch.randn(B, T, h), v=torch.randn(B, T, d), weight=torch.randn(d, h), chunk_size=2, lr=0.1)
    a.update(over)
    return a


BAD = [
    (dict(z=torch.randn(2, 6)), r"z must be \[B, T, h\]"),
    (dict(v=torch.randn(2, 6, 5)), r"v must be \[B, T, d\]"),
    (dict(v=torch.randn(2, 5, 3)), r"v must be \[B, T, d\]"),
    (dict(weight=torch.randn(3, 5)), r"weight must be \[d, h\]"),
    (dict(weight=torch.randn(3, 4, dtype=F64)), "share one dtype"),
    (dict(z=torch.randint(0, 3, (2, 6, 4))), "z must be float32/float64/bfloat16/float16"),
    (dict(chunk_size=0), "chunk_size must be an int >= 1"),
    (dict(chunk_size=2.0), "chunk_size must be an int >= 1"),
    (dict(lr=float("nan")), "lr must be finite"),
    (dict(lr=float("inf")), "lr must be finite"),
    (dict(lr=-1.0), "lr .* must be >= 0"),
    (dict(lr="fast"), "lr must be a real number"),
    (dict(max_update_norm=0.0), "max_update_norm must be > 0"),
    (dict(max_update_norm=float("nan")), "max_update_norm must be finite"),
    (dict(doc_ids=torch.tensor([[0, 0, 1, 1, 0, 2]] * 2)), "non-decreasing"),
    (dict(doc_ids=torch.zeros(2, 5, dtype=torch.int64)), r"doc_ids must be \[B, T\]"),
    (dict(doc_ids=torch.zeros(2, 6)), "doc_ids must be an integer tensor"),
    (dict(doc_ids=torch.full((2, 6), -1)), "doc_ids must be >= 0"),
    (dict(initial_state=torch.randn(1, 3, 4)), r"initial_state must be \[B, d, h\]"),
    (dict(initial_state=torch.randn(2, 4, 3)), r"initial_state must be \[B, d, h\]"),
]


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("over,match", BAD, ids=[m for _, m in BAD])
def test_bad_input_raises_value_error(op, over, match):
    a = _args(**over)
    with pytest.raises(ValueError, match=match):
        op(a.pop("z"), a.pop("v"), a.pop("weight"), **a)

"""LMAlignedTarget: per-chunk, per-document depthwise "same" convolution and projection (METHOD.md
section 3). Float64 comparisons at 1e-12."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttt_train.ops import LMAlignedTarget
from ttt_train.ops.target import chunked_depthwise_conv

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def loop_conv(x, w, C, doc_ids):
    """y_t = sum_m w[:, 0, m] x_{t+m-p} over sources in t's chunk and document (plain loops)."""
    B, T, d = x.shape
    k = w.shape[-1]
    p = k // 2
    y = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            for m in range(k):
                s = t + m - p
                if 0 <= s < T and s // C == t // C and (doc_ids is None or doc_ids[b, s] == doc_ids[b, t]):
                    y[b, t] += w[:, 0, m] * x[b, s]
    return y


@pytest.mark.parametrize("T,C", [(12, 4), (13, 5), (7, 10), (9, 1)])
def test_conv_equals_conv1d_per_chunk(T, C):
    """Without documents: F.conv1d with "same" zero padding applied to every chunk separately."""
    B, d, k = 2, 3, 5
    x, w = rand(B, T, d, seed=1), rand(d, 1, k, seed=2)
    y = chunked_depthwise_conv(x, w, C)
    ref = torch.cat([F.conv1d(x[:, s:s + C].transpose(1, 2), w, padding=k // 2, groups=d).transpose(1, 2)
                     for s in range(0, T, C)], dim=1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_conv_with_documents_equals_loops(k):
    B, T, d, C = 2, 17, 3, 6
    x, w = rand(B, T, d, seed=3), rand(d, 1, k, seed=4)
    ids = torch.tensor([[0] * 4 + [1] * 1 + [2] * 7 + [3] * 5, [5] * 6 + [6] * 11])
    torch.testing.assert_close(chunked_depthwise_conv(x, w, C, ids), loop_conv(x, w, C, ids), rtol=1e-12, atol=1e-12)


def test_target_never_mixes_documents_or_chunks():
    """Perturbing one document's (or one chunk's) source changes no target outside it."""
    B, T, d, C = 1, 20, 4, 8
    tgt = LMAlignedTarget(d, kernel_size=5, init_std=0.5).double()
    with torch.no_grad():
        tgt.conv.weight.copy_(rand(d, 1, 5, seed=5))
        tgt.proj.weight.copy_(rand(d, d, seed=6))
    x = rand(B, T, d, seed=7)
    ids = torch.tensor([[0] * 5 + [1] * 3 + [2] * 12])  # boundaries at 5 and 8 (a chunk edge)
    base = tgt(x, C, ids)
    for region in [ids[0] == k for k in range(3)] + [(torch.arange(T) // C) == c for c in range(3)]:
        x2 = x.clone()
        x2[0, region] += 1.0
        out = tgt(x2, C, ids)
        torch.testing.assert_close(out[0, ~region], base[0, ~region], rtol=0, atol=0)
        assert not torch.allclose(out[0, region], base[0, region])


def test_init_zero_target_with_gradient():
    """At init V == 0 exactly and the conv gets gradient; the projection gets gradient as soon as
    the conv is non-zero (at init its gradient is exactly 0: it multiplies conv(X) == 0)."""
    d, k, std = 64, 5, 0.02
    torch.manual_seed(0)
    tgt = LMAlignedTarget(d, kernel_size=k, init_std=std)
    assert tgt.conv.weight.shape == (d, 1, k) and tgt.proj.weight.shape == (d, d)
    assert tgt.conv.weight.abs().max() == 0
    off_diag = tgt.proj.weight - torch.diag(tgt.proj.weight.diagonal())
    assert off_diag.abs().max() == 0
    assert 0.5 * std < tgt.proj.weight.diagonal().std().item() < 1.5 * std
    x = torch.randn(2, 24, d)
    ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    out = tgt(x, 8, ids)
    assert out.shape == x.shape and out.abs().max() == 0
    g = torch.randn_like(out)
    (out * g).sum().backward()
    assert tgt.conv.weight.grad.abs().max() > 0
    assert tgt.proj.weight.grad.abs().max() == 0
    with torch.no_grad():
        tgt.conv.weight -= 0.1 * tgt.conv.weight.grad  # one SGD step
    tgt.zero_grad()
    (tgt(x, 8, ids) * g).sum().backward()
    assert tgt.proj.weight.grad.abs().max() > 0 and tgt.conv.weight.grad.abs().max() > 0


@pytest.mark.parametrize("init", ["next_token", "next_token_difference"])
@pytest.mark.parametrize("use_proj", [True, False])
def test_next_token_inits_target_the_next_source_vector(use_proj, init):
    """init=next_token: V_t = scale * x_{t+1} inside t's chunk and document, 0 where t+1 lies beyond;
    init=next_token_difference: V_t = scale * (x_{t+1} - x_t), -scale * x_t where t+1 lies beyond."""
    d, C, scale = 8, 4, 0.5
    tgt = LMAlignedTarget(d, kernel_size=5, use_proj=use_proj, init=init, init_scale=scale).double()
    x = rand(2, 11, d, seed=3)
    ids = torch.tensor([[0] * 6 + [1] * 5, [0] * 11])
    expected = torch.zeros_like(x)
    for b in range(2):
        for t in range(11):
            if t + 1 < 11 and (t + 1) // C == t // C and ids[b, t + 1] == ids[b, t]:
                expected[b, t] = x[b, t + 1]
            if init == "next_token_difference":
                expected[b, t] -= x[b, t]
    expected *= scale if use_proj else 1.0
    torch.testing.assert_close(tgt(x, C, ids), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="init must be one of"):
        LMAlignedTarget(d, init="zeros")
    with pytest.raises(ValueError, match="kernel of at least 3"):
        LMAlignedTarget(d, kernel_size=1, init=init)


def test_no_projection_and_reset():
    d = 6
    tgt = LMAlignedTarget(d, kernel_size=3, use_proj=False).double()
    assert set(dict(tgt.named_parameters())) == {"conv.weight"}
    with torch.no_grad():
        tgt.conv.weight.copy_(rand(d, 1, 3, seed=1))
    x = rand(1, 10, d, seed=2)
    torch.testing.assert_close(tgt(x, 4), chunked_depthwise_conv(x, tgt.conv.weight, 4))
    tgt.reset_parameters()
    assert tgt(x, 4).abs().max() == 0


def test_state_dict_names_and_release_orientation():
    """proj.weight is nn.Linear-oriented: V = conv(X) @ proj.weight^T (the release's ttt_proj.weight
    is its transpose)."""
    d = 4
    tgt = LMAlignedTarget(d, kernel_size=1).double()
    assert set(tgt.state_dict()) == {"conv.weight", "proj.weight"}
    p = rand(d, d, seed=3)
    with torch.no_grad():
        tgt.conv.weight.fill_(1.0)
        tgt.proj.weight.copy_(p)
    x = rand(1, 5, d, seed=4)
    torch.testing.assert_close(tgt(x, 2), x @ p.T)


def test_bad_input():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        LMAlignedTarget(8, kernel_size=4)
    tgt = LMAlignedTarget(8)
    with pytest.raises(ValueError, match=r"x must be \[B, T, 8\]"):
        tgt(torch.randn(1, 5, 7), 4)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        tgt(torch.randn(1, 5, 8), 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        tgt(torch.randn(1, 3, 8), 2, torch.tensor([[0, 1, 0]]))
    with pytest.raises(ValueError, match=r"doc_ids must be \[B, T\]"):
        tgt(torch.randn(1, 3, 8), 2, torch.tensor([[0, 1]]))

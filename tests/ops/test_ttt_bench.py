"""The benchmark CLI runs at a tiny size and prints one parseable JSON object; its materialised
baseline computes the same function as the reference (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch

from tests.support.cli import json_from_module
from ttt_train.ops import inplace_ttt_reference
from ttt_train.ops.bench import VARIANTS, materialized_ttt


def test_bench_json_tiny():
    res = json_from_module("ttt_train.ops.bench", "--json", "--T", "40", "--d", "4", "--h", "8", "--chunk", "16",
                           "--threads", "1", "--repeats", "2", "--warmup", "0", "--device", "cpu", timeout=120)
    assert (res["T"], res["d"], res["h"], res["chunk"], res["n_chunks"], res["threads"]) == (40, 4, 8, 16, 3, 1)
    for name in VARIANTS:
        assert res[f"{name}_ms"] > 0
        assert res[f"{name}_peak_extra_mib"] > 0
    for key in ("ttt_over_plain_mlp", "ttt_over_materialized", "memory_method"):
        assert key in res
    # default cp=8, tp=1, state [1, 4, 8] float32: 2*(cp-1) = 14 ring messages each way, forward ones
    # carry the int64 depth and key (16 + 128 bytes), backward ones the depth and the gradient (8 + 128
    # bytes); a middle rank sends two of each
    assert res["cp_scan_bytes_per_layer_step_all_ranks"] == 14 * 144 + 14 * 136
    assert res["cp_scan_bytes_per_layer_step_max_rank"] == 2 * 144 + 2 * 136
    # log: 3 levels; a rank sends at most 6 forward totals (8 + 136 each: one total per message)
    # and 3 backward messages (two totals fused but for one at the last level)
    assert res["cp_scan_log_bytes_per_layer_step_max_rank"] == 6 * 144 + 3 * 8 + 6 * 136
    assert res["ttt_over_plain_mlp"] == pytest.approx(res["ttt_mlp_ms"] / res["plain_mlp_ms"], rel=1e-3)
    assert res["ttt_over_materialized"] == pytest.approx(res["ttt_down_ms"] / res["materialized_down_ms"], rel=1e-3)


@pytest.mark.parametrize("T,C", [(12, 4), (13, 5), (6, 8)])
def test_materialized_equals_reference(T, C):
    g = torch.Generator().manual_seed(0)
    B, d, h = 2, 3, 4
    ins = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, T, h), (B, T, d), (d, h))]
    res = []
    for fn in (lambda z, v, w: materialized_ttt(z, v, w, C, 0.3),
               lambda z, v, w: inplace_ttt_reference(z, v, w, chunk_size=C, lr=0.3)):
        z, v, w = (t.clone().requires_grad_() for t in ins)
        out = fn(z, v, w)
        (out * torch.arange(d, dtype=out.dtype)).sum().backward()
        res.append((out, z.grad, v.grad if v.grad is not None else torch.zeros_like(v), w.grad))
    for a, b in zip(*res):
        assert (a == b).all() if b.abs().max() == 0 else ((a - b).abs().max() / b.abs().max()).item() < 1e-10

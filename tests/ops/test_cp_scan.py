"""Tests of the CP exclusive scan (ttt_train.ops.cp_scan): reference, ring (gloo ranks), layouts."""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.distributed as dist

from ttt_train.ops.cp_scan import (
    LAYOUTS,
    bytes_sent_per_call,
    combine,
    cp_exclusive_scan,
    exclusive_scan_reference,
    num_segments,
    segment_order,
    validate_cp_alignment,
)
from ttt_train.runtime.local_ranks import run_local_ranks

F64 = torch.float64


# ----------------------------------------------------------------------------- reference

def test_reference_without_boundaries_is_exclusive_cumsum():
    g = torch.Generator().manual_seed(0)
    sums = torch.randn(5, 2, 3, 4, generator=g, dtype=F64)
    pk, ps = exclusive_scan_reference(torch.zeros(5, 2, dtype=torch.int64), sums)
    expected = torch.cat([torch.zeros_like(sums[:1]), torch.cumsum(sums, 0)[:-1]])
    torch.testing.assert_close(ps, expected, rtol=0, atol=1e-12)
    assert pk.tolist() == [[-1, -1]] + [[0, 0]] * 4


def test_reference_with_boundaries_hand_computed():
    keys = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 2], [1, 3]])  # [n=5, B=2]
    base = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=F64)
    mat = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    sums = base[:, None, None, None] * mat.expand(5, 2, 3, 2)
    pk, ps = exclusive_scan_reference(keys, sums)
    # row 0: ids 0 0 1 1 1 -> prefixes 0, 1, 1+2, 4, 4+8 ; row 1: ids 0 1 2 2 3 -> 0, 1, 2, 4, 4+8
    want = torch.tensor([[0, 0], [1, 1], [3, 2], [4, 4], [12, 12]], dtype=F64)
    torch.testing.assert_close(ps, want[:, :, None, None] * mat, rtol=0, atol=1e-12)
    assert pk.tolist() == [[-1, -1], [0, 0], [0, 1], [1, 2], [1, 2]]


def _random_keys(g, n, b):
    return torch.cumsum((torch.rand(n, b, generator=g) < 0.4).long(), 0) + torch.randint(0, 3, (1, b), generator=g)


def test_combine_is_associative_on_non_decreasing_keys():
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        keys, sums = _random_keys(g, 3, 4), torch.randn(3, 4, 2, 3, generator=g, dtype=F64)
        a, b, c = ((keys[i], sums[i]) for i in range(3))
        left = combine(*combine(*a, *b), *c)
        right = combine(*a, *combine(*b, *c))
        assert torch.equal(left[0], right[0])
        torch.testing.assert_close(left[1], right[1], rtol=0, atol=1e-12)
    # any bracketing of a longer fold equals the sequential reference (inclusive end)
    keys, sums = _random_keys(g, 7, 3), torch.randn(7, 3, 2, 2, generator=g, dtype=F64)
    items = [(keys[i], sums[i]) for i in range(7)]

    def tree(lo, hi):  # balanced bracketing
        if hi - lo == 1:
            return items[lo]
        mid = (lo + hi) // 2
        return combine(*tree(lo, mid), *tree(mid, hi))

    pk, ps = exclusive_scan_reference(torch.cat([keys, keys[-1:]]), torch.cat([sums, sums[-1:]]))
    k, s = tree(0, 7)
    assert torch.equal(k, pk[-1])
    torch.testing.assert_close(s, ps[-1], rtol=0, atol=1e-12)
    # the check can fail: decreasing ids break associativity
    k3, s3 = torch.tensor([0, 1, 0]), torch.ones(3, 1, 1, 1, dtype=F64)
    x, y, z = ((k3[i:i + 1], s3[i]) for i in range(3))
    assert not torch.equal(combine(*combine(*x, *y), *z)[1], combine(*x, *combine(*y, *z))[1])


# ----------------------------------------------------------------------------- layout, accounting

def test_segment_order():
    assert segment_order(3, "contiguous") == [[0], [1], [2]]
    assert segment_order(3, "load_balanced") == [[0, 5], [1, 4], [2, 3]]
    assert num_segments(4, "load_balanced") == 8
    with pytest.raises(ValueError, match="layout"):
        segment_order(2, "zigzag")


def test_validate_cp_alignment():
    assert validate_cp_alignment(32768, 4, 1024) == 4096
    assert validate_cp_alignment(32768, 4, 4096, layout="contiguous") == 8192
    assert validate_cp_alignment(8192, 1, 4096) == 4096
    with pytest.raises(ValueError) as e:
        validate_cp_alignment(32768, 4, 3000)
    msg = str(e.value)
    for part in ("seq_length=32768", "context_parallel_size=4", "chunk_size=3000", "4096", "24000"):
        assert part in msg, msg
    with pytest.raises(ValueError, match=r"seq_length=1000.*context_parallel_size=3.*chunk_size=8"):
        validate_cp_alignment(1000, 3, 8)
    with pytest.raises(ValueError, match="chunk_size=4096"):
        validate_cp_alignment(32768, 8, 4096)  # shard 2048 < chunk
    validate_cp_alignment(32768, 8, 4096, layout="contiguous")


def test_bytes_formula():
    acc = bytes_sent_per_call((2, 3, 4), 4, "load_balanced", torch.float32)
    assert acc.forward_message == 8 * 2 + 2 * 3 * 4 * 4 and acc.backward_message == 2 * 3 * 4 * 4
    assert acc.forward_per_rank == (112, 224, 224, 112)
    assert acc.forward_total == 2 * (4 - 1) * 112 and acc.backward_total == 2 * (4 - 1) * 96
    acc = bytes_sent_per_call((1, 8, 8), 3, "contiguous", torch.bfloat16)
    assert acc.forward_per_rank == (136, 136, 0) and acc.backward_per_rank == (0, 128, 128)
    assert bytes_sent_per_call((1, 8, 8), 1).forward_total == 0


# ----------------------------------------------------------------------------- distributed (rank side)

def _case(seed, n, b, d, h, kind, dtype):
    g = torch.Generator().manual_seed(seed)
    sums = torch.randn(n, b, d, h, generator=g, dtype=dtype)
    w = torch.randn(n, b, d, h, generator=g, dtype=dtype)
    if kind == "none":
        keys = torch.zeros(n, b, dtype=torch.int64)
    elif kind == "pattern":  # row 0: ids 0 0 1 1 2 2 ..., row 1: 3 4 4 5 5 ... (both equal and changing)
        s = torch.arange(n)
        keys = torch.stack([s // 2, 3 + (s + 1) // 2], 1)[:, :b].contiguous()
    else:
        keys = _random_keys(g, n, b)
    return keys, sums, w


class _CountSends:
    """Counts bytes passed to dist.isend while active."""

    def __enter__(self):
        self.bytes, self._orig = 0, dist.isend

        def isend(tensor, *a, **k):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig(tensor, *a, **k)

        dist.isend = isend
        return self

    def __exit__(self, *exc):
        dist.isend = self._orig


def _check_scan(group, layout, kind, seed, b=2, d=3, h=2, dtype=F64, late=False):
    """Run the ring scan on this rank's slice of a global case; return errors vs the reference.
    With `late`, the rank's last segment sum is produced by while_waiting (late sums)."""
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    n = num_segments(cp, layout)
    keys, sums, w = _case(seed, n, b, d, h, kind, dtype)
    full = sums.clone().requires_grad_()
    ref_k, ref_s = exclusive_scan_reference(keys, full)
    (ref_grad,) = torch.autograd.grad((w * ref_s).sum(), full)
    idx = segment_order(cp, layout)[r]
    local = sums[idx].clone().requires_grad_()
    calls = []
    with _CountSends() as fwd:
        if late and len(idx) > 1:
            pk, ps, extra = cp_exclusive_scan(keys[idx], [local[0], None], group=group, layout=layout,
                                              while_waiting=lambda: (calls.append(1) or local * 2, [local[1] * 1]))
        else:
            pk, ps, extra = cp_exclusive_scan(keys[idx], local, group=group, layout=layout,
                                              while_waiting=lambda: calls.append(1) or local * 2)
    with _CountSends() as bwd:
        (w[idx] * ps).sum().backward()
    acc = bytes_sent_per_call((b, d, h), cp, layout, dtype)
    return dict(
        keys_equal=torch.equal(pk, ref_k[idx]),
        fwd_err=(ps - ref_s[idx]).abs().max().item(),
        bwd_err=(local.grad - ref_grad[idx]).abs().max().item(),
        shapes=(tuple(pk.shape), tuple(ps.shape), ps.dtype) == ((len(idx), b), (len(idx), b, d, h), dtype),
        ww_calls=len(calls), ww_grad=extra is not None and extra.requires_grad and torch.equal(extra, local * 2),
        bytes=(fwd.bytes, bwd.bytes), bytes_expected=(acc.forward_per_rank[r], acc.backward_per_rank[r]),
        boundaries=bool((keys[1:] != keys[:-1]).any()),
    )


def _rank_main(world):
    rank = dist.get_rank()
    out = {}
    for layout in LAYOUTS:
        for kind in ("none", "pattern", "random"):
            out[("world", layout, kind)] = _check_scan(None, layout, kind, seed=100 + world)
        out[("world_f32_b1", layout)] = _check_scan(None, layout, "random", seed=7, b=1, d=4, h=3,
                                                    dtype=torch.float32)
        out[("world", layout, "late")] = _check_scan(None, layout, "pattern", seed=200 + world, late=True)
    # subgroups: world 4 -> TP=2 x CP=2 (CP groups {0,2} and {1,3}); world 2 -> two CP groups of 1
    if world in (2, 4):
        tp = world // 2
        groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
        mine = rank % tp
        for layout in LAYOUTS:
            out[("subgroup", layout)] = _check_scan(groups[mine], layout, "pattern", seed=50 + mine)
    # without while_waiting: extra is None
    pk, ps, extra = cp_exclusive_scan(torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1, 1, 1))
    out["no_ww_extra"] = extra
    # while_waiting runs before the incoming state exists: rank 0 starts 0.5 s late
    dist.barrier()
    if rank == 0:
        time.sleep(0.5)
    start = time.time()  # rank 0: the moment it begins (and can first send)
    stamps = {}
    cp_exclusive_scan(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1, 1, 1), layout="contiguous",
                      while_waiting=lambda: stamps.setdefault("ww", time.time()))
    out["timing"] = (start, stamps["ww"])
    # late sums must be trailing, with a producer
    try:
        cp_exclusive_scan(torch.zeros(2, 1, dtype=torch.int64), [None, torch.ones(1, 1, 1)])
        out["bad_late"] = "accepted"
    except ValueError as e:
        out["bad_late"] = str(e)
    # bad shapes are refused
    try:
        cp_exclusive_scan(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1, 1, 1))
        out["bad_shape"] = "accepted"
    except ValueError as e:
        out["bad_shape"] = str(e)
    return out


# ----------------------------------------------------------------------------- distributed (parent side)

WORLDS = [2, 3, 4]


@functools.cache
def _launch(world):
    return run_local_ranks(_rank_main, world, world, timeout=120)


def _scan_results(world, prefix):
    return [(r, key, v) for r, res in enumerate(_launch(world)) for key, v in res.items()
            if isinstance(key, tuple) and key[0] in prefix]


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_ring_forward_matches_reference(world):
    results = _scan_results(world, ("world", "world_f32_b1"))
    assert len(results) == world * 10
    bad = [(r, key, v) for r, key, v in results if not (v["keys_equal"] and v["shapes"] and v["fwd_err"] <= (
        1e-12 if key[0] == "world" else 1e-5))]
    assert not bad, bad
    assert any(v["boundaries"] for *_, v in results) and not all(v["boundaries"] for *_, v in results)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_ring_backward_matches_reference(world):
    results = _scan_results(world, ("world", "world_f32_b1"))
    bad = [(r, key, v["bwd_err"]) for r, key, v in results
           if not v["bwd_err"] <= (1e-12 if key[0] == "world" else 1e-5)]
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_while_waiting_called_once_and_returned(world):
    res = _launch(world)
    for r, key, v in _scan_results(world, ("world", "world_f32_b1", "subgroup")):
        assert v["ww_calls"] == 1 and v["ww_grad"], (r, key, v)
    assert all(x["no_ww_extra"] is None for x in res)
    # rank 1 ran while_waiting before rank 0 (0.5 s late) had even started: it did not wait first
    rank0_start, _ = res[0]["timing"]
    _, ww_rank1 = res[1]["timing"]
    assert ww_rank1 < rank0_start, (res[0]["timing"], res[1]["timing"])
    assert all("keys must be int64 [m=2, B]" in x["bad_shape"] for x in res)
    assert all("only trailing entries of `sums` may be None" in x["bad_late"] for x in res)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_bytes_accounting_matches_bytes_sent(world):
    for r, key, v in _scan_results(world, ("world", "world_f32_b1", "subgroup")):
        assert v["bytes"] == v["bytes_expected"], (r, key, v)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_cp_subgroups(world):
    results = _scan_results(world, ("subgroup",))
    assert len(results) == world * 2
    for r, key, v in results:
        assert v["keys_equal"] and v["shapes"] and v["fwd_err"] <= 1e-12 and v["bwd_err"] <= 1e-12, (r, key, v)

"""Tests of the CP exclusive scan (ttt_train.ops.cp_scan): reference, layouts, the traffic model, the
log scan's hypercube simulated in one process, and both algorithms on gloo ranks (counted vs modelled)."""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ttt_train.ops.cp_scan import (
    ALGORITHMS,
    LAYOUTS,
    ScanStats,
    combine,
    cp_exclusive_scan,
    exclusive_scan_reference,
    num_segments,
    scan_traffic,
    segment_order,
    validate_cp_alignment,
)
from ttt_train.ops.cp_scan import log as log_scan
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


def test_traffic_ring_closed_form():
    t = scan_traffic(4, (2, 3, 4), algorithm="ring", dtype=torch.float32)
    fwd_msg, bwd_msg = 8 + 8 * 2 + 2 * 3 * 4 * 4, 8 + 2 * 3 * 4 * 4  # depth, keys, state / depth, state
    assert [r["bytes_sent"] for r in t.forward.per_rank()] == [fwd_msg, 2 * fwd_msg, 2 * fwd_msg, fwd_msg]
    assert t.forward.total_bytes == 2 * (4 - 1) * fwd_msg and t.backward.total_bytes == 2 * (4 - 1) * bwd_msg
    assert t.forward.rounds == t.backward.rounds == 2 * (4 - 1)
    assert [r["rounds"] for r in t.forward.per_rank()] == [6, 5, 4, 3]  # rank r's second shard waits 2cp-2-r hops
    t = scan_traffic(3, (1, 8, 8), algorithm="ring", layout="contiguous", dtype=torch.bfloat16)
    assert [r["bytes_sent"] for r in t.forward.per_rank()] == [144, 144, 0]
    assert [r["bytes_sent"] for r in t.backward.per_rank()] == [0, 136, 136]
    assert scan_traffic(1, (1, 8, 8)).forward.total_bytes == 0


@pytest.mark.parametrize("cp", [2, 4, 8, 16, 32, 64])
def test_traffic_log_closed_form_for_powers_of_two(cp):
    L = cp.bit_length() - 1
    b, shape = 2, (2, 3, 4)
    part = 8 * b + 2 * 3 * 4 * 4
    t = scan_traffic(cp, shape, algorithm="log")
    assert (t.forward.rounds, t.backward.rounds) == (L + 1, L)
    assert scan_traffic(cp, shape, algorithm="log", late=False).forward.rounds == L
    fwd, bwd = t.forward.per_rank(), t.backward.per_rank()
    for r in range(cp):
        # forward: round 0 one A total; rounds 1..L-1 A and B totals (to two partners); round L a B
        # total only towards the lower partner (a descending stream's total is not needed at the end)
        sends_last = bool(r & (cp >> 1))
        assert fwd[r]["bytes_sent"] == (2 * L - 1 + sends_last) * (8 + part), r
        assert fwd[r]["messages_sent"] == 2 * L - 1 + sends_last
        assert fwd[r]["rounds"] == L + 1 - sends_last  # the senders of round L receive nothing in it
        # backward: L rounds of one message to the partner (B-gradient and A-gradient totals fused)
        assert bwd[r]["bytes_sent"] == (L - 1) * (8 + 2 * part) + 8 + (1 + sends_last) * part, r
        assert bwd[r]["messages_sent"] == L and bwd[r]["rounds"] == L
    assert sum(f["bytes_sent"] for f in fwd) == sum(f["bytes_received"] for f in fwd)


# ----------------------------------------------------------------------------- the hypercube in one process


def _simulate(cp, layout, keys, values, merge, backward, late):
    """Run every rank's Hypercube of one call in memory (segment s's element: (keys[s], values[s]));
    returns (results per rank, rounds)."""
    streams, local = log_scan._streams(layout, backward, late)
    order = segment_order(cp, layout)
    cubes = [log_scan.Hypercube(cp, r, streams, [(keys[order[r][i]], values[order[r][i]]) for i in local], merge)
             for r in range(cp)]
    rounds = len(cubes[0].rounds)
    for j in range(rounds):
        out = [c.outgoing(j) for c in cubes]
        for r, cube in enumerate(cubes):
            wanted = cube.incoming(j)
            assert {p for p in range(cp) if r in out[p]} == set(wanted), (cp, j, r)  # sends match receives
            assert all(len(out[p][r]) == n for p, n in wanted.items())
            cube.absorb(j, {p: out[p][r] for p in wanted})
    return [log_scan._results(c, layout, backward) for c in cubes], rounds


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hypercube_simulated_equals_reference(layout):
    """Every cp from 1 to 17 (powers of two and not), forward with and without late sums, backward."""
    g = torch.Generator().manual_seed(3)
    for cp in range(1, 18):
        n, order = num_segments(cp, layout), segment_order(cp, layout)
        for _ in range(3):
            keys = _random_keys(g, n, 3)
            sums = torch.randn(n, 3, 2, 2, generator=g, dtype=F64).requires_grad_()
            ref_k, ref_s = exclusive_scan_reference(keys, sums)
            w = torch.randn_like(ref_s)
            (ref_g,) = torch.autograd.grad((w * ref_s).sum() + 0 * sums.sum(), sums)
            for late in (False, True) if layout == "load_balanced" else (False,):
                res, rounds = _simulate(cp, layout, keys, sums.detach(), log_scan.key_merge, False, late)
                assert rounds == log_scan.num_levels(cp) + (late and cp > 1)
                for r in range(cp):
                    for i, seg in enumerate(order[r]):
                        if res[r][i] is None:
                            assert seg == 0
                            continue
                        assert torch.equal(res[r][i][0], ref_k[seg]), (cp, r, seg)
                        torch.testing.assert_close(res[r][i][1], ref_s[seg], rtol=0, atol=1e-12)
            gates = (ref_k == keys).long()
            res, _ = _simulate(cp, layout, gates, w, log_scan.gate_merge, True, False)
            for r in range(cp):
                for i, seg in enumerate(order[r]):
                    if res[r][i] is None:
                        assert seg == n - 1
                        continue
                    torch.testing.assert_close(res[r][i][1], ref_g[seg], rtol=0, atol=1e-12)


def test_hypercube_schedule_is_data_independent_and_log_depth():
    for cp in range(1, 65):
        levels = log_scan.num_levels(cp)
        assert 2 ** levels >= cp and (levels == 0 or 2 ** (levels - 1) < cp)
        t = scan_traffic(cp, (1, 2, 2), algorithm="log")
        assert t.forward.num_rounds == (levels + 1 if cp > 1 else 0) and t.backward.num_rounds == levels
        assert t.forward.rounds <= levels + 1 and t.backward.rounds <= levels
        if cp & (cp - 1) == 0:  # powers of two: every transfer is with the partner r ^ 2^level
            streams, _ = log_scan._streams("load_balanced", False, True)
            for r in range(cp):
                for transfers in log_scan.plan(cp, r, streams):
                    for _, level, sends, recvs in transfers:
                        assert set(sends) | set(recvs) <= {r ^ (1 << level)}


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
    elif kind == "every_shard":  # a document starts at every segment
        keys = torch.arange(n)[:, None].expand(n, b).contiguous()
    else:
        keys = _random_keys(g, n, b)
    return keys, sums, w


class _CountSends:
    """Counts bytes and messages handed to torch.distributed's isend while active (also through
    batch_isend_irecv, which checks its ops against c10d.isend): independent of the scan's counts."""

    def __enter__(self):
        self.bytes, self.messages, self._orig = 0, 0, c10d.isend

        def isend(tensor, *a, **k):
            self.bytes += tensor.numel() * tensor.element_size()
            self.messages += 1
            return self._orig(tensor, *a, **k)

        dist.isend = c10d.isend = isend
        return self

    def __exit__(self, *exc):
        dist.isend = c10d.isend = self._orig


def _check_scan(group, layout, kind, seed, algorithm, b=2, d=3, h=2, dtype=F64, late=False, wire=None):
    """Run the scan on this rank's slice of a global case; return errors vs the reference and the
    counts (the scan's, an independent isend counter's, the traffic model's).
    With `late`, the rank's last segment sum is produced by while_waiting (late sums); `wire`: the
    scan's wire dtype."""
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    n = num_segments(cp, layout)
    keys, sums, w = _case(seed, n, b, d, h, kind, dtype)
    full = sums.clone().requires_grad_()
    ref_k, ref_s = exclusive_scan_reference(keys, full)
    (ref_grad,) = torch.autograd.grad((w * ref_s).sum() + 0 * full.sum(), full)  # (a CP group of 1: no prefix)
    idx = segment_order(cp, layout)[r]
    local = sums[idx].clone().requires_grad_()
    calls, stats = [], ScanStats()
    uses_late = late and len(idx) > 1
    with _CountSends() as fwd:
        if uses_late:
            pk, ps, extra = cp_exclusive_scan(keys[idx], [local[0], None], group=group, layout=layout,
                                              algorithm=algorithm, stats=stats, wire_dtype=wire,
                                              while_waiting=lambda: (calls.append(1) or local * 2, [local[1] * 1]))
        else:
            pk, ps, extra = cp_exclusive_scan(keys[idx], local, group=group, layout=layout, algorithm=algorithm,
                                              stats=stats, wire_dtype=wire,
                                              while_waiting=lambda: calls.append(1) or local * 2)
    with _CountSends() as bwd:
        (w[idx] * ps).sum().backward()
    model = scan_traffic(cp, (b, d, h), algorithm=algorithm, layout=layout, dtype=wire or dtype, late=uses_late)
    return dict(
        keys_equal=torch.equal(pk, ref_k[idx]),
        fwd_err=(ps - ref_s[idx]).abs().max().item(),
        bwd_err=(local.grad - ref_grad[idx]).abs().max().item(),
        scale=(ref_s.abs().max().item(), ref_grad.abs().max().item()),
        shapes=(tuple(pk.shape), tuple(ps.shape), ps.dtype) == ((len(idx), b), (len(idx), b, d, h), dtype),
        ww_calls=len(calls), ww_grad=extra is not None and extra.requires_grad and torch.equal(extra, local * 2),
        counted=stats.as_dict(), isend=((fwd.messages, fwd.bytes), (bwd.messages, bwd.bytes)),
        model=dict(forward=model.forward.per_rank()[r], backward=model.backward.per_rank()[r]),
        boundaries=bool((keys[1:] != keys[:-1]).any()),
    )


def _rank_main(world, algorithms=ALGORITHMS):
    rank = dist.get_rank()
    out = {}
    for algorithm in algorithms:
        for layout in LAYOUTS:
            for kind in ("none", "pattern", "every_shard", "random"):
                out[("world", algorithm, layout, kind)] = _check_scan(None, layout, kind, 100 + world, algorithm)
            out[("world_f32_b1", algorithm, layout)] = _check_scan(None, layout, "random", 7, algorithm, b=1, d=4,
                                                                   h=3, dtype=torch.float32)
            out[("world", algorithm, layout, "late")] = _check_scan(None, layout, "pattern", 200 + world, algorithm,
                                                                    late=True)
            out[("wire_bf16", algorithm, layout)] = _check_scan(None, layout, "random", 300 + world, algorithm, b=2,
                                                                d=8, h=8, dtype=torch.float32, late=True,
                                                                wire=torch.bfloat16)
    # subgroups: world 2 -> two CP groups of 1; world 4 -> TP=2 x CP=2 (CP groups {0,2} and {1,3});
    # world 8 -> TP=2 x CP=4
    if world in (2, 4, 8):
        tp = 2
        groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
        mine = rank % tp
        for algorithm in algorithms:
            for layout in LAYOUTS:
                out[("subgroup", algorithm, layout)] = _check_scan(groups[mine], layout, "pattern", 50 + mine,
                                                                   algorithm, late=True)
    for algorithm in algorithms:
        # without while_waiting: extra is None
        _, _, extra = cp_exclusive_scan(torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1, 1, 1),
                                        algorithm=algorithm)
        out[("no_ww_extra", algorithm)] = extra
        # while_waiting runs before the incoming state exists: rank 0 starts 0.5 s late
        dist.barrier()
        if rank == 0:
            time.sleep(0.5)
        start = time.time()  # rank 0: the moment it begins (and can first send)
        stamps = {}
        cp_exclusive_scan(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1, 1, 1), layout="contiguous",
                          algorithm=algorithm, while_waiting=lambda stamps=stamps: stamps.setdefault("ww", time.time()))
        out[("timing", algorithm)] = (start, stamps["ww"])
    # late sums must be trailing, with a producer
    try:
        cp_exclusive_scan(torch.zeros(2, 1, dtype=torch.int64), [None, torch.ones(1, 1, 1)])
        out["bad_late"] = "accepted"
    except ValueError as e:
        out["bad_late"] = str(e)
    # bad shapes and names are refused
    for name, call in (("bad_shape", lambda: cp_exclusive_scan(torch.zeros(1, 1, dtype=torch.int64),
                                                              torch.ones(1, 1, 1, 1))),
                       ("bad_algorithm", lambda: cp_exclusive_scan(torch.zeros(2, 1, dtype=torch.int64),
                                                                  torch.ones(2, 1, 1, 1), algorithm="tree"))):
        try:
            call()
            out[name] = "accepted"
        except ValueError as e:
            out[name] = str(e)
    return out


# ----------------------------------------------------------------------------- distributed (parent side)

WORLDS = [2, 3, 4, pytest.param(8, marks=pytest.mark.slow)]


@functools.cache
def _launch(world):
    return run_local_ranks(_rank_main, world, world, timeout=600)


def _scan_results(world, prefix):
    return [(r, key, v) for r, res in enumerate(_launch(world)) for key, v in res.items()
            if isinstance(key, tuple) and key[0] in prefix]


def _tolerance(key):
    return 1e-12 if key[0] in ("world", "subgroup") else 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_forward_matches_reference(world):
    results = _scan_results(world, ("world", "world_f32_b1"))
    assert len(results) == world * len(ALGORITHMS) * len(LAYOUTS) * 6
    bad = [(r, key, v) for r, key, v in results
           if not (v["keys_equal"] and v["shapes"] and v["fwd_err"] <= _tolerance(key))]
    assert not bad, bad
    assert any(v["boundaries"] for *_, v in results) and not all(v["boundaries"] for *_, v in results)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_backward_matches_reference(world):
    results = _scan_results(world, ("world", "world_f32_b1", "subgroup"))
    bad = [(r, key, v["bwd_err"]) for r, key, v in results if not v["bwd_err"] <= _tolerance(key)]
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_bf16_wire_rounds_within_bf16_precision(world):
    """float32 sums sent as bfloat16: results differ from the float32 reference, by bf16 rounding only."""
    results = _scan_results(world, ("wire_bf16",))
    assert len(results) == world * len(ALGORITHMS) * len(LAYOUTS)
    for r, key, v in results:
        assert v["keys_equal"] and v["shapes"], (r, key)
        assert v["fwd_err"] <= 2e-2 * v["scale"][0] and v["bwd_err"] <= 2e-2 * v["scale"][1], (r, key, v)
    assert max(v["fwd_err"] for *_, v in results) > 1e-6 and max(v["bwd_err"] for *_, v in results) > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_while_waiting_called_once_and_returned(world):
    res = _launch(world)
    for r, key, v in _scan_results(world, ("world", "world_f32_b1", "subgroup")):
        assert v["ww_calls"] == 1 and v["ww_grad"], (r, key, v)
    for algorithm in ALGORITHMS:
        assert all(x[("no_ww_extra", algorithm)] is None for x in res)
        # rank 1 ran while_waiting before rank 0 (0.5 s late) had even started: it did not wait first
        rank0_start, _ = res[0][("timing", algorithm)]
        _, ww_rank1 = res[1][("timing", algorithm)]
        assert ww_rank1 < rank0_start, (algorithm, res[0][("timing", algorithm)], res[1][("timing", algorithm)])
    assert all("keys must be int64 [m=2, B]" in x["bad_shape"] for x in res)
    assert all("only trailing entries of `sums` may be None" in x["bad_late"] for x in res)
    assert all("unknown CP scan algorithm 'tree'" in x["bad_algorithm"] for x in res)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_counted_traffic_equals_model_and_isend(world):
    """Each rank's counted rounds, messages and bytes (both directions) equal the traffic model's, and
    the sends equal an independent count of the tensors handed to isend."""
    results = _scan_results(world, ("world", "world_f32_b1", "subgroup", "wire_bf16"))
    for r, key, v in results:
        counted = v["counted"]
        assert counted["algorithm"] == key[1], (r, key)
        for i, direction in enumerate(("forward", "backward")):
            assert counted[direction] == v["model"][direction], (r, key, direction, counted, v["model"])
            assert v["isend"][i] == (counted[direction]["messages_sent"], counted[direction]["bytes_sent"]), (r, key)
    # the log scan's depth: ceil(log2 cp) rounds (+1 forward with late sums); the ring's 2(cp-1)
    for algorithm, layout, late in (("log", "load_balanced", True), ("ring", "load_balanced", True),
                                    ("log", "contiguous", False)):
        depth = max(res[("world", algorithm, layout, "late" if late else "pattern")]["counted"]["forward"]["rounds"]
                    for res in _launch(world))
        levels = (world - 1).bit_length()
        want = {"log": levels + (layout == "load_balanced"), "ring": 2 * (world - 1)}[algorithm]
        assert depth == want, (algorithm, layout, depth, want)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_cp_subgroups(world):
    results = _scan_results(world, ("subgroup",))
    assert len(results) == world * len(ALGORITHMS) * len(LAYOUTS)
    for r, key, v in results:
        assert v["keys_equal"] and v["shapes"] and v["fwd_err"] <= 1e-12 and v["bwd_err"] <= 1e-12, (r, key, v)

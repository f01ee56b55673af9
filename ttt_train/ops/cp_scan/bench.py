"""Benchmark of the context-parallel scan: both algorithms on local gloo ranks, counted and timed.

``python -m ttt_train.ops.cp_scan.bench [--cp 2 4 8] [--batch 1 --d 256 --h 512] [--repeats 5]``
prints one JSON object. For each CP size and algorithm (``ring``, ``log``) it runs ``--repeats``
scan calls as ``TTTMLP`` makes them (load-balanced, the second sum late, documents with
boundaries), forward then backward, on ``cp`` local processes, and reports:

- ``forward`` / ``backward``: ``rounds`` (dependent communication rounds, counted on the wire:
  the deepest message depth any rank received), ``max_bytes_sent`` / ``max_bytes_received`` (the
  most one rank moved) and ``bytes_sent_per_rank`` / ``messages_sent_per_rank``, all as counted by
  the ranks, and ``wall_ms`` (median over repeats of the slowest rank; ``wall_ms_min`` the fastest
  repeat), each call started together after a barrier;
- ``counted_equals_model``: every rank's counts equal :func:`scan_traffic`'s prediction;
- ``model``: the prediction (rounds, most bytes per rank) at ``--model-cp`` sizes (default 16 32 64).

Wall times here are of gloo over loopback on a CPU; the network estimate for a cluster is the
dry-run plan's (``parallel.links``).

``--wire-error`` measures instead what sending the partial sums as bfloat16 costs in accuracy, on a
real-size layer state (default ``--d 2560 --h 2432``: Qwen3-4B's W_down slice at TP 4): each of the
``2 cp`` shards' sum is one chunk's ``lr V^T Z`` (``--tokens`` tokens of random z, v; documents
change at two shard starts), scanned with a float32 and a bfloat16 wire by both algorithms;
reported are the relative Frobenius errors of the bf16 run against the fp32 run (and of the fp32
run against the single-process float32 reference) of the prefixes, of the layer-output
corrections ``Z P^T`` they make, and of the gradients of the sums (upstream gradients random).
Measured at cp 8 (about 12 GB over the 8 ranks and the parent): bf16 vs fp32 2.5e-3 (ring) and
2.0e-3 (log), the worst segment 3.1e-3 / 2.6e-3; fp32 vs single process 0 (ring: the same fold)
and 4e-8 (log).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from .accounting import scan_traffic
from .layout import segment_order
from .messages import ScanStats
from .scan import ALGORITHMS, cp_exclusive_scan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _rank_bench(algorithm: str, shape: tuple[int, int, int], dtype: str, repeats: int, warmup: int) -> dict:
    """On each rank: `warmup + repeats` forward + backward calls; wall times and the last call's counts."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    b, d, h = shape
    g = torch.Generator().manual_seed(0)  # the same global case on every rank
    n = 2 * cp
    keys = torch.cumsum((torch.rand(n, b, generator=g) < 0.3).long(), 0)
    sums = torch.randn(n, b, d, h, generator=g).to(DTYPES[dtype])
    grad = torch.randn(2, b, d, h, generator=g).to(DTYPES[dtype])
    idx = segment_order(cp, "load_balanced")[rank]
    times, stats = [], None
    for i in range(warmup + repeats):
        local = sums[idx].clone().requires_grad_()
        stats = ScanStats()
        dist.barrier()
        t0 = time.perf_counter()
        _, ps, _ = cp_exclusive_scan(keys[idx], [local[0], None], layout="load_balanced", algorithm=algorithm,
                                     stats=stats, while_waiting=lambda local=local: (None, [local[1]]))
        t1 = time.perf_counter()
        ps.backward(grad)
        t2 = time.perf_counter()
        if i >= warmup:
            times.append((t1 - t0, t2 - t1))
    return {"times": times, "counted": stats.as_dict()}


def _summary(per_rank: list[dict], direction: int, name: str) -> dict:
    counted = [r["counted"][name] for r in per_rank]
    walls = [max(r["times"][i][direction] for r in per_rank) for i in range(len(per_rank[0]["times"]))]
    return {"rounds": max(c["rounds"] for c in counted),
            "max_bytes_sent": max(c["bytes_sent"] for c in counted),
            "max_bytes_received": max(c["bytes_received"] for c in counted),
            "bytes_sent_per_rank": [c["bytes_sent"] for c in counted],
            "messages_sent_per_rank": [c["messages_sent"] for c in counted],
            "wall_ms": round(1e3 * statistics.median(walls), 3), "wall_ms_min": round(1e3 * min(walls), 3)}


def run_bench(args) -> dict:
    from functools import partial

    from ttt_train.ops.cp_scan import bench  # by its import name (not __main__), for the rank processes
    from ttt_train.runtime.local_ranks import run_local_ranks

    shape = (args.batch, args.d, args.h)
    dtype = DTYPES[args.dtype]
    result = {"backend": "gloo", "device": "cpu", "state": list(shape), "dtype": args.dtype,
              "state_bytes": args.batch * args.d * args.h * torch.empty((), dtype=dtype).element_size(),
              "layout": "load_balanced", "late_second_sum": True, "repeats": args.repeats, "warmup": args.warmup,
              "measured": [], "model": []}
    for cp in args.cp:
        for algorithm in ALGORITHMS:
            per_rank = run_local_ranks(partial(bench._rank_bench, algorithm, shape, args.dtype, args.repeats, args.warmup),
                                       cp, timeout=args.timeout)
            model = scan_traffic(cp, shape, algorithm=algorithm, dtype=dtype)
            predicted = [{"forward": f, "backward": b} for f, b in zip(model.forward.per_rank(),
                                                                        model.backward.per_rank())]
            counted = [{k: r["counted"][k] for k in ("forward", "backward")} for r in per_rank]
            result["measured"].append({"cp": cp, "algorithm": algorithm,
                                       "forward": _summary(per_rank, 0, "forward"),
                                       "backward": _summary(per_rank, 1, "backward"),
                                       "counted_equals_model": counted == predicted})
    for cp in args.model_cp:
        for algorithm in ALGORITHMS:
            t = scan_traffic(cp, shape, algorithm=algorithm, dtype=dtype)
            result["model"].append({"cp": cp, "algorithm": algorithm, **{
                name: {"rounds": p.rounds, "max_bytes_sent": p.max_bytes_sent, "max_bytes_received": p.max_bytes_received}
                for name, p in (("forward", t.forward), ("backward", t.backward))}})
    return result


def _wire_case(cp: int, shape: tuple[int, int, int], tokens: int, seg: int) -> tuple:
    """Segment `seg`'s (z [B, T, h], sum lr V^T Z [B, d, h], upstream gradient [B, d, h]), float32."""
    b, d, h = shape
    g = torch.Generator().manual_seed(1000 + seg)
    z = torch.nn.functional.silu(torch.randn(b, tokens, h, generator=g)) * torch.randn(b, tokens, h, generator=g)
    v = 0.02 * torch.randn(b, tokens, d, generator=g)
    return z, 3.0 * v.transpose(1, 2) @ z, torch.randn(b, d, h, generator=g)


def _wire_keys(cp: int, batch: int) -> torch.Tensor:
    """Document ids at each segment's end: new documents start at shards cp // 2 and cp + 1."""
    seg = torch.arange(2 * cp)
    return ((seg >= cp // 2).long() + (seg >= cp + 1).long())[:, None].expand(2 * cp, batch).contiguous()


def _rank_wire_error(algorithm: str, shape: tuple[int, int, int], tokens: int) -> dict:
    """This rank's two segments scanned with fp32 and bf16 wires: prefixes, corrections, sum gradients."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    idx = segment_order(cp, "load_balanced")[rank]
    cases = [_wire_case(cp, shape, tokens, s) for s in idx]
    keys = _wire_keys(cp, shape[0])[idx]
    out = {}
    for wire in (torch.float32, torch.bfloat16):
        sums = torch.stack([c[1] for c in cases]).requires_grad_()
        _, ps, _ = cp_exclusive_scan(keys, sums, algorithm=algorithm, wire_dtype=wire)
        ps.backward(torch.stack([c[2] for c in cases]))
        out[str(wire).removeprefix("torch.")] = (ps.detach(), sums.grad)
    out["corrections"] = {w: torch.stack([c[0] @ p.transpose(1, 2) for c, p in zip(cases, out[w][0])])
                          for w in ("float32", "bfloat16")}
    out["segments"] = idx
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F, accumulated in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def wire_error(args) -> dict:
    from functools import partial

    from ttt_train.ops.cp_scan import bench
    from ttt_train.runtime.local_ranks import run_local_ranks

    from .naive import exclusive_scan_reference

    shape = (args.batch, args.d, args.h)
    (cp,) = args.cp
    cases = [_wire_case(cp, shape, args.tokens, s) for s in range(2 * cp)]
    sums = torch.stack([c[1] for c in cases]).requires_grad_()
    _, ref = exclusive_scan_reference(_wire_keys(cp, args.batch), sums)
    ref.backward(torch.stack([c[2] for c in cases]))
    ref_corr = torch.stack([c[0] @ p.transpose(1, 2) for c, p in zip(cases, ref.detach())])
    result = {"cp": cp, "state": list(shape), "tokens_per_shard": args.tokens, "errors": []}
    for algorithm in ALGORITHMS:
        per_rank = run_local_ranks(partial(bench._rank_wire_error, algorithm, shape, args.tokens), cp,
                                   timeout=args.timeout)
        perm = torch.argsort(torch.tensor([s for r in per_rank for s in r["segments"]]))  # -> global order
        fp32, bf16 = ([torch.cat([r[w][i] for r in per_rank])[perm] for i in (0, 1)]
                      + [torch.cat([r["corrections"][w] for r in per_rank])[perm]] for w in ("float32", "bfloat16"))
        nonzero = slice(1, None)  # segment 0's prefix is the identity
        result["errors"].append({
            "algorithm": algorithm,
            "bf16_vs_fp32": {"prefix": _rel(bf16[0][nonzero], fp32[0][nonzero]),
                             "prefix_worst_segment": max(_rel(a, b) for a, b in zip(bf16[0][1:], fp32[0][1:])
                                                         if b.norm() > 0),
                             "correction": _rel(bf16[2][nonzero], fp32[2][nonzero]),
                             "sum_gradient": _rel(bf16[1], fp32[1])},
            "fp32_vs_single_process": {"prefix": _rel(fp32[0][nonzero], ref.detach()[nonzero]),
                                          "correction": _rel(fp32[2][nonzero], ref_corr[nonzero]),
                                          "sum_gradient": _rel(fp32[1], sums.grad)}})
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8], help="CP sizes to run (local processes)")
    p.add_argument("--model-cp", type=int, nargs="*", default=[16, 32, 64], help="CP sizes to predict only")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d", type=int, default=None, help="state rows (default 256; --wire-error 2560)")
    p.add_argument("--h", type=int, default=None, help="state columns (default 512; --wire-error 2432)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per (cp, algorithm) launch")
    p.add_argument("--wire-error", action="store_true", help="measure the bf16 wire's error instead (one --cp)")
    p.add_argument("--tokens", type=int, default=256, help="--wire-error: tokens per shard")
    args = p.parse_args(argv)
    if args.wire_error and len(args.cp) != 1:
        p.error("--wire-error takes one --cp size")
    args.d = args.d or (2560 if args.wire_error else 256)
    args.h = args.h or (2432 if args.wire_error else 512)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    print(json.dumps(wire_error(args) if args.wire_error else run_bench(args)))


if __name__ == "__main__":
    main()

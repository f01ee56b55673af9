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

Wall times here are of gloo over loopback on a CPU (latency-bound at these sizes); the network
estimate for a cluster is the dry-run plan's (``parallel.links``).
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8], help="CP sizes to run (local processes)")
    p.add_argument("--model-cp", type=int, nargs="*", default=[16, 32, 64], help="CP sizes to predict only")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per (cp, algorithm) launch")
    return p.parse_args(argv)


def main(argv=None) -> None:
    print(json.dumps(run_bench(parse_args(argv))))


if __name__ == "__main__":
    main()

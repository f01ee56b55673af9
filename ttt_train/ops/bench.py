"""Benchmark of the In-Place TTT down-projection (fwd+bwd) against plain and materialised forms.

``python -m ttt_train.ops.bench --json [--T 8192 --d 512 --h 1536 --chunk 1024 --dtype float32
--threads 2]`` prints one JSON object with the median fwd+bwd milliseconds (``*_ms``; the fastest
round as ``*_min_ms``) of:

- ``plain_down``: a plain down-projection ``Z W^T``;
- ``plain_mlp``: a plain SwiGLU MLP (fused gate/up);
- ``ttt_down``: the TTT down-projection (:func:`inplace_ttt`);
- ``ttt_mlp``: the SwiGLU MLP with the TTT down-projection (``v`` an input);
- ``materialized_down``: the materialised formulation (:func:`materialized_ttt`: per-chunk weights
  from a cumsum of every ``dW_i``, one batched matmul; it never clips).

Ratios: ``ttt_over_plain_mlp`` (TTT MLP / plain MLP), ``ttt_over_materialized`` (TTT /
materialised down-projection). ``*_peak_extra_mib``: each variant's peak extra memory, measured
(see ``memory_method``) over one fwd+bwd with the inputs already allocated. Timing rounds
interleave the variants, so that a shared machine disturbs them alike.
``cp_scan_bytes_per_layer_step_*``: bytes the context-parallel ring scan sends per TTT layer and
micro-batch (forward + backward) at ``--cp``/``--tp``, from :func:`scan_traffic` (``cp_scan_log_*``:
the log scan's); the scan itself is measured by ``python -m ttt_train.ops.cp_scan.bench``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from .cp_scan import scan_traffic
from .inplace_ttt import inplace_ttt

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("plain_down", "plain_mlp", "ttt_down", "ttt_mlp", "materialized_down")


def materialized_ttt(z: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, chunk_size: int, lr: float) -> torch.Tensor:
    """The official release's formulation (no documents, no clipping), plain autograd: all
    per-chunk weights ``W^(i) = weight + lr * (cumsum_j dW_j - dW_i)`` kept, ``[B, n, d, h]``."""
    B, T, h = z.shape
    d = v.shape[-1]
    n = math.ceil(T / chunk_size)
    pad = n * chunk_size - T
    zc = F.pad(z, (0, 0, 0, pad)).view(B, n, chunk_size, h)
    vc = F.pad(v, (0, 0, 0, pad)).view(B, n, chunk_size, d)
    dw = vc.transpose(-1, -2) @ zc
    w = weight + lr * (torch.cumsum(dw, dim=1) - dw)
    return (zc @ w.transpose(-1, -2)).view(B, n * chunk_size, d)[:, :T]


def _make_inputs(args, device):
    dt = DTYPES[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt).requires_grad_()

    B, T, d, h = args.batch, args.T, args.d, args.h
    return {"x": rnd(B, T, d), "fc1": rnd(2 * h, d, std=0.02), "down": rnd(d, h, std=0.02),
            "z": rnd(B, T, h), "v": rnd(B, T, d, std=0.1), "g_out": rnd(B, T, d).detach()}


def _variant(name: str, t: dict, args):
    """A closure running one fwd+bwd of the variant."""
    ttt = {"chunk_size": args.chunk, "lr": args.lr, "max_update_norm": args.max_update_norm}

    def mlp_z():
        gate, up = F.linear(t["x"], t["fc1"]).chunk(2, dim=-1)
        return F.silu(gate) * up

    forward = {
        "plain_down": lambda: F.linear(t["z"], t["down"]),
        "plain_mlp": lambda: F.linear(mlp_z(), t["down"]),
        "ttt_down": lambda: inplace_ttt(t["z"], t["v"], t["down"], **ttt),
        "ttt_mlp": lambda: inplace_ttt(mlp_z(), t["v"], t["down"], **ttt),
        "materialized_down": lambda: materialized_ttt(t["z"], t["v"], t["down"], args.chunk, args.lr),
    }[name]

    def run():
        forward().backward(t["g_out"])
        for p in t.values():
            p.grad = None

    return run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(runs: dict, device, warmup: int, repeats: int) -> dict:
    """(median, min) fwd+bwd milliseconds per variant; rounds interleave the variants so that a
    noisy (shared) machine disturbs them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def _peak_extra_bytes(run, device) -> int:
    """Peak of bytes allocated beyond those live at the start, over one call of ``run``."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


MEMORY_METHOD = {
    "cpu": "torch.profiler(profile_memory=True) CPU-allocator records: peak live bytes allocated "
           "during one fwd+bwd beyond those live before it (inputs, weights, output gradient excluded)",
    "cuda": "torch.cuda.max_memory_allocated during one fwd+bwd minus memory_allocated before it",
}


def run_bench(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t = _make_inputs(args, device)
    result = {"T": args.T, "d": args.d, "h": args.h, "chunk": args.chunk, "batch": args.batch,
              "n_chunks": math.ceil(args.T / args.chunk), "dtype": args.dtype, "device": str(device),
              "threads": torch.get_num_threads(), "lr": args.lr, "max_update_norm": args.max_update_norm,
              "repeats": args.repeats, "warmup": args.warmup}
    times = _time_ms({name: _variant(name, t, args) for name in VARIANTS}, device, args.warmup, args.repeats)
    for name in VARIANTS:
        result[f"{name}_ms"] = round(times[name][0], 3)
    for name in VARIANTS:
        result[f"{name}_min_ms"] = round(times[name][1], 3)
    for name in VARIANTS:
        extra = _peak_extra_bytes(_variant(name, t, args), device)
        result[f"{name}_peak_extra_mib"] = round(extra / 2**20, 3)
    result["memory_method"] = MEMORY_METHOD["cuda" if device.type == "cuda" else "cpu"]
    result["ttt_over_plain_mlp"] = round(result["ttt_mlp_ms"] / result["plain_mlp_ms"], 4)
    result["ttt_over_materialized"] = round(result["ttt_down_ms"] / result["materialized_down_ms"], 4)
    result["ttt_down_over_plain_down"] = round(result["ttt_down_ms"] / result["plain_down_ms"], 4)
    result["ttt_over_plain_mlp_min"] = round(result["ttt_mlp_min_ms"] / result["plain_mlp_min_ms"], 4)
    result["ttt_over_materialized_min"] = round(result["ttt_down_min_ms"] / result["materialized_down_min_ms"], 4)
    result.update(cp=args.cp, tp=args.tp)
    for algorithm, prefix in (("ring", "cp_scan_bytes_per_layer_step"), ("log", "cp_scan_log_bytes_per_layer_step")):
        scan = scan_traffic(args.cp, (args.batch, args.d, args.h // args.tp), algorithm=algorithm)
        result[f"{prefix}_max_rank"] = scan.max_bytes_sent
        result[f"{prefix}_all_ranks"] = scan.forward.total_bytes + scan.backward.total_bytes
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--h", type=int, default=1536)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--max-update-norm", type=float, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cp", type=int, default=8, help="context-parallel size for the scan's byte accounting")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for the scan's byte accounting")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run_bench(args)
    if args.json:
        print(json.dumps(result))
        return
    for k, val in result.items():
        print(f"{k:>28}: {val}")


if __name__ == "__main__":
    main()

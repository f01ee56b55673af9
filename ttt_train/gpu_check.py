"""`python -m ttt_train.gpu_check`: does this node run ttt-train correctly and fast?

Runs the checks below (`--only` names a subset), prints a table (check, measured, target, status) and writes one JSON
(`--out`, default `runs/gpu_check/gpu_check.json`). The exit code is 0 only when every judged line
meets its target; a line that cannot run here (transformer-engine absent, one GPU only) is
`skip` with its reason and does not fail. On a GPU the checks run at real sizes; on a CPU at toy
sizes (`--size toy`, the default there), where only correctness is judged (timings on a CPU say
nothing about a GPU node) so that CI keeps the command working.

| check | what | target |
|-------|------|--------|
| environment | Python, torch (CUDA), GPU, megatron-core, transformers, transformer-engine | - |
| process_group | NCCL (gloo on a CPU) group of this process: all-reduce, all-gather | exact |
| op_exact | the In-Place TTT op in bf16 (fp32 state) against the float64 reference: output and gradients | max error <= 1e-2 of max abs |
| op_speed | fwd+bwd of the TTT MLP against a plain gated MLP (and the materialised form), Qwen3-4B layer, sequence 32768, chunk 1024 (`ttt_train.ops.bench`) | <= 1.5x the plain MLP |
| train_local / train_te | one training step of a megatron GPT, TTT every sixth layer against the same model without, Qwen3-0.6B shape, bf16 (`ttt_train.bench`) | tokens/s >= 0.93x, memory <= 1.10x |
| hf: hf_prefill | the exported HF model, prefill at 32k and 128k, TTT against baseline | tokens/s >= 0.93x, memory <= 1.10x |
| hf: hf_decode | greedy decoding with the cache at batch 1 and 16 | tokens/s >= 0.90x |
| tp_cp_nccl | TP and CP through NCCL | skipped: not built yet |

The train and prefill lines sweep their lengths upwards and stop at the first that runs out of
memory (reported as a failed line). Needs numpy, torch, transformers, safetensors, megatron-core and
omegaconf; not hydra, not wandb.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

EXACT_TOLERANCE = 1e-2  # bf16 (8-bit mantissa) output and gradients, relative to the reference's max
OP_TARGET = 1.5
TRAIN_TARGETS = {"tokens_per_s_ratio": (">=", 0.93), "peak_memory_ratio": ("<=", 1.10)}
PREFILL_TARGETS = TRAIN_TARGETS
DECODE_TARGETS = {"tokens_per_s_ratio": (">=", 0.90)}

TTT = {"every": 6, "chunk_size": 1024, "lr": 0.1, "max_update_norm": None}
SIZES = {
    "real": {
        "op": dict(T=32768, d=2560, h=9728, chunk=1024, repeats=5, warmup=2),
        "train": dict(preset="qwen3_0.6b", local_lengths=[32768], te_lengths=[32768]),
        "prefill": dict(preset="qwen3_0.6b", lengths=[32768, 131072]),
        "decode": dict(batch_sizes=[1, 16], prompt_length=1024, new_tokens=64),
        "ttt": TTT, "repeats": 3, "warmup": 1, "dtype": "bf16",
    },
    "toy": {
        "op": dict(T=256, d=32, h=96, chunk=64, repeats=1, warmup=1),
        "train": dict(preset="tiny", overrides=dict(num_layers=6, max_position_embeddings=1024),
                      local_lengths=[128], te_lengths=[128]),
        "prefill": dict(preset="tiny", overrides=dict(num_layers=6, max_position_embeddings=1024), lengths=[128]),
        "decode": dict(batch_sizes=[1, 16], prompt_length=16, new_tokens=4),
        "ttt": dict(TTT, chunk_size=32), "repeats": 1, "warmup": 1, "dtype": "fp32",
    },
}
CHECKS = ("environment", "process_group", "op_exact", "op_speed", "train_local", "train_te", "hf", "tp_cp_nccl")


@dataclass
class Line:
    """One row of the table. status: pass | fail | skip | info | error (error counts as a failure)."""

    check: str
    measured: str
    target: str = "-"
    status: str = "info"
    values: dict = field(default_factory=dict)


def _judge(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def te_available() -> str | None:
    """None when transformer-engine imports, else why not."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken install is a reason to skip, named
        return f"transformer_engine does not import: {type(err).__name__}: {err}"
    return None


# ---------------------------------------------------------------- checks


def check_environment(size: str) -> list[Line]:
    from ttt_train.runtime import megatron_compat

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "megatron_core": megatron_compat.version_string(), "transformers": _version("transformers"),
           "transformer_engine": _version("transformer-engine") or _version("transformer_engine"),
           "hydra_core": _version("hydra-core"), "wandb": _version("wandb"), "size": size}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(_device())
        env.update(gpu=props.name, gpus=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    shown = ", ".join(f"{k} {v}" for k, v in env.items() if k in ("python", "torch", "cuda", "gpu", "megatron_core",
                                                                  "transformers", "transformer_engine"))
    return [Line("environment", shown, values=env)]


def check_process_group() -> list[Line]:
    """This process's group (NCCL on a GPU, gloo on a CPU; world size 1 without torchrun)."""
    import torch.distributed as dist

    from ttt_train.runtime.distributed import init_process_group

    init_process_group()
    device = _device()
    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    gathered = torch.empty(world * 1024, device=device)
    dist.all_gather_into_tensor(gathered, torch.full((1024,), float(rank), device=device))
    expected_sum = world * (world + 1) / 2
    ok = bool((x == expected_sum).all()) and bool((gathered.view(world, -1)[:, 0] == torch.arange(world,
                                                                                                   device=device)).all())
    backend = dist.get_backend()
    return [Line("process_group", f"{backend}, world size {world}: all-reduce and all-gather "
                 f"{'exact' if ok else 'WRONG'}", "exact", "pass" if ok else "fail",
                 {"backend": backend, "world_size": world})]


def check_op_exact(spec: dict) -> list[Line]:
    """The fast op in bf16 (fp32 state) against the float64 reference on the same (bf16) values."""
    from ttt_train.ops import inplace_ttt
    from ttt_train.ops.inplace_ttt.naive import inplace_ttt_reference

    device = _device()
    T, d, h, chunk = spec["T"], spec["d"], spec["h"], spec["chunk"]
    g = torch.Generator().manual_seed(0)
    inputs = {"z": torch.randn(1, T, h, generator=g), "v": torch.randn(1, T, d, generator=g) * 0.1,
              "weight": torch.randn(d, h, generator=g) * 0.02}
    g_out = torch.randn(1, T, d, generator=g).to(device, torch.bfloat16)
    runs = {}
    for name, dtype, op in (("bf16", torch.bfloat16, inplace_ttt), ("float64", torch.float64, inplace_ttt_reference)):
        leaves = {k: t.to(device, torch.bfloat16).to(dtype).requires_grad_() for k, t in inputs.items()}
        out = op(leaves["z"], leaves["v"], leaves["weight"], chunk_size=chunk, lr=TTT["lr"])
        out.backward(g_out.to(dtype))
        runs[name] = {"out": out.detach(), **{f"d{k}": t.grad for k, t in leaves.items()}}
        del leaves, out
    errors = {key: ((runs["bf16"][key].double() - ref).abs().max() / ref.abs().max()).item()
              for key, ref in runs["float64"].items()}
    worst = max(errors.values())
    status = "pass" if worst <= EXACT_TOLERANCE else "fail"
    shown = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    return [Line("op_exact", f"max |bf16 - float64| / max |float64| at T={T}, d={d}, h={h}: {shown}",
                 f"<= {EXACT_TOLERANCE:g}", status, {"relative_max_error": errors, "T": T, "d": d, "h": h})]


def check_op_speed(spec: dict, judged: bool) -> list[Line]:
    from ttt_train.ops import bench as op_bench

    args = op_bench.parse_args([f"--T={spec['T']}", f"--d={spec['d']}", f"--h={spec['h']}",
                                f"--chunk={spec['chunk']}", "--dtype=bfloat16", f"--repeats={spec['repeats']}",
                                f"--warmup={spec['warmup']}", f"--device={_device()}"])
    result = op_bench.run_bench(args)
    ratio = result["ttt_over_plain_mlp"]
    shown = (f"TTT MLP {result['ttt_mlp_ms']:.1f} ms vs plain {result['plain_mlp_ms']:.1f} ms = {ratio:.3f}x "
             f"(TTT down / materialised {result['ttt_over_materialized']:.3f}x; peak extra MiB TTT "
             f"{result['ttt_mlp_peak_extra_mib']:.0f}, plain {result['plain_mlp_peak_extra_mib']:.0f}, materialised "
             f"{result['materialized_down_peak_extra_mib']:.0f})")
    status = ("pass" if ratio <= OP_TARGET else "fail") if judged else "info"
    return [Line("op_speed", shown, f"<= {OP_TARGET}x plain MLP", status, result)]


def _bench_cfg(size: dict, section: str, backend: str = "local"):
    """A `ttt_train.bench` config (as its functions read it) for one section of `size`."""
    from omegaconf import OmegaConf

    part = size[section] if section in size else size["prefill"]
    overrides = dict(part.get("overrides", {}))
    if section == "prefill":
        overrides.setdefault("max_position_embeddings", max(part["lengths"]))
    overrides["backend"] = backend
    return OmegaConf.create({
        "model": {"preset": part.get("preset", size["prefill"]["preset"]), "overrides": overrides},
        "ttt": size["ttt"], "seed": 0, "repeats": size["repeats"], "warmup": size["warmup"],
        "decode": size["decode"]})


def _ratio_line(check: str, row: dict, targets: dict, judged: bool, where: str, note: str = "") -> Line:
    met = {key: _judge(row[key], *bound) for key, bound in targets.items()}
    parts = [f"{key.replace('_ratio', '')} {row[key]:.3f}x" for key in targets]
    if "base_tokens_per_s" in row:
        parts.append(f"tokens/s {row['ttt_tokens_per_s']:.0f} vs {row['base_tokens_per_s']:.0f}")
    if "base_peak_mib" in row:
        parts.append(f"peak MiB {row['ttt_peak_mib']:.0f} vs {row['base_peak_mib']:.0f}")
    target = ", ".join(f"{key.replace('_ratio', '')} {op} {bound}" for key, (op, bound) in targets.items())
    status = ("pass" if all(met.values()) else "fail") if judged else "info"
    return Line(check, f"{where}: " + "; ".join(parts) + note, target, status, row)


def check_train(size: dict, backend: str, judged: bool) -> list[Line]:
    check = f"train_{backend}"
    if backend == "te" and (reason := te_available()):
        return [Line(check, f"skipped: {reason}", status="skip")]
    cfg = _bench_cfg(size, "train", backend)
    rows, oom_at, model_cfg = _train_rows(cfg, size["train"][f"{backend}_lengths"], size["dtype"])
    lines = [_ratio_line(check, row, TRAIN_TARGETS, judged, f"{model_cfg.name} {size['dtype']}, {row['length']} tokens")
             for row in rows]
    if oom_at:
        lines.append(Line(check, f"{oom_at} tokens: out of memory", "fits", "fail", {"oom_at": oom_at}))
    return lines


def _train_rows(cfg, lengths: list[int], dtype: str):
    """(rows, first length out of memory, model config) of `ttt_train.bench`'s train-step sweep; the
    models are freed on return."""
    from ttt_train import bench

    pairs, model_cfg = bench.build_train_pair(cfg, dtype)
    rows, oom_at = bench._sweep(lengths, lambda n: bench.measure_train_step(pairs, model_cfg, cfg, _device(), n))
    return rows, oom_at, model_cfg


def check_hf(size: dict, judged: bool) -> list[Line]:
    from ttt_train import bench

    cfg = _bench_cfg(size, "prefill")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[size["dtype"]]
    models = bench.build_hf_pair(cfg, _device(), dtype)
    rows, oom_at = bench._sweep(size["prefill"]["lengths"], lambda n: bench.measure_prefill(models, cfg, _device(), n))
    lines = [_ratio_line("hf_prefill", row, PREFILL_TARGETS, judged, f"{row['length']} tokens") for row in rows]
    if oom_at:
        lines.append(Line("hf_prefill", f"{oom_at} tokens: out of memory", "fits", "fail", {"oom_at": oom_at}))
    for batch in size["decode"]["batch_sizes"]:
        row = bench.measure_decode(models, cfg, _device(), batch)
        lines.append(_ratio_line("hf_decode", row, DECODE_TARGETS, judged, f"batch {batch}"))
    return lines


def check_tp_cp_nccl() -> list[Line]:
    if not torch.cuda.is_available():
        return [Line("tp_cp_nccl", "skipped: no GPU (the CPU test suite runs TP and CP on gloo)", status="skip")]
    if torch.cuda.device_count() < 2:
        return [Line("tp_cp_nccl", "skipped: one GPU visible; TP and CP through NCCL need two or more",
                     status="skip")]
    return [Line("tp_cp_nccl", f"skipped: {torch.cuda.device_count()} GPUs visible, but the multi-GPU TP/CP "
                 "check is not built yet; run the training driver under torchrun", status="skip")]


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- driver


def _write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


def run_checks(size_name: str, only: tuple[str, ...] = CHECKS, out: Path | None = None) -> dict:
    """Run the checks of `only` at `size_name`; the JSON at `out` is rewritten after each (so a run
    stopped half-way still leaves what it measured, `finished: false`)."""
    size = SIZES[size_name]
    judged = size_name == "real"
    plan = {
        "environment": lambda: check_environment(size_name),
        "process_group": check_process_group,
        "op_exact": lambda: check_op_exact(size["op"]),
        "op_speed": lambda: check_op_speed(size["op"], judged),
        "train_local": lambda: check_train(size, "local", judged),
        "train_te": lambda: check_train(size, "te", judged),
        "hf": lambda: check_hf(size, judged),
        "tp_cp_nccl": check_tp_cp_nccl,
    }
    lines: list[Line] = []
    started = time.perf_counter()
    for name, fn in plan.items():
        if name not in only:
            continue
        t0 = time.perf_counter()
        try:
            new = fn()
        except Exception as err:  # noqa: BLE001 - a check that breaks is a failed line, the others still run
            new = [Line(name, f"{type(err).__name__}: {err}".splitlines()[0][:300], status="error",
                        values={"traceback": traceback.format_exc()})]
        _free()
        for line in new:
            line.values["seconds"] = round(time.perf_counter() - t0, 2)
        lines.extend(new)
        print(_row(new), flush=True)
        result = {"size": size_name, "judged": judged, "finished": name == [n for n in plan if n in only][-1],
                  "all_met": all(line.status not in ("fail", "error") for line in lines),
                  "seconds": round(time.perf_counter() - started, 1), "lines": [asdict(line) for line in lines]}
        if out is not None:
            _write_json(result, out)
    return result


def _row(lines: list[Line]) -> str:
    return "\n".join(f"{line.status.upper():<6} {line.check:<14} {line.measured}"
                     + (f"   [target {line.target}]" if line.target != "-" else "") for line in lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ttt_train.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="real (the default on a GPU) or toy (the default on a CPU; timings not judged)")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--out", default="runs/gpu_check/gpu_check.json", help="where the JSON is written")
    args = parser.parse_args(argv)
    args.only = tuple(filter(None, args.only.split(",")))
    unknown = sorted(set(args.only) - set(CHECKS))
    if unknown:
        parser.error(f"--only: unknown checks {unknown}; choose from {list(CHECKS)}")
    args.size = args.size or ("real" if torch.cuda.is_available() else "toy")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size, only = args.size, args.only
    print(f"ttt-train GPU check ({size} sizes{'' if size == 'real' else ', timings not judged'})", flush=True)
    out = Path(args.out)
    result = run_checks(size, only, out)
    verdict = "every line meets its target" if result["all_met"] else "some lines FAIL"
    print(f"{verdict} ({result['seconds']} s); JSON: {out}", flush=True)
    return 0 if result["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

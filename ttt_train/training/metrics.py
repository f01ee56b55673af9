"""Metrics of a run: one console line per interval, `metrics.jsonl` and a wandb run (rank 0 writes).

wandb is offline by default (`wandb sync <run.dir>/wandb/offline-run-*` uploads it); the run id is
kept in every checkpoint so a resumed run continues the same wandb run. Records carry `stage`,
`stage_name`, `step` (in the stage) and `run_step` (across stages; wandb's step axis).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def peak_memory_gib() -> float:
    """Peak memory of this process: the GPU allocator's peak on CUDA, else the peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def new_wandb_id() -> str:
    """A fresh wandb run id (lowercase hex, as wandb's own ids)."""
    import uuid

    return uuid.uuid4().hex[:12]


class MetricsWriter:
    """Console, JSONL and wandb output of rank 0 (other ranks get a writer that does nothing)."""

    def __init__(self, run_dir: Path, wandb_cfg, name: str, config: dict, run_id: str, *, enabled: bool):
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if wandb_cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name or name,
                                  group=wandb_cfg.group, tags=list(wandb_cfg.tags), mode=wandb_cfg.mode,
                                  dir=str(run_dir), id=run_id, resume="allow", config=config,
                                  settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, record: dict) -> None:
        """Append `record` (JSON-safe scalars) to metrics.jsonl and wandb (step axis `run_step`)."""
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                         step=record["run_step"])

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.run is not None:
            self.run.finish()


def console_line(record: dict, stage_label: str, total_steps: int, eta_s: float) -> str:
    """`stage 1 ctx4k  step 20/30  loss 2.3456  lr 3.0e-04  gnorm 0.52  12,345 tok/s  ETA 1m05s`."""
    eta = f"{int(eta_s // 3600)}h{int(eta_s % 3600 // 60):02d}m" if eta_s >= 3600 else \
        f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s"
    parts = [stage_label, f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}",
             f"lr {record['lr']:.2e}", f"gnorm {record['grad_norm']:.3g}", f"{record['tokens_per_s']:,.0f} tok/s"]
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"ETA {eta}")
    return "  ".join(parts)


def record_ttt_stats(layers: list, on: bool) -> None:
    """Switch the TTT layers' statistics on (cleared: a new step to log) or off (no cost in forward).
    Every rank must pass the same `on`: recording adds a TP all-reduce to each TTT forward."""
    for layer in layers:
        layer.record_stats = on
        if on:
            layer.reset_stats()


def gather_ttt_stats(layers: list) -> dict[int, dict]:
    """{global layer index: {stat: float}} on rank 0 ({} elsewhere): each TTT layer's statistics over the
    forwards recorded since `record_ttt_stats(layers, True)` (every micro-batch of the step) and over
    all data- and context-parallel ranks (sums and counts added, maxima the largest; see
    `ttt_train.layers.ttt_mlp.summarize_ttt_stats`). Layers split over pipeline stages are merged;
    tensor-parallel copies agree. Collective: two small all-reduces over the data x context-parallel
    group and a gather over the world, entered by every rank whatever it recorded.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ttt_train.layers.ttt_mlp import STATS_MAX, summarize_ttt_stats

    mine = {}
    if layers:
        acc = torch.stack([layer.stats_accumulator() for layer in layers])  # [layers, fields]
        group = ps.get_data_parallel_group(with_context_parallel=True)
        if group.size() > 1:
            is_max = STATS_MAX.to(acc.device)
            sums, maxima = torch.where(is_max, 0.0, acc), acc.clone()
            dist.all_reduce(sums, group=group)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
            acc = torch.where(is_max, maxima, sums)
        for layer, row in zip(layers, acc):
            mine[layer.layer_number - 1] = {k: float(v) for k, v in summarize_ttt_stats(row).items()}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    merged: dict[int, dict] = {}
    for part in gathered or []:
        for layer, stats in part.items():
            merged.setdefault(layer, stats)
    return merged


def flatten_ttt_stats(stats: dict[int, dict]) -> dict[str, float]:
    """{"ttt/layer3/update_norm_mean": ...} for logging."""
    return {f"ttt/layer{layer}/{key}": value for layer, values in sorted(stats.items())
            for key, value in values.items()}

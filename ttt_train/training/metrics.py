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


def ttt_layer_stats(layers: list) -> dict[int, dict]:
    """{global layer index: {stat: float}} from each TTT layer's `ttt_stats()` (statistics of the last
    micro-batch: update norms, clipped fraction, relative fast-weight change, target norm)."""
    out = {}
    for layer in layers:
        out[layer.layer_number - 1] = {k: float(v) for k, v in layer.ttt_stats().items()}
    return out


def gather_ttt_stats(layers: list) -> dict[int, dict]:
    """Every rank's TTT layer stats on rank 0 (collective over the world; {} elsewhere).

    Layers split over pipeline stages are merged; tensor-parallel copies agree, and under context
    parallelism the lowest rank's (its own shards') statistics are kept.
    """
    import torch.distributed as dist

    mine = ttt_layer_stats(layers)
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

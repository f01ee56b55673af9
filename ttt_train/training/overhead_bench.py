"""Driver overhead: time per step of the training driver's loop against a bare `run_step` loop on the
same tiny TTT model, data and optimizer (one rank), as JSON.

    python -m ttt_train.training.overhead_bench [--steps 20] [--repeats 3] [--seq-length 512] [--out FILE]

Both loops run interleaved `--repeats` times; a step's time is the interval between consecutive
scheduler steps (driver) or loop iterations (bare), so the stage-end checkpoint is not counted.
The driver's per-step extras: the inner-lr warm-up, the schedule, the stop/save agreement (one
all-reduce), the skip guard and, every `logging.interval` steps, metrics (wandb off here).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _stage(data_prefix: str, run_dir: Path, steps: int, seq: int):
    from ttt_train.training.config import compose
    from ttt_train.training.curriculum import resolve_stage

    cfg = compose(["experiment=tiny_ttt", f"run.dir={run_dir}", "run.world_size=1",
                   f"data.blend=[{{path:'{data_prefix}',weight:1.0}}]", f"data.cache_dir={run_dir / 'cache'}",
                   f"model.max_position_embeddings={seq}", f"stages.0.seq_length={seq}",
                   f"stages.0.tokens={steps * 4 * seq}", "schedule.warmup_fraction=0.0",
                   "checkpoint.every_steps=0", "logging.wandb.mode=disabled", "logging.interval=10"])
    return cfg, resolve_stage(cfg, 0, 1)


def _bare(stage, built) -> list[float]:
    from ttt_train.data.datasets import build_dataloader
    from ttt_train.training.step import run_step

    t = stage.training
    batches = iter(build_dataloader(built.train_set, built.tokenizer.eod_id, 0, t.micro_batch_size))
    times = [time.perf_counter()]
    for _ in range(stage.steps):
        run_step(built.chunks, itertools.islice(batches, stage.num_microbatches),
                 num_microbatches=stage.num_microbatches, micro_batch_size=t.micro_batch_size,
                 seq_length=stage.seq_length, optimizer=built.optimizer)
        times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


def _driver(cfg, stage, built, writer, flags) -> list[float]:
    from ttt_train.training.loop import RunState, train_stage

    times = [time.perf_counter()]
    step = built.scheduler.step

    def timed_step(increment):
        step(increment)
        times.append(time.perf_counter())

    built.scheduler.step = timed_step
    try:
        train_stage(stage, built, RunState(cfg, writer, flags, "bench", 0, None), 0)
    finally:
        built.scheduler.step = step
    return [b - a for a, b in zip(times, times[1:])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ttt_train.training.overhead_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--out", help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)

    import torch

    from data_tools import synthetic
    from ttt_train.training.metrics import MetricsWriter
    from ttt_train.training.preemption import StopFlags
    from ttt_train.training.stage_setup import build

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "data")
        synthetic.main(["passkey", "variable_tracking", "--num", "200", "--length", str(args.seq_length),
                        "--seed", "0", "--output-prefix", prefix])
        cfg, stage = _stage(prefix, Path(tmp) / "run", args.steps, args.seq_length)
        built = build(stage)
        writer = MetricsWriter(Path(tmp) / "run", cfg.logging.wandb, "bench", {}, "bench", enabled=False)
        flags = StopFlags([], 0, 0)
        bare, driver = [], []
        for _ in range(args.repeats):
            bare += _bare(stage, built)[1:]  # the first step of each pass warms the data loader up
            driver += _driver(cfg, stage, built, writer, flags)[1:]
    result = {"model": "tiny_ttt (4 layers, d 64, TTT layers [1, 3], chunk 64)", "seq_length": args.seq_length,
              "global_batch": stage.training.global_batch_size, "steps_per_pass": args.steps, "repeats": args.repeats,
              "bare_step_s_median": statistics.median(bare), "driver_step_s_median": statistics.median(driver),
              "bare_step_s_mean": statistics.fmean(bare), "driver_step_s_mean": statistics.fmean(driver)}
    result["overhead_median"] = result["driver_step_s_median"] / result["bare_step_s_median"] - 1
    result["overhead_mean"] = result["driver_step_s_mean"] / result["bare_step_s_mean"] - 1
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    from ttt_train.runtime import quiet  # noqa: F401

    sys.exit(main())

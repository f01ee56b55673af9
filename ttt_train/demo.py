"""`make demo`: train a tiny Qwen3-shaped model with In-Place TTT on synthetic long-context data.

This is the interim demo of the foundation: it generates passkey / multi-key / variable-tracking
documents with the shipped byte tokenizer, builds a megatron indexed dataset, and trains the tiny
model (6 layers, sliding-window attention, TTT in every sixth MLP) for a few steps under
`torchrun` with 2 ranks in context parallelism (the fast-weight prefix scan crosses the ranks),
then saves a dist_checkpoint. The full demo (two-stage curriculum, TTT vs. baseline evaluation)
arrives with the Hydra training driver.

    python -m ttt_train.demo [--steps 20] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

SEQ_LENGTH = 512
MICRO_BATCH = 2
CHUNK = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ttt_train.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument("--out", default="runs/demo", help="output folder: data, checkpoint (default runs/demo)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare_data(out: Path) -> str:
    """Generate the synthetic dataset once; return its prefix."""
    from data_tools import synthetic

    prefix = out / "data" / "synthetic"
    if not Path(f"{prefix}.idx").is_file():
        synthetic.main(["passkey", "multikey", "variable_tracking", "--num", "120", "--length", str(SEQ_LENGTH),
                        "--seed", "0", "--output-prefix", str(prefix)])
    return str(prefix)


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: CP=2 training of the tiny TTT model."""
    import torch.distributed as dist

    from ttt_train.data.datasets import BlendEntry, DataConfig, build_dataloader, build_datasets
    from ttt_train.data.tokenizer import load_tokenizer
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
    from ttt_train.runtime.distributed import ParallelConfig, initialize
    from ttt_train.training.checkpoint import save_checkpoint
    from ttt_train.training.optimizer import OptimizerArgs, build_optimizer
    from ttt_train.training.setup import DDPConfig, wrap_for_training
    from ttt_train.training.step import run_step

    out = Path(args.out)
    parallel = ParallelConfig(cp=2)
    initialize(parallel)
    rank = dist.get_rank()
    tokenizer = load_tokenizer("byte")
    data = DataConfig(blend=[BlendEntry(str(out / "data" / "synthetic"))], seq_length=SEQ_LENGTH, split="100,0,0",
                      cache_dir=str(out / "data" / "cache"))
    train, _, _ = build_datasets(data, tokenizer, (args.steps * MICRO_BATCH, 0, 0))
    model_cfg = load_model_config("tiny", num_layers=6, sliding_window=128, vocab_size=tokenizer.vocab_size)
    # A small inner lr and per-chunk clipping: with the demo's aggressive outer lr the target grows
    # fast, and fast-weight responses scale like lr * tokens * |z|^2 * |v| on repetitive text.
    ttt = TTTConfig(every=6, chunk_size=CHUNK, lr=0.03, max_update_norm=0.1)
    config = to_transformer_config(model_cfg, parallel)
    chunks = wrap_for_training(build_gpt_model(model_cfg, config, ttt=ttt), config, DDPConfig())
    optimizer = build_optimizer(OptimizerArgs(lr=3e-3, weight_decay=0.1), chunks, config)
    batches = iter(build_dataloader(train, tokenizer.eod_id, 0, MICRO_BATCH))
    if rank == 0:
        print(f"tiny model: {sum(p.numel() for p in chunks[0].parameters())} parameters on this rank, "
              f"TTT layers {ttt.layer_indices(model_cfg.num_layers)}, chunk {CHUNK}, inner lr {ttt.lr}, "
              f"clip {ttt.max_update_norm}, context parallel 2, "
              f"sequence {SEQ_LENGTH}", flush=True)
    start = time.perf_counter()
    for step in range(args.steps):
        result = run_step(chunks, itertools.islice(batches, 1), num_microbatches=1, micro_batch_size=MICRO_BATCH,
                          seq_length=SEQ_LENGTH // parallel.cp, optimizer=optimizer)
        if rank == 0:
            tokens_per_s = (step + 1) * MICRO_BATCH * SEQ_LENGTH / (time.perf_counter() - start)
            print(f"step {step + 1:3d}/{args.steps}  loss {result['loss']:.4f}  grad norm {result['grad_norm']:.3f}"
                  f"  {tokens_per_s:,.0f} tokens/s", flush=True)
    path = save_checkpoint(out / "checkpoints", args.steps, chunks, metadata={"demo": "interim"})
    if rank == 0:
        print(f"saved {path}\nThis interim demo trained the tiny TTT model for {args.steps} steps; the full "
              f"demo (curriculum, TTT vs. baseline evaluation) comes with the training driver.", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_data(out)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ttt_train.demo",
               "--worker", "--steps", str(args.steps), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE="offline")
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())

"""Small megatron scenarios run inside local ranks: training, recompute, YaRN, pipeline, checkpoints.

Each function is module-level so `run_local_ranks` can start it in fresh rank processes.
"""

from __future__ import annotations

import torch

from tests.support.parallel_cases import make_batch
from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
from ttt_train.runtime.distributed import ParallelConfig, initialize
from ttt_train.training.optimizer import OptimizerArgs, build_optimizer
from ttt_train.training.setup import DDPConfig, wrap_for_training
from ttt_train.training.step import run_step


def _repeat(batch: dict, micro: int):
    while True:
        for i in range(0, batch["tokens"].shape[0], micro):
            yield {k: v[i:i + micro] for k, v in batch.items()}


def train_losses(layout: dict, steps: int = 12, distributed_optimizer: bool = False, dtype: str = "fp32",
                 recompute: str | None = None, model_overrides: dict | None = None, seq: int = 32,
                 lr: float = 3e-3) -> list[float | None]:
    """Train the tiny model on one fixed batch with megatron DDP + AdamW; return the loss per step."""
    parallel = ParallelConfig(**layout)
    dp = initialize(parallel)
    model_cfg = load_model_config("tiny", **(model_overrides or {}))
    config = to_transformer_config(model_cfg, parallel, dtype=dtype, recompute=recompute)
    chunks = wrap_for_training(build_gpt_model(model_cfg, config), config,
                               DDPConfig(use_distributed_optimizer=distributed_optimizer))
    optimizer = build_optimizer(OptimizerArgs(lr=lr, weight_decay=0.0), chunks, config,
                                use_distributed_optimizer=distributed_optimizer)
    batch = make_batch(3, 4, seq, model_cfg.vocab_size)
    from megatron.core import parallel_state as ps

    rows = slice(ps.get_data_parallel_rank() * 4 // dp, (ps.get_data_parallel_rank() + 1) * 4 // dp)
    data = _repeat({k: v[rows] for k, v in batch.items()}, 2)
    return [run_step(chunks, data, num_microbatches=4 // dp // 2, micro_batch_size=2, seq_length=seq,
                     optimizer=optimizer)["loss"] for _ in range(steps)]


def yarn_forward(seq: int) -> dict:
    """Forward a YaRN model on a sequence longer than its original context."""
    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny", yarn={"factor": 4.0, "original_max_position_embeddings": seq // 4})
    config = to_transformer_config(model_cfg, parallel)
    model = build_gpt_model(model_cfg, config)
    batch = make_batch(1, 1, seq, model_cfg.vocab_size)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return dict(rotary=type(model.rotary_pos_emb).__name__, loss=out.mean().item(),
                finite=bool(torch.isfinite(out).all()))


def crash_during_save(root: str) -> dict:
    """Save step 1, then crash inside the save of step 2; return what `latest` says afterwards."""
    from unittest import mock

    from megatron.core import dist_checkpointing

    from ttt_train.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny")
    config = to_transformer_config(model_cfg, parallel)
    chunks = wrap_for_training(build_gpt_model(model_cfg, config), config, DDPConfig())
    save_checkpoint(root, 1, chunks, metadata={"note": "good"})
    real_save = dist_checkpointing.save

    def broken_save(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)
        raise OSError("disk full (injected)")

    with mock.patch.object(dist_checkpointing, "save", broken_save):
        try:
            save_checkpoint(root, 2, chunks)
        except OSError as err:
            error = str(err)
    meta = load_checkpoint(root, chunks)
    return dict(error=error, latest=latest_checkpoint(root).name, meta=meta)


def pp_tied_build() -> bool:
    """Build the tiny (tied-embedding) model split over two pipeline stages."""
    parallel = ParallelConfig(pp=2)
    initialize(parallel)
    model_cfg = load_model_config("tiny")
    build_gpt_model(model_cfg, to_transformer_config(model_cfg, parallel))
    return True


def checkpoint_save(root: str) -> bool:
    from ttt_train.training.checkpoint import save_checkpoint

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny")
    config = to_transformer_config(model_cfg, parallel)
    save_checkpoint(root, 0, wrap_for_training(build_gpt_model(model_cfg, config), config, DDPConfig()))
    return True

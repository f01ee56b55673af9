"""Wrap this rank's model chunks for training: bf16 wrapper, megatron DDP, grad-sync hooks."""

from __future__ import annotations

from dataclasses import dataclass

from ttt_train.config_keys import build, check_fields, checked


@dataclass
class DDPConfig:
    """megatron DistributedDataParallel options.

    use_distributed_optimizer: shard optimizer state over data-parallel ranks (ZeRO-1).
    overlap_grad_reduce: start bucket all-reduces during the backward pass.
    bucket_size: elements per gradient bucket (None: megatron's default).
    """

    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    bucket_size: int | None = checked(None, ge=1)

    @classmethod
    def from_dict(cls, values) -> DDPConfig:
        """Build from a plain mapping (YAML, Hydra); unknown keys, wrong types and ranges are errors naming them."""
        return build(cls, values, "ddp")


def wrap_for_training(model, config, ddp: DDPConfig):
    """Return `[DDP(model)]` (a list of model chunks, as megatron's schedules expect).

    Sets `config.no_sync_func`, `config.finalize_model_grads_func` (and `grad_sync_func` when
    overlapping) so `get_forward_backward_func()` handles gradient reduction.
    """
    check_fields(ddp, "ddp")
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    if config.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=ddp.use_distributed_optimizer,
        overlap_grad_reduce=ddp.overlap_grad_reduce,
        bucket_size=ddp.bucket_size,
    )
    wrapped = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = wrapped.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if ddp.overlap_grad_reduce:
        config.grad_sync_func = wrapped.start_grad_sync
    return [wrapped]

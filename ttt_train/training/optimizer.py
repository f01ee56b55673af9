"""The outer optimizer: megatron's AdamW (fp32 master weights, grad clipping, optional ZeRO-1)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimizerArgs:
    """AdamW hyper-parameters (METHOD.md section 4: lr 5e-6 continual / 5e-4 scratch, wd 0.1, clip 1.0)."""

    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


def build_optimizer(args: OptimizerArgs, model_chunks, config, *, use_distributed_optimizer: bool = False):
    """megatron `get_megatron_optimizer` over `model_chunks` (DDP-wrapped)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=config.bf16,
        fp16=False,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, model_chunks)

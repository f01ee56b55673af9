"""The outer optimizer: megatron's AdamW (fp32 master weights, grad clipping, optional ZeRO-1)."""

from __future__ import annotations

from dataclasses import dataclass

from ttt_train.config_keys import build, check_fields, checked


@dataclass
class OptimizerArgs:
    """AdamW hyper-parameters (METHOD.md section 4: lr 5e-6 continual / 5e-4 scratch, wd 0.1, clip 1.0).

    `ttt_target_lr_mult` / `ttt_target_wd_mult` scale the learning rate (max and min of the schedule)
    and the weight decay of the In-Place TTT target parameters (`*.ttt_target.*`: the conv and the
    projection) against every other parameter's; 1 and 1 (the paper's) put them in the common group.
    """

    lr: float = checked(3e-4, ge=0.0)
    min_lr: float = checked(0.0, ge=0.0)
    weight_decay: float = checked(0.1, ge=0.0)
    adam_beta1: float = checked(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = checked(0.95, ge=0.0, lt=1.0)
    adam_eps: float = checked(1e-8, gt=0.0)
    clip_grad: float = checked(1.0, ge=0.0)
    ttt_target_lr_mult: float = checked(1.0, gt=0.0)
    ttt_target_wd_mult: float = checked(1.0, ge=0.0)

    @classmethod
    def from_dict(cls, values) -> OptimizerArgs:
        """Build from a plain mapping (YAML, Hydra); unknown keys, wrong types and ranges are errors naming them."""
        return build(cls, values, "optimizer").validate()

    def validate(self) -> OptimizerArgs:
        check_fields(self, "optimizer")
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr: must be <= optimizer.lr={self.lr}, got {self.min_lr}")
        return self


TTT_TARGET_PARAMS = "*.ttt_target.*"
"""Names (fnmatch) of the In-Place TTT target parameters, whatever wraps the model."""


def param_group_overrides(args: OptimizerArgs, opt_config) -> dict:
    """megatron's standard overrides (no weight decay on biases and 1-D parameters) plus, when the
    multipliers are not 1, a group for the TTT target parameters with its own lr and weight decay."""
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides

    overrides = get_standard_config_overrides(opt_config)
    if (args.ttt_target_lr_mult, args.ttt_target_wd_mult) != (1.0, 1.0):
        overrides[ParamKey(name=TTT_TARGET_PARAMS)] = {"max_lr": args.lr * args.ttt_target_lr_mult,
                                                       "min_lr": args.min_lr * args.ttt_target_lr_mult,
                                                       "wd_mult": args.ttt_target_wd_mult}
    return overrides


def build_optimizer(args: OptimizerArgs, model_chunks, config, *, use_distributed_optimizer: bool = False):
    """megatron `get_megatron_optimizer` over `model_chunks` (DDP-wrapped)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    args.validate()

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
    return get_megatron_optimizer(opt_config, model_chunks, param_group_overrides(args, opt_config))

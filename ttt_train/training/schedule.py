"""Learning rates: the outer schedule (megatron's OptimizerParamScheduler, one step per optimizer
step) and the TTT inner-lr warm-up (a function of the run's step, written into every TTT layer)."""

from __future__ import annotations

import math

from ttt_train.training.config import InnerLRWarmup, ScheduleConfig
from ttt_train.training.curriculum import warmup_steps
from ttt_train.training.optimizer import OptimizerArgs

_STYLES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_decay": "WSD"}


def build_scheduler(optimizer, schedule: ScheduleConfig, args: OptimizerArgs, steps: int):
    """megatron `OptimizerParamScheduler` over a stage of `steps` steps; sets the step-0 lr now.

    Weight decay stays constant at `args.weight_decay`. Its state (`state_dict()`) is JSON-safe.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    style = _STYLES[schedule.style]
    return OptimizerParamScheduler(
        optimizer, init_lr=schedule.warmup_init_lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps(schedule, steps), lr_decay_steps=steps, lr_decay_style=style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
        wsd_decay_steps=max(1, round(schedule.decay_fraction * steps)) if style == "WSD" else None,
        lr_wsd_decay_style=schedule.decay_style if style == "WSD" else None)


def keep_fresh_hyperparameters(optimizer, load) -> None:
    """Run `load()` (which restores a previous stage's optimizer state) but keep this optimizer's own
    per-group hyper-parameters (lr, max_lr, min_lr, weight decay, betas): loading a megatron
    optimizer restores the old groups' values, and the scheduler reads `max_lr`/`min_lr` from them,
    so without this the new stage would keep training at the old stage's learning rates."""
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    load()
    for group, values in zip(optimizer.param_groups, fresh, strict=True):
        group.update(values)


def inner_lr(target: float, warmup: InnerLRWarmup, step: int) -> float:
    """TTT inner lr at run step `step` (0-based): `warmup.start` -> `target` over `warmup.steps` steps,
    linearly or geometrically; `target` afterwards (and when warm-up is off or target is 0)."""
    if warmup.steps <= 0 or step >= warmup.steps or target <= 0:
        return float(target)
    frac = step / warmup.steps
    if warmup.style == "exponential":
        return float(math.exp(math.log(warmup.start) + frac * (math.log(target) - math.log(warmup.start))))
    return float(warmup.start + frac * (target - warmup.start))


def ttt_layers(model_chunks) -> list:
    """This rank's TTT MLPs (objects with a `ttt_lr` attribute), in layer order."""
    from ttt_train.layers.ttt_mlp import TTTMLP

    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TTTMLP)]


def set_inner_lr(layers: list, lr: float) -> None:
    for layer in layers:
        layer.ttt_lr = lr

"""Non-finite steps: skip the update when the gradient is NaN/Inf, stop after too many in a row.

megatron's fp32 and bf16 optimizers (without a loss scaler) would clip by a NaN norm and write NaN
into the weights; `guarded_step` runs the same stages as megatron's `ChainedOptimizer.step`
(prepare grads, one norm, clip, step) but skips the update when the norm is not finite. The norm
is reduced over the model-parallel group and gradients are already reduced over data parallel, so
every rank takes the same decision. A non-finite loss gives a non-finite gradient.
"""

from __future__ import annotations

import math


def guarded_step(optimizer) -> tuple[bool, float]:
    """(updated, grad norm): the optimizer step, skipped (weights untouched) when the norm is not finite."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the message names the step and the suspect TTT layer."""


class SkipCounter:
    """Counts consecutive skipped steps; `update` raises NonFiniteError past `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def update(self, skipped: bool, step: int, loss: float | None, grad_norm: float, describe_ttt) -> None:
        """Record one step (`describe_ttt()`: a phrase naming the TTT layer with the largest update norm)."""
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.limit:
            raise NonFiniteError(
                f"step {step}: loss {loss} / gradient norm {grad_norm} not finite for {self.in_a_row} steps in a "
                f"row (training.max_skipped_steps={self.limit}); {describe_ttt()}. Lower optimizer.lr or ttt.lr, "
                f"set ttt.max_update_norm, or lengthen ttt.lr_warmup; the last checkpoint is intact")

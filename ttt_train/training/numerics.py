"""Non-finite steps: skip the update when any gradient is NaN/Inf, name where it came from, stop after too many.

megatron's fp32 and bf16 optimizers (without a loss scaler) would clip by a NaN norm and write NaN
into the weights; `guarded_step` runs the same stages as megatron's `ChainedOptimizer.step`
(prepare grads, one norm, clip, step) but skips the update when a gradient is not finite on *any*
rank: the norm alone does not suffice, as it is reduced over the model-parallel group only and
leaves out tensor-parallel duplicates (norm weights, TTT targets) on all TP ranks but the first,
so an inf in a duplicate, or a rank-local fault after the data-parallel reduction, would be
stepped into the weights of some ranks and not others. One all-reduce (MAX) of a per-rank flag
over the world makes every rank take the same decision. A non-finite loss gives non-finite gradients.

`NonFiniteLocator` names the first place (in forward order, over all ranks) whose output was not
finite in a skipped step, or, with finite activations, the deepest layer whose gradients were not.
"""

from __future__ import annotations

import math

import torch


def _local_grads(optimizer) -> list[torch.Tensor]:
    grads = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param in opt.get_parameters():
            grad = getattr(param, "decoupled_grad", None) if opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 \
                else param.grad
            if grad is not None:
                grads.append(grad)
    return grads


def grads_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor: every element of every tensor is finite (one fused norm per dtype, no host sync)."""
    if not grads:
        return torch.tensor(True)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    norms = [n.float() for group in by_dtype.values() for n in torch._foreach_norm(group)]
    return torch.isfinite(torch.stack(norms)).all()


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True if `flag` holds on any rank (collective over the world)."""
    import torch.distributed as dist

    from ttt_train.runtime.distributed import device

    value = torch.as_tensor(flag, dtype=torch.int32).to(device()).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def guarded_step(optimizer) -> tuple[bool, float]:
    """(updated, grad norm): the optimizer step, skipped on every rank (weights untouched) when any rank has
    a non-finite gradient (collective over the world)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from ttt_train.training import fault_injection

    fault_injection.at("grad")
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    bad = torch.logical_not(grads_finite(_local_grads(optimizer))) | bool(found_inf) | (not math.isfinite(grad_norm))
    if any_rank(bad):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


class NonFiniteLocator:
    """Watches the outputs of the embedding, each decoder layer's self-attention and MLP, the final norm
    and the output layer of this rank's model chunks: a forward hook ORs "not finite" of each output's
    sum into a per-site flag (one reduction per site and micro-batch, no host sync). `reset()` before a
    step; `describe()` after a skipped one."""

    def __init__(self, model_chunks):
        from megatron.core.transformer.transformer_layer import TransformerLayer

        from ttt_train.layers.ttt_mlp import TTTMLP

        self.sites: list[tuple[int, str]] = []  # (global forward order, label)
        self.param_site: dict[int, tuple[int, str]] = {}  # id(param) -> (site index, parameter name)
        self.handles = []

        def site(order: int, label: str, module, params) -> None:
            index = len(self.sites)
            self.sites.append((order, label))
            self.handles.append(module.register_forward_hook(self._hook(index)))
            for pname, param in params:
                self.param_site.setdefault(id(param), (index, strip_wrappers(pname)))

        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                if isinstance(module, TransformerLayer):  # its norms go with the block they feed
                    layer = module.layer_number - 1
                    params = [(f"{name}.{p}", q) for p, q in module.named_parameters()]
                    in_mlp = [(p, q) for p, q in params if p[len(name) + 1:].startswith(("mlp.", "pre_mlp_layernorm."))]
                    ttt = " (TTT)" if isinstance(module.mlp, TTTMLP) else ""
                    site(2 * layer + 1, f"layer {layer}'s self-attention", module.self_attention,
                         [pq for pq in params if pq not in in_mlp])
                    site(2 * layer + 2, f"layer {layer}'s MLP{ttt}", module.mlp, in_mlp)
                elif name.endswith(("embedding", "final_layernorm", "output_layer")) and "layers." not in name:
                    order, label = {"embedding": (0, "the embedding"), "final_layernorm": (1 << 30, "the final norm"),
                                    "output_layer": ((1 << 30) + 1, "the output layer")}[name.rsplit(".", 1)[-1]]
                    site(order, label, module, [(f"{name}.{p}", q) for p, q in module.named_parameters()])
        self.flags = torch.zeros(len(self.sites), dtype=torch.bool, device=_device())
        self.params = [p for chunk in model_chunks for p in chunk.parameters()]

    def _hook(self, index: int):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                with torch.no_grad():
                    self.flags[index] |= ~torch.isfinite(torch.sum(tensor, dtype=torch.float32))
        return hook

    def reset(self) -> None:
        self.flags.zero_()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _local(self) -> tuple[tuple[int, str] | None, tuple[int, str, str] | None]:
        bad = self.flags.nonzero().flatten().tolist()
        activation = min((self.sites[i] for i in bad), default=None)
        deepest = None
        for param in self.params:
            grad = getattr(param, "main_grad", None)
            grad = grad if grad is not None else param.grad
            if grad is None or id(param) not in self.param_site or bool(torch.isfinite(grad).all()):
                continue
            index, name = self.param_site[id(param)]
            order, label = self.sites[index]
            if deepest is None or order > deepest[0]:
                deepest = (order, label, name)
        return activation, deepest

    def describe(self) -> str:
        """Where the non-finite values of this (skipped) step came from (collective over the world)."""
        import torch.distributed as dist

        mine = self._local()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        activations = [(a, r) for r, (a, _) in enumerate(everyone) if a is not None]
        if activations:
            first = min(a for a, _ in activations)
            ranks = [r for a, r in activations if a == first]
            return f"non-finite values first in the output of {first[1]} (rank {_ranks(ranks)})"
        grads = [(g, r) for r, (_, g) in enumerate(everyone) if g is not None]
        if grads:
            deepest = max(g for g, _ in grads)
            ranks = [r for g, r in grads if g[0] == deepest[0]]
            return (f"activations finite; non-finite gradients from {deepest[1]} down ({deepest[2]}, rank "
                    f"{_ranks(ranks)})")
        return "activations and gradients finite on every rank (the loss itself was not)"


def strip_wrappers(name: str) -> str:
    """A parameter name without the `module.` prefixes of DDP and Float16Module."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks))


def _device():
    from ttt_train.runtime.distributed import device

    return device()


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the message names the step and where the values came from."""


class SkipCounter:
    """Counts consecutive skipped steps; `update` raises NonFiniteError past `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def update(self, skipped: bool, step: int, loss: float | None, grad_norm: float, where: str | None) -> None:
        """Record one step (`where`: `NonFiniteLocator.describe()` of a skipped step)."""
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.limit:
            raise NonFiniteError(
                f"step {step}: loss {loss} / gradient norm {grad_norm} not finite for {self.in_a_row} steps in a "
                f"row (training.max_skipped_steps={self.limit}); {where}. Lower optimizer.lr or ttt.lr, "
                f"set ttt.max_update_norm, or lengthen ttt.lr_warmup; the last checkpoint is intact")

"""A torch-native norm for local (non-transformer-engine) specs that also works with sequence parallelism."""

from __future__ import annotations

import torch


class TorchNorm:
    """Build `torch.nn.RMSNorm` or `torch.nn.LayerNorm` from a megatron config (ModuleSpec-compatible).

    Unlike megatron's `WrappedTorchNorm`, it accepts `config.sequence_parallel`: its parameters are
    marked `.sequence_parallel` so that megatron's `finalize_model_grads` sums their gradients over
    the tensor-parallel group, as transformer-engine's norms are. Input `[..., hidden_size]`.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"model normalization must be RMSNorm or LayerNorm, got {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

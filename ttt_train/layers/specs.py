"""Transformer block specs: megatron's local spec made CPU-capable, or its transformer-engine spec.

`block_spec(config, backend=...)` returns the `TransformerBlockSubmodules` (one spec per layer built
on this pipeline stage, and the final norm) that `GPTModel` takes as `transformer_layer_spec`.
"""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from ttt_train.layers.norms import TorchNorm

BACKENDS = ("local", "te")


def local_layer_spec(qk_layernorm: bool) -> ModuleSpec:
    """megatron's local GPT layer spec with every norm replaced by `TorchNorm` (same state-dict keys)."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm))
    sub = spec.submodules
    sub.input_layernorm = TorchNorm
    sub.pre_mlp_layernorm = TorchNorm
    if qk_layernorm:
        sub.self_attention.submodules.q_layernorm = TorchNorm
        sub.self_attention.submodules.k_layernorm = TorchNorm
    return spec


def te_layer_spec(qk_layernorm: bool) -> ModuleSpec:
    """megatron's transformer-engine GPT layer spec (GPU fast path; imports transformer-engine lazily)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def block_spec(config, *, backend: str = "local", vp_stage: int | None = None,
               pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """Per-layer specs for the layers this pipeline stage builds, plus the final norm."""
    if backend not in BACKENDS:
        raise ValueError(f"model.backend must be one of {BACKENDS}, got {backend!r}")
    layer = local_layer_spec(config.qk_layernorm) if backend == "local" else te_layer_spec(config.qk_layernorm)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if backend == "local":
        final_norm = TorchNorm
    else:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return TransformerBlockSubmodules(layer_specs=[copy.deepcopy(layer) for _ in range(num_layers)],
                                      layer_norm=final_norm)

"""Transformer block specs: megatron's local spec made CPU-capable (or its transformer-engine spec),
with In-Place TTT MLPs in the layers a `TTTConfig` names.

`block_spec(config, backend=..., ttt=...)` returns the `TransformerBlockSubmodules` (one spec per
layer built on this pipeline stage, and the final norm) that `GPTModel` takes as
`transformer_layer_spec`. Layer indices are global: a stage's layers are numbered from megatron's
`get_transformer_layer_offset`, so a TTT layer stays the same layer at any pipeline split.
"""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from ttt_train.layers.norms import TorchNorm
from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.runtime import megatron_compat

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
    import importlib.util

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    if importlib.util.find_spec("transformer_engine") is None:
        raise RuntimeError("model.backend=te needs transformer-engine (pip install -e '.[gpu]' on a GPU machine); "
                           "use model.backend=local without it")
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def ttt_layer_spec(base: ModuleSpec, ttt: TTTConfig, backend: str) -> ModuleSpec:
    """`base` with its MLP replaced by `TTTMLP` (and the layer by `TTTTransformerLayer`).

    With transformer-engine the pre-MLP norm is fused into fc1; a TTT layer needs the normalised
    input itself (the `hidden_states` target), so it uses an unfused `TENorm` + `TEColumnParallelLinear`
    with the same checkpoint keys.
    """
    from ttt_train.layers.ttt_mlp import TTTMLP, TTTTransformerLayer

    spec = copy.deepcopy(base)
    spec.module = TTTTransformerLayer
    mlp_submodules = copy.deepcopy(megatron_compat.mlp_submodules(spec.submodules.mlp))
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm

        spec.submodules.pre_mlp_layernorm = TENorm
        mlp_submodules.linear_fc1 = TEColumnParallelLinear
        spec.submodules.sharded_state_dict_keys_map = {
            **spec.submodules.sharded_state_dict_keys_map, "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    spec.submodules.mlp = ModuleSpec(module=TTTMLP, submodules=mlp_submodules, params={"ttt": ttt})
    return spec


def block_spec(config, *, backend: str = "local", ttt: TTTConfig | None = None, vp_stage: int | None = None,
               pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """Per-layer specs for the layers this pipeline stage builds, plus the final norm."""
    if backend not in BACKENDS:
        raise ValueError(f"model.backend must be one of {BACKENDS}, got {backend!r}")
    base = local_layer_spec(config.qk_layernorm) if backend == "local" else te_layer_spec(config.qk_layernorm)
    if backend == "local":  # torch's fused SDPA (megatron's unfused attention is ~4x slower on a CPU), any CP
        from ttt_train.layers.cp_attention import GatherKVAttention

        base.submodules.self_attention.submodules.core_attention = GatherKVAttention
    ttt_layers = set(ttt.layer_indices(config.num_layers)) if ttt is not None else set()
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    here = [offset + i for i in range(num_layers)]
    if ttt is not None and ttt.target == "input_embed" and offset > 0 and ttt_layers.intersection(here):
        raise ValueError(
            f"ttt.target=input_embed: TTT layers {sorted(ttt_layers.intersection(here))} sit on a pipeline stage "
            f"after the first, which has no token embeddings; use ttt.target=hidden_states, or a pipeline "
            f"split that keeps every TTT layer on the first stage")
    layers = [ttt_layer_spec(base, ttt, backend) if index in ttt_layers else copy.deepcopy(base) for index in here]
    if backend == "local":
        final_norm = TorchNorm
    else:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm)

"""State-dict adapters between ttt-train's megatron GPT (local spec) and HuggingFace Qwen3 / Llama.

One table serves both families (they share tensor names; Qwen3 adds `q_norm` / `k_norm`) and both
directions. Every megatron tensor is described by a `TensorMap`: its global name (layer numbers are
global, `decoder.layers.{i}.`), the HF tensors it is made of, and a `kind` that says how:

- `copy`: same tensor (norms, `o_proj` = `linear_proj`, `down_proj` = `linear_fc2`, the TTT conv).
- `vocab`: embedding / output layer; megatron pads the vocabulary rows (padding rows are zero).
- `qkv`: `linear_qkv` = per KV group g, `[q heads of g; k_g; v_g]` (megatron's layout; a TP rank
  holds whole groups, so its shard is a contiguous row range).
- `fc1`: `linear_fc1` = `[gate; up]`; a TP rank holds `[gate_r; up_r]`.
- `ttt_proj`: the official release applies `conv(X) @ ttt_proj.weight`; ttt-train's
  `ttt_target.proj.weight` is its transpose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ttt_train.models.config import ModelConfig


@dataclass(frozen=True)
class TensorMap:
    megatron: str
    hf: tuple[str, ...]
    kind: str


def layer_maps(i: int, model: ModelConfig, ttt_layer: bool, ttt_proj: bool) -> list[TensorMap]:
    """Tensor maps of global layer `i`."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    maps = [
        TensorMap(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy"),
        TensorMap(m + "self_attention.linear_qkv.weight",
                  tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
        TensorMap(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "copy"),
        TensorMap(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "copy"),
        TensorMap(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "fc1"),
        TensorMap(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "copy"),
    ]
    if model.qk_layernorm:
        maps += [TensorMap(m + "self_attention.q_layernorm.weight", (h + "self_attn.q_norm.weight",), "copy"),
                 TensorMap(m + "self_attention.k_layernorm.weight", (h + "self_attn.k_norm.weight",), "copy")]
    if ttt_layer:
        maps.append(TensorMap(m + "mlp.ttt_target.conv.weight", (h + "mlp.ttt_conv.weight",), "copy"))
        if ttt_proj:
            maps.append(TensorMap(m + "mlp.ttt_target.proj.weight", (h + "mlp.ttt_proj.weight",), "ttt_proj"))
    return maps


def tensor_maps(model: ModelConfig, ttt_layers: list[int], ttt_proj: bool = True) -> list[TensorMap]:
    """Maps of every tensor of the whole model (all pipeline stages). With tied embeddings the HF
    `model.embed_tokens.weight` also feeds megatron's `output_layer.weight` (the last stage's copy)."""
    maps = [TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(model.num_layers):
        maps += layer_maps(i, model, i in ttt_layers, ttt_proj)
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    head = "model.embed_tokens.weight" if model.tie_embeddings else "lm_head.weight"
    maps.append(TensorMap("output_layer.weight", (head,), "vocab"))
    return maps


def to_megatron(tm: TensorMap, parts: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """The full (unsharded, vocabulary unpadded) megatron tensor of `tm` from its HF `parts`."""
    if tm.kind in ("copy", "vocab"):
        return parts[0]
    if tm.kind == "ttt_proj":
        return parts[0].t()
    if tm.kind == "fc1":
        return torch.cat(parts, dim=0)
    if tm.kind == "qkv":
        q, k, v = parts
        groups, d = model.num_query_groups, model.kv_channels
        hidden = q.shape[-1]
        fused = torch.cat([q.reshape(groups, -1, hidden), k.reshape(groups, d, hidden), v.reshape(groups, d, hidden)],
                          dim=1)
        return fused.reshape(-1, hidden)
    raise ValueError(f"unknown tensor kind {tm.kind!r}")


def to_hf(tm: TensorMap, full: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """HF tensors (in `tm.hf` order) from the full megatron tensor (the inverse of `to_megatron`)."""
    if tm.kind == "copy":
        return [full]
    if tm.kind == "vocab":
        return [full[:model.vocab_size]]
    if tm.kind == "ttt_proj":
        return [full.t().contiguous()]
    if tm.kind == "fc1":
        return list(full.chunk(2, dim=0))
    if tm.kind == "qkv":
        groups, d = model.num_query_groups, model.kv_channels
        per_group = model.num_attention_heads // groups
        hidden = full.shape[-1]
        q, k, v = full.reshape(groups, (per_group + 2) * d, hidden).split([per_group * d, d, d], dim=1)
        return [t.reshape(-1, hidden).contiguous() for t in (q, k, v)]
    raise ValueError(f"unknown tensor kind {tm.kind!r}")


def expected_hf_shapes(tm: TensorMap, model: ModelConfig, conv_size: int) -> list[tuple[int, ...]]:
    """Shapes the HF tensors of `tm` must have (in `tm.hf` order)."""
    d, f, kv = model.hidden_size, model.ffn_hidden_size, model.kv_channels
    name = tm.megatron
    if tm.kind == "vocab":
        return [(model.vocab_size, d)]
    if tm.kind == "qkv":
        return [(model.num_attention_heads * kv, d), (model.num_query_groups * kv, d), (model.num_query_groups * kv, d)]
    if tm.kind == "fc1":
        return [(f, d), (f, d)]
    if tm.kind == "ttt_proj":
        return [(d, d)]
    if name.endswith("linear_proj.weight"):
        return [(d, model.num_attention_heads * kv)]
    if name.endswith("linear_fc2.weight"):
        return [(d, f)]
    if name.endswith("conv.weight"):
        return [(d, 1, conv_size)]
    if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return [(kv,)]
    return [(d,)]


def local_shard(tm: TensorMap, full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This tensor-parallel rank's part of the full megatron tensor, shaped like `param`."""
    if tm.kind == "vocab":
        padded = param.shape[0] * tp_size
        if full.shape[0] < padded:
            full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])
    if tuple(full.shape) == tuple(param.shape):  # replicated over tensor parallelism (or tp == 1)
        return full
    # the one dimension split over the TP ranks (megatron's `partition_dim` attribute is not set on
    # parameters built with perform_initialization=False, so it is read off the shapes)
    dim = next(i for i, (whole, part) in enumerate(zip(full.shape, param.shape)) if whole != part)
    if full.shape[dim] != param.shape[dim] * tp_size:
        raise ValueError(f"{tm.megatron}: full shape {list(full.shape)} does not split over tp={tp_size} into "
                         f"{list(param.shape)}")
    if tm.kind == "fc1":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    return full.chunk(tp_size, dim=dim)[tp_rank]


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# transformer-engine specs fuse the pre-attention / pre-MLP norms into the following linear layer
_TE_ALIASES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def global_parameters(gpt) -> dict[str, torch.Tensor]:
    """Parameters of one (unwrapped) GPTModel chunk by global name: local layer `j` becomes the
    layer's global index, and transformer-engine's fused norm names become the local spec's."""
    local_to_global = {j: layer.layer_number - 1 for j, layer in enumerate(gpt.decoder.layers)}
    named = {}
    for name, param in gpt.named_parameters():
        match = _LAYER.match(name)
        if match:
            rest = name[match.end():]
            for plain, fused in _TE_ALIASES.items():
                if rest == fused:
                    rest = plain
            name = f"decoder.layers.{local_to_global[int(match.group(1))]}.{rest}"
        named[name] = param
    return named

"""HuggingFace `config.json` <-> ttt-train `ModelConfig` / `TTTConfig` (Qwen3, Llama-3/3.1/3.2).

Rotary settings: `rope_theta`, Llama-3.1's `rope_type: llama3` (megatron-core hard-codes
low_freq_factor 1, high_freq_factor 4 and original_max_position_embeddings 8192, so other values are
refused) and YaRN (factor, original_max_position_embeddings, beta_fast/slow, mscale, mscale_all_dim,
truncate, attention_factor). Both transformers' v5 `rope_parameters` and the older `rope_scaling` +
`rope_theta` layouts are read; both are written, with the same values, so that transformers 4.x (the
official release pins 4.57.3) and 5.x build the same rotary embedding. The official In-Place TTT
release's keys (`ttt_mode`, `ttt_layers`, `ttt_lr`, `ttt_chunk`, `ttt_proj`, `ttt_target`) map to
`TTTConfig`; `ttt_conv_size` and `ttt_max_update_norm` are ttt-train's own (`TTT_ONLY_OURS`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models.config import ModelConfig, YarnConfig

# architecture -> family; the project's own TTT export classes and the plain ones
FAMILIES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama",
            "InPlaceTTTQwen3ForCausalLM": "qwen3", "InPlaceTTTLlamaForCausalLM": "llama"}
MODEL_TYPES = {"qwen3": "qwen3", "llama": "llama", "inplace_ttt_qwen3": "qwen3", "inplace_ttt_llama": "llama"}
REFUSED = {
    "Qwen2ForCausalLM": "Qwen2/Qwen2.5 have q/k/v biases, which ttt-train's model builder does not support "
                        "(add_bias_linear=False)",
}
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TTT_KEYS = ("ttt_mode", "ttt_layers", "ttt_lr", "ttt_chunk", "ttt_proj", "ttt_target", "ttt_conv_size",
            "ttt_max_update_norm")
# keys only ttt-train's code reads -> the value the official release's code assumes (it has no such key)
TTT_ONLY_OURS = {"ttt_conv_size": 5, "ttt_max_update_norm": None}
# fields that fix the tensors' shapes and the function computed (a preset must agree on them)
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "vocab_size", "rotary_base", "llama3_rope_factor", "qk_layernorm", "tie_embeddings",
                "norm_eps")


def read_hf_config(hf_dir: str | Path) -> dict:
    """The parsed `config.json` of a HuggingFace model folder (clear error when it is missing)."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such directory (expected a HuggingFace model folder)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; a HuggingFace model folder holds config.json beside "
                                "its *.safetensors files")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def family_of(cfg: dict, where: str = "config.json") -> str:
    """'qwen3' or 'llama' from `architectures` (or `model_type`); refuse anything else by name."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in REFUSED:
            raise ValueError(f"{where}: architecture {arch} is not supported: {REFUSED[arch]}")
        if arch in FAMILIES:
            return FAMILIES[arch]
    if not archs and cfg.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[cfg["model_type"]]
    raise ValueError(f"{where}: unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
                     f"{sorted(set(FAMILIES))} (Qwen3, Llama-3/3.1/3.2)")


def _rope(cfg: dict) -> dict:
    """Rotary parameters in v5 form: {"rope_type", "rope_theta", ...}."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return params


def _yarn_from_hf(rope: dict, where: str) -> YarnConfig:
    factor = float(rope["factor"])
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):  # transformers then uses 0.1 ln(factor) + 1 == mscale 1 over 0
        mscale, mscale_all_dim = 1.0, 0.0
    yarn = YarnConfig(factor=factor, original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                      beta_fast=float(rope.get("beta_fast") or 32.0), beta_slow=float(rope.get("beta_slow") or 1.0),
                      mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))
    if hasattr(yarn, "correction_range_round_to_int"):
        yarn.correction_range_round_to_int = bool(rope.get("truncate", True))
    elif not rope.get("truncate", True):
        raise ValueError(f"{where}: rope_parameters.truncate=false is not supported by this YarnConfig")
    given = rope.get("attention_factor")
    if given is not None and not math.isclose(float(given), yarn_attention_factor(yarn), rel_tol=1e-6):
        raise ValueError(f"{where}: rope_parameters.attention_factor={given} differs from the value megatron "
                         f"derives from factor/mscale/mscale_all_dim ({yarn_attention_factor(yarn)})")
    return yarn


def yarn_attention_factor(yarn: YarnConfig) -> float:
    """The cos/sin scale megatron applies (`_yarn_get_concentration_factor`)."""
    def get(scale: float, m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    return get(yarn.factor, yarn.mscale) / get(yarn.factor, yarn.mscale_all_dim)


def model_config_from_cfg(cfg: dict, name: str, where: str = "config.json") -> ModelConfig:
    """`ModelConfig` from a parsed HF config dict (see `model_config_from_hf`)."""
    family = family_of(cfg, where)
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"{where}: {key}=true is not supported (ttt-train's layers have no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={cfg['hidden_act']!r} is not supported (only silu / SwiGLU)")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ValueError(f"{where}: required key {key!r} is missing")
    heads = cfg["num_attention_heads"]
    rope = _rope(cfg)
    llama3, yarn = None, None
    kind = rope["rope_type"]
    if kind == "llama3":
        for key, value in LLAMA3_FIXED.items():
            if float(rope.get(key, value)) != value:
                raise ValueError(f"{where}: rope_parameters.{key}={rope[key]} is not supported (megatron-core "
                                 f"hard-codes {value} for Llama-3.1 rope scaling)")
        llama3 = float(rope["factor"])
    elif kind == "yarn":
        yarn = _yarn_from_hf(rope, where)
    elif kind != "default":
        raise ValueError(f"{where}: rope type {kind!r} is not supported (default, llama3 or yarn)")
    window = None
    if family == "qwen3" and cfg.get("use_sliding_window"):
        layer_types = cfg.get("layer_types") or []
        if set(layer_types) != {"sliding_attention"}:
            raise ValueError(f"{where}: sliding-window attention in only some layers (layer_types) is not "
                             "supported; ttt-train applies one window to every layer")
        window = int(cfg["sliding_window"])
    return ModelConfig(
        name=name, num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096), rotary_base=float(rope["rope_theta"]),
        llama3_rope_factor=llama3, yarn=yarn, qk_layernorm=family == "qwen3",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        init_std=float(cfg.get("initializer_range", 0.02)), sliding_window=window,
    ).validate()


def model_config_from_hf(hf_dir: str | Path) -> ModelConfig:
    """The model shape and rotary settings of a HuggingFace Qwen3 / Llama folder (its `config.json`)."""
    return model_config_from_cfg(read_hf_config(hf_dir), Path(hf_dir).resolve().name, f"{Path(hf_dir) / 'config.json'}")


def config_mismatches(preset: ModelConfig, from_hf: ModelConfig) -> list[str]:
    """Human-readable differences in the fields that fix the weights' shapes and meaning, e.g.
    `model.hidden_size: preset 2560, config.json 4096` (empty when the preset fits the checkpoint)."""
    out = []
    for key in SHAPE_FIELDS:
        a, b = getattr(preset, key), getattr(from_hf, key)
        if a != b:
            out.append(f"model.{key if key != 'kv_channels' else 'head_dim'}: preset {a!r}, config.json {b!r}")
    return out


def ttt_config_from_cfg(cfg: dict, num_layers: int, conv_size: int | None = None) -> tuple[TTTConfig | None, list[int]]:
    """(TTTConfig, dropped layers) from an official-release (or ttt-train export) config's `ttt_*` keys;
    (None, []) when `ttt_mode` is absent or false. Listed layers that the model lacks are dropped and
    returned so the caller reports them."""
    if not cfg.get("ttt_mode"):
        return None, []
    listed = list(cfg.get("ttt_layers") or [])
    layers = sorted(i for i in listed if 0 <= i < num_layers)
    dropped = sorted(set(listed) - set(layers))
    defaults = TTTConfig()
    ttt = TTTConfig(layers=layers, chunk_size=int(cfg.get("ttt_chunk", defaults.chunk_size)),
                    lr=float(cfg.get("ttt_lr", defaults.lr)),
                    conv_size=int(cfg.get("ttt_conv_size") or conv_size or defaults.conv_size),
                    use_proj=bool(cfg.get("ttt_proj", defaults.use_proj)),
                    target=cfg.get("ttt_target", defaults.target),
                    max_update_norm=cfg.get("ttt_max_update_norm"))
    ttt.validate(num_layers)
    return ttt, dropped


def rope_parameters(model: ModelConfig) -> dict:
    """transformers v5 `rope_parameters` giving exactly the rotary embedding megatron computes."""
    rope = {"rope_type": "default", "rope_theta": model.rotary_base}
    if model.llama3_rope_factor is not None:
        rope.update(rope_type="llama3", factor=model.llama3_rope_factor, **LLAMA3_FIXED)
    elif model.yarn is not None:
        y = model.yarn
        rope.update(rope_type="yarn", factor=y.factor, original_max_position_embeddings=y.original_max_position_embeddings,
                    beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale, mscale_all_dim=y.mscale_all_dim,
                    truncate=bool(getattr(y, "correction_range_round_to_int", True)),
                    attention_factor=yarn_attention_factor(y))
    return rope


def legacy_rope_keys(model: ModelConfig) -> dict:
    """transformers 4.x's top-level `rope_theta` and `rope_scaling` (None: plain RoPE) for the same
    rotary embedding as `rope_parameters(model)`."""
    rope = rope_parameters(model)
    theta = rope.pop("rope_theta")
    return {"rope_theta": theta, "rope_scaling": rope if rope["rope_type"] != "default" else None}


def family_for(model: ModelConfig) -> str:
    """Qwen3 has qk-norm, Llama has none."""
    return "qwen3" if model.qk_layernorm else "llama"


def hf_config_kwargs(model: ModelConfig, *, max_position_embeddings: int | None = None) -> dict:
    """Keyword arguments of transformers' Qwen3Config / LlamaConfig for `model`."""
    family = family_for(model)
    kwargs = dict(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels, hidden_act="silu",
        max_position_embeddings=max_position_embeddings or model.max_position_embeddings,
        initializer_range=model.init_std, rms_norm_eps=model.norm_eps, tie_word_embeddings=model.tie_embeddings,
        rope_parameters=rope_parameters(model), attention_bias=False,
    )
    if model.sliding_window is not None:
        if family != "qwen3":
            raise ValueError(f"model.sliding_window={model.sliding_window}: HF Llama has no sliding-window "
                             "attention; only qk-norm (Qwen3-shaped) models export with a window")
        kwargs.update(use_sliding_window=True, sliding_window=model.sliding_window, max_window_layers=0,
                      layer_types=["sliding_attention"] * model.num_layers)
    else:
        kwargs["mlp_bias" if family == "llama" else "use_sliding_window"] = False
    return kwargs


def ttt_config_keys(ttt: TTTConfig, num_layers: int) -> dict:
    """The official release's `ttt_*` keys plus ttt-train's (`ttt_conv_size`, `ttt_max_update_norm`)."""
    return dict(ttt_mode=True, ttt_layers=ttt.layer_indices(num_layers), ttt_lr=float(ttt.lr),
                ttt_chunk=ttt.chunk_size, ttt_proj=ttt.use_proj, ttt_target=ttt.target,
                ttt_conv_size=ttt.conv_size, ttt_max_update_norm=ttt.max_update_norm)


def official_differences(ttt: TTTConfig) -> dict[str, tuple]:
    """`{key: (ours, the official code's)}` for the keys only ttt-train reads whose value differs from
    what the official release's code assumes (empty: the official code computes the same model)."""
    ours = {"ttt_conv_size": ttt.conv_size, "ttt_max_update_norm": ttt.max_update_norm}
    return {k: (ours[k], v) for k, v in TTT_ONLY_OURS.items() if ours[k] != v}

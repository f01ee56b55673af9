"""Model arguments (one dataclass for the GPT family: Qwen3, Llama-3.1, the paper's from-scratch
shapes) and their translation into megatron's `TransformerConfig`.

Presets live as YAML in `configs/model/` (experiments are config files); `load_model_config(name)`
reads one. Values are validated once, in `validate()`, with errors that name the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ttt_train.config_keys import checked_mapping

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


@dataclass
class YarnConfig:
    """YaRN rotary extension (stage 2 of the curriculum): `factor` over `original_max_position_embeddings`."""

    factor: float = 4.0
    original_max_position_embeddings: int = 32768
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class ModelConfig:
    """Shape and options of a decoder-only GPT with RMSNorm, SwiGLU, GQA and RoPE.

    `head_dim` may differ from hidden_size / num_attention_heads (Qwen3). `num_query_groups` is the
    number of key/value heads. `sliding_window` (tokens, or None) gives every layer sliding-window
    attention. `llama3_rope_factor` enables Llama-3.1's frequency-dependent RoPE scaling.
    `yarn` (or None) switches the rotary embedding to YaRN.
    """

    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int | None = None
    vocab_size: int = 320
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    llama3_rope_factor: float | None = None
    yarn: YarnConfig | None = None
    qk_layernorm: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    sliding_window: int | None = None
    make_vocab_size_divisible_by: int = 128
    backend: str = "local"
    extra: dict = field(default_factory=dict)

    def validate(self) -> ModelConfig:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"model.{key}: {msg} (model {self.name!r})")

        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "vocab_size", "max_position_embeddings"):
            value = getattr(self, key)
            need(isinstance(value, int) and value > 0, key, f"must be a positive integer, got {value!r}")
        need(self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
             f"{self.num_query_groups} must divide num_attention_heads={self.num_attention_heads}")
        need(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0, "head_dim",
             f"set it: hidden_size={self.hidden_size} is not divisible by num_attention_heads="
             f"{self.num_attention_heads}")
        need(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
             f"must be a positive number of tokens or null, got {self.sliding_window!r}")
        need(self.backend in ("local", "te"), "backend", f"must be 'local' or 'te', got {self.backend!r}")
        need(math.isfinite(self.init_std) and self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        need(not (self.yarn and self.llama3_rope_factor), "yarn",
             "YaRN and llama3_rope_factor cannot both be set")
        return self

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Build from a plain mapping (YAML, Hydra); unknown keys are an error naming them."""
        values = checked_mapping(cls, values, "model")
        if values.get("yarn") is not None and not isinstance(values["yarn"], YarnConfig):
            values["yarn"] = YarnConfig(**values["yarn"])
        return cls(**values).validate()


def load_model_config(name: str, **overrides) -> ModelConfig:
    """Read preset `configs/model/<name>.yaml` (e.g. `qwen3_4b`, `llama3.1_8b`, `tiny`) with overrides."""
    from omegaconf import OmegaConf

    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no model preset {name!r} ({path}); choose one of {choices}")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    values.update(overrides)
    return ModelConfig.from_dict(values)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Parameter / compute dtypes by config name (bf16 keeps fp32 master weights in the optimizer)."""


def to_transformer_config(model: ModelConfig, parallel, *, dtype: str = "fp32", recompute: str | None = None,
                          **overrides):
    """megatron `TransformerConfig` for `model` under the layout `parallel` (a `ParallelConfig`).

    `recompute`: None, "selective" (core attention) or "full" (whole layers, uniform, 1 per chunk).
    The YaRN fields that megatron-core 0.16.1's GPTModel reads but its config lacks are set here.
    """
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    model.validate()
    if dtype not in DTYPES:
        raise ValueError(f"precision dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    recompute_args = {}
    if recompute == "selective":
        recompute_args = dict(recompute_granularity="selective")
    elif recompute == "full":
        recompute_args = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute is not None:
        raise ValueError(f"recompute must be null, 'selective' or 'full', got {recompute!r}")
    config = TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        add_bias_linear=False,
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        window_size=(model.sliding_window - 1, 0) if model.sliding_window else None,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=dtype == "bf16",
        calculate_per_token_loss=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=torch.cuda.is_available(),
        apply_rope_fusion=False,
        # Per-layer checkpoint keys: TTT layers carry parameters other layers lack, and a plain
        # model's checkpoint then has the same layout as a TTT model's (it can seed one).
        hetereogenous_dist_checkpoint=True,
        **recompute_args,
        **overrides,
    )
    if model.yarn is not None:
        y = model.yarn
        for key, value in dict(yarn_rotary_scaling_factor=y.factor,
                               yarn_original_max_position_embeddings=y.original_max_position_embeddings,
                               yarn_beta_fast=y.beta_fast, yarn_beta_slow=y.beta_slow, yarn_mscale=y.mscale,
                               yarn_mscale_all_dim=y.mscale_all_dim,
                               yarn_correction_range_round_to_int=True).items():
            setattr(config, key, value)
    return config

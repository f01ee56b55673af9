"""Model arguments (one dataclass for the GPT family: Qwen3, Llama-3.1, the paper's from-scratch
shapes) and their translation into megatron's `TransformerConfig`.

Presets live as YAML in `configs/model/` (experiments are config files); `load_model_config(name)`
reads one. Values are validated once, in `validate()`, with errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ttt_train.config_keys import build, check_fields, checked

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


@dataclass
class YarnConfig:
    """YaRN rotary extension (stage 2 of the curriculum): `factor` over `original_max_position_embeddings`.

    beta_fast / beta_slow: the rotation counts bounding the ramp between interpolated and kept
    frequencies; mscale / mscale_all_dim: the attention (concentration) factor is
    (0.1 * mscale * ln(factor) + 1) / (0.1 * mscale_all_dim * ln(factor) + 1) (defaults: HF's
    0.1 ln(factor) + 1); correction_range_round_to_int: round the ramp's bounds to whole dimensions
    (HF's `truncate`).
    """

    factor: float = checked(4.0, ge=1.0)
    original_max_position_embeddings: int = checked(32768, ge=1)
    beta_fast: float = checked(32.0, gt=0.0)
    beta_slow: float = checked(1.0, gt=0.0)
    mscale: float = checked(1.0, ge=0.0)
    mscale_all_dim: float = checked(0.0, ge=0.0)
    correction_range_round_to_int: bool = True

    def validate(self, section: str = "model.yarn") -> YarnConfig:
        check_fields(self, section)
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"{section}.beta_fast: must be greater than beta_slow={self.beta_slow}, "
                             f"got {self.beta_fast}")
        return self

    @classmethod
    def from_dict(cls, values) -> YarnConfig:
        """Build from a plain mapping (YAML, Hydra); unknown keys and wrong types are errors naming them."""
        return build(cls, values, "model.yarn").validate()


@dataclass
class ModelConfig:
    """Shape and options of a decoder-only GPT with RMSNorm, SwiGLU, GQA and RoPE.

    `head_dim` may differ from hidden_size / num_attention_heads (Qwen3). `num_query_groups` is the
    number of key/value heads. `sliding_window` (tokens, or None) gives every layer sliding-window
    attention. `llama3_rope_factor` enables Llama-3.1's frequency-dependent RoPE scaling.
    `yarn` (or None) switches the rotary embedding to YaRN. `extra`: free-form notes, unused by the model.
    """

    name: str = "tiny"
    num_layers: int = checked(4, ge=1)
    hidden_size: int = checked(64, ge=1)
    ffn_hidden_size: int = checked(128, ge=1)
    num_attention_heads: int = checked(4, ge=1)
    num_query_groups: int = checked(2, ge=1)
    head_dim: int | None = checked(None, ge=1)
    vocab_size: int = checked(320, ge=1)
    max_position_embeddings: int = checked(4096, ge=1)
    rotary_base: float = checked(10000.0, gt=1.0)
    llama3_rope_factor: float | None = checked(None, ge=1.0)
    yarn: YarnConfig | None = None
    qk_layernorm: bool = True
    tie_embeddings: bool = True
    norm_eps: float = checked(1e-6, gt=0.0, lt=1.0)
    init_std: float = checked(0.02, gt=0.0)
    sliding_window: int | None = checked(None, ge=1)
    make_vocab_size_divisible_by: int = checked(128, ge=1)
    backend: str = checked("local", choices=("local", "te"))
    extra: dict = field(default_factory=dict)

    def validate(self) -> ModelConfig:
        """Check types, ranges and cross-field rules; raise ValueError naming `model.<key>`."""
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"model.{key}: {msg} (model {self.name!r})")

        try:
            check_fields(self, "model")
        except ValueError as err:
            raise ValueError(f"{err} (model {self.name!r})") from None
        need(self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
             f"{self.num_query_groups} must divide num_attention_heads={self.num_attention_heads}")
        need(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0, "head_dim",
             f"set it: hidden_size={self.hidden_size} is not divisible by num_attention_heads="
             f"{self.num_attention_heads}")
        need(not (self.yarn and self.llama3_rope_factor), "yarn",
             "YaRN and llama3_rope_factor cannot both be set")
        if self.yarn is not None:
            self.yarn.validate()
        return self

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values) -> ModelConfig:
        """Build from a plain mapping (YAML, Hydra); unknown keys and wrong types are errors naming them."""
        return build(cls, values, "model").validate()


def load_model_config(name: str, **overrides) -> ModelConfig:
    """Read preset `configs/model/<name>.yaml` (e.g. `qwen3_4b`, `llama3.1_8b`, `tiny`) with overrides."""
    from omegaconf import OmegaConf

    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no model preset {name!r} ({path}); choose one of {choices}")
    try:
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # noqa: BLE001 - YAML / interpolation errors, re-raised naming the file
        raise ValueError(f"{path}: cannot read the model preset: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of model keys, got {values!r}")
    values.update(overrides)
    try:
        return ModelConfig.from_dict(values)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Parameter / compute dtypes by config name (bf16 keeps fp32 master weights in the optimizer)."""


def to_transformer_config(model: ModelConfig, parallel, *, dtype: str = "fp32", recompute: str | None = None,
                          **overrides):
    """megatron `TransformerConfig` for `model` under the layout `parallel` (a `ParallelConfig`).

    `recompute`: None, "selective" (core attention) or "full" (whole layers, uniform, 1 per chunk).
    `parallel.cp_scan`, `cp_scan_wire` and `links` travel as `config.ttt_cp_scan`, `ttt_cp_scan_wire`, `ttt_cp_links`.
    The YaRN fields that megatron-core 0.16.1's GPTModel reads but its config lacks are set here.
    """
    import importlib.util

    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ttt_train.runtime.cp_attention_rules import resolve_cp_comm_type

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
        cp_comm_type=resolve_cp_comm_type(parallel.cp_comm_type, cp=parallel.cp, tp=parallel.tp,
                                          backend=model.backend, sliding_window=model.sliding_window,
                                          num_attention_heads=model.num_attention_heads,
                                          num_query_groups=model.num_query_groups),
        sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=dtype == "bf16",
        calculate_per_token_loss=True,
        bias_activation_fusion=False,
        # megatron's fused softmax kernels come with Megatron-LM's build or Apex, not with megatron-core's wheel
        masked_softmax_fusion=torch.cuda.is_available() and importlib.util.find_spec("scaled_masked_softmax_cuda")
        is not None,
        apply_rope_fusion=False,
        # Per-layer checkpoint keys: TTT layers carry parameters other layers lack, and a plain
        # model's checkpoint then has the same layout as a TTT model's (it can seed one).
        hetereogenous_dist_checkpoint=True,
        **recompute_args,
        **overrides,
    )
    # not megatron fields: the TTT layers' context-parallel scan (`TTTMLP._context_parallel_ttt`)
    config.ttt_cp_scan, config.ttt_cp_scan_wire, config.ttt_cp_links = parallel.cp_scan, parallel.cp_scan_wire, \
        parallel.links
    if model.yarn is not None:
        y = model.yarn
        for key, value in dict(yarn_rotary_scaling_factor=y.factor,
                               yarn_original_max_position_embeddings=y.original_max_position_embeddings,
                               yarn_beta_fast=y.beta_fast, yarn_beta_slow=y.beta_slow, yarn_mscale=y.mscale,
                               yarn_mscale_all_dim=y.mscale_all_dim,
                               yarn_correction_range_round_to_int=y.correction_range_round_to_int).items():
            setattr(config, key, value)
    return config

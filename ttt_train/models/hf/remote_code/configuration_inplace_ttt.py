"""Configurations of In-Place TTT models for transformers (self-contained: torch and transformers only).

``InPlaceTTTQwen3Config`` / ``InPlaceTTTLlamaConfig`` are the base configs plus the In-Place TTT keys
(the official release's ``ttt_mode``, ``ttt_layers``, ``ttt_lr``, ``ttt_chunk``, ``ttt_proj``,
``ttt_target``, plus ``ttt_conv_size`` and ``ttt_max_update_norm``, the per-chunk clip tau, which only
ttt-train's code reads). Their ``model_type`` is the base model's (``qwen3`` / ``llama``, as the official
release writes it), so that a tokenizer or a plain config loads from an exported folder without remote
code; ``trust_remote_code=True`` loads these classes through ``auto_map`` (without it, transformers
builds the plain base model and reports the ``mlp.ttt_*`` tensors as unused).
Runs on transformers 4.57 and 5.x.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig, Qwen3Config

try:  # validates the keys whenever a config is built (transformers 5 configs are strict dataclasses)
    from huggingface_hub.dataclasses import strict
except ImportError:  # an older huggingface_hub: the model's __init__ still validates
    def strict(cls):
        return cls

TTT_TARGETS = ("hidden_states", "input_embed")


def check_ttt_config(cfg) -> None:
    """Raise ValueError naming ``config.<key>`` when an In-Place TTT key is invalid."""
    def bad(key, why):
        raise ValueError(f"config.{key} {why}, got {getattr(cfg, key)!r}")

    if not isinstance(cfg.ttt_mode, bool):
        bad("ttt_mode", "must be true or false")
    if isinstance(cfg.ttt_chunk, bool) or not isinstance(cfg.ttt_chunk, int) or cfg.ttt_chunk < 1:
        bad("ttt_chunk", "must be an int >= 1 (tokens per chunk)")
    if isinstance(cfg.ttt_lr, bool) or not isinstance(cfg.ttt_lr, (int, float)) or not 0 <= cfg.ttt_lr < float("inf"):
        bad("ttt_lr", "must be a finite number >= 0 (the inner learning rate)")
    tau = cfg.ttt_max_update_norm
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < float("inf")):
        bad("ttt_max_update_norm", "must be a finite number > 0 or null (no clipping)")
    k = cfg.ttt_conv_size
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        bad("ttt_conv_size", "must be an odd int >= 1")
    if cfg.ttt_target not in TTT_TARGETS:
        bad("ttt_target", f"must be one of {list(TTT_TARGETS)}")
    if not isinstance(cfg.ttt_proj, bool):
        bad("ttt_proj", "must be true or false")
    layers = cfg.ttt_layers if cfg.ttt_layers is not None else []
    n = cfg.num_hidden_layers
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        bad("ttt_layers", "must be a list of layer indices")
    if cfg.ttt_mode and not layers:
        bad("ttt_layers", "must list at least one layer when ttt_mode is true")
    if len(set(layers)) != len(layers) or any(not 0 <= i < n for i in layers):
        bad("ttt_layers", f"must hold distinct indices in [0, {n}) (num_hidden_layers = {n})")
    if cfg.ttt_mode and getattr(cfg, "mlp_bias", False):
        bad("mlp_bias", "must be false with ttt_mode (In-Place TTT needs a bias-free down projection)")


def ttt_layer_indices(cfg) -> list[int]:
    """The decoder layers whose MLP runs In-Place TTT (empty unless ``ttt_mode``)."""
    return sorted(cfg.ttt_layers or []) if cfg.ttt_mode else []


@dataclass
class InPlaceTTTKeys:
    """The In-Place TTT keys (module docstring) that both configs add to their base config."""

    ttt_mode: bool = False
    ttt_layers: list[int] | None = None
    ttt_lr: float | int = 0.3
    ttt_chunk: int = 4096
    ttt_proj: bool = True
    ttt_target: str = "hidden_states"
    ttt_conv_size: int = 5
    ttt_max_update_norm: float | int | None = None

    def validate_ttt(self):
        check_ttt_config(self)


@strict
class InPlaceTTTQwen3Config(Qwen3Config, InPlaceTTTKeys):
    """Qwen3 with In-Place TTT MLPs in ``ttt_layers`` (keys as in the module docstring)."""

    model_type = "qwen3"


@strict
class InPlaceTTTLlamaConfig(LlamaConfig, InPlaceTTTKeys):
    """Llama with In-Place TTT MLPs in ``ttt_layers`` (keys as in the module docstring)."""

    model_type = "llama"


InPlaceTTTQwen3Config.register_for_auto_class()
InPlaceTTTLlamaConfig.register_for_auto_class()

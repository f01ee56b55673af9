"""Model arguments, builders and (per family) HuggingFace conversion.

The names below are imported on first use, so that `ttt_train.models.hf.remote_code` (the modeling
code an export ships, torch and transformers only) imports without megatron-core.
"""

import importlib

_NAMES = {"ModelConfig": "config", "YarnConfig": "config", "load_model_config": "config",
          "to_transformer_config": "config", "build_gpt_model": "builder", "padded_vocab_size": "builder"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)

"""HuggingFace conversion: Qwen3 / Llama folders <-> ttt-train checkpoints (see `ttt_train.convert`).

API: `model_config_from_hf`, `config_mismatches`, `load_hf_weights` (fill a model's shards in place,
streaming), `import_hf` (folder -> checkpoint), `export_checkpoint` (checkpoint -> folder).
The HF modeling code for In-Place TTT exports lives in `remote_code/` (importable without megatron:
the names below are imported on first use).
"""

import importlib

_NAMES = {"export_checkpoint": "exporter", "config_mismatches": "hf_config", "model_config_from_hf": "hf_config",
          "import_hf": "importer", "load_hf_weights": "loader"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)

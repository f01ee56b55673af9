"""HuggingFace conversion: Qwen3 / Llama folders <-> ttt-train checkpoints (see `ttt_train.convert`).

API: `model_config_from_hf`, `config_mismatches`, `load_hf_weights` (fill a model's shards in place,
streaming), `import_hf` (folder -> checkpoint), `export_checkpoint` (checkpoint -> folder).
The HF modeling code for In-Place TTT exports lives in `remote_code/`.
"""

from ttt_train.models.hf.exporter import export_checkpoint
from ttt_train.models.hf.hf_config import config_mismatches, model_config_from_hf
from ttt_train.models.hf.importer import import_hf
from ttt_train.models.hf.loader import load_hf_weights

__all__ = ["config_mismatches", "export_checkpoint", "import_hf", "load_hf_weights", "model_config_from_hf"]

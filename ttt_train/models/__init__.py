"""Model arguments, builders and (per family) HuggingFace conversion."""

from ttt_train.models.builder import build_gpt_model, padded_vocab_size
from ttt_train.models.config import ModelConfig, YarnConfig, load_model_config, to_transformer_config

__all__ = ["ModelConfig", "YarnConfig", "build_gpt_model", "load_model_config", "padded_vocab_size",
           "to_transformer_config"]

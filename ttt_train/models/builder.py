"""Build a megatron-core `GPTModel` (this pipeline stage's part) from a `ModelConfig`."""

from __future__ import annotations

import torch

from ttt_train.layers.specs import block_spec
from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models.config import ModelConfig


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Vocabulary padded to a multiple of `make_vocab_size_divisible_by`, independent of the layout
    (so a checkpoint loads at any tensor-parallel size); it must divide evenly over `tp` ranks."""
    multiple = model.make_vocab_size_divisible_by
    padded = -(-model.vocab_size // multiple) * multiple
    if padded % tp:
        raise ValueError(f"padded vocabulary {padded} (model.vocab_size={model.vocab_size} rounded up to "
                         f"model.make_vocab_size_divisible_by={multiple}) does not divide over tp={tp}; "
                         f"raise make_vocab_size_divisible_by to a multiple of {tp}")
    return padded


def build_gpt_model(model: ModelConfig, config, *, ttt: TTTConfig | None = None,
                    pre_process: bool | None = None, post_process: bool | None = None,
                    vp_stage: int | None = None):
    """GPTModel for the layers of this pipeline stage, with In-Place TTT where `ttt` says.

    `config` is the `TransformerConfig` from `to_transformer_config`. `pre_process` / `post_process`
    default to whether this rank is the first / last pipeline stage. The model remembers `ttt`
    (attribute `ttt_config`) so the training step knows what to feed it.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if model.yarn is not None:
        position_embedding_type = "yarn"
    else:
        position_embedding_type = "rope"
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, backend=model.backend, ttt=ttt, vp_stage=vp_stage),
        vocab_size=padded_vocab_size(model, config.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=position_embedding_type,
        rotary_base=model.rotary_base,
        rope_scaling=model.llama3_rope_factor is not None,
        rope_scaling_factor=model.llama3_rope_factor or 8.0,
        vp_stage=vp_stage,
    )
    gpt.ttt_config = ttt
    if torch.cuda.is_available():  # parameters built on the CPU (use_cpu_initialization) move to this GPU
        gpt.cuda(torch.cuda.current_device())
    return gpt

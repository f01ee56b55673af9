"""Tiny random HF models (a plain Qwen3 and an exported In-Place TTT Qwen3) with the project's
byte-level tokenizer, built once per session; and a small tokenized dataset."""

import numpy
import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from ttt_train.data import indexed
from ttt_train.data.tokenizer import BYTE_TOKENIZER_PATH

SHAPE = dict(vocab_size=258, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, eos_token_id=256, pad_token_id=257,
             bos_token_id=None, tie_word_embeddings=False)


def save_tokenizer(path):
    PreTrainedTokenizerFast(tokenizer_file=str(BYTE_TOKENIZER_PATH), eos_token="<|endoftext|>",
                            pad_token="<|pad|>").save_pretrained(path)


@pytest.fixture(scope="session")
def plain_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain_qwen3")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**SHAPE)).save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def ttt_dir(tmp_path_factory):
    """Exported the way the exporter does it: safetensors, then write_remote_code (code + config.json)."""
    from ttt_train.models.hf.remote_code.configuration_inplace_ttt import InPlaceTTTQwen3Config
    from ttt_train.models.hf.remote_code.modeling_inplace_ttt import InPlaceTTTQwen3ForCausalLM
    from ttt_train.models.hf.remote_files import write_remote_code

    path = tmp_path_factory.mktemp("ttt_qwen3")
    config = InPlaceTTTQwen3Config(**SHAPE, ttt_mode=True, ttt_layers=[0], ttt_chunk=16, ttt_lr=1.0,
                                   ttt_target="hidden_states")
    torch.manual_seed(1)
    model = InPlaceTTTQwen3ForCausalLM(config)
    with torch.no_grad():
        for mlp in model.model.ttt_mlps:
            mlp.ttt_conv.weight.normal_(0, 0.5)
            mlp.ttt_proj.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    (path / "config.json").unlink()
    write_remote_code(path, config)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def dataset_prefix(tmp_path_factory):
    """Byte-tokenized documents of lengths 100..700 (each ending with EOD 256), no sidecar."""
    rng = numpy.random.default_rng(0)
    docs = [numpy.append(rng.integers(32, 127, size=n), 256) for n in (100, 700, 300, 650, 690)]
    prefix = str(tmp_path_factory.mktemp("data") / "docs")
    indexed.write_documents(prefix, docs, numpy.uint16)
    return prefix

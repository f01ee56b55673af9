"""Model presets load, and bad configuration is refused with the offending key named."""

import pytest

from ttt_train.models import load_model_config, padded_vocab_size
from ttt_train.models.config import ModelConfig
from ttt_train.runtime.distributed import ParallelConfig

PRESETS = ["tiny", "qwen3_0.6b", "qwen3_1.7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "llama3.1_8b",
           "scratch_500m", "scratch_1.5b"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_model_config(name)
    assert cfg.name == name
    assert padded_vocab_size(cfg, 1) >= cfg.vocab_size


def test_qwen3_4b_shape():
    cfg = load_model_config("qwen3_4b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
            cfg.num_query_groups, cfg.kv_channels, cfg.tie_embeddings) == (36, 2560, 9728, 32, 8, 128, True)


@pytest.mark.parametrize("overrides, key", [
    (dict(num_layers=0), "model.num_layers"),
    (dict(num_query_groups=3), "model.num_query_groups"),
    (dict(sliding_window=-1), "model.sliding_window"),
    (dict(backend="cuda"), "model.backend"),
    (dict(hidden_size=65, head_dim=None), "model.head_dim"),
])
def test_bad_model_config_names_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_model_config("tiny", **overrides)


def test_unknown_key_and_preset():
    with pytest.raises(ValueError, match="unknown model config keys.*hiden_size"):
        ModelConfig.from_dict({"hiden_size": 3})
    with pytest.raises(FileNotFoundError, match="no model preset 'qwen9'.*tiny"):
        load_model_config("qwen9")


def test_parallel_layout_must_divide_world():
    assert ParallelConfig(tp=2).validate(4) == 2
    with pytest.raises(ValueError, match="world size 6 is not divisible.*tp \\* parallel.pp"):
        ParallelConfig(tp=2, pp=2).validate(6)
    with pytest.raises(ValueError, match="parallel.cp must be a positive integer"):
        ParallelConfig(cp=0).validate(1)


def test_vocab_padding_must_divide_tp():
    cfg = load_model_config("tiny", make_vocab_size_divisible_by=3)
    with pytest.raises(ValueError, match="does not divide over tp=2"):
        padded_vocab_size(cfg, 2)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_translate_to_megatron_config(name):
    from ttt_train.models import to_transformer_config

    model = load_model_config(name)
    config = to_transformer_config(model, ParallelConfig(tp=8 if model.num_query_groups % 8 == 0 else 1))
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (
        model.num_layers, model.hidden_size, model.ffn_hidden_size)
    assert config.kv_channels == model.kv_channels and config.num_query_groups == model.num_query_groups
    assert config.qk_layernorm == model.qk_layernorm and config.gated_linear_unit
    assert config.window_size == ((model.sliding_window - 1, 0) if model.sliding_window else None)


def test_yarn_fields_reach_megatron_config():
    from ttt_train.models import to_transformer_config

    model = load_model_config("qwen3_4b", yarn={"factor": 4.0, "original_max_position_embeddings": 32768},
                              max_position_embeddings=131072)
    config = to_transformer_config(model, ParallelConfig())
    assert config.yarn_rotary_scaling_factor == 4.0 and config.yarn_original_max_position_embeddings == 32768

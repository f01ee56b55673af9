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
    with pytest.raises(ValueError, match=r"parallel\.cp: must be >= 1, got 0"):
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


# ----------------------------------------------------------------------------- strict types and ranges

def _build(cls_name: str, values: dict):
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models.config import YarnConfig
    from ttt_train.training.optimizer import OptimizerArgs
    from ttt_train.training.setup import DDPConfig

    classes = dict(model=ModelConfig, yarn=YarnConfig, ttt=TTTConfig, parallel=ParallelConfig, ddp=DDPConfig,
                   optimizer=OptimizerArgs)
    return classes[cls_name].from_dict(values)


@pytest.mark.parametrize("section, values, message", [
    ("ttt", dict(enabled="false"), r"ttt\.enabled: expected true/false, got 'false' \(str\)"),
    ("model", dict(qk_layernorm="false"), r"model\.qk_layernorm: expected true/false, got 'false'"),
    ("model", dict(tie_embeddings=0), r"model\.tie_embeddings: expected true/false, got 0 \(int\)"),
    ("ttt", dict(every=True), r"ttt\.every: expected an integer, got True \(bool\)"),
    ("ttt", dict(chunk_size=64.0), r"ttt\.chunk_size: expected an integer, got 64\.0 \(float\)"),
    ("ttt", dict(max_update_norm="0.1"), r"ttt\.max_update_norm: expected a number or null, got '0\.1'"),
    ("ttt", dict(lr=True), r"ttt\.lr: expected a number, got True"),
    ("ttt", dict(layers=[0, "6"]), r"ttt\.layers\[1\]: expected an integer, got '6'"),
    ("ttt", dict(layers=6), r"ttt\.layers: expected a list of an integer or null, got 6"),
    ("ttt", dict(target=1), r"ttt\.target: expected a string"),
    ("model", dict(yarn={"factor": "4"}), r"model\.yarn\.factor: expected a number, got '4'"),
    ("model", dict(yarn=4.0), r"model\.yarn: expected a mapping of YarnConfig keys or null, got 4\.0"),
    ("model", dict(yarn={"factr": 4.0}), r"unknown model\.yarn config keys \['factr'\]"),
    ("model", dict(head_dim="128"), r"model\.head_dim: expected an integer or null"),
    ("model", dict(extra=[1]), r"model\.extra: expected a mapping"),
    ("parallel", dict(tp="2"), r"parallel\.tp: expected an integer, got '2'"),
    ("parallel", dict(sequence_parallel="true"), r"parallel\.sequence_parallel: expected true/false"),
    ("ddp", dict(use_distributed_optimizer="yes"), r"ddp\.use_distributed_optimizer: expected true/false"),
    ("ddp", dict(bucket_size=1.5), r"ddp\.bucket_size: expected an integer or null"),
    ("optimizer", dict(lr="1e-4"), r"optimizer\.lr: expected a number, got '1e-4'"),
])
def test_types_are_checked_not_coerced(section, values, message):
    with pytest.raises(ValueError, match=message):
        _build(section, values)


@pytest.mark.parametrize("section, values, message", [
    ("model", dict(head_dim=0), r"model\.head_dim: must be >= 1, got 0"),
    ("model", dict(norm_eps=0.0), r"model\.norm_eps: must be > 0\.0 and < 1\.0, got 0\.0"),
    ("model", dict(norm_eps=2.0), r"model\.norm_eps: must be > 0\.0 and < 1\.0"),
    ("model", dict(rotary_base=0.5), r"model\.rotary_base: must be > 1\.0"),
    ("model", dict(rotary_base=float("inf")), r"model\.rotary_base: must be a finite number"),
    ("model", dict(make_vocab_size_divisible_by=0), r"model\.make_vocab_size_divisible_by: must be >= 1"),
    ("model", dict(llama3_rope_factor=0.5), r"model\.llama3_rope_factor: must be >= 1\.0"),
    ("model", dict(init_std=0), r"model\.init_std: must be > 0\.0, got 0\.0"),
    ("model", dict(vocab_size=-5), r"model\.vocab_size: must be >= 1"),
    ("model", dict(max_position_embeddings=0), r"model\.max_position_embeddings: must be >= 1"),
    ("model", dict(backend="cuda"), r"model\.backend: must be one of \['local', 'te'\]"),
    ("model", dict(yarn={"factor": 0.5}), r"model\.yarn\.factor: must be >= 1\.0"),
    ("model", dict(yarn={"original_max_position_embeddings": 0}), r"model\.yarn\.original_max_position_embeddings"),
    ("model", dict(yarn={"beta_fast": 1.0, "beta_slow": 2.0}), r"model\.yarn\.beta_fast: must be greater than"),
    ("model", dict(yarn={"mscale": -1.0}), r"model\.yarn\.mscale: must be >= 0\.0"),
    ("yarn", dict(beta_slow=0.0), r"model\.yarn\.beta_slow: must be > 0\.0"),
    ("ttt", dict(layers=[]), r"ttt\.layers: must not be empty"),
    ("ttt", dict(layers=[0, -6]), r"ttt\.layers: must be >= 0, got -6"),
    ("ttt", dict(offset=-1), r"ttt\.offset: must be >= 0"),
    ("ttt", dict(conv_size=4), r"ttt\.conv_size: must be odd, got 4"),
    ("parallel", dict(seed=-1), r"parallel\.seed: must be >= 0"),
    ("ddp", dict(bucket_size=0), r"ddp\.bucket_size: must be >= 1"),
    ("optimizer", dict(adam_beta2=1.0), r"optimizer\.adam_beta2: must be >= 0\.0 and < 1\.0, got 1\.0"),
    ("optimizer", dict(adam_eps=0.0), r"optimizer\.adam_eps: must be > 0\.0"),
    ("optimizer", dict(lr=1e-4, min_lr=1e-3), r"optimizer\.min_lr: must be <= optimizer\.lr"),
])
def test_numeric_fields_are_range_checked(section, values, message):
    with pytest.raises(ValueError, match=message):
        _build(section, values)


@pytest.mark.parametrize("section", ["model", "yarn", "ttt", "parallel", "ddp", "optimizer"])
def test_from_dict_round_trips_and_refuses_unknown_keys(section):
    import dataclasses

    from omegaconf import OmegaConf

    default = _build(section, {})
    assert _build(section, dataclasses.asdict(default)) == default  # what a manifest stores builds back
    assert _build(section, OmegaConf.create(dataclasses.asdict(default))) == default  # Hydra nodes
    with pytest.raises(ValueError, match=r"unknown .* config keys \['bogus'\]; known keys"):
        _build(section, {"bogus": 1})


def test_integers_widen_to_float_fields_and_directly_built_configs_are_checked():
    from ttt_train.layers.ttt_config import TTTConfig

    cfg = TTTConfig.from_dict({"lr": 3, "max_update_norm": 1})
    assert type(cfg.lr) is float and type(cfg.max_update_norm) is float
    with pytest.raises(ValueError, match=r"ttt\.every: expected an integer, got True"):
        TTTConfig(every=True).layer_indices(12)
    with pytest.raises(ValueError, match=r"model\.num_layers: expected an integer, got '4'"):
        ModelConfig(num_layers="4").validate()
    with pytest.raises(ValueError, match=r"parallel\.tp: expected an integer, got 2\.0"):
        ParallelConfig(tp=2.0).validate(2)


def test_yaml_errors_name_the_file_and_the_key(tmp_path, monkeypatch):
    from ttt_train.models import config as model_config

    monkeypatch.setattr(model_config, "CONFIG_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text("name: bad\nyarn:\n  factor: '4'\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: model\.yarn\.factor: expected a number, got '4'"):
        load_model_config("bad")
    (tmp_path / "broken.yaml").write_text("name: broken\nyarn: [1,\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: cannot read the model preset"):
        load_model_config("broken")


def test_every_yarn_field_reaches_megatron():
    from ttt_train.models import to_transformer_config

    yarn = dict(factor=3.2, original_max_position_embeddings=40960, beta_fast=16.0, beta_slow=2.0, mscale=0.5,
                mscale_all_dim=0.25, correction_range_round_to_int=False)
    config = to_transformer_config(load_model_config("tiny", yarn=yarn), ParallelConfig())
    assert {key: getattr(config, f"yarn_{'rotary_scaling_' if key == 'factor' else ''}{key}") for key in yarn} == yarn
    default = to_transformer_config(load_model_config("tiny", yarn={}), ParallelConfig())
    assert default.yarn_correction_range_round_to_int is True and default.yarn_mscale_all_dim == 0.0

"""In-Place TTT layers in a megatron GPT: layer selection, drop-in initialisation, exactness against a
float64 re-computation, and refusal of bad configuration at build time."""

import pytest

from tests.support.scenarios import ttt_drop_in, ttt_mlp_vs_float64, ttt_spec_layers
from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.runtime.local_ranks import run_local_ranks


# (TTT config, TTT layers of a 12-layer model, those of each of 2 pipeline stages of 6 layers). Indices
# are global: `every: 4, offset: 1` read per stage (local indices) would give [[1, 5], [7, 11]].
@pytest.mark.parametrize("ttt, expected, stages", [
    (dict(every=6), [0, 6], [[0], [6]]),
    (dict(every=6, offset=5), [5, 11], [[5], [11]]),
    (dict(layers=[3, 4, 10]), [3, 4, 10], [[3, 4], [10]]),
    (dict(every=4, offset=1), [1, 5, 9], [[1, 5], [9]]),
])
def test_exactly_the_configured_layers_are_ttt(ttt, expected, stages):
    (single,) = run_local_ranks(ttt_spec_layers, 1, ttt, 1, timeout=300)
    assert single == expected
    assert run_local_ranks(ttt_spec_layers, 2, ttt, 2, timeout=300) == stages  # PP=2


@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
def test_fresh_ttt_model_is_the_base_model(target):
    (result,) = run_local_ranks(ttt_drop_in, 1, target, timeout=300)
    assert result["bitwise_equal_no_docs"], result["max_diff_no_docs"]
    assert result["max_diff_docs"] < 1e-6
    assert result["conv_grad"] > 0 and result["proj_grad"] == 0.0
    assert result["ttt_layers"] == [0, 6]


def test_ttt_mlp_equals_float64_recomputation_and_its_stats_their_definition():
    (result,) = run_local_ranks(ttt_mlp_vs_float64, 1, timeout=300)
    assert result["out_rel_err"] < 1e-12
    assert result["changed_by_ttt"] > 1e-3  # the fast weights really moved
    # ttt_stats() of that forward follow their definition
    stats, expected = result["stats"], result["expected_stats"]
    assert stats.keys() == expected.keys()
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-6), key
    assert 0 < stats["clipped_fraction"] < 1 and stats["fast_weight_rel_change"] > 1e-3


@pytest.mark.parametrize("ttt, key", [
    (dict(chunk_size=0), "ttt.chunk_size"),
    (dict(layers=[0, 12]), "ttt.layers"),
    (dict(target="output"), "ttt.target"),
    (dict(conv_size=4), "ttt.conv_size"),
    (dict(every=6, offset=6), "ttt.offset"),
    (dict(lr=float("nan")), "ttt.lr"),
    (dict(max_update_norm=0.0), "ttt.max_update_norm"),
])
def test_bad_ttt_config_names_the_key(ttt, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TTTConfig.from_dict(ttt).layer_indices(12)


def test_unknown_ttt_key():
    with pytest.raises(ValueError, match="unknown ttt config keys.*chunk"):
        TTTConfig.from_dict({"chunk": 4})


def test_bad_config_fails_at_model_build():
    from ttt_train.runtime.local_ranks import LocalRanksError

    with pytest.raises(LocalRanksError, match=r"ttt\.layers: indices \[12\]"):
        run_local_ranks(ttt_spec_layers, 1, dict(layers=[12]), 1, timeout=300)


def test_input_embed_refused_on_later_pipeline_stage():
    from ttt_train.runtime.local_ranks import LocalRanksError

    with pytest.raises(LocalRanksError, match="ttt.target=input_embed.*pipeline stage after the first"):
        run_local_ranks(ttt_spec_layers, 2, dict(every=6, target="input_embed"), 2, timeout=300)


def test_te_backend_without_transformer_engine_says_what_to_install():
    from ttt_train.layers.specs import te_layer_spec

    with pytest.raises(RuntimeError, match=r"model\.backend=te needs transformer-engine.*\[gpu\]"):
        te_layer_spec(qk_layernorm=True)

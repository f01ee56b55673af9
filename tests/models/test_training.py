"""The tiny Qwen3-shaped model trains on CPU with megatron DDP + optimizer, recompute, YaRN, checkpoints."""

import pytest

from tests.support import scenarios
from ttt_train.runtime.local_ranks import run_local_ranks


def test_loss_decreases_single_rank():
    (losses,) = run_local_ranks(scenarios.train_losses, 1, {}, 12, timeout=300)
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.slow
def test_loss_decreases_tp2_sp_distributed_optimizer_bf16():
    per_rank = run_local_ranks(scenarios.train_losses, 2, dict(tp=2, sequence_parallel=True), 12, True, "bf16",
                               timeout=300)
    assert per_rank[0] == per_rank[1]
    assert per_rank[0][-1] < 0.8 * per_rank[0][0], per_rank[0]


@pytest.mark.slow
def test_data_parallel_distributed_optimizer_matches_single_rank():
    (single,) = run_local_ranks(scenarios.train_losses, 1, {}, 4, timeout=300)
    dp2 = run_local_ranks(scenarios.train_losses, 2, {}, 4, True, timeout=300)
    for a, b in zip(single, dp2[0]):
        assert abs(a - b) < 1e-5 * abs(a)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_gives_same_losses(recompute):
    (plain,) = run_local_ranks(scenarios.train_losses, 1, {}, 3, timeout=300)
    (recomputed,) = run_local_ranks(scenarios.train_losses, 1, {}, 3, False, "fp32", recompute, timeout=300)
    assert recomputed == pytest.approx(plain, rel=1e-6)


# model.yarn key (megatron TransformerConfig.yarn_*) -> transformers rope_parameters key ("yarn"). One
# difference: transformers uses mscale / mscale_all_dim only when both are non-zero (else 0.1 ln(factor)
# + 1), megatron always takes their ratio; where they differ (mscale_all_dim == 0 with mscale != 1, or
# mscale == 0) an HF config must state `attention_factor` = megatron's ratio explicitly.
YARN_TO_HF = {"factor": "factor", "original_max_position_embeddings": "original_max_position_embeddings",
              "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
              "mscale_all_dim": "mscale_all_dim", "correction_range_round_to_int": "truncate"}
YARN_SETTINGS = [
    dict(factor=4.0, original_max_position_embeddings=32),  # the defaults (HF's 0.1 ln(factor) + 1)
    dict(factor=3.2, original_max_position_embeddings=40, mscale=1.0, mscale_all_dim=1.0,
         correction_range_round_to_int=False),  # Megatron-Bridge's Qwen3 128k recipe: attention factor 1
    dict(factor=8.0, original_max_position_embeddings=16, beta_fast=16.0, beta_slow=2.0, mscale=0.707,
         mscale_all_dim=0.5),
    dict(factor=4.0, original_max_position_embeddings=32, mscale=0.707),  # needs attention_factor in HF
]


def _megatron_attention_factor(yarn: dict) -> float:
    """YarnConfig's documented attention factor: (0.1 m ln s + 1) / (0.1 m_all ln s + 1)."""
    import math

    def get(m: float) -> float:
        return 0.1 * m * math.log(yarn["factor"]) + 1

    return get(yarn.get("mscale", 1.0)) / get(yarn.get("mscale_all_dim", 0.0))


def _hf_yarn(head_dim: int, rotary_base: float, yarn: dict, **extra):
    """transformers' own YaRN rope for the same settings: (inverse frequencies, attention factor)."""
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": rotary_base, **{YARN_TO_HF[k]: v for k, v in yarn.items()}, **extra}
    config = Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=128,
                         rope_parameters=rope)
    return ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")


def test_yarn_rotary_equals_transformers_yarn():
    """megatron's YaRN, as configured from model.yarn, has transformers' inverse frequencies and
    attention factor (applied to cos and sin, i.e. to q and k, in both) for the same settings; the
    model runs past its original context."""
    import torch

    from ttt_train.models.config import YarnConfig

    assert set(YARN_TO_HF) == set(YarnConfig.__dataclass_fields__)  # every field has its HF counterpart
    results = run_local_ranks(scenarios.yarn_rotary, 1, 128, YARN_SETTINGS, timeout=300)[0]
    for yarn, result in zip(YARN_SETTINGS, results):
        assert result["rotary"] == "YarnRotaryEmbedding" and result["finite"], yarn
        inv_freq, attention_factor = _hf_yarn(result["head_dim"], result["rotary_base"], yarn)
        assert torch.allclose(result["inv_freq"], inv_freq, rtol=1e-6, atol=0), (yarn, result["inv_freq"], inv_freq)
        assert result["mscale"] == pytest.approx(_megatron_attention_factor(yarn), rel=1e-12), yarn
        if yarn is YARN_SETTINGS[-1]:  # the one difference: HF needs the factor stated
            assert result["mscale"] != pytest.approx(attention_factor, rel=1e-3)
            _, attention_factor = _hf_yarn(result["head_dim"], result["rotary_base"], yarn,
                                           attention_factor=_megatron_attention_factor(yarn))
        assert result["mscale"] == pytest.approx(attention_factor, rel=1e-12), yarn
    assert results[1]["mscale"] == 1.0 and results[0]["mscale"] > 1.0
    # the ramp's rounding matters (a test that cannot tell truncate on from off proves nothing)
    rounded = dict(YARN_SETTINGS[1], correction_range_round_to_int=True)
    assert not torch.allclose(_hf_yarn(16, results[1]["rotary_base"], rounded)[0], results[1]["inv_freq"])


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    (result,) = run_local_ranks(scenarios.crash_during_save, 1, str(tmp_path), timeout=300)
    assert "injected" in result["error"]
    assert result["latest"] == "iter_0000001"
    assert (result["meta"]["step"], result["meta"]["metadata"]) == (1, {"note": "good"})
    assert not (tmp_path / "iter_0000002").exists()


@pytest.mark.parametrize("layout", [dict(), dict(tp=2)], ids=["tp1", "tp2"])
def test_model_and_optimizer_resume_exactly(tmp_path, layout):
    world = layout.get("tp", 1)
    result = run_local_ranks(scenarios.resume_losses, world, str(tmp_path), layout, timeout=300)[0]
    assert (result["meta"]["step"], result["meta"]["metadata"]) == (2, {"consumed_samples": 4})
    assert result["resumed"] == result["straight"]


def test_latest_pointing_at_a_missing_checkpoint_is_reported(tmp_path):
    from ttt_train.checkpoint import latest_checkpoint

    (tmp_path / "latest").write_text("iter_0000007\n")
    with pytest.raises(FileNotFoundError, match="names iter_0000007, which is missing or incomplete"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nothing_here") is None


def test_step_gradients_are_those_of_the_mean_token_loss():
    (result,) = run_local_ranks(scenarios.step_gradient_vs_autograd, 1, timeout=300)
    assert result["reported"] == pytest.approx(result["loss"], rel=1e-6)
    assert result["worst_grad_rel_err"] < 1e-5


def test_ttt_target_parameters_get_their_own_lr_and_weight_decay():
    """optimizer.ttt_target_lr_mult / ttt_target_wd_mult put exactly the target parameters (conv and
    projection of every TTT layer) in a group of their own; the defaults leave megatron's groups."""
    default, scaled = run_local_ranks(_groups_pair, 1)[0]
    assert all(not any("ttt_target" in n for n in g["names"]) or g["max_lr"] == 1e-3 for g in default)
    assert len(scaled) == len(default) + 1
    (target,) = [g for g in scaled if any("ttt_target" in n for n in g["names"])]
    assert all("ttt_target" in n for n in target["names"]) and len(target["names"]) == 4  # 2 layers x conv, proj
    assert (target["max_lr"], target["min_lr"], target["wd_mult"]) == pytest.approx((1e-2, 1e-3, 0.0))
    others = [g for g in scaled if g is not target]
    assert all(g["max_lr"] == 1e-3 and g["min_lr"] == 1e-4 for g in others)


def _groups_pair():
    args = {"lr": 1e-3, "min_lr": 1e-4}
    return (scenarios.optimizer_groups(args),
            scenarios.optimizer_groups({**args, "ttt_target_lr_mult": 10.0, "ttt_target_wd_mult": 0.0}))

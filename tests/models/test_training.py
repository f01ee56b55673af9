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


def test_yarn_runs_past_original_context():
    (result,) = run_local_ranks(scenarios.yarn_forward, 1, 128, timeout=300)
    assert result["rotary"] == "YarnRotaryEmbedding" and result["finite"]


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
    from ttt_train.training.checkpoint import latest_checkpoint

    (tmp_path / "latest").write_text("iter_0000007\n")
    with pytest.raises(FileNotFoundError, match="names iter_0000007, which is missing or incomplete"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nothing_here") is None


def test_step_gradients_are_those_of_the_mean_token_loss():
    (result,) = run_local_ranks(scenarios.step_gradient_vs_autograd, 1, timeout=300)
    assert result["reported"] == pytest.approx(result["loss"], rel=1e-6)
    assert result["worst_grad_rel_err"] < 1e-5

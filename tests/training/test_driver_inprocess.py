"""Driver behaviour probed inside the ranks: the inner-lr warm-up reaches every TTT layer's op, a
carried optimizer takes the new stage's learning rate, non-finite steps are skipped then stop the run."""

import math

import pytest

from tests.training import driver_helpers as h
from tests.training import driver_scenarios as sc
from ttt_train.runtime.local_ranks import run_local_ranks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.make_data(tmp_path_factory.mktemp("driver_data"))


def one_rank(run_dir, data, steps, *extra):
    """The test-size curriculum on one rank (stage 1 without context parallelism), wandb off."""
    return h.tiny_overrides(run_dir, data, steps=steps, extra=["run.world_size=1", "stages.1.parallel.cp=1",
                                                                "logging.wandb.mode=disabled", *extra])


def test_inner_lr_warmup_reaches_every_ttt_layer(tmp_path, data):
    (result,) = run_local_ranks(sc.inner_lrs_seen, 1, one_rank(tmp_path / "run", data, (4, 2)), timeout=400)
    code, seen = result
    assert code == 0
    # 2 micro-batches per step in both stages, 2 TTT layers (1 and 3): 4 op calls per step
    assert len(seen) == 6 * 4
    start, target, warmup = 1e-3, 0.03, 4  # tiny_ttt: exponential from 1e-3 to ttt.lr over 4 run steps
    for run_step in range(6):
        calls = seen[4 * run_step: 4 * run_step + 4]
        expected = start * (target / start) ** (run_step / warmup) if run_step < warmup else target
        assert len({layer for layer, _ in calls}) == 2
        assert [lr for _, lr in calls] == pytest.approx([expected] * 4, rel=1e-12), run_step


def test_carried_optimizer_trains_at_the_new_stage_lr(tmp_path, data):
    run_dir = tmp_path / "run"
    overrides = one_rank(run_dir, data, (2, 2), "schedule=constant", "checkpoint.carry_optimizer=true",
                         "+stages.1.optimizer.lr=1.0e-3")
    assert run_local_ranks(sc.run_driver, 1, overrides, timeout=400) == [0]
    lrs = {(r["stage"], r["step"]): r["lr"] for r in h.records(run_dir)}
    assert lrs == {(0, 1): 3e-3, (0, 2): 3e-3, (1, 1): 1e-3, (1, 2): 1e-3}


def test_nonfinite_steps_are_skipped_then_stop_without_checkpoint(tmp_path, data, capfd):
    run_dir = tmp_path / "run"
    overrides = one_rank(run_dir, data, (8, 1), "training.max_skipped_steps=2", "checkpoint.every_steps=1",
                         "checkpoint.keep_last=8")
    # 2 micro-batches per step: steps 1-2 are finite, then every step is NaN
    assert run_local_ranks(sc.nan_after, 1, overrides, 4, timeout=400) == [1]
    err = capfd.readouterr().err
    assert "step 5: loss nan / gradient norm nan not finite for 3 steps in a row (training.max_skipped_steps=2)" in err
    assert "TTT layer" in err
    checkpoints = sorted(p.name for p in (run_dir / "stages" / "0_ctx1k" / "checkpoints").glob("iter_*"))
    assert checkpoints == ["iter_0000001", "iter_0000002"]
    skipped = {r["step"]: r["skipped_steps"] for r in h.records(run_dir)}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 2}
    assert all(math.isfinite(r["loss"]) for r in h.records(run_dir) if r["step"] <= 2)

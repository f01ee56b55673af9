"""The training driver end to end under torchrun (2 ranks, gloo): the two-stage tiny curriculum,
exact resume after kill -9 and SIGTERM in either stage, a TP=1 checkpoint resumed at TP=2."""

import json
import math
import shutil
import signal

import pytest

from tests.training import driver_helpers as h
from tests.training import driver_scenarios as sc
from ttt_train.runtime.local_ranks import run_local_ranks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.make_data(tmp_path_factory.mktemp("driver_data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """One uninterrupted run of the test-size curriculum (stage 0 CP1 x DP2, stage 1 CP2)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, out = h.run_to_end(h.tiny_overrides(run_dir, data))
    assert code == 0, out[-5000:]
    return run_dir, out


def test_two_stage_curriculum(reference, data):
    from ttt_train.checkpoint import read_checkpoint_info

    run_dir, out = reference
    stage0 = read_checkpoint_info(run_dir / "stages" / "0_ctx1k" / "checkpoints")
    stage1 = read_checkpoint_info(run_dir / "stages" / "1_ctx4k" / "checkpoints")
    assert stage0["step"] == 6 and stage0["metadata"]["stage_complete"]
    assert stage0["manifest"]["parallel"]["cp"] == 1 and stage0["manifest"]["model"]["yarn"] is None
    assert stage1["step"] == 6 and stage1["manifest"]["parallel"]["cp"] == 2
    assert stage1["manifest"]["model"]["yarn"]["factor"] == 4.0
    assert stage1["manifest"]["model"]["max_position_embeddings"] == 4 * stage0["manifest"]["model"][
        "max_position_embeddings"]
    assert stage1["metadata"]["wandb_id"] == stage0["metadata"]["wandb_id"]
    assert f"from {run_dir}/stages/0_ctx1k/checkpoints/iter_0000006" in out
    losses = h.losses(run_dir)
    assert sorted(losses) == [(0, s) for s in range(1, 7)] + [(1, s) for s in range(1, 7)]
    # stage 1 starts from stage 0's trained weights: far below a random model's loss (~ln 320 = 5.8)
    assert losses[(1, 1)] < losses[(0, 1)] - 0.3
    record = [r for r in h.records(run_dir) if "losses" in r][-1]
    ttt_keys = [f"ttt/layer{i}/{k}" for i in (1, 3) for k in ("update_norm_mean", "update_norm_max",
                                                              "clipped_fraction", "fast_weight_rel_change", "target_norm")]
    for key in ("loss", "lr", "grad_norm", "skipped_steps", "tokens_per_s", "tflops_per_device", "peak_memory_gib",
                "ttt_lr", "consumed_tokens", "run_step", *ttt_keys):
        assert key in record, key
    assert 0 < record["ttt/layer1/fast_weight_rel_change"] and 0 <= record["ttt/layer3/clipped_fraction"] <= 1
    assert "stages.1 (ctx4k)  step 6/6  loss" in out and "ETA" in out
    validation = [r for r in h.records(run_dir) if "val/loss" in r]
    assert [(r["stage"], r["step"]) for r in validation] == [(0, 3), (0, 6), (1, 3), (1, 6)]
    for r in validation:
        edges = [256 // 4 * (i + 1) for i in range(4)] if r["stage"] == 0 else [1024 // 4 * (i + 1) for i in range(4)]
        by_position = [r[f"val/loss_pos_{e}"] for e in edges]
        assert all(math.isfinite(x) for x in by_position)
        assert min(by_position) <= r["val/loss"] <= max(by_position)
    assert "validation loss" in out
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "finished", "exit_code": 0}
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    (history,) = offline[0].glob("*.wandb")
    logged = history.read_bytes()  # protobuf records: the metric names appear verbatim
    for key in ("loss", "tokens_per_s", "grad_norm", "stage", *ttt_keys):
        assert key.encode() in logged, key
    # rerunning a finished run says so and exits 0 (two local ranks: no need for a fresh torchrun)
    logged = h.records(run_dir)
    assert run_local_ranks(sc.run_driver, 2, h.tiny_overrides(run_dir, data), timeout=300) == [0, 0]
    assert h.records(run_dir) == logged


def test_kill9_and_sigterm_in_both_stages_resume_exactly(reference, data, tmp_path):
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    overrides = h.tiny_overrides(run_dir, data)
    # kill -9 (whole process group) in the middle of stage 0, after its step-2 checkpoint
    h.interrupt_when(overrides, h.logged_step(0, 3), signal.SIGKILL)
    # SIGTERM to torchrun in the middle of stage 0: every rank saves and exits 75
    code, out = h.interrupt_when(overrides, h.logged_step(0, 4), signal.SIGTERM)
    status = json.loads((run_dir / "status.json").read_text())
    assert status == {"state": "preempted", "exit_code": 75}, out[-4000:]
    assert "(stopping: signal SIGTERM)" in out, out[-4000:]
    # kill -9 in the middle of stage 1, then SIGTERM in stage 1 too, then finish
    h.interrupt_when(overrides, h.logged_step(1, 3), signal.SIGKILL)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
    code, out = h.run_to_end(overrides)
    assert code == 0, out[-4000:]
    assert "resumed at step 2" in out
    assert h.losses(run_dir) == h.losses(ref_dir)


def test_tp1_checkpoint_resumes_at_tp2(reference, data, tmp_path):
    """Stage 0's step-4 checkpoint (TP1) resumed with TP=2 (sequence parallel), then stage 1 at TP=2."""
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    src = ref_dir / "stages" / "0_ctx1k" / "checkpoints"
    dst = run_dir / "stages" / "0_ctx1k" / "checkpoints"
    dst.mkdir(parents=True)
    shutil.copytree(src / "iter_0000004", dst / "iter_0000004")
    (dst / "latest").write_text("iter_0000004\n")
    overrides = h.tiny_overrides(run_dir, data, extra=["parallel=tp2", "stages.1.parallel.cp=1"])
    code, out = h.run_to_end(overrides)
    assert code == 0, out[-4000:]
    assert "resumed at step 4" in out
    ref, tp2 = h.losses(ref_dir), h.losses(run_dir)
    assert sorted(tp2) == [(0, 5), (0, 6)] + [(1, s) for s in range(1, 7)]
    for key in [(0, 5), (0, 6)]:
        assert tp2[key] == pytest.approx(ref[key], rel=1e-4)
    assert tp2[(1, 1)] == pytest.approx(ref[(1, 1)], rel=1e-3)

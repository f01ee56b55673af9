"""Driver paths no other test runs: time-based saves and the wall-time limit (on a fake clock), TTT
statistics recorded on logged steps only, and pipeline parallelism in the two-stage curriculum under
torchrun, resumed at another pipeline layout."""

import json

import pytest

from tests.faults import fault_helpers as fh
from tests.faults import scenarios as sc
from tests.training import driver_helpers as h
from ttt_train.runtime.local_ranks import run_local_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # several launches each (2 shared cores)


def _reasons(run_dir) -> dict[int, str]:
    root = run_dir / "stages" / "0_ctx1k" / "checkpoints"
    return {int(p.name[5:]): json.loads((p / "ttt_meta.json").read_text())["metadata"]["reason"]
            for p in root.glob("iter_*")}


def test_time_based_saves_and_exit_after_minutes_on_a_fake_clock(tmp_path, data):
    """40 s per step: a save every 1.5 min (step 3), the 3-minute limit after step 5 (saved, exit 75); the
    rerun (a new clock) finishes with the losses of a run without time limits."""
    def overrides(run_dir, *extra):
        return h.tiny_overrides(run_dir, data, steps=(6, 2), extra=[
            "run.world_size=1", "stages.1.parallel.cp=1", "logging.wandb.mode=disabled", "validation.every_steps=0",
            "checkpoint.every_steps=0", "checkpoint.keep_last=8", "logging.interval=2", *extra])

    timed = overrides(tmp_path / "run", "checkpoint.every_minutes=1.5", "run.exit_after_minutes=3")
    ((code, recorded),) = run_local_ranks(sc.driver_on_a_fake_clock, 1, timed, 40.0, timeout=900)
    assert code == 75
    assert _reasons(tmp_path / "run") == {3: "periodic", 5: "stopping: run.exit_after_minutes reached (or another "
                                                            "rank's signal)"}
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "preempted"
    # 2 micro-batches x 2 TTT layers per step; statistics on the logged steps (2 and 4) only
    assert recorded == [step in (2, 4) for step in range(1, 6) for _ in range(4)]
    ((code, _),) = run_local_ranks(sc.driver_on_a_fake_clock, 1, timed, 40.0, timeout=900)
    assert code == 0
    ((code, _),) = run_local_ranks(sc.driver_on_a_fake_clock, 1, overrides(tmp_path / "reference"), 40.0, timeout=900)
    assert code == 0
    assert h.losses(tmp_path / "run") == h.losses(tmp_path / "reference")


def test_pipeline_parallel_curriculum_resumed_at_another_pipeline_layout(reference, data, tmp_path):
    """Stage 0 at PP=1 x DP=2 stopped after step 3 (SIGTERM) and resumed at PP=2, stage 1 at PP=2 (the
    reference: PP=1 throughout, stage 1 at CP=2): the same losses and weights up to float rounding. (Both
    start at PP=1: megatron seeds each pipeline rank's random initialisation differently.)"""
    run_dir = tmp_path / "run"
    code, out = fh.run(fh.overrides(run_dir, data), faults="term@step,rank=0,stage=0,step=3")
    assert code == 75, out[-6000:]
    code, out = fh.run(fh.overrides(run_dir, data, "parallel.pp=2", "stages.1.parallel.cp=1"))
    assert code == 0, out[-6000:]
    assert "resumed at step 3" in out
    ours, theirs = h.losses(run_dir), h.losses(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
    fh.assert_same_tensors(fh.checkpoint_tensors(fh.final_checkpoint(run_dir)),
                           fh.checkpoint_tensors(fh.final_checkpoint(reference)), rel=1e-4)
    for stage, step in (("0_ctx1k", 4), ("1_ctx4k", 3)):
        meta = json.loads((run_dir / "stages" / stage / "checkpoints" / f"iter_{step:07d}" / "ttt_meta.json").read_text())
        assert meta["manifest"]["parallel"]["pp"] == 2, stage

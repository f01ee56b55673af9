"""Driver paths no other test runs: time-based saves and the wall-time limit (on a fake clock), TTT
statistics recorded on logged steps only. (Pipeline parallelism in the driver, resumed at another
pipeline layout: test_signals.py.)"""

import json
from pathlib import Path

import pytest

from tests.faults import scenarios as sc
from tests.training import driver_helpers as h
from ttt_train.runtime.local_ranks import run_local_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # several launches each (2 shared cores)


def _reasons(run_dir) -> dict[int, str]:
    root = run_dir / "stages" / "0_ctx1k" / "checkpoints"
    return {int(p.name[5:]): json.loads((p / "ttt_meta.json").read_text())["metadata"]["reason"]
            for p in root.glob("iter_*")}


def test_time_based_saves_and_exit_after_minutes_on_a_fake_clock(tmp_path, data):
    """Stage 0 alone (one rank), 40 s per step: a save every 1.5 min (step 3), the 3-minute limit after step 5
    (saved, exit 75); the rerun (a new clock) finishes the stage. (That a resume continues exactly:
    test_rank_faults.py, test_run_faults.py.)"""
    run_dir = tmp_path / "run"
    timed = h.tiny_overrides(run_dir, data, steps=(6, 2), extra=[
        "run.world_size=1", "run.stages=[0]", "logging.wandb.mode=disabled", "validation.every_steps=0",
        f"data.cache_dir={Path(data['short']).parent / 'cache'}", "checkpoint.every_steps=0", "checkpoint.keep_last=8",
        "logging.interval=2", "checkpoint.every_minutes=1.5", "run.exit_after_minutes=3"])
    ((code, recorded),) = run_local_ranks(sc.driver_on_a_fake_clock, 1, timed, 40.0, timeout=900)
    assert code == 75
    stopped = "stopping: run.exit_after_minutes reached (or another rank's signal)"
    assert _reasons(run_dir) == {3: "periodic", 5: stopped}
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    # 2 micro-batches x 2 TTT layers per step; statistics on the logged steps (2 and 4) only
    assert recorded == [step in (2, 4) for step in range(1, 6) for _ in range(4)]
    ((code, recorded),) = run_local_ranks(sc.driver_on_a_fake_clock, 1, timed, 40.0, timeout=900)
    assert code == 0 and len(recorded) == 4  # step 6 only, before the new clock's limits
    assert _reasons(run_dir) == {3: "periodic", 5: stopped, 6: "stage end"}
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stages_finished"

"""SIGTERM at awkward moments, through launch/torchrun.py with restarts allowed (a stop must not be
restarted): twice in a row, the second during the save the first one triggers, and during the hand-off
between stages. Each time the run saves once (or not at all when nothing changed) and exits 75. The
same launches carry pipeline parallelism in the driver: after the first stop the run goes on at PP=2
(stage 0 resumed at another pipeline layout, stage 1 at PP=2), and the plain rerun ends with the losses
and weights of the reference run (PP=1 throughout, stage 1 at CP=2): exactly up to the first stop, to
float rounding after it. (Both start at PP=1: megatron seeds each pipeline rank's random initialisation
differently.)"""

import json
import time

import pytest

from tests.faults import fault_helpers as fh
from tests.training import driver_helpers as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # several launches each (2 shared cores)


def _stopped(run_dir, out: str, code: int) -> list[str]:
    """The saves of a launch that must have exited 75; returns their lines."""
    assert code == 75, out[-6000:]
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "preempted", "exit_code": 75}
    assert "will restart worker group" not in out, out[-6000:]
    return [line for line in out.splitlines() if line.startswith("saved ")]


def test_sigterm_twice_during_its_save_and_at_the_hand_off_resumed_at_pp2(reference, data, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "faults.jsonl"
    pp2 = fh.overrides(run_dir, data, "parallel.pp=2", "stages.1.parallel.cp=1")

    # 1. a SIGTERM (to the launcher, which forwards it) as step 2 starts, and a second one during the save the
    # first triggers: one save, exit 75
    code, out = fh.run(fh.overrides(run_dir, data), max_restarts=2, log=log,
                       faults="term@step,rank=0,stage=0,step=2;term@save,rank=0,stage=0,step=2")
    saves = _stopped(run_dir, out, code)
    assert [s.split("/")[-1] for s in saves] == ["iter_0000002 (stopping: signal SIGTERM)"], saves
    assert [f["fault"].split(",")[0] for f in fh.fault_log(log)] == ["term@step", "term@save"]
    fh.report(fault="SIGTERM twice in a row, the second during the save the first triggered",
              injected="TTT_FAULTS term@step + term@save (SIGTERM to the launcher)", outcome="one save, exit 75",
              steps_lost=0, data_lost=0, seconds_to_stop=round(time.time() - fh.fault_log(log)[0]["time"], 1))

    # 2. (at PP=2 from here on) a SIGTERM after stage 0's last step, while stage 1 is being set up: stage 0's
    # final checkpoint is saved as always, stage 1 stops before its first step with nothing new to save
    code, out = fh.run(pp2, faults="term@handoff,rank=0,stage=1", max_restarts=2, log=log)
    saves = _stopped(run_dir, out, code)
    assert "resumed at step 2" in out
    assert [s.split("/")[-1] for s in saves] == ["iter_0000004 (stage end)"], saves
    assert "stages.1 (ctx4k): stopping before step 1 (signal SIGTERM); nothing new to save" in out
    assert not (run_dir / "stages" / "1_ctx4k" / "checkpoints").exists()
    fh.report(fault="SIGTERM at the stage hand-off", injected="TTT_FAULTS term@handoff",
              outcome="stage 1 not started, nothing to save, exit 75", steps_lost=0, data_lost=0,
              seconds_to_stop=round(time.time() - fh.fault_log(log)[-1]["time"], 1))

    # 3. the plain rerun finishes: every step's loss and the final weights as without interruptions
    code, out = fh.run(pp2, max_restarts=2)
    assert code == 0, out[-6000:]
    ours, theirs = h.losses(run_dir), h.losses(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == (theirs[key] if key <= (0, 2) else pytest.approx(theirs[key], rel=1e-5)), key
    fh.assert_same_tensors(fh.checkpoint_tensors(fh.final_checkpoint(run_dir)),
                           fh.checkpoint_tensors(fh.final_checkpoint(reference)), rel=1e-4)
    steps = fh.steps_logged(run_dir)
    assert len(steps) == len(set(steps)), steps  # no step was run twice: nothing lost
    for stage, last in enumerate(fh.STEPS):
        meta = json.loads((fh.checkpoints(run_dir, stage) / f"iter_{last:07d}" / "ttt_meta.json").read_text())
        assert meta["manifest"]["parallel"]["pp"] == 2, stage

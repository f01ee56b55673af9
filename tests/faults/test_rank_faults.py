"""One worker killed (kill -9 mid-backward, mid-save) or hung (SIGSTOP as it starts a step) under torchrun
with --max-restarts: the other workers stop (in seconds for a death, within run.collective_timeout_minutes
for a hang, naming the stuck rank), nothing is saved from the broken state, torchrun restarts the group,
and the run resumes from the last good checkpoint to the same losses and weights as a run without faults."""

import json

import pytest

from tests.faults import fault_helpers as fh
from tests.training import driver_helpers as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # several launches each (2 shared cores)

TIMEOUT_MIN = 0.25  # a hang is declared after 15 s in one micro-batch (a tiny one takes < 1 s on 2 shared cores)
FAULTS = ";".join([
    "kill@backward,rank=1,stage=0,step=3,attempt=0",  # checkpoint 2 is the last good one
    "kill@save,rank=0,stage=0,step=4,attempt=1",  # stage 0's final save: rank 0's shards written, not published
    "stop@step,rank=1,stage=1,step=2,attempt=2",  # the run resumed in stage 1 from stage 0's final checkpoint
])


def test_killed_and_hung_workers_restart_and_resume_exactly(reference, data, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "faults.jsonl"
    launch = fh.Launch(fh.overrides(run_dir, data, f"run.collective_timeout_minutes={TIMEOUT_MIN}"),
                       faults=FAULTS, max_restarts=3, log=log)
    code, out = launch.wait()
    assert code == 0, out[-6000:]
    fired = fh.fault_log(log)
    assert [(f["attempt"], f["rank"], f["stage"], f["step"]) for f in fired] == [(0, 1, 0, 3), (1, 0, 0, 4),
                                                                                (2, 1, 1, 2)], fired
    stop_s = [launch.ended(f["attempt"], but=f["rank"]) - f["time"] for f in fired]
    # a death ends the survivors within seconds; a hang once it has lasted the timeout
    assert stop_s[0] < 20 and stop_s[1] < 20, stop_s
    assert TIMEOUT_MIN * 60 - 10 < stop_s[2] < TIMEOUT_MIN * 60 + 20, stop_s
    assert "rank 0 waited" in out and "rank(s) 1 stopped responding: rank 1 (pid" in out, out[-6000:]
    assert "last seen in 'stages.1 (ctx4k) " in out and "stopping without saving" in out
    # every attempt resumed from the last checkpoint published before its fault
    assert "resumed at step 2 from" in out and out.count("stages.1 (ctx4k): 3 steps at 1024 tokens, from ") == 2
    # what was lost: the steps since the last checkpoint, nothing else
    steps = fh.steps_logged(run_dir)
    assert steps == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 3), (0, 4), (1, 1), (1, 1), (1, 2), (1, 3)], steps
    stage0 = run_dir / "stages" / "0_ctx1k" / "checkpoints"
    assert sorted(p.name for p in stage0.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
    assert h.losses(run_dir) == h.losses(reference)
    fh.assert_same_tensors(fh.checkpoint_tensors(fh.final_checkpoint(run_dir)),
                           fh.checkpoint_tensors(fh.final_checkpoint(reference)))
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "finished", "exit_code": 0}
    for fault, stop, lost in zip(fired, stop_s, (1, 2, 1)):
        fh.report(fault=fault["fault"], injected="TTT_FAULTS", outcome="survivors stopped, torchrun restarted the "
                  "group, resumed from the last checkpoint", steps_lost=lost, data_lost=0, seconds_to_stop=round(stop, 1))
    times = [r["time"] for r in h.records(run_dir)]
    print("fault | survivors stopped (s) | all workers gone (s) | next step logged (s)", *(
        f"{f['fault']} | {s:.1f} | {launch.ended(f['attempt']) - f['time']:.1f} | "
        f"{min(t for t in times if t > f['time']) - f['time']:.1f}" for f, s in zip(fired, stop_s)), sep="\n")

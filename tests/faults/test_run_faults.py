"""Faults of the run folder and its checkpoints, under launch/torchrun.py (2 workers, the test-size
two-stage curriculum of tests/faults): a second start in a live run folder, torchrun killed alone, a
truncated shard of the newest checkpoint, a full disk during saves (ENOSPC in the checkpoint writers).
For each: what the run does, how long it takes to stop, what is lost, and that a plain rerun of the
same command then ends exactly as the uninterrupted reference run (every loss, every tensor of the
final checkpoint). Several faults share a launch to keep the tests short."""

import json
import os
import signal
import time

import psutil
import pytest

from tests.faults import fault_helpers as fh
from tests.training import driver_helpers as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _latest(root) -> str | None:
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def _assert_same_as(run_dir, reference) -> None:
    assert h.losses(run_dir) == h.losses(reference)
    fh.assert_same_tensors(fh.checkpoint_tensors(fh.final_checkpoint(run_dir)),
                           fh.checkpoint_tensors(fh.final_checkpoint(reference)))


def test_second_start_killed_torchrun_and_a_truncated_latest_checkpoint(reference, data, tmp_path):
    """1. While the run is held (rank 0 SIGSTOPped once stage 0 saved step 2), a second start in its folder
    is refused by name and the run is unaffected. 2. torchrun alone is killed (kill -9): its workers
    notice, save at their next step and exit 75. 3. One shard of that newest checkpoint is cut to half its
    size (issue 24's case): the rerun names the file, falls back to iter_0000002 and ends as the reference."""
    run_dir = tmp_path / "run"
    args = fh.overrides(run_dir, data)
    root = fh.checkpoints(run_dir, 0)
    launch = fh.Launch(args)
    fh.until(launch, lambda: _latest(root) == "iter_0000002" and len(launch.workers) == 2)
    (rank0,) = [pid for pid, w in launch.workers.items() if w["rank"] == 0]
    os.kill(rank0, signal.SIGSTOP)
    try:
        owner = json.loads((run_dir / "run.lock").read_text())
        started = time.monotonic()
        code, out = fh.run(args)
        refused_s = time.monotonic() - started
        assert code == 2 and launch.proc.poll() is None, out[-3000:]
        assert f"error: run folder {run_dir} is in use by pid {owner['pid']} on {owner['host']}" in out, out[-3000:]
        assert json.loads((run_dir / "run.lock").read_text()) == owner
        workers = psutil.Process(launch.proc.pid).children(recursive=True)
        killed = time.monotonic()
        os.kill(launch.proc.pid, signal.SIGKILL)
        time.sleep(2.5)  # rank 1's parent watch (1 s polls) has seen it: the stop comes at the end of this step
    finally:
        os.kill(rank0, signal.SIGCONT)
    _, alive = psutil.wait_procs(workers, timeout=120)
    stopped_s = time.monotonic() - killed
    _, out = launch.wait()
    assert alive == [], f"workers still running: {alive}\n{out[-3000:]}"
    assert "error: the launcher (pid" in out and "(stopping: " in out, out[-4000:]  # (the first rank's reason)
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "preempted", "exit_code": 75}
    assert not (run_dir / "run.lock").exists()
    stopped_at = int(_latest(root)[5:])
    assert fh.steps_logged(run_dir)[-1] == (0, stopped_at) and stopped_at in (3, 4), fh.steps_logged(run_dir)

    shard = max((root / _latest(root)).glob("*.distcp"), key=lambda p: p.stat().st_size)
    os.truncate(shard, shard.stat().st_size // 2)
    code, out = fh.run(args)
    assert code == 0, out[-4000:]
    assert f"checkpoint {shard.parent} is damaged: {shard.name} has" in out and "(truncated)" in out, out[-4000:]
    lost = stopped_at - 2
    assert f"resuming from iter_0000002 instead ({lost} step{'s' * (lost != 1)} to redo)" in out
    assert "resumed at step 2" in out and "EOFError" not in out
    (aside,) = root.glob(f"{shard.parent.name}.damaged-*")  # kept as it was found
    assert (aside / shard.name).stat().st_size == json.loads((aside / "ttt_meta.json").read_text())["files"][
        shard.name][0] // 2
    _assert_same_as(run_dir, reference)
    fh.report(fault="second start in a live run folder", injected="the same command again",
              outcome="refused by name (exit 2), first run unaffected", steps_lost=0, data_lost=0,
              seconds_to_stop=round(refused_s, 1))
    fh.report(fault="torchrun alone killed -9", injected="kill -9 of the agent", outcome="workers saved, exited 75",
              steps_lost=0, data_lost=0, seconds_to_stop=round(stopped_s, 1))
    fh.report(fault="truncated shard in the latest checkpoint", injected="os.truncate to half",
              outcome="damaged one set aside, resumed from iter_0000002", steps_lost=lost, data_lost=0)


def test_disk_full_during_saves_retried_then_stopping(reference, data, tmp_path):
    """ENOSPC in the checkpoint writers with checkpoint.on_save_error=retry: rank 0's at stage 0's periodic
    save of step 2 (warned, training goes on, stage 0's end saves), then every rank's at stage 1's final
    save (a failed final save always stops: exit 1, one line naming the folder and the space needed;
    `latest` still names iter_0000002, which is intact). The rerun resumes there and ends as the reference."""
    from ttt_train.checkpoint import latest_checkpoint, newest_intact

    run_dir = tmp_path / "run"
    args = fh.overrides(run_dir, data, "checkpoint.on_save_error=retry")
    code, out = fh.run(args, faults="enospc@write,rank=0,stage=0,step=2;enospc@write,stage=1,step=3")
    stopped_s = time.time() - next(r["time"] for r in h.records(run_dir) if (r.get("stage"), r.get("step")) == (1, 3))
    assert code == 1, out[-4000:]
    warnings = [line for line in out.splitlines() if "training on (checkpoint.on_save_error=retry)" in line]
    assert len(warnings) == 1 and "iter_0000002 not saved (disk full: rank 0: [Errno 28] No space left on device" in \
        warnings[0], out[-4000:]
    assert sorted(p.name for p in fh.checkpoints(run_dir, 0).iterdir()) == ["iter_0000004", "latest"]
    root = fh.checkpoints(run_dir, 1)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-4000:]
    assert f"checkpoint {root}/iter_0000003 not saved (disk full: " in errors[0]
    assert "free there, the checkpoint needs about" in errors[0] and f"{root}/latest still names iter_0000002" \
        in errors[0] and errors[0].endswith("free space there and rerun the same command"), errors[0]
    assert f'File "{h.ROOT}/ttt_train' not in out  # no traceback of ours
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "latest"]
    assert latest_checkpoint(root).name == "iter_0000002" and newest_intact(root) == (root / "iter_0000002", [])
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "not saved (disk full" in status["error"]
    code, out = fh.run(args)
    assert code == 0, out[-4000:]
    assert "resumed at step 2" in out
    _assert_same_as(run_dir, reference)
    fh.report(fault="ENOSPC in one rank's writers at a periodic save, on_save_error=retry",
              injected="enospc@write (TTT_FAULTS)", outcome="warned, trained on, saved at the next interval",
              steps_lost=0, data_lost=0)
    fh.report(fault="disk full at a stage's final save", injected="enospc@write on both ranks",
              outcome="exit 1, one line; latest kept", steps_lost=1, data_lost=0, seconds_to_stop=round(stopped_s, 1))

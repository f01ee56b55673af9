"""Faults a long run meets, under torchrun (2 ranks, gloo): a damaged newest checkpoint, a full disk
during a save, torchrun killed alone, a second start in a live run folder. For each: what the run
does, how long it takes to stop, and that a plain rerun of the same command then ends exactly as
an uninterrupted run (every loss, every tensor of the final checkpoint)."""

import json
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from tests.faults import run_faults as f
from tests.training import driver_helpers as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.make_data(tmp_path_factory.mktemp("fault_data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, out = h.run_to_end(f.overrides(run_dir, data))
    assert code == 0, out[-4000:]
    return run_dir


def test_truncated_shard_of_the_latest_checkpoint_falls_back_to_the_previous(reference, data, tmp_path):
    """Issue 24's case: kill -9 after step 15's checkpoint, one shard of iter_0000015 cut in half."""
    run_dir = tmp_path / "run"
    args = f.overrides(run_dir, data)
    proc = h.torchrun(args)
    f.wait_for(proc, f.latest_is(run_dir, "iter_0000015"))
    h.kill_tree(proc.pid)
    proc.communicate()
    shard = max((f.checkpoints(run_dir) / "iter_0000015").glob("*.distcp"), key=lambda p: p.stat().st_size)
    os.truncate(shard, shard.stat().st_size // 2)
    code, out = h.run_to_end(args)
    assert code == 0, out[-4000:]
    assert f"checkpoint {shard.parent} is damaged: {shard.name} has" in out and "(truncated)" in out, out[-4000:]
    assert "resuming from iter_0000010 instead (5 steps to redo)" in out
    assert "resumed at step 10" in out and "EOFError" not in out
    (aside,) = f.checkpoints(run_dir).glob("iter_0000015.damaged-*")  # kept as it was found
    assert (aside / shard.name).stat().st_size == json.loads((aside / "ttt_meta.json").read_text())["files"][
        shard.name][0] // 2
    f.assert_same_run(run_dir, reference)
    f.report(fault="truncated shard in the latest checkpoint", outcome="fell back to iter_0000010", steps_lost=5,
             data_lost=0)


def test_killing_only_torchrun_stops_its_workers(reference, data, tmp_path):
    """kill -9 of the torchrun agent alone: its workers notice, save at the next step, exit; a rerun
    continues exactly."""
    run_dir = tmp_path / "run"
    args = f.overrides(run_dir, data)
    proc = h.torchrun(args)
    f.wait_for(proc, lambda: any(r.get("step") == 7 for r in h.records(run_dir)))
    workers = psutil.Process(proc.pid).children(recursive=True)
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(workers, timeout=120)
    stopped_s = time.monotonic() - killed
    out = proc.communicate()[0]
    assert alive == [], f"workers still running: {alive}\n{out[-3000:]}"
    saved = [r["step"] for r in h.records(run_dir) if "step" in r]
    assert max(saved) < f.STEPS, "the workers trained on after torchrun died"
    assert "error: the launcher (pid" in out and "(stopping: " in out, out[-4000:]  # (the first rank's reason)
    stopped_at = json.loads((run_dir / "status.json").read_text())
    assert stopped_at == {"state": "preempted", "exit_code": 75}
    assert not (run_dir / "run.lock").exists()
    code, out = h.run_to_end(args)
    assert code == 0, out[-4000:]
    assert f"resumed at step {max(saved)}" in out
    f.assert_same_run(run_dir, reference)
    f.report(fault="torchrun alone killed -9", outcome="workers saved and exited 75", steps_lost=0, data_lost=0,
             seconds_to_stop=round(stopped_s, 1))


def test_a_second_start_in_a_live_run_folder_is_refused_by_name(data, tmp_path):
    run_dir = tmp_path / "run"
    args = f.overrides(run_dir, data, f"stages.0.tokens={1000 * 4 * f.SEQ}")  # 1000 steps: alive throughout
    proc = h.torchrun(args)
    try:
        f.wait_for(proc, lambda: bool(h.records(run_dir)))
        owner = json.loads((run_dir / "run.lock").read_text())
        started = time.monotonic()
        code, out = h.run_to_end(args)
        refused_s = time.monotonic() - started
        assert code != 0 and proc.poll() is None, out[-3000:]  # refused; the first run goes on
        assert f"error: run folder {run_dir} is in use by pid {owner['pid']} on {owner['host']}" in out, out[-3000:]
        assert json.loads((run_dir / "run.lock").read_text()) == owner
    finally:
        proc.send_signal(signal.SIGTERM)
        code, out = h.finish(proc)
    # the workers saved and exited 75 (plain torchrun itself exits 1 on SIGTERM)
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "preempted", "exit_code": 75}, out[-3000:]
    assert not (run_dir / "run.lock").exists()
    f.report(fault="second start in a live run folder", outcome="refused by name, first run unaffected",
             steps_lost=0, data_lost=0, seconds_to_stop=round(refused_s, 1))


def _small_disk(folder, size: str) -> bool:
    """Mount a tmpfs of `size` at `folder` (root only); False where that is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0


def test_disk_full_during_a_save_stops_and_keeps_the_previous_checkpoint(reference, data, tmp_path):
    """A 6 MiB disk for the checkpoints (2.4 MiB each; the newest 3 kept): the save at step 15 finds
    no room. Without a tmpfs (not root) the writers of both ranks fail with ENOSPC instead."""
    from ttt_train.checkpoint import latest_checkpoint, newest_intact

    run_dir = tmp_path / "run"
    root = f.checkpoints(run_dir)
    mounted = _small_disk(root, "6m")
    try:
        env = None if mounted else f.injected("iter_0000015.tmp:0,1")
        code, out = h.run_to_end(f.overrides(run_dir, data), extra_env=env)
        stopped_s = time.time() - next(r["time"] for r in h.records(run_dir) if r.get("step") == 15)
        assert code == 1, out[-4000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out[-4000:]
        assert f"checkpoint {root}/iter_0000015 not saved (disk full: " in errors[0]
        assert "free there, the checkpoint needs about 2.4" in errors[0] and f"{root}/latest still names iter_0000010" \
            in errors[0] and "checkpoint.on_save_error=retry" in errors[0]
        assert f'File "{h.ROOT}/ttt_train' not in out  # no traceback of ours (torchrun prints its own)
        assert sorted(p.name for p in root.iterdir()) == ["iter_0000005", "iter_0000010", "latest"]
        assert latest_checkpoint(root).name == "iter_0000010" and newest_intact(root) == (root / "iter_0000010", [])
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "failed" and "not saved (disk full" in status["error"]
        if mounted:  # room made: the same command continues
            subprocess.run(["mount", "-o", "remount,size=40m", str(root)], check=True)
        code, out = h.run_to_end(f.overrides(run_dir, data))
        assert code == 0, out[-4000:]
        assert "resumed at step 10" in out
        f.assert_same_run(run_dir, reference)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], check=False)
    f.report(fault="disk full at a save", injected="6 MiB tmpfs" if mounted else "ENOSPC in both ranks' writers",
             outcome="exit 1, one line; latest kept", steps_lost=5, data_lost=0, seconds_to_stop=round(stopped_s, 1))


def test_a_failed_periodic_save_with_retry_trains_on(reference, data, tmp_path):
    """ENOSPC in rank 0's checkpoint writer at step 10's save, checkpoint.on_save_error=retry: the
    run warns, trains on, saves at step 15; nothing is lost."""
    run_dir = tmp_path / "run"
    code, out = h.run_to_end(f.overrides(run_dir, data, "checkpoint.on_save_error=retry"),
                             extra_env=f.injected("iter_0000010.tmp:0"))
    assert code == 0, out[-4000:]
    warnings = [line for line in out.splitlines() if "training on (checkpoint.on_save_error=retry)" in line]
    assert len(warnings) == 1 and "iter_0000010 not saved (disk full: rank 0: [Errno 28] No space left on device" in \
        warnings[0], out[-4000:]
    assert "saved" in out and f"{f.checkpoints(run_dir)}/iter_0000015 (periodic)" in out
    assert not any(".tmp-" in p.name for p in f.checkpoints(run_dir).iterdir())
    f.assert_same_run(run_dir, reference)
    f.report(fault="ENOSPC in one rank's writer, on_save_error=retry", outcome="warned, trained on", steps_lost=0,
             data_lost=0)

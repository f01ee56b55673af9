"""The run folder's lock: refused by name while its owner lives, taken over when provably stale
(owner dead on this host, or heartbeat older than the timeout), and an owner whose lock was taken
over stops at once. Plain processes, no torch."""

import json
import os
import subprocess
import sys
import time

import pytest

from ttt_train.runtime.run_lock import LOCK, RunFolderLocked, RunLock

pytestmark = pytest.mark.timeout(120)

HOLD = """
import sys, time
from ttt_train.runtime.run_lock import RunLock
lock = RunLock(sys.argv[1], float(sys.argv[2]), heartbeat_s=0.2)
print("locked", flush=True)
time.sleep(60)
"""


def _holder(run_dir, timeout_s=600.0) -> subprocess.Popen:
    """A process that takes the lock and holds it (heartbeat every 0.2 s)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(timeout_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def test_a_live_owner_keeps_its_folder_and_a_dead_one_loses_it(tmp_path):
    owner = _holder(tmp_path)
    try:
        recorded = json.loads((tmp_path / LOCK).read_text())
        assert recorded["pid"] == owner.pid and recorded["host"] and recorded["started"] and "-c" in recorded["command"]
        with pytest.raises(RunFolderLocked, match=rf"run folder {tmp_path} is in use by pid {owner.pid} on "
                                                  rf"{recorded['host']} \(started .*, heartbeat 0 s ago\)"):
            RunLock(tmp_path, 600.0)
        before = (tmp_path / LOCK).stat().st_mtime
        time.sleep(0.6)
        assert (tmp_path / LOCK).stat().st_mtime > before  # the heartbeat
    finally:
        owner.kill()
        owner.wait()
    lock = RunLock(tmp_path, 600.0)  # kill -9 left the file; its owner is provably dead
    assert lock.taken_over and f"pid {owner.pid} on this host, is dead" in lock.taken_over
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_another_hosts_lock_is_taken_over_only_when_its_heartbeat_is_old(tmp_path):
    lock = RunLock(tmp_path, 600.0)
    lock.release()
    elsewhere = {"host": "node-17", "boot_id": "other", "pid_namespace": 1, "pid": 4242, "process_start": 1.0,
                 "started": "yesterday", "token": "theirs", "command": "torchrun ..."}
    (tmp_path / LOCK).write_text(json.dumps(elsewhere))
    with pytest.raises(RunFolderLocked, match="in use by pid 4242 on node-17 .*taken over 10 min after its last "
                                              "heartbeat"):
        RunLock(tmp_path, 600.0)
    old = time.time() - 601
    os.utime(tmp_path / LOCK, (old, old))
    lock = RunLock(tmp_path, 600.0)
    assert "its heartbeat is 10.0 min old (run.lock_timeout_minutes=10)" in lock.taken_over
    lock.release()


def test_an_owner_whose_lock_was_taken_over_stops_at_once(tmp_path):
    owner = _holder(tmp_path)
    try:
        stolen = {**json.loads((tmp_path / LOCK).read_text()), "pid": 1, "token": "another run"}
        (tmp_path / LOCK).write_text(json.dumps(stolen))
        assert owner.wait(timeout=10) == 1
        assert "another run took this run folder over" in owner.stderr.read()
        assert json.loads((tmp_path / LOCK).read_text())["token"] == "another run"  # not removed by the loser
    finally:
        owner.kill()
        owner.wait()

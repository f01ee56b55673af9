"""One live run per run folder: `RUN_DIR/run.lock` names its owner and carries its heartbeat.

The lock file holds the owner's host, pid, process start time, start time and command; its
modification time is the heartbeat, refreshed every few seconds by a daemon thread of the owner.
A second start is refused, naming the owner, while the owner lives. The lock is taken over when it
is provably stale: its heartbeat is older than the timeout (any host), or its owner ran on this
host and that process is gone. A lock is created whole or not at all (a hard link of a complete
file), and a takeover re-checks that the file it moved is the stale one it judged.

If the owner finds its lock taken over (it was frozen longer than the timeout and another run
started), it stops at once: exit code 1, nothing more written (`os._exit`: a live second run owns
the folder now).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

LOCK = "run.lock"


class RunFolderLocked(RuntimeError):
    """Another live run owns the run folder; the message names it."""


def _process_start(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch), None if there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0  # alive, start unknown


def _read(path: Path) -> tuple[dict | None, float] | None:
    """(owner as recorded or None if unreadable, heartbeat age in s), or None when there is no lock."""
    try:
        age = time.time() - path.stat().st_mtime
        return json.loads(path.read_text()), age
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None, age


def _machine() -> dict:
    """What makes a pid meaningful: the host name, the kernel's boot id and the pid namespace (two
    containers may share a host name, and one kernel)."""
    identity = {"host": socket.gethostname(), "boot_id": None, "pid_namespace": None}
    with contextlib.suppress(OSError):
        identity["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        identity["pid_namespace"] = os.stat("/proc/self/ns/pid").st_ino
    return identity


def _dead_reason(owner: dict | None, age: float, timeout_s: float) -> str | None:
    """Why the lock is stale, or None while its owner may live."""
    if age > timeout_s:
        return f"its heartbeat is {age / 60:.1f} min old (run.lock_timeout_minutes={timeout_s / 60:g})"
    here = _machine()
    if owner and here["boot_id"] and all(owner.get(key) == value for key, value in here.items()):
        started, recorded = _process_start(int(owner.get("pid", -1))), owner.get("process_start")
        if started is None or (recorded and started > 0 and abs(started - recorded) > 1.0):
            return f"its owner, pid {owner.get('pid')} on this host, is dead"
    return None


def _describe(owner: dict | None, age: float) -> str:
    if owner is None:
        return f"an unreadable lock (heartbeat {age:.0f} s ago)"
    return (f"pid {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')}, heartbeat {age:.0f} s "
            f"ago): {owner.get('command')}")


class RunLock:
    """The lock of a run folder, held by this process; `release()` gives it back."""

    def __init__(self, run_dir: str | os.PathLike, timeout_s: float, heartbeat_s: float | None = None):
        self.path = Path(run_dir) / LOCK
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s or max(0.5, min(30.0, timeout_s / 5))
        self.owner = {**_machine(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": uuid.uuid4().hex,
                      "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
        self.taken_over: str | None = None  # why a stale lock was replaced, if it was
        self._stop = threading.Event()
        self._acquire()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        """Create the lock with our content in one step; False if a lock exists."""
        tmp = self.path.with_name(f".{LOCK}.{self.owner['token']}")
        tmp.write_text(json.dumps(self.owner, indent=1) + "\n")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                return
            found = _read(self.path)
            if found is None:
                continue  # released meanwhile
            owner, age = found
            reason = _dead_reason(owner, age, self.timeout_s)
            if reason is None:
                raise RunFolderLocked(f"run folder {self.path.parent} is in use by {_describe(owner, age)}; stop that "
                                      f"run first (its lock {self.path} is taken over "
                                      f"{self.timeout_s / 60:g} min after its last heartbeat, or at once on its host "
                                      f"once it is dead)")
            if self._take_over(owner):
                self.taken_over = f"took over {self.path} of {_describe(owner, age)}: {reason}"
                return
        raise RunFolderLocked(f"run folder {self.path.parent}: another start is taking its lock {self.path} at the "
                              f"same time; start one run only")

    def _take_over(self, judged: dict | None) -> bool:
        """Move the stale lock aside and create ours; False if what was moved is not what was judged."""
        moved = self.path.with_name(f".{LOCK}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return False
        try:
            current = json.loads(moved.read_text())
        except (OSError, ValueError):
            current = None
        if (current or {}).get("token") != (judged or {}).get("token"):  # a fresh lock: put it back
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
            moved.unlink(missing_ok=True)
            return False
        moved.unlink(missing_ok=True)
        return self._create()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            found = _read(self.path)
            if found is None and self._create():
                continue  # removed by hand: ours again
            owner = found[0] if found else None
            if found is not None and owner is None:
                continue  # unreadable for a moment (a network file system): try again
            if (owner or {}).get("token") != self.owner["token"]:
                print(f"error: {self.path} is now held by {_describe(owner, found[1] if found else 0)}: another run "
                      f"took this run folder over (this one did not refresh its lock for "
                      f"{self.timeout_s / 60:g} min); stopping at once", file=sys.stderr, flush=True)
                os._exit(1)
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        self._thread.join(timeout=5)
        found = _read(self.path)
        if found is not None and (found[0] or {}).get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)

"""Workers stop when their launcher dies: under torchrun, killing only the agent (kill -9) must not
leave its workers training (they run in sessions of their own and would go on writing checkpoints
into a run folder that a rerun may already use).

`stop_with_parent()` starts a daemon thread that polls `os.getppid()`; when the parent process is
gone it sends this process `signal` (default SIGTERM: with SIGTERM in `run.signals` the worker
saves at the next step boundary and exits 75, as on a preemption; otherwise SIGTERM ends it).
Polling rather than Linux's PR_SET_PDEATHSIG: that fires when the parent *thread* exits, and works
on Linux only.
"""

from __future__ import annotations

import os
import signal as signals
import sys
import threading


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def stop_with_parent(signal: int = signals.SIGTERM, interval_s: float = 1.0) -> threading.Thread:
    """Watch the parent process; send `signal` to this process once it has died."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(interval_s)
        print(f"error: the launcher (pid {parent}) died: this worker (pid {os.getpid()}) stops "
              f"({signals.Signals(signal).name})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread

"""A stand-in for the training driver in launch-script tests (no torch import: starts fast).

Prints one JSON line per worker: rank, world size, local rank, its arguments and the environment
the launch scripts set. ECHO_EXIT=N: exit with N once every worker has printed (the driver's ranks
exit together after a collective save; torchrun stops the other workers at the first failure), with
ECHO_BARRIER naming an empty folder for that rendezvous. ECHO_WAIT_SIGNAL=1: print "ready", wait up to
60 s for SIGUSR1, SIGTERM or SIGINT, print which one came, and exit 75 (as the driver does after saving).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def say(line: str) -> None:
    """One write per line: the workers share the launcher's stdout (a pipe; short writes are atomic)."""
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def barrier(folder: str, rank: str, world_size: int) -> None:
    """Wait (up to 60 s) until every worker has left its mark in `folder`."""
    Path(folder, f"rank{rank}").touch()
    deadline = time.monotonic() + 60
    while len(list(Path(folder).glob("rank*"))) < world_size and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> int:
    env = os.environ
    say(json.dumps({"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                    "local_rank": int(env["LOCAL_RANK"]), "argv": sys.argv[1:],
                    "omp_num_threads": env.get("OMP_NUM_THREADS"), "wandb_mode": env.get("WANDB_MODE")}))
    if env.get("ECHO_WAIT_SIGNAL"):
        received = []
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
        say(f"ready {env['RANK']}")
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        say(f"got {received[0] if received else 'nothing'} {env['RANK']}")
        return 75 if received else 1
    code = int(env.get("ECHO_EXIT", "0"))
    if code:
        barrier(env["ECHO_BARRIER"], env["RANK"], int(env["WORLD_SIZE"]))
    return code


if __name__ == "__main__":
    sys.exit(main())

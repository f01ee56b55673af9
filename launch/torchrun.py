"""torchrun, keeping the training driver's "saved and stopped early" exit code and its preemption signals.

    python launch/torchrun.py [torchrun options] -m MODULE [args ...]   (torchrun's own arguments)

Two differences from `torchrun` (torch.distributed.run), which the launch scripts need:
- Exit code: torchrun reports 1 whenever a worker fails, so the driver's exit code 75 ("checkpoint
  saved, stopped early; rerun to continue", `ttt_train.training.preemption.EXIT_PREEMPTED`) would be
  lost. Here the launcher exits 75 when a worker exited 75 and every other failed worker either
  exited 75 or was stopped by a signal (torchrun stops the rest of the group after the first exit).
- SIGTERM and SIGUSR1 are forwarded to every worker's process group (torchrun starts each worker in
  its own session) and the workers are left to finish their step, save and exit. torchrun itself
  would forward SIGTERM, SIGKILL the workers `--shutdown-timeout` seconds later (30 s by default)
  and die on SIGUSR1 (not one of its handled signals), which breaks a SLURM preemption save.
  Other signals (SIGINT, SIGHUP, SIGQUIT) keep torchrun's handling.
"""

from __future__ import annotations

import os
import signal
import sys

import psutil
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from ttt_train.training.preemption import EXIT_PREEMPTED

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def _forward(signum: int, frame) -> None:
    """Send `signum` to the process group of every worker (each child leads its own session)."""
    for child in psutil.Process().children():
        try:
            os.killpg(child.pid, signum)
        except (ProcessLookupError, PermissionError):  # gone, or not a session leader (not a worker)
            pass


def exit_code(failures: dict) -> int:
    """75 when some worker exited 75 and the others that failed exited 75 or by a signal; else 1."""
    codes = [failure.exitcode for failure in failures.values()]
    if EXIT_PREEMPTED in codes and all(code == EXIT_PREEMPTED or code < 0 for code in codes):
        return EXIT_PREEMPTED
    return 1


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    names = {sig.name for sig in FORWARDED}
    args.signals_to_handle = ",".join(s for s in args.signals_to_handle.split(",") if s.strip() not in names)
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    try:
        run(args)
    except ChildFailedError as error:
        print(f"launch: workers failed with exit codes "
              f"{sorted({f.exitcode for f in error.failures.values()})}", file=sys.stderr)
        return exit_code(error.failures)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

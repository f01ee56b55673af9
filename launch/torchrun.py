"""torchrun, keeping the training driver's exit codes and its preemption signals.

    python launch/torchrun.py [torchrun options] -m MODULE [args ...]   (torchrun's own arguments)

Three differences from `torchrun` (torch.distributed.run), which the launch scripts need:
- Exit code: torchrun reports 1 whenever a worker fails, so the driver's exit codes 75 ("checkpoint
  saved, stopped early; rerun to continue", `ttt_train.training.preemption.EXIT_PREEMPTED`) and 2
  ("refused configuration") would be lost. Here the launcher exits with that code when a worker exited
  with it and every other failed worker exited with it too or was stopped by a signal (torchrun stops
  the rest of the group after the first exit), without torchrun's failure report; anything else is 1.
- SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) are forwarded to every worker's process group (torchrun starts
  each worker in its own session) and the workers are left to finish their step, save and exit 75.
  torchrun itself would forward SIGTERM and SIGINT, SIGKILL the workers `--shutdown-timeout` seconds
  later (30 s by default) and die on SIGUSR1 (not one of its handled signals), which breaks a SLURM
  preemption save. SIGHUP and SIGQUIT keep torchrun's handling.
- Restarts (`--max-restarts N`): torchrun restarts the worker group after any worker fails, and the
  restarted driver resumes from the last checkpoint. A group that saved and stopped on purpose (exit 75
  as above), that was refused (exit 2) or that was told to stop (a forwarded signal) is not restarted:
  torchrun would otherwise train on through a preemption.
  `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (unless set): with the c10d rendezvous's store shared with
  the workers (torch's default), the restarted workers find their predecessors' keys in it and hang
  creating their process groups (pytorch/pytorch#135712; still so in torch 2.13 with gloo); unshared,
  rank 0 hosts a fresh store for each attempt.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys

import psutil
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from ttt_train.training.preemption import EXIT_PREEMPTED

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_REFUSED = 2  # the driver's "refused configuration" (ttt_train.train.EXIT_REFUSED)
_stopping = False  # a stop signal was forwarded: no restart after it


def _forward(signum: int, frame) -> None:
    """Send `signum` to the process group of every worker (each child leads its own session)."""
    global _stopping
    _stopping = True
    for child in psutil.Process().children():
        try:
            os.killpg(child.pid, signum)
        except (ProcessLookupError, PermissionError):  # gone, or not a session leader (not a worker)
            pass


class _DriverOutcomes(logging.Filter):
    """Drops torchrun's "failed (exitcode: 75|2)" log lines: saved-and-stopped and refused are the
    driver's own outcomes, which it reports itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return re.search(rf"failed \(exitcode: ({EXIT_PREEMPTED}|{EXIT_REFUSED})\)", record.getMessage()) is None


def exit_code(failures: dict) -> int:
    """75 (or 2) when some worker exited 75 (or 2) and the others that failed exited so too or by a
    signal; else 1."""
    codes = [failure.exitcode for failure in failures.values()]
    for code in (EXIT_PREEMPTED, EXIT_REFUSED):
        if code in codes and all(c == code or c < 0 for c in codes):
            return code
    return 1


def restart_allowed(failures: dict) -> bool:
    """Whether a failed worker group may be restarted: not after a stop signal, nor when the group's outcome
    (`exit_code`: the workers torchrun stopped itself count as by a signal) is 75 (saved and stopped) or 2
    (refused: a restart would be refused again)."""
    return not _stopping and exit_code(failures) == 1


def _no_restart_after_a_planned_stop() -> None:
    """Make torchrun's agent spend no restart on a group that `restart_allowed` refuses."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = LocalElasticAgent._monitor_workers

    def monitored(self, worker_group):
        result = monitor(self, worker_group)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and not restart_allowed(result.failures):
            self._remaining_restarts = 0
        return result

    LocalElasticAgent._monitor_workers = monitored


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    _no_restart_after_a_planned_stop()
    names = {sig.name for sig in FORWARDED}
    args.signals_to_handle = ",".join(s for s in args.signals_to_handle.split(",") if s.strip() not in names)
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DriverOutcomes())
    try:
        run(args)
    except ChildFailedError as error:
        code = exit_code(error.failures)
        if code == 1:  # 75 and 2 are the driver's own outcomes, which it has reported
            print(f"launch: workers failed with exit codes "
                  f"{sorted({f.exitcode for f in error.failures.values()})}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Stopping cleanly: preemption signals and wall-time limits, agreed by all ranks at step boundaries.

A signal handler only sets a flag. After every step all ranks enter one small all-reduce (MAX) of
[signal seen, wall-time limit reached, periodic save due]; so they act on the same step, save the
same checkpoint and exit together with `EXIT_PREEMPTED` (the launch scripts requeue on it). The
wall-time clock is a parameter (`clock`, default `time.monotonic`): tests drive the time limits with
a fake one instead of sleeping.
"""

from __future__ import annotations

import signal
import sys
import time

import torch

from ttt_train.training.config import ConfigError

EXIT_PREEMPTED = 75
"""Exit code of a run that saved and stopped early; rerun the same command to continue."""


class StopFlags:
    """Per-rank flags (signal received, time limit, periodic save clock) and their step-boundary agreement."""

    def __init__(self, signal_names: list[str], exit_after_minutes: float, save_every_minutes: float,
                 clock=time.monotonic):
        self.received: str | None = None
        self.clock = clock
        self.start = clock()
        self.exit_after_s = exit_after_minutes * 60
        self.save_every_s = save_every_minutes * 60
        self.last_save = self.start
        self.previous = {}
        for name in signal_names:
            if not hasattr(signal, name):
                self.restore()
                raise ConfigError(f"run.signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
            sig = getattr(signal, name)
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def shield_checkpoint_writer(self) -> None:
        """Start dist_checkpointing's result-queue manager now, with the watched signals ignored.

        That manager is a *spawned* process created at the first save, and torchrun sends SIGTERM
        to each worker's whole process group: without this a preemption signal kills it and the save
        fails. An ignored signal stays ignored across exec; this rank's own handlers are restored
        right after. (The writer processes of each save are forked: they inherit the flag-only handler.)

        Ignoring SIGTERM, the manager would outlive a rank that is killed (kill -9, the OOM killer): an
        orphan holding the rank's memory and its stdout, which keeps a launcher's pipe open. So it is
        started here, as megatron would, but asks the kernel to SIGKILL it when this rank dies (Linux).
        """
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        from ttt_train.runtime import megatron_compat

        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in self.previous}
        try:
            if filesystem_async._results_queue is None and sys.platform == "linux":  # the same global 0.16-0.19
                from multiprocessing import get_context
                from multiprocessing.managers import SyncManager

                self._manager = SyncManager(ctx=get_context("spawn"))
                self._manager.start(_die_with_parent)
                filesystem_async._results_queue = self._manager.Queue()
            megatron_compat.write_results_queue()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def saved(self) -> None:
        """A checkpoint was just written: restart the periodic-save clock."""
        self.last_save = self.clock()

    def agree(self) -> tuple[bool, bool]:
        """(stop now, save now) as agreed by every rank (collective). Stop: a signal reached any rank
        or the wall-time limit passed; save: the periodic-save interval passed on any rank."""
        import torch.distributed as dist

        from ttt_train.runtime.distributed import device

        now = self.clock()
        flags = torch.tensor([
            self.received is not None,
            self.exit_after_s > 0 and now - self.start >= self.exit_after_s,
            self.save_every_s > 0 and now - self.last_save >= self.save_every_s,
        ], dtype=torch.int32, device=device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, timed_out, save = (bool(x) for x in flags.tolist())
        return stop or timed_out, save

    def reason(self) -> str:
        return f"signal {self.received}" if self.received else "run.exit_after_minutes reached (or another rank's signal)"


def _die_with_parent() -> None:
    """In a child process: be SIGKILLed when the parent dies (Linux `prctl(PR_SET_PDEATHSIG)`)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG

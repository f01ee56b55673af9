"""Hang detection: every rank names what it is doing, beats in the rendezvous store, and stops when stuck.

A rank that hangs inside a collective (a stopped process, a dead device, a lost link) leaves every
other rank waiting in its own collective. gloo and NCCL only time out (gloo raises a bare "Timed
out waiting Nms for recv"; NCCL's watchdog aborts the process), and neither names the rank that is
missing. Here the training loop marks *phases* (`phase("stages.0 step 3 micro-batch 2/4")`, with
`generous=True` for start-up, checkpoint saves and loads) and a daemon thread per rank

- writes a heartbeat `{beat, phase, pid, host}` to the rendezvous store every `interval` seconds
  and whenever the phase changes (its own store connection, off the training thread; the key is `ttt_watchdog/<rank>`, written once at start, before any
  collective can hang, so a store kept across torchrun restarts holds no stale beat);
- when its own phase has lasted the phase's timeout (the steady `collective timeout` once `steady()`
  is called after a stage's first step, the generous start-up timeout before that and in generous
  phases), reads every rank's heartbeat twice, `interval * 2.5` s apart, inside that timeout: a rank
  whose beat did not advance is stopped (or dead); the others report their phases. It prints one
  line naming the unresponsive ranks and the phase each was last seen in, calls `on_hang(message)`
  and ends the process (`os._exit(EXIT_HUNG)`): nothing is saved from the broken state. A phase
  that ends during those reads was slow, not hung: the verdict is dropped.

The process groups' own timeouts follow the phases (a generous one at start-up, lowered after the
first step, as torchtitan does) with a grace period on top, so this message comes first and the
backend's timeout stays as a backstop. One watchdog per process (`start`); the module-level
functions are no-ops before `start` and after `stop`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta

EXIT_HUNG = 1
_PREFIX = "ttt_watchdog"
_watchdog: Watchdog | None = None


def beat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats for a steady timeout of `timeout_s` (1/20 of it, 0.25 s to 10 s)."""
    return min(10.0, max(0.25, timeout_s / 20))


def set_process_group_timeouts(seconds: float) -> None:
    """Set the timeout of every process group this rank belongs to (gloo and NCCL alike)."""
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=seconds)
    for group in list(c10d._world.pg_map):
        if group is not None and not c10d._rank_not_in_group(group):
            try:
                c10d._set_pg_timeout(timeout, group)
            except (ValueError, AssertionError, RuntimeError):  # a group of another backend
                pass


class Watchdog:
    """See the module docstring. `steady_s`: the collective timeout after a stage's first step;
    `startup_s`: before it and in generous phases; `keys`: their config keys, named in messages."""

    def __init__(self, steady_s: float, startup_s: float, *, keys: tuple[str, str], on_hang=None, store=None):
        import torch.distributed as dist

        self.steady_s, self.startup_s, self.keys = float(steady_s), float(max(startup_s, steady_s)), keys
        self.on_hang = on_hang
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.interval = beat_interval(self.steady_s)
        self.grace = max(30.0, 6 * self.interval)
        self.store = store if store is not None else _store_client(max(10.0, 4 * self.interval))
        self.identity = {"pid": os.getpid(), "host": socket.gethostname()}
        self.steady_mode = False
        self._phase = ("starting", time.monotonic(), True)
        self._beats = 0
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._applied: bool | None = None
        self._apply_timeouts(generous=True)
        self._beat()
        self._thread = threading.Thread(target=self._run, name="ttt-watchdog", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ main thread
    def phase(self, what: str, generous: bool = False) -> None:
        """This rank now does `what` (a short phrase); its timeout restarts."""
        generous = generous or not self.steady_mode
        self._phase = (what, time.monotonic(), generous)
        self._changed.set()
        if generous != self._applied:
            self._apply_timeouts(generous)

    def steady(self, on: bool = True) -> None:
        """After a stage's first step (on) or at a stage's start (off): the lowered or generous timeout."""
        self.steady_mode = on
        what, _, _ = self._phase
        self.phase(what, generous=not on)

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        self._thread.join(timeout=2 * self.interval + 1)

    def _apply_timeouts(self, generous: bool) -> None:
        set_process_group_timeouts((self.startup_s if generous else self.steady_s) + self.grace)
        self._applied = generous

    # ------------------------------------------------------------------ watchdog thread
    def _key(self, rank: int) -> str:
        return f"{_PREFIX}/{rank}"

    def _beat(self) -> None:
        self._beats += 1
        what, _, _ = self._phase
        self.store.set(self._key(self.rank), json.dumps({"beat": self._beats, "phase": what, **self.identity}))

    def _limit(self, generous: bool) -> float:
        return self.startup_s if generous else self.steady_s

    def _run(self) -> None:
        diagnosis_s = 2.5 * self.interval
        while True:
            self._changed.wait(self.interval)
            self._changed.clear()
            if self._stop.is_set():
                return
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a store hiccup must not kill training; the check below still runs
                pass
            phase = self._phase
            what, since, generous = phase
            if time.monotonic() - since < self._limit(generous) - diagnosis_s:
                continue
            message = self._diagnose(phase, diagnosis_s)
            if message is None or self._stop.is_set():
                continue
            print(f"error: {message}", file=sys.stderr, flush=True)
            if self.on_hang is not None:
                try:
                    self.on_hang(message)
                except Exception:  # noqa: BLE001 - exiting matters more than the report
                    pass
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(EXIT_HUNG)

    def _snapshot(self) -> dict[int, dict | None]:
        keys = [self._key(r) for r in range(self.world)]
        present = {r for r, key in enumerate(keys) if self.store.check([key])}
        values = self.store.multi_get([keys[r] for r in sorted(present)]) if present else []
        records: dict[int, dict | None] = {r: None for r in range(self.world)}
        for r, raw in zip(sorted(present), values):
            records[r] = json.loads(bytes(raw).decode())
        return records

    def _diagnose(self, phase: tuple, wait_s: float) -> str | None:
        """The hang message, or None if this rank's phase ended meanwhile (slow, not hung)."""
        what, since, generous = phase
        limit = self._limit(generous)
        try:
            first = self._snapshot()
            if self._stop.wait(wait_s) or self._phase is not phase:
                return None
            second = self._snapshot()
        except Exception as err:  # noqa: BLE001 - the store host itself may be the stuck process
            return (f"rank {self.rank} waited {time.monotonic() - since:.0f} s in {what!r} "
                    f"({self._limit_text(generous)}) and the rendezvous store does not answer ({err}); its host "
                    f"(the launcher, or rank 0 without torchrun) may be the stuck process; stopping without saving")
        if self._phase is not phase:
            return None
        waited = time.monotonic() - since
        gone = [r for r in range(self.world) if r != self.rank and
                (second[r] is None or first[r] is None or second[r]["beat"] == first[r]["beat"])]
        head = f"rank {self.rank} waited {waited:.0f} s in {what!r} ({self._limit_text(generous)}, limit {limit:.0f} s)"
        tail = "; stopping without saving (the last checkpoint is intact)"
        if gone:
            described = "; ".join(_describe(r, second[r] or first[r]) for r in gone[:8])
            more = f" and {len(gone) - 8} more" if len(gone) > 8 else ""
            return f"{head}: rank(s) {_ranks(gone)} stopped responding: {described}{more}{tail}"
        phases: dict[str, list[int]] = {}
        for r in range(self.world):
            phases.setdefault(second[r]["phase"], []).append(r)
        where = "; ".join(f"rank(s) {_ranks(ranks)} in {p!r}" for p, ranks in list(phases.items())[:8])
        return (f"{head}: every rank still responds ({where}): a collective that never completes (ranks in "
                f"different phases, or a hung device or link){tail}")

    def _limit_text(self, generous: bool) -> str:
        if generous:
            return f"a start-up, save or load phase: {self.keys[1]}={self.startup_s / 60:g}"
        return f"{self.keys[0]}={self.steady_s / 60:g}"


def _describe(rank: int, record: dict | None) -> str:
    if record is None:
        return f"rank {rank} never reported (did it start?)"
    return f"rank {rank} (pid {record['pid']} on {record['host']}) last seen in {record['phase']!r}"


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks))


def _store_client(timeout_s: float):
    """A connection of our own to the rendezvous store (torchrun's agent store, or rank 0's)."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


# ---------------------------------------------------------------------- process-wide watchdog

def start(steady_s: float, startup_s: float, *, keys: tuple[str, str], on_hang=None) -> Watchdog:
    """Start this process's watchdog (collective-free; call after torch.distributed is initialised)."""
    global _watchdog
    stop()
    _watchdog = Watchdog(steady_s, startup_s, keys=keys, on_hang=on_hang)
    return _watchdog


def stop() -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None


def phase(what: str, generous: bool = False) -> None:
    """Mark this rank's current phase (no-op without a watchdog)."""
    if _watchdog is not None:
        _watchdog.phase(what, generous)


def steady(on: bool = True) -> None:
    if _watchdog is not None:
        _watchdog.steady(on)

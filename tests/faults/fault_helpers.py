"""Shared pieces of the fault tests: the driver under `launch/torchrun.py` with injected faults, a watch
on its workers (when each started and ended, by torchrun attempt), and checkpoint tensors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tests.training import driver_helpers as h

STEPS = (4, 3)  # stage 0: checkpoints at 2 and 4 (its end); stage 1: at 2 and 3 (its end)


def overrides(run_dir: Path, data: dict, *extra: str) -> list[str]:
    """The test-size two-stage curriculum (see driver_helpers.tiny_overrides), validation and wandb off; one
    index cache beside the data for every run (built once)."""
    cache = Path(data["short"]).parent / "cache"
    return h.tiny_overrides(run_dir, data, steps=STEPS, extra=["validation.every_steps=0", "logging.wandb.mode=disabled",
                                                               f"data.cache_dir={cache}", *extra])


class Launch:
    """`launch/torchrun.py` running the driver on 2 local workers, its workers watched from a thread."""

    def __init__(self, overrides: list[str], *, faults: str = "", max_restarts: int = 0, log: Path | None = None):
        env = {**h.env(), "TTT_FAULTS": faults}
        if log is not None:
            env["TTT_FAULTS_LOG"] = str(log)
        # --standalone (a c10d rendezvous) as launch/single_node.sh: torchrun's static rendezvous keeps one
        # store across restarts, and restarted gloo workers then meet their predecessors' stale addresses
        command = [sys.executable, str(h.ROOT / "launch" / "torchrun.py"), "--standalone", "--nproc-per-node", "2",
                   "--max-restarts", str(max_restarts), "--monitor-interval", "0.1", "-m", "ttt_train.train",
                   *overrides]
        self.proc = subprocess.Popen(command, cwd=h.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.workers: dict[int, dict] = {}  # pid -> {"rank", "attempt", "start", "end"}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        launcher = psutil.Process(self.proc.pid)
        while not self._done.is_set():
            now = time.time()
            try:
                children = {p.pid: p for p in launcher.children()}
            except psutil.NoSuchProcess:
                children = {}
            for pid, process in children.items():
                if pid not in self.workers:
                    try:
                        environ = process.environ()
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    if "RANK" in environ:
                        self.workers[pid] = {"rank": int(environ["RANK"]), "start": now, "end": None,
                                             "attempt": int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}
            for pid, worker in self.workers.items():
                if worker["end"] is None and (pid not in children or _zombie(children[pid])):
                    worker["end"] = now
            time.sleep(0.05)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 900) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            h.kill_tree(self.proc.pid)
            out, _ = self.proc.communicate()
            raise AssertionError("launch timed out:\n" + out[-6000:]) from None
        finally:
            if self.proc.poll() is None:  # interrupted (pytest-timeout): leave no launcher behind
                h.kill_tree(self.proc.pid)
            time.sleep(0.2)
            self._done.set()
            self._thread.join()
        return self.proc.returncode, out

    def ended(self, attempt: int, but: int | None = None) -> float:
        """When the last worker of `attempt` (other than rank `but`) ended."""
        ends = [w["end"] for w in self.workers.values() if w["attempt"] == attempt and w["rank"] != but]
        assert ends and None not in ends, self.workers
        return max(ends)

    def started(self, attempt: int) -> float:
        return min(w["start"] for w in self.workers.values() if w["attempt"] == attempt)


def _zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def run(overrides: list[str], **kwargs) -> tuple[int, str]:
    return Launch(overrides, **kwargs).wait()


def until(launch: Launch, ready, timeout: float = 900) -> None:
    """Wait until `ready()` holds; fail (killing the launch) if it ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if launch.proc.poll() is not None or time.monotonic() > deadline:
            h.kill_tree(launch.proc.pid)
            raise AssertionError("the launch ended or timed out first:\n" + launch.proc.communicate()[0][-6000:])
        time.sleep(0.05)


def when(run_dir: Path, ready, launch: Launch, timeout: float = 900) -> None:
    """Wait until `ready(records logged by this launch so far)` holds (h.logged_step(stage, step), ...)."""
    before = len(h.records(run_dir))
    until(launch, lambda: ready(h.records(run_dir)[before:]), timeout)


def report(**row) -> None:
    """One row of issue 24's fault table (fault, injected, outcome, steps_lost, data_lost, seconds_to_stop),
    printed for `pytest -s`."""
    print("FAULT-REPORT", json.dumps(row), flush=True)


def fault_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def checkpoint_tensors(path: Path) -> dict:
    """Every tensor of a checkpoint (an iter_* folder), read without torch.distributed."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), os.path.join(tmp, "state.pt"))
        state = torch.load(os.path.join(tmp, "state.pt"), weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def checkpoints(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / "stages" / ("0_ctx1k", "1_ctx4k")[stage] / "checkpoints"


def final_checkpoint(run_dir: Path) -> Path:
    root = checkpoints(run_dir, 1)
    return root / (root / "latest").read_text().strip()


def assert_same_tensors(a: dict, b: dict, rel: float = 0.0) -> None:
    """Equal tensors (rel=0), or each within `rel` of the other in relative Frobenius norm (another layout:
    Adam turns rounding in tiny gradients into element differences of ~1e-4 of the largest weight)."""
    import torch

    assert a.keys() == b.keys()
    for key in a:
        if rel:
            x, y = a[key].double(), b[key].double()
            assert (x - y).norm() <= rel * y.norm(), (key, ((x - y).norm() / y.norm()).item())
        else:
            assert torch.equal(a[key], b[key]), key


def steps_logged(run_dir: Path) -> list[tuple[int, int]]:
    """(stage, step) of every training record in order, repeats included (a step redone after a fault)."""
    return [(r["stage"], r["step"]) for r in h.records(run_dir) if "losses" in r]

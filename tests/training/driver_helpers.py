"""Shared pieces of the training-driver tests: tiny synthetic data, the tiny curriculum's overrides
at test size, launching the driver under torchrun, and reading a run's metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHORT, LONG = 256, 1024  # stage lengths at test size (the experiment's 1k / 4k scaled down 4x)


def make_data(folder: Path) -> dict[str, str]:
    """Synthetic datasets for both stages (byte tokenizer): {"short": prefix, "long": prefix}."""
    from data_tools import synthetic

    prefixes = {}
    for key, length, num, seed, tasks in (("short", SHORT, 120, 0, ["passkey"]),
                                          ("long", LONG, 60, 1000, ["passkey", "multikey", "variable_tracking"])):
        prefix = folder / f"len{length}"
        if not Path(f"{prefix}.idx").is_file():
            synthetic.main([*tasks, "--num", str(num), "--length", str(length), "--seed", str(seed),
                            "--output-prefix", str(prefix)])
        prefixes[key] = str(prefix)
    return prefixes


def tiny_overrides(run_dir: Path, data: dict[str, str], *, steps=(6, 6), extra=()) -> list[str]:
    """`tiny_ttt` at test size: stage 0 `steps[0]` steps at 256 tokens (CP1 x DP2), stage 1 `steps[1]`
    steps at 1024 tokens with YaRN factor 4 (CP2); log every step, checkpoint every 2 steps, validate
    (held-out loss, 4 position buckets) every 3 steps."""
    return ["experiment=tiny_ttt", f"run.dir={run_dir}", f"data.blend=[{{path:'{data['short']}',weight:1.0}}]",
            f"data.cache_dir={run_dir.parent / 'cache'}", f"model.max_position_embeddings={SHORT}",
            f"stages.0.seq_length={SHORT}", f"stages.0.tokens={steps[0] * 4 * SHORT}",
            f"stages.1.seq_length={LONG}", f"stages.1.tokens={steps[1] * 2 * LONG}",
            f"stages.1.model.max_position_embeddings={LONG}", f"stages.1.yarn.original_max_position_embeddings={SHORT}",
            f"stages.1.data.blend=[{{path:'{data['long']}',weight:1.0}}]",
            "logging.interval=1", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            "validation.every_steps=3", "validation.num_batches=1", "validation.position_buckets=4",
            "schedule.warmup_fraction=0.0", "ttt.lr_warmup.steps=4", *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}


def torchrun(overrides: list[str], nproc: int = 2, extra_env: dict | None = None) -> subprocess.Popen:
    """Start the driver under torchrun in its own process group (output to a pipe)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_port()), "-m", "ttt_train.train", *overrides]
    return subprocess.Popen(command, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _port() -> int:
    from ttt_train.runtime.local_ranks import free_port

    return free_port()


def run_to_end(overrides: list[str], nproc: int = 2, timeout: float = 400,
               extra_env: dict | None = None) -> tuple[int, str]:
    return finish(torchrun(overrides, nproc, extra_env), timeout)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    """(exit code, output) of a started driver; killed (and the test failed) after `timeout` s."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError("driver timed out:\n" + out[-4000:]) from None
    return proc.returncode, out


def interrupt_when(overrides: list[str], ready, sig: int, nproc: int = 2, timeout: float = 400) -> tuple[int, str]:
    """Start the driver, wait until `ready(records logged by this launch)` holds, send `sig` (SIGKILL: to torchrun and all
    its workers, as a node failure; else to torchrun, as SLURM does), return (exit code, output)."""
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir=")))
    before = len(records(run_dir))
    proc = torchrun(overrides, nproc)
    deadline = time.monotonic() + timeout
    while not ready(records(run_dir)[before:]):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc.pid)
            raise AssertionError("driver ended or timed out before the interruption point:\n"
                                 + proc.communicate()[0][-4000:])
        time.sleep(0.2)
    if sig == signal.SIGKILL:
        kill_tree(proc.pid)
    else:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun's workers run in sessions of their own)."""
    import psutil

    parent = psutil.Process(pid)
    for process in [parent, *parent.children(recursive=True)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def losses(run_dir: Path) -> dict[tuple[int, int], float]:
    """{(stage, step): loss}; a step logged twice (re-run after a crash) keeps its last value."""
    return {(r["stage"], r["step"]): r["losses"][-1] for r in records(run_dir) if "losses" in r}


def logged_step(stage: int, step: int):
    """`ready` predicate: this launch has logged `step` of `stage`."""
    return lambda new: any((r["stage"], r["step"]) == (stage, step) for r in new)

"""Shared pieces of the checkpoint / run-folder fault tests: a one-stage `tiny_ttt` run at test size
under torchrun (2 ranks, checkpoints every 5 steps), waiting for a point of it, and comparing a
faulted run with an uninterrupted one (every logged loss, and every tensor of the final checkpoint:
model and optimizer state)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.training import driver_helpers as h

STEPS, EVERY, SEQ = 20, 5, 256
INJECT = Path(__file__).resolve().parent / "inject"  # sitecustomize.py: TTT_FAULT_ENOSPC


def overrides(run_dir: Path, data: dict[str, str], *extra: str) -> list[str]:
    """One stage of `tiny_ttt` (CP1 x DP2): STEPS steps of 4 x 256 tokens, a checkpoint every EVERY
    steps (the newest 3 kept), every step logged."""
    return ["experiment=tiny_ttt", f"run.dir={run_dir}", f"data.blend=[{{path:'{data['short']}',weight:1.0}}]",
            f"data.cache_dir={run_dir.parent / 'cache'}", f"model.max_position_embeddings={SEQ}",
            f"stages=[{{name:ctx1k,tokens:{STEPS * 4 * SEQ},seq_length:{SEQ},yarn:null}}]",
            f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=3", "logging.interval=1", *extra]


def checkpoints(run_dir: Path) -> Path:
    return run_dir / "stages" / "0_ctx1k" / "checkpoints"


def injected(spec: str) -> dict:
    """Environment that makes the ranks' checkpoint writers fail with ENOSPC (see inject/sitecustomize.py)."""
    return {"PYTHONPATH": f"{INJECT}{os.pathsep}{h.ROOT}", "TTT_FAULT_ENOSPC": spec}


def wait_for(proc: subprocess.Popen, ready, timeout: float = 400) -> None:
    """Poll until `ready()` holds; fail (killing the job) if the job ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            h.kill_tree(proc.pid)
            raise AssertionError("driver ended or timed out first:\n" + proc.communicate()[0][-4000:])
        time.sleep(0.1)


def latest_is(run_dir: Path, name: str):
    pointer = checkpoints(run_dir) / "latest"
    return lambda: pointer.is_file() and pointer.read_text().strip() == name


def tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint folder (model and optimizer), read without megatron."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder), f"{tmp}/all.pt")
        state = torch.load(f"{tmp}/all.pt", weights_only=False)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Every step's loss and the final checkpoint's tensors equal the uninterrupted run's, exactly."""
    assert h.losses(run_dir) == h.losses(reference)
    final = f"iter_{STEPS:07d}"
    ours, theirs = tensors(checkpoints(run_dir) / final), tensors(checkpoints(reference) / final)
    assert sorted(ours) == sorted(theirs) and len(ours) > 20
    different = [key for key in ours if not ours[key].equal(theirs[key])]
    assert different == [], different[:5]


def report(**row) -> None:
    """One row of the fault table (issue 24), printed for `pytest -s`."""
    print("FAULT-REPORT", row, flush=True)

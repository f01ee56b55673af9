"""Run a function on N local ranks (one process each, gloo), for tests and small CPU jobs.

`run_local_ranks(fn, world_size, *args)` starts `world_size` processes, initialises
`torch.distributed` in each (gloo on a free loopback port), calls `fn(*args)` and returns the
list of per-rank return values (rank order). A rank that raises, dies or outlives `timeout`
makes the whole call fail with every rank's traceback in the message.

Processes come from a forkserver that pre-imports torch (and megatron-core when present), so a
call costs a fork, not a fresh 7 s import. `fn` must be a module-level (picklable) function, or a
`functools.partial` of one to pass keyword arguments; its return value travels back through
`torch.save`, so tensors are fine. Ranks are not daemonic (dist_checkpointing starts helper
processes); they are killed on failure or time-out.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

_PRELOAD = ["ttt_train.runtime.quiet", "torch", "torch.distributed", "megatron.core.models.gpt.gpt_model",
            "megatron.core.optimizer", "megatron.core.pipeline_parallel"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _rank_main(fn, args, rank, world_size, port, threads, env, results):
    import torch
    import torch.distributed as dist

    os.setpgrp()  # own process group: helpers a rank starts (checkpoint writers) die with it
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(*args)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except ImportError:
                pass
            dist.destroy_process_group()


class LocalRanksError(RuntimeError):
    """One or more local ranks failed or timed out; the message holds each rank's report."""


def run_local_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0,
                    env: dict[str, str] | None = None) -> list[Any]:
    """Run `fn(*args)` on `world_size` local gloo ranks; return their results in rank order.

    `timeout` is in seconds for the whole group. `env` adds environment variables in each rank.
    Torch threads per rank: the machine's cores divided among the ranks (at least 1).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    import torch

    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [ctx.Process(target=_rank_main,
                         args=(fn, args, r, world_size, port, threads, dict(env or {}), results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    reports: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(reports) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.2)
                reports[rank] = (status, payload)
                if status == "error":
                    deadline = min(deadline, time.monotonic() + 5.0)  # let peers report, then stop
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in reports]
            if dead:
                time.sleep(0.5)  # a result may still be in flight
                while True:
                    try:
                        rank, status, payload = results.get_nowait()
                        reports[rank] = (status, payload)
                    except queue.Empty:
                        break
                for r in dead:
                    if r not in reports:
                        reports[r] = ("error", f"process exited with code {procs[r].exitcode} before reporting")
                        deadline = min(deadline, time.monotonic() + 5.0)  # as for a reported error
            if time.monotonic() > deadline:
                break
    finally:
        for p in procs:
            p.join(timeout=2 if p.pid and all(s == "ok" for s, _ in reports.values()) else 0)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.join(timeout=5)
    failures = []
    for r in range(world_size):
        status, payload = reports.get(r, ("timeout", f"no report within {timeout:.0f} s"))
        if status != "ok":
            failures.append(f"--- rank {r}/{world_size}: {status}\n{payload}")
    if failures:
        target = getattr(fn, "func", fn)  # functools.partial
        raise LocalRanksError(f"{target.__module__}.{target.__qualname__} failed on {len(failures)} of "
                              f"{world_size} ranks:\n" + "\n".join(failures))
    return [torch.load(io.BytesIO(reports[r][1]), weights_only=False) for r in range(world_size)]

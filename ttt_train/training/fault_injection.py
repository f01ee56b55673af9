"""Test-only fault injection: kill, stop or signal one rank, or put an inf into its activations or gradients,
at a chosen point of a chosen step. Off unless the environment variable `TTT_FAULTS` is set: then
nothing is installed and each hook point costs one test of a module global.

`TTT_FAULTS` holds faults separated by `;`, each `ACTION@POINT` with optional `,key=value` filters:

    kill@backward,rank=1,step=3                 SIGKILL rank 1 during step 3's backward
    stop@step,rank=1,step=5                     SIGSTOP rank 1 as it starts step 5 (hangs its peers' collectives)
    kill@save,rank=0,step=4                     SIGKILL rank 0 inside the save of step 4, after its shards are
                                                written and before the checkpoint is published
    term@save,rank=0,step=4 / term@handoff,rank=0,stage=1
                                                SIGTERM to the launcher (which forwards it to every worker)
                                                inside that save / after the next stage is built, before its
                                                first step; returns once this rank's handler has seen it
    inf@activation,rank=1,step=3-6,site=decoder.layers.2.mlp
                                                +inf into the first element of that module's output
    inf@grad,rank=1,step=3,site=decoder.layers.1.mlp.linear_fc1.layer_norm_weight
                                                +inf into that parameter's reduced gradient, before the optimizer
    enospc@write,rank=0,step=10                 every checkpoint file that rank writes in the save of step 10
                                                fails with ENOSPC after a few bytes, as on a full disk

Filters: `rank` (global rank; default every rank), `stage`, `step` (`3`, `3-6` or `3+`, the stage's
1-based step being run), `attempt` (torchrun's restart count it fires on, default 0, so a restarted
job runs clean). kill/stop/term fire once; inf and enospc wherever they match. `TTT_FAULTS_LOG`, if set, is a file each firing appends a
JSON line to (time, pid, rank, attempt, fault, stage, step): the tests measure stop times from it.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import signal
import time

from ttt_train.training.numerics import strip_wrappers

ENV, LOG_ENV = "TTT_FAULTS", "TTT_FAULTS_LOG"
ACTIONS = {"kill": ("step", "backward", "save"), "stop": ("step", "backward", "save"),
           "term": ("step", "save", "handoff"), "inf": ("activation", "grad"), "enospc": ("write",)}


@dataclasses.dataclass
class Fault:
    action: str
    point: str
    rank: int | None = None
    stage: int | None = None
    steps: tuple[int, int] | None = None  # inclusive range; (n, large) for "n+"
    attempt: int = 0
    site: str | None = None
    text: str = ""
    fired: bool = False
    param: object = None  # the parameter of a "grad" fault on this rank

    def matches(self, point: str, stage: int, step: int) -> bool:
        return (self.point == point and not (self.fired and self.action in ("kill", "stop", "term"))
                and (self.stage is None or self.stage == stage)
                and (self.steps is None or self.steps[0] <= step <= self.steps[1]))


def parse(text: str) -> list[Fault]:
    """The faults of a `TTT_FAULTS` value (ValueError naming the bad entry)."""
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        head, *filters = entry.split(",")
        action, _, point = head.partition("@")
        if point not in ACTIONS.get(action, ()):
            raise ValueError(f"{ENV}: {entry!r}: use ACTION@POINT with {ACTIONS}")
        fault = Fault(action, point, text=entry)
        for item in filters:
            key, _, value = item.partition("=")
            if key in ("rank", "stage", "attempt"):
                setattr(fault, key, int(value))
            elif key == "step":
                low, _, high = value.partition("-")
                fault.steps = (int(value[:-1]), 1 << 62) if value.endswith("+") else (int(low), int(high or low))
            elif key == "site":
                fault.site = value
            else:
                raise ValueError(f"{ENV}: {entry!r}: unknown filter {key!r} (rank, stage, step, attempt, site)")
        if point in ("activation", "grad") and fault.site is None:
            raise ValueError(f"{ENV}: {entry!r}: {point} needs site=MODULE (activation) or site=PARAMETER (grad)")
        faults.append(fault)
    return faults


class _State:
    """Faults of this rank and this attempt, the position in training, and what a `term` waits for."""

    def __init__(self, faults: list[Fault]):
        self.faults = faults
        self.stage = self.step = -1
        self.signal_seen = lambda: True
        self.handles: list = []


_state: _State | None = None


def install(model_chunks, *, stage: int, signal_seen=None) -> None:
    """Read `TTT_FAULTS` and arm this rank's faults for a stage's model (no-op when unset)."""
    global _state
    remove()
    text = os.environ.get(ENV)
    if not text:
        return
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    faults = [f for f in parse(text) if f.rank in (None, rank) and f.attempt == attempt]
    if not faults:
        return
    _state = _State(faults)
    _state.stage = stage
    if signal_seen is not None:
        _state.signal_seen = signal_seen
    for fault in faults:
        if fault.point in ("activation", "backward"):
            _state.handles += [_hook_module(chunk, fault) for chunk in model_chunks]
        elif fault.point == "grad":
            fault.param = _find_parameter(model_chunks, fault)
        elif fault.point == "save":
            _wrap_save()
        elif fault.point == "write":
            _fail_writes()


def remove() -> None:
    global _state
    if _state is not None:
        for handle in _state.handles:
            if handle is not None:
                handle.remove()
    _state = None


def position(step: int) -> None:
    """The stage step (1-based) now being run."""
    if _state is not None:
        _state.step = step


def at(point: str) -> None:
    """Fire the faults armed for `point` ("step", "handoff", "grad") at the current position."""
    if _state is None:
        return
    for fault in _state.faults:
        if fault.matches(point, _state.stage, _state.step):
            _fire(fault)


def _fire(fault: Fault) -> None:
    import torch

    fault.fired = True
    _log(fault)
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif fault.action == "term":
        os.kill(os.getppid(), signal.SIGTERM)  # the launcher, which forwards it to every worker
        deadline = time.monotonic() + 30
        while not _state.signal_seen() and time.monotonic() < deadline:
            time.sleep(0.01)
    elif fault.point == "grad":
        param = fault.param
        grad = getattr(param, "main_grad", None)
        for target in (grad, param.grad):
            if target is not None:
                with torch.no_grad():
                    target.view(-1)[0] = float("inf")


def _log(fault: Fault) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        import torch.distributed as dist

        record = {"time": time.time(), "pid": os.getpid(), "rank": dist.get_rank() if dist.is_initialized() else 0,
                  "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), "fault": fault.text,
                  "stage": _state.stage, "step": _state.step}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _hook_module(chunk, fault: Fault):
    """A forward hook on `fault.site` of this chunk (None if the chunk lacks it, e.g. another pipeline stage)."""
    modules = {strip_wrappers(name): module for name, module in chunk.named_modules()}
    module = modules.get(fault.site if fault.site else "decoder")
    if module is None:
        return None

    def hook(mod, args, output):
        if _state is None or not fault.matches(fault.point, _state.stage, _state.step):
            return None
        tensor = output[0] if isinstance(output, tuple) else output
        if fault.point == "backward":
            tensor.register_hook(lambda grad: _fire(fault))
            return None
        _log(fault)
        poisoned = tensor.clone()
        poisoned.view(-1)[0] = float("inf")
        return (poisoned, *output[1:]) if isinstance(output, tuple) else poisoned

    return module.register_forward_hook(hook)


def _find_parameter(model_chunks, fault: Fault):
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if strip_wrappers(name) == fault.site:
                return param
    raise ValueError(f"{ENV}: {fault.text!r}: no parameter {fault.site!r} on this rank")


_original_save = None


def _wrap_save() -> None:
    """Make dist_checkpointing.save fire the "save" faults once this rank's shards are written."""
    global _original_save
    from megatron.core import dist_checkpointing

    if _original_save is not None:
        return
    _original_save = dist_checkpointing.save

    def save(*args, **kwargs):
        result = _original_save(*args, **kwargs)
        at("save")
        return result

    dist_checkpointing.save = save


_original_write_item = None


def _fail_writes() -> None:
    """Make megatron's checkpoint writers fail with ENOSPC after a few bytes while an "enospc" fault
    matches the position (the writer processes this rank forks inherit the patch and the position)."""
    global _original_write_item
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _original_write_item is not None:
        return
    _original_write_item = real = filesystem_async._write_item

    @functools.wraps(real)  # megatron inspects its signature
    def write_item(*args, **kwargs):
        if _state is not None and any(f.action == "enospc" and f.matches("write", _state.stage, _state.step)
                                      for f in _state.faults):
            stream = next(a for a in args if hasattr(a, "write") and hasattr(a, "name"))
            stream.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stream.name))
        return real(*args, **kwargs)

    filesystem_async._write_item = write_item

"""Patches that let megatron-core (0.16.1 to 0.19) train on a CPU-only torch build (gloo backend).

megatron-core assumes CUDA in a few dozen places (hard-coded `device='cuda'`, the CUDA RNG
tracker, `torch.cuda.synchronize`, `Tensor.type()` checks). On a machine without CUDA,
`apply()` installs the small set of process-wide patches below, each named, each replacing one
symbol, each needed by some path (see `tests/runtime/test_cpu_compat.py`, which removes each one
and shows what breaks). They are never applied when CUDA is available.

| id | replaces | why |
|----|----------|-----|
| P1 | `torch.cuda.current_device` -> `"cpu"` | rotary embeddings, buffers and p2p build tensors on it |
| P2 | torch factories (`zeros`, `arange`, ...): `device='cuda'` or an int -> cpu; `pin_memory` -> False | ~50 hard-coded `device='cuda'` (causal mask, optimizer, grad clipping, schedules, CP RoPE) |
| P3 | `Tensor.cuda` -> identity | tied embeddings under pipeline parallelism (`language_module.py` moves the shared output weight with `.cuda()`) |
| P4 | `Tensor.type()` (no argument) reports `torch.cuda.*Tensor` | grad clipping, distributed and bf16 optimizers assert on it |
| P5 | `torch.cuda.synchronize` -> no-op | pipeline p2p and checkpoint save |
| P6 | `tensor_parallel.random._CUDA_RNG_STATE_TRACKER` -> `CPURNGStatesTracker` | every forward forks the model-parallel RNG |
| P7 | `tensor_parallel.random._get/_set_cuda_rng_state` -> CPU RNG | activation recompute saves and restores RNG states |
| P8 | `torch.cuda.current_stream` -> `torch.cpu.current_stream` (megatron-core >= 0.19 only) | 0.19's DDP gradient sync waits on the current stream |

Always build models with `use_cpu_initialization=True` on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

PATCH_IDS = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8")
FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand",
             "randint", "zeros_like", "ones_like", "empty_like", "full_like", "eye", "linspace")

_applied: list[str] = []


class MegatronVersionError(RuntimeError):
    """A symbol the CPU patches replace is missing: megatron-core moved it."""


def _cpu_device(device):
    """Map a CUDA device spec (`'cuda'`, `'cuda:1'`, `torch.device('cuda')`, an int) to the CPU."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if kwargs.get("device") is not None:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    wrapper.__wrapped_for_cpu__ = True
    return wrapper


def _megatron_random():
    """megatron's RNG module, checked for the symbols P6/P7 replace."""
    import megatron.core
    import megatron.core.tensor_parallel.random as rng

    version = megatron.core.__version__
    missing = [name for name in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
                                 "_get_cuda_rng_state", "_set_cuda_rng_state", "CudaRNGStatesTracker")
               if not hasattr(rng, name)]
    if missing:
        raise MegatronVersionError(
            f"megatron-core {version}: megatron.core.tensor_parallel.random has no {missing}; the CPU "
            f"patches were written for megatron-core >=0.16.1,<0.20 (install one of those, or update "
            f"ttt_train/runtime/cpu_compat.py)")
    return rng


def _cpu_rng_tracker_class():
    rng = _megatron_random()

    class CPURNGStatesTracker(rng.CudaRNGStatesTracker):
        """megatron's RNG tracker on the CPU generator: named states, `add(name, seed)`, `fork(name)`."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=rng._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CPURNGStatesTracker


def _apply_one(patch_id: str) -> None:
    if patch_id == "P1":
        torch.cuda.current_device = lambda: "cpu"
    elif patch_id == "P2":
        # torch's device context (`with torch.device("meta")`, used by transformers' loading) redirects
        # only the functions in its lazily cached constructor set; cache the original factories (the ones
        # the wrappers call) before wrapping, or a later first use caches the wrappers and the context
        # is silently ignored.
        from torch.utils import _device

        _device._device_constructors()
        for name in FACTORIES:
            factory = getattr(torch, name)
            if not getattr(factory, "__wrapped_for_cpu__", False):
                setattr(torch, name, _on_cpu(factory))
    elif patch_id == "P3":
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    elif patch_id == "P4":
        original_type = torch.Tensor.type

        def tensor_type(self, *args, **kwargs):
            if args or kwargs:
                return original_type(self, *args, **kwargs)
            name = original_type(self)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)

        torch.Tensor.type = tensor_type
    elif patch_id == "P5":
        torch.cuda.synchronize = lambda *args, **kwargs: None
    elif patch_id == "P6":
        rng = _megatron_random()
        rng._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
        rng._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    elif patch_id == "P8":
        torch.cuda.current_stream = torch.cpu.current_stream
    elif patch_id == "P7":
        rng = _megatron_random()
        rng._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        rng._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    else:
        raise ValueError(f"unknown CPU patch id {patch_id!r}; known: {PATCH_IDS}")


def needed() -> tuple[str, ...]:
    """The patch ids the installed megatron-core needs (`megatron_compat.cpu_patch_ids`)."""
    from ttt_train.runtime import megatron_compat

    return megatron_compat.cpu_patch_ids(PATCH_IDS)


def apply(skip: tuple[str, ...] = ()) -> list[str]:
    """Install the CPU patches once per process (idempotent); return the ids applied.

    `skip` (or the environment variable `TTT_CPU_COMPAT_SKIP=P1,P5`) leaves patches out, for the
    ablation tests. Raises RuntimeError if CUDA is available: the patches are for CPU runs only.
    """
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.apply() is for CPU-only runs, but CUDA is available")
    skip = set(skip) | set(filter(None, os.environ.get("TTT_CPU_COMPAT_SKIP", "").split(",")))
    unknown = skip - set(PATCH_IDS)
    if unknown:
        raise ValueError(f"TTT_CPU_COMPAT_SKIP names unknown patches {sorted(unknown)}; known: {PATCH_IDS}")
    for patch_id in needed():
        if patch_id not in skip and patch_id not in _applied:
            _apply_one(patch_id)
            _applied.append(patch_id)
    return list(_applied)


def applied() -> list[str]:
    """The patch ids installed in this process."""
    return list(_applied)


def seed_cpu_rng_tracker(seed: int) -> None:
    """CPU stand-in for megatron's `model_parallel_cuda_manual_seed`: same named states, same offsets.

    Call after `initialize_model_parallel` and `apply()`.
    """
    from megatron.core import parallel_state as ps

    rng = _megatron_random()
    torch.manual_seed(seed)
    tracker = rng.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(rng._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(rng._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(rng._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank())

"""One call that sets up torch.distributed and megatron's parallel state from a `ParallelConfig`.

GPU present: NCCL, one device per local rank, megatron's CUDA RNG tracker.
CPU only: gloo, the CPU patches of `cpu_compat`, a CPU RNG tracker with the same seeds.
Works under `torchrun` (env:// rendezvous) and inside `run_local_ranks` (already initialised).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ttt_train.config_keys import build, check_fields, checked
from ttt_train.runtime.cp_attention_rules import CP_COMM_TYPES
from ttt_train.runtime.links import LinkConfig


@dataclass
class ParallelConfig:
    """Parallel layout. `dp` is derived: world_size / (tp * pp * cp).

    tp: tensor parallel size; pp: pipeline parallel size; cp: context parallel size;
    sequence_parallel: shard activations along the sequence inside TP regions (needs tp > 1 to
    matter); seed: base seed for megatron's RNG trackers; cp_comm_type: attention's communication
    under context parallelism (`auto`, `p2p`, `a2a`, `all_gather`, `a2a+p2p`; see
    `ttt_train.runtime.cp_attention_rules`).
    cp_scan: the TTT fast-weight scan over CP ranks: "ring" (2*(cp-1) hops), "log" (about log2(cp)
    rounds, more bytes) or "auto" (the faster on `links` by the alpha-beta model, per call);
    cp_scan_wire: the dtype its partial sums travel in, "fp32" or "bf16" (half the bytes, rounded
    per message, accumulated in fp32; measured on a Qwen3-4B TP-4 state at cp 8: prefixes within
    2e-3 (log) / 2.5e-3 (ring) relative of fp32's); links: the network model (`runtime/links.py`).
    """

    tp: int = checked(1, ge=1)
    pp: int = checked(1, ge=1)
    cp: int = checked(1, ge=1)
    sequence_parallel: bool = False
    seed: int = checked(1234, ge=0)
    cp_comm_type: str = checked("auto", choices=CP_COMM_TYPES)
    cp_scan: str = checked("auto", choices=("ring", "log", "auto"))
    cp_scan_wire: str = checked("fp32", choices=("fp32", "bf16"))
    links: LinkConfig = checked(default_factory=LinkConfig)

    @classmethod
    def from_dict(cls, values) -> ParallelConfig:
        """Build from a plain mapping (YAML, Hydra); unknown keys, wrong types and ranges are errors naming them."""
        return build(cls, values, "parallel")

    def validate(self, world_size: int) -> int:
        """Check the layout (types, ranges, against `world_size`); return the data-parallel size."""
        check_fields(self, "parallel")
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by parallel.tp * parallel.pp * parallel.cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {model_parallel}; change the layout or the number of ranks")
        return world_size // model_parallel


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this rank computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def init_process_group() -> None:
    """Initialise torch.distributed from the environment (torchrun) if it is not already."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a single process started without torchrun
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _free_port() -> int:
    from ttt_train.runtime.local_ranks import free_port

    return free_port()


def initialize(parallel: ParallelConfig) -> int:
    """Set up process groups, megatron's parallel state and RNG; return the data-parallel size.

    Idempotent with respect to torch.distributed; re-initialises megatron's model-parallel state
    (so tests can switch layouts in one process group).
    """
    if not has_cuda():
        from ttt_train.runtime import cpu_compat

        cpu_compat.apply()
    init_process_group()
    dp = parallel.validate(dist.get_world_size())
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
    )
    if has_cuda():
        tensor_parallel.model_parallel_cuda_manual_seed(parallel.seed)
    else:
        from ttt_train.runtime import cpu_compat

        cpu_compat.seed_cpu_rng_tracker(parallel.seed)
    return dp


def destroy() -> None:
    """Tear down megatron's parallel state and the process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

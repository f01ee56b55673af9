"""Every call into megatron-core's dist_checkpointing, in one place (version differences go
through here): sharded state dicts of models and optimizers, saving, loading, reading what a
checkpoint stores.

Model chunks are the training wrappers (DDP, Float16Module) or bare models; their state is keyed
"model" (one chunk) or "model0", "model1", ... (virtual pipeline chunks).
"""

from __future__ import annotations

from pathlib import Path

from ttt_train.checkpoint import ranks
from ttt_train.runtime import megatron_compat

DISTRIB_OPTIM_SHARDING = "fully_reshardable"


def model_keys(model_chunks) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def model_state(model_chunks) -> dict:
    """Sharded state dicts of the bare models (wrappers such as DDP and Float16Module removed)."""
    from megatron.core.utils import unwrap_model

    return {key: unwrap_model(chunk).sharded_state_dict()
            for key, chunk in zip(model_keys(model_chunks), model_chunks)}


def optimizer_state(optimizer, state: dict, is_loading: bool) -> dict:
    """The optimizer's sharded state dict against the model state `state` (from `model_state`)."""
    return optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                        metadata={"distrib_optim_sharding_type": DISTRIB_OPTIM_SHARDING})


def refuse_unsupported_resume(optimizer, path: Path) -> None:
    """megatron-core 0.16.1 cannot load distributed-optimizer state over torch's own Adam (no Apex /
    transformer-engine, e.g. on a CPU): its `state_dict` asserts a per-parameter `step` that a fresh
    optimizer lacks, and its loader then copies a `step` the checkpoint does not hold. Say so."""
    from megatron.core.optimizer import distrib_optimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if not distrib_optimizer.HAVE_APEX_OR_TE and any(isinstance(sub, distrib_optimizer.DistributedOptimizer)
                                                     for sub in subs):
        raise NotImplementedError(
            f"checkpoint {path}: megatron-core 0.16.1 cannot resume the distributed optimizer without Apex or "
            f"transformer-engine (torch's Adam, e.g. on a CPU); use the plain optimizer here, or load weights only "
            f"(optimizer=None)")


def global_shapes(state: dict) -> dict[str, tuple | None]:
    """Collective: {checkpoint key: global shape (None for non-tensor objects)} requested by all ranks."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    flat, _, _ = load_preprocess(state)
    flat, _ = extract_sharded_base(flat)
    local = {item.key: tuple(item.global_shape) if isinstance(item, ShardedTensor) else None
             for item in nested_values(flat)}
    return {key: shape for part in ranks.gather(local) for key, shape in part.items()}


def stored_shapes(path: Path) -> dict[str, tuple | None]:
    """{key: global shape (None for non-tensor objects)} of what the checkpoint at `path` holds."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    items = {item.key: item for item in load_sharded_metadata(str(path)).values()}
    return {key: tuple(items[key].global_shape) if isinstance(items[key], ShardedTensor) else None
            for key in megatron_compat.stored_tensor_keys(items)}


def save(state: dict, folder: Path) -> None:
    """Collective: write `state` (model and optimizer sharded state) into `folder` (torch_dist format)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, str(folder))


def load(state: dict, folder: Path, *, allow_unexpected: bool) -> dict:
    """Collective: `state` filled from `folder`. allow_unexpected: log (rather than assume absent)
    requested tensors the checkpoint lacks (a non-strict load)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    return dist_checkpointing.load(state, str(folder), strict=StrictHandling.LOG_UNEXPECTED if allow_unexpected
                                   else StrictHandling.ASSUME_OK_UNEXPECTED)


def load_into_models(model_chunks, loaded: dict, strict: bool) -> None:
    """Copy the loaded model state (from `load`) into the bare models."""
    from megatron.core.utils import unwrap_model

    for key, chunk in zip(model_keys(model_chunks), model_chunks):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=strict)


def state_bytes(state: dict) -> int:
    """Collective: bytes of tensor data the checkpoint of `state` writes (main replicas of every
    rank, the tensor files' payload: an estimate of its size before it is written)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    local = 0
    for item in nested_values(state):
        if isinstance(item, ShardedTensor | ShardedTensorFactory) and item.data is not None and \
                _is_main_replica(item.replica_id):
            local += item.data.numel() * item.data.element_size()
    return sum(ranks.gather(local))


def _is_main_replica(replica_id) -> bool:
    return all(r == 0 for r in replica_id) if isinstance(replica_id, tuple) else replica_id == 0


def write_errors() -> tuple[type[BaseException], ...]:
    """What a failed `save` raises: any Exception, and torch's CheckpointException (a BaseException
    raised on every rank when a writer process of any rank failed)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return Exception, CheckpointException


def failure_cause(err: BaseException) -> str:
    """One line for a failed save or load: the innermost OSError's text when there is one (e.g.
    "[Errno 28] No space left on device: 'path'", also when a writer process's OSError reached this
    rank as text), else the innermost exception's first line."""
    import re

    from torch.distributed.checkpoint.api import CheckpointException

    def chain(exc):
        while exc is not None:
            yield exc
            if isinstance(exc, CheckpointException):
                for inner, _ in exc.failures.values():
                    yield from chain(inner)
            exc = exc.__cause__ or exc.__context__

    found = list(chain(err))
    for exc in found:
        if isinstance(exc, OSError) and exc.errno is not None:
            return str(exc)
    for exc in reversed(found):
        match = re.search(r"\[Errno \d+\][^\n]*", str(exc) if not isinstance(exc, CheckpointException) else "")
        if match:
            return match.group(0)
    lines = [str(exc).strip().splitlines() for exc in found if str(exc).strip()]
    head = lines[-1][0] if lines else ""
    return f"{type(found[-1]).__name__}: {head}" if head else type(found[-1]).__name__

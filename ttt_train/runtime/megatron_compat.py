"""Every difference between the megatron-core releases ttt-train supports (>= 0.16.1, < 0.20).

The rest of the code calls these functions instead of testing versions itself; each branch is
named (`V0_18`, ...) after the release that needs it, as read off the releases' own sources
(tags `core_v0.16.1` to `core_v0.19.0`, and the 0.19.2 wheel):

- 0.16.1, the baseline: `TransformerLayer` builds its MLP with `build_module(spec, config=...)`,
  a stock spec's MLP is a `ModuleSpec`, `common.pt` holds a checkpoint's common state.
- 0.17: MLP submodules became builder protocols (`submodules.linear_fc1(...)`; a `ModuleSpec` is
  callable), which a `ModuleSpec` of ours still satisfies; `filesystem_async.
  _get_write_results_queue` was renamed `get_write_results_queue` -> `write_results_queue`.
- 0.18: `MlpBuilder` (#3435): the layer builds `submodules.mlp(config=, pg_collection=,
  is_mtp_layer=, name=)` and calls it with `padding_mask=`; a stock spec's MLP is a
  `functools.partial(MLP.as_mlp_submodule, submodules=...)`; `MLP.__init__` takes `name` ->
  `mlp_submodules`, `mlp_init_kwargs`. `mlp_chunks_for_training` calls the MLP on pieces of the
  sequence without `padding_mask` -> `check_mlp_chunking` refuses it for In-Place TTT.
  `get_batch_on_this_cp_rank` takes `is_hybrid_cp` and reads `cp_group=None` as the whole world,
  and splits packed (THD) batches per document -> `batch_on_this_cp_rank`.
- 0.19: DDP's gradient sync calls `torch.cuda.current_stream()` -> `cpu_patch_ids` (CPU patch
  P8); a checkpoint's common state moved from `common.pt` into the torch_dist files as the object
  `common_state` (#5160) -> `dist_checkpoint_files`, `stored_tensor_keys`.
  `dist_checkpointing/strategies/base.py` was removed (#5134): ttt-train never imported it.
  THD RoPE under context parallelism was reworked (#5243): it concerns packed sequences only;
  ttt-train's padded batches take the unchanged path (its CP tests pass on 0.19.2).

`version()` reads `megatron.core.package_info` (importing megatron-core, seconds);
`dist_checkpoint_files` reads only the checkpoint folder.
"""

from __future__ import annotations

import functools
import warnings

SUPPORTED = ((0, 16, 1), (0, 20, 0))  # [lowest, first unsupported): pyproject's megatron-core range
V0_16_1 = (0, 16, 1)
V0_17 = (0, 17, 0)
V0_18 = (0, 18, 0)
V0_19 = (0, 19, 0)


class UnsupportedMegatronError(RuntimeError):
    """The installed megatron-core is outside the range ttt-train supports."""


@functools.cache
def version() -> tuple[int, int, int]:
    """The installed megatron-core release as (major, minor, patch); refuses one below 0.16.1 and
    warns (once) above the tested range."""
    from megatron.core import package_info

    found = (int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH))
    low, high = SUPPORTED
    if found < low:
        raise UnsupportedMegatronError(
            f"megatron-core {version_string(found)} is older than ttt-train supports "
            f"(>= {version_string(low)}, < {version_string(high)}); pip install 'megatron-core>=0.16.1,<0.20'")
    if found >= high:
        warnings.warn(f"megatron-core {version_string(found)} is newer than ttt-train was tested with "
                      f"(< {version_string(high)}); ttt_train/runtime/megatron_compat.py may need a new branch",
                      stacklevel=2)
    return found


def version_string(found: tuple[int, int, int] | None = None) -> str:
    return ".".join(map(str, found or version()))


def at_least(release: tuple[int, int, int]) -> bool:
    return version() >= release


def cpu_patch_ids(all_ids: tuple[str, ...]) -> tuple[str, ...]:
    """Which of `cpu_compat`'s patches this release needs on a CPU.

    V0_19: DDP's gradient sync waits on `torch.cuda.current_stream()` (P8). V0_16_1: P1 to P7.
    """
    return tuple(p for p in all_ids if p != "P8" or at_least(V0_19))


# ----------------------------------------------------------------------------- MLP construction

def mlp_submodules(mlp_spec):
    """The `MLPSubmodules` of a stock layer spec's `mlp` entry.

    V0_18: a `functools.partial(MLP.as_mlp_submodule, submodules=...)`; V0_16_1: a `ModuleSpec`.
    """
    if isinstance(mlp_spec, functools.partial):  # V0_18
        return mlp_spec.keywords["submodules"]
    return mlp_spec.submodules  # V0_16_1


def mlp_init_kwargs(*, tp_group=None, pg_collection=None, name: str | None = None) -> dict:
    """Keyword arguments for megatron's `MLP.__init__` from what `TransformerLayer` handed a custom MLP.

    V0_18: the layer passes `pg_collection` (its `.tp` is the TP group), `is_mtp_layer` and `name`;
    `MLP` takes `name`. V0_16_1: the layer passes only `config` (and `tp_group` to megatron's own
    MLP); `tp_group=None` resolves to parallel_state's TP group inside `MLP`.
    """
    if pg_collection is not None and tp_group is None:
        tp_group = getattr(pg_collection, "tp", None)
    kwargs = {"tp_group": tp_group}
    if at_least(V0_18):
        kwargs["name"] = name
    return kwargs


def check_mlp_chunking(config, what: str) -> None:
    """Refuse megatron's MLP chunking for a module that must see the whole sequence in order.

    V0_18: `mlp_chunks_for_training` (and, for inference, `mlp_chunks_for_prefill`) > 1 make the
    layer call the MLP on pieces of the sequence without `padding_mask`; In-Place TTT updates its
    fast weights chunk after chunk over the whole sequence, so it needs 1. V0_16_1 has no such fields.
    """
    for field in ("mlp_chunks_for_training", "mlp_chunks_for_prefill"):
        chunks = getattr(config, field, 1) or 1
        if chunks > 1:
            raise ValueError(f"{what}: megatron's {field}={chunks} splits the MLP along the sequence, which "
                             f"In-Place TTT cannot follow (its fast weights need the whole sequence in order); "
                             f"set {field}=1")


# ----------------------------------------------------------------------------- context parallelism

def batch_on_this_cp_rank(batch: dict, cp_group=None) -> dict:
    """This CP rank's load-balanced shards (r and 2*CP-1-r) of every `[b, s, ...]` tensor of `batch`.

    V0_18: `get_batch_on_this_cp_rank(batch, is_hybrid_cp, cp_group)`, which reads `cp_group=None`
    as the whole world, so the group is always passed; a batch without `cu_seqlens` takes the
    per-sequence split, as before; one with `cu_seqlens` (packed, THD) is split per document, and
    each document must then be padded to a multiple of 2 * CP. V0_16_1:
    `get_batch_on_this_cp_rank(batch, cp_group)`, padded batches only.
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    from ttt_train.runtime.cp_attention_rules import check_thd_padding

    if cp_group is None:
        cp_group = parallel_state.get_context_parallel_group()
    if batch.get("cu_seqlens") is not None:  # packed (THD): V0_18 splits per document
        if not at_least(V0_18):
            raise ValueError(f"packed (THD) batches under context parallelism need megatron-core >= 0.18 "
                             f"(installed {version_string()}); pass padded [b, s] batches")
        batch.setdefault("cu_seqlens_padded", None)
        padded = batch["cu_seqlens_padded"]
        check_thd_padding(batch["cu_seqlens"] if padded is None else padded, cp_group.size())
    if at_least(V0_18):
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)  # V0_16_1


# ----------------------------------------------------------------------------- dist_checkpointing

def dist_checkpoint_files(folder) -> tuple[str, ...]:
    """The files a complete dist_checkpointing (torch_dist) folder holds, read off the folder itself
    (no megatron import): `metadata.json`, `.metadata`, and `common.pt` where it was written by a
    release that keeps common state there.

    V0_19: common (non-tensor) state is a ShardedObject `common_state` inside the torch_dist files;
    `metadata.json` names no `common_backend`. V0_16_1: `common.pt`, named by `common_backend`.
    """
    import json
    from pathlib import Path

    files = ("metadata.json", ".metadata")
    try:
        config = json.loads((Path(folder) / "metadata.json").read_text())
    except (OSError, ValueError):
        return files + ("common.pt",)  # unreadable: ask for everything any release writes
    return files + (("common.pt",) if "common_backend" in config else ())


def stored_tensor_keys(keys):
    """Checkpoint keys of the application's state, without dist_checkpointing's own entries
    (V0_19: `common_state`, the common state's ShardedObject)."""
    return [key for key in keys if key != "common_state"]


def write_results_queue():
    """Start (or get) dist_checkpointing's result-queue manager process.

    V0_17: `strategies.filesystem_async.get_write_results_queue`; V0_16_1: `_get_write_results_queue`.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if at_least(V0_17):
        return filesystem_async.get_write_results_queue()
    return filesystem_async._get_write_results_queue()  # V0_16_1

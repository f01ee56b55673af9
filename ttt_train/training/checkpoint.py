"""Atomic, resharding, self-describing checkpoints with megatron's dist_checkpointing.

Layout of a checkpoint root:

    root/
      iter_0000100/                 one complete checkpoint
        ... megatron shards ...     (dist_checkpointing torch_dist format)
        rank_states/rank_00000.pt   optional per-rank state (RNG, data position), one file per rank
        ttt_meta.json               step, metadata, manifest, tensor keys (written last)
      latest                        text file: name of the most recently saved checkpoint

A save writes everything into `iter_XXXXXXX.tmp-<nonce>` and renames it into place only when
every rank has finished. A re-save of an existing step first renames the old folder aside
(`iter_XXXXXXX.old-<nonce>`), renames the new one in, updates `latest`, then deletes the old
one, so a crash at any point leaves a loadable checkpoint: `latest_checkpoint` falls back to the
aside copy when a crash fell between the two renames. Leftover `*.tmp-*` / `*.old-*` folders of
crashed saves are removed by the next successful save.

The manifest (`build_manifest`) records the model, TTT and parallel configuration, the dtype and
the tokenizer / data fingerprints. Loading works at any other TP/PP/DP layout (dist_checkpointing
reshards), refuses missing, unexpected and mis-shaped tensors by name, and with `expect_manifest`
refuses a checkpoint of another model or TTT configuration.

Optimizer state: the plain optimizer resumes bit-exactly on the same layout and loads at another
TP/PP/DP layout. The distributed optimizer is saved in megatron's `fully_reshardable` format
(gathered per parameter on DP rank 0 at save time; loadable at any TP/PP/DP layout, unlike
`dp_reshardable`; 0.16.1's `fully_sharded_model_space` fails at save with "flattened_range is not
supported"). Without Apex or transformer-engine (torch's Adam, e.g. on a CPU) megatron-core 0.16.1
cannot load distributed-optimizer state (see `_refuse_unsupported_resume` and
shared/notes/megatron_cpu.md): use the plain optimizer there.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ttt_train.runtime import megatron_compat

LATEST = "latest"
META = "ttt_meta.json"
RANK_STATES = "rank_states"
FORMAT = 2
DISTRIB_OPTIM_SHARDING = "fully_reshardable"
_NO_FOLDER = "the folder itself"
# Configuration keys that do not change what the tensors mean: a label.
_MANIFEST_IGNORED = {"model": {"name"}}


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def _step_of(name: str) -> int | None:
    if name.startswith("iter_") and name[5:].isdigit():
        return int(name[5:])
    return None


# ----------------------------------------------------------------------------- manifest

def _as_dict(value):
    if value is None or isinstance(value, dict):
        return value
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"expected a config dataclass, a dict or None, got {type(value).__name__}")


def tokenizer_manifest(tokenizer) -> dict | None:
    """{"spec", "fingerprint", "vocab_size"} of a `Tokenizer` (spec made portable: "byte" or an absolute path)."""
    if tokenizer is None or isinstance(tokenizer, dict):
        return tokenizer
    spec = str(getattr(tokenizer, "spec", None) or tokenizer.name)
    if spec != "byte":
        spec = str(Path(spec).expanduser().resolve())
    return {"spec": spec, "fingerprint": tokenizer.fingerprint, "vocab_size": int(tokenizer.vocab_size)}


def build_manifest(model_cfg, ttt_cfg, parallel, dtype: str = "fp32", tokenizer=None,
                   data_fingerprint: str | None = None) -> dict:
    """What a checkpoint was trained with: model / TTT / parallel config (as dicts), dtype, tokenizer, data.

    `ttt_cfg` None (or disabled) records a model without TTT; `tokenizer` is a `Tokenizer` or its
    manifest dict.
    """
    ttt = _as_dict(ttt_cfg)
    if ttt is not None and not ttt.get("enabled", True):
        ttt = None
    return {"model": _as_dict(model_cfg), "ttt": ttt, "parallel": _as_dict(parallel), "dtype": dtype,
            "tokenizer": tokenizer_manifest(tokenizer), "data_fingerprint": data_fingerprint}


def manifest_differences(stored: dict | None, expected: dict) -> list[str]:
    """'section.key: checkpoint X, expected Y' for every model / TTT / tokenizer difference.

    Only the sections (and, inside `model` and `ttt`, the keys) present in `expected` are compared,
    so a caller can leave out what it means to change (e.g. `model.yarn` at a stage hand-off).
    The parallel layout, dtype and data fingerprint are never compared (loading reshards).
    """
    if stored is None:
        return ["manifest: the checkpoint has none (saved without manifest=)"]
    diffs = []
    for section in ("model", "ttt"):
        if section not in expected:
            continue
        want, have = _as_dict(expected[section]), stored.get(section)
        if section == "ttt" and want is not None and not want.get("enabled", True):
            want = None
        if want is None or have is None:
            if (want is None) != (have is None):
                diffs.append(f"{section}: checkpoint {'has no TTT' if have is None else 'has TTT'}, "
                             f"expected {'none' if want is None else 'TTT'}")
            continue
        for key in sorted(set(want) - _MANIFEST_IGNORED.get(section, set())):
            if have.get(key, "<absent>") != want[key]:
                diffs.append(f"{section}.{key}: checkpoint {have.get(key, '<absent>')!r}, expected {want[key]!r}")
    want_tok, have_tok = expected.get("tokenizer"), stored.get("tokenizer")
    if want_tok and have_tok:
        want_tok = tokenizer_manifest(want_tok)
        if want_tok["fingerprint"] != have_tok["fingerprint"]:
            diffs.append(f"tokenizer: checkpoint {have_tok['spec']} (fingerprint {have_tok['fingerprint']}), "
                         f"expected {want_tok['spec']} (fingerprint {want_tok['fingerprint']})")
    return diffs


# ----------------------------------------------------------------------------- collectives

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _agree(error: str | None, what: str) -> None:
    """Collective: raise the same RuntimeError on every rank if any rank reports an error."""
    errors = [None] * _world()
    dist.all_gather_object(errors, error)
    bad = [(rank, e) for rank, e in enumerate(errors) if e]
    if bad:
        raise RuntimeError(f"{what} failed on rank {bad[0][0]}: {bad[0][1]}")


def _on_rank0(fn, what: str):
    """Run `fn()` on rank 0; every rank raises if it failed. Returns fn's (broadcast) result."""
    holder = [None, None]
    if _rank() == 0:
        try:
            holder = [fn(), None]
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            holder = [None, f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(holder, src=0)
    if holder[1]:
        raise RuntimeError(f"{what} failed on rank 0: {holder[1]}")
    return holder[0]


# ----------------------------------------------------------------------------- sharded state

def _model_keys(model_chunks) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _sharded_model_state(model_chunks) -> dict:
    """Sharded state dicts of the bare models (wrappers such as DDP and Float16Module removed)."""
    from megatron.core.utils import unwrap_model

    return {key: unwrap_model(chunk).sharded_state_dict()
            for key, chunk in zip(_model_keys(model_chunks), model_chunks)}


def _optimizer_state(optimizer, model_state: dict, is_loading: bool) -> dict:
    return optimizer.sharded_state_dict(dict(model_state), is_loading=is_loading,
                                        metadata={"distrib_optim_sharding_type": DISTRIB_OPTIM_SHARDING})


def _refuse_unsupported_resume(optimizer, path: Path) -> None:
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


def _global_shapes(sharded_state: dict) -> dict[str, tuple | None]:
    """Collective: {checkpoint key: global shape (None for non-tensor objects)} requested by all ranks."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    flat, _, _ = load_preprocess(sharded_state)
    flat, _ = extract_sharded_base(flat)
    local = {item.key: tuple(item.global_shape) if isinstance(item, ShardedTensor) else None
             for item in nested_values(flat)}
    gathered = [None] * _world()
    dist.all_gather_object(gathered, local)
    return {key: shape for part in gathered for key, shape in part.items()}


def _stored_shapes(path: Path) -> dict[str, tuple | None]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    items = {item.key: item for item in load_sharded_metadata(str(path)).values()}
    return {key: tuple(items[key].global_shape) if isinstance(items[key], ShardedTensor) else None
            for key in megatron_compat.stored_tensor_keys(items)}


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _mismatches(requested: dict, stored: dict) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(set(stored) - set(requested), key=_natural)
    unexpected = sorted(set(requested) - set(stored), key=_natural)
    misshaped = sorted((f"{key} (checkpoint {list(stored[key])}, model {list(requested[key])})"
                       for key in set(requested) & set(stored)
                       if requested[key] is not None and stored[key] is not None and requested[key] != stored[key]), key=_natural)
    return missing, unexpected, misshaped


def _short(names: list[str], limit: int = 12) -> str:
    """Names for a one-line message: extra-state objects left out, layers folded ('layers.{2,3}.x')."""
    groups: dict[str, list[str]] = {}
    for name in names:
        if name.endswith("._extra_state"):
            continue
        match = re.search(r"layers\.(\d+)\.", name)
        pattern = name if match is None else name[:match.start(1)] + "{}" + name[match.end(1):]
        groups.setdefault(pattern, []).append(match.group(1) if match else "")
    folded = [pattern.format(numbers[0] if len(numbers) == 1 else "{" + ",".join(numbers) + "}")
              for pattern, numbers in groups.items()]
    if not folded and names:
        folded = names
    return ", ".join(folded[:limit]) + (f" and {len(folded) - limit} more" if len(folded) > limit else "")


# ----------------------------------------------------------------------------- save

def save_checkpoint(root: str | os.PathLike, step: int, model_chunks, optimizer=None, metadata: dict | None = None,
                    *, manifest: dict | None = None, rank_state=None, keep_last: int | None = None) -> Path:
    """Save model (and optimizer) state of all ranks as checkpoint `step` under `root`; return its path.

    Collective: every rank calls it. `metadata`: JSON-serialisable step-level state. `manifest`:
    from `build_manifest`. `rank_state`: any torch.save-able object of this rank (RNG states, data
    position), read back with `load_rank_state`. `keep_last`: afterwards keep only the newest K
    complete checkpoints (the one just saved always stays).
    """
    from megatron.core import dist_checkpointing

    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")
    meta_text = json.dumps({"format": FORMAT, "step": step, "metadata": metadata or {}, "manifest": manifest},
                           indent=1)  # fails early, on every rank alike, if not JSON-serialisable
    root = Path(root)
    final = root / checkpoint_name(step)

    def make_tmp() -> str:
        tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return str(tmp)

    tmp = Path(_on_rank0(make_tmp, f"creating a checkpoint folder under {root}"))
    state = _sharded_model_state(model_chunks)
    model_shapes = _global_shapes(state)
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(optimizer, state, is_loading=False)
    dist_checkpointing.save(state, str(tmp))
    error = None
    if rank_state is not None:
        try:
            _write_rank_state(tmp, rank_state)
        except Exception as err:  # noqa: BLE001 - reported on every rank by _agree
            error = f"{type(err).__name__}: {err}"
    _agree(error, f"writing the rank states of {final}")
    has_rank_state = [None] * _world()
    dist.all_gather_object(has_rank_state, rank_state is not None)

    def publish() -> str:
        meta = json.loads(meta_text)
        meta.update(world_size=_world(), rank_states=all(has_rank_state), optimizer=optimizer is not None,
                    model_keys=sorted(model_shapes))
        _write_atomic(tmp / META, json.dumps(meta, indent=1))
        aside = None
        if final.exists():  # an older save of the same step: replace it without a gap
            aside = root / f"{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, aside)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        _remove_leftovers(root)
        if keep_last is not None:
            _keep_newest(root, keep_last, final.name)
        return str(final)

    return Path(_on_rank0(publish, f"publishing checkpoint {final}"))


def _write_rank_state(folder: Path, rank_state) -> None:
    target = folder / RANK_STATES / f"rank_{_rank():05d}.pt"
    target.parent.mkdir(exist_ok=True)
    buf = io.BytesIO()
    torch.save(rank_state, buf)
    _write_atomic(target, buf.getvalue())


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def _remove_leftovers(root: Path) -> None:
    """Delete `*.tmp-*` and `*.old-*` folders (crashed or replaced saves) and stray `latest` temp files."""
    for path in root.iterdir():
        if path.is_dir() and (".tmp-" in path.name or ".old-" in path.name) and path.name.startswith("iter_"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name.startswith(f".{LATEST}."):
            path.unlink(missing_ok=True)


def _keep_newest(root: Path, keep: int, current: str) -> None:
    complete = sorted((p for p in root.iterdir() if _step_of(p.name) is not None and not _missing_parts(p)),
                      key=lambda p: _step_of(p.name))
    for path in complete[:-keep]:
        if path.name != current:  # renamed first, so a crash mid-delete leaves no half folder
            aside = root / f"{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, aside)
            shutil.rmtree(aside)


# ----------------------------------------------------------------------------- find and read

def _missing_parts(path: Path) -> list[str]:
    """What a complete checkpoint folder has and `path` lacks ([] when complete)."""
    if not path.is_dir():
        return [_NO_FOLDER]
    missing = [name for name in (META,) + megatron_compat.dist_checkpoint_files(path) if not (path / name).exists()]
    if META not in missing:
        meta = json.loads((path / META).read_text())
        if meta.get("rank_states"):
            missing += [f"{RANK_STATES}/rank_{r:05d}.pt" for r in range(meta["world_size"])
                        if not (path / RANK_STATES / f"rank_{r:05d}.pt").is_file()]
    return missing


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """Path of the checkpoint `root/latest` names, or None if there is no `latest`.

    Raises FileNotFoundError naming the folder and what it lacks if that checkpoint is incomplete.
    A re-save interrupted between its two renames is found in its aside copy.
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.exists():
        asides = sorted(p for p in root.glob(f"{path.name}.old-*") if not _missing_parts(p))
        if asides:
            return asides[0]
    missing = _missing_parts(path)
    if missing:
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete "
                                f"({_describe_missing(missing)}); point {pointer} at a complete iter_* folder "
                                f"or remove it to start afresh")
    return path


def _describe_missing(missing: list[str]) -> str:
    return "no such folder" if missing == [_NO_FOLDER] else f"lacks {', '.join(missing)}"


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / LATEST).is_file():
        return latest_checkpoint(path)
    missing = _missing_parts(path)
    if missing:
        raise FileNotFoundError(f"{path} is not a complete ttt-train checkpoint ({_describe_missing(missing)}); "
                                f"give an iter_* folder or a checkpoint root holding '{LATEST}'")
    return path


def _read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def read_checkpoint_info(path: str | os.PathLike) -> dict:
    """{"step", "manifest", "metadata", "path"} of a checkpoint (an iter_* folder or a root with `latest`).

    Needs no torch.distributed. `manifest` is None for checkpoints saved without one.
    """
    path = _resolve(path)
    meta = _read_meta(path)
    return {"step": meta["step"], "manifest": meta.get("manifest"), "metadata": meta.get("metadata", {}),
            "path": path}


def load_rank_state(path: str | os.PathLike):
    """This rank's `rank_state` of a checkpoint, or None if absent or saved with another world size."""
    path = _resolve(path)
    meta = _read_meta(path)
    file = path / RANK_STATES / f"rank_{_rank():05d}.pt"
    if meta.get("world_size") != _world() or not file.is_file():
        return None
    return torch.load(file, weights_only=False)  # our own file: RNG states hold numpy arrays


# ----------------------------------------------------------------------------- load

def load_checkpoint(path: str | os.PathLike, model_chunks, optimizer=None, *, strict: bool = True,
                    expect_manifest: dict | None = None) -> dict:
    """Load a checkpoint (an iter_* folder or a root with `latest`) into `model_chunks` (and `optimizer`).

    Collective. Works across TP/PP/DP layouts. Returns `read_checkpoint_info(path)`.
    strict: refuse (ValueError naming them) checkpoint tensors the model lacks, model tensors the
    checkpoint lacks and tensors of another global shape. strict=False loads the tensors both have
    (e.g. a plain checkpoint into a TTT model: the TTT tensors keep their initialisation); shapes
    and the optimizer's tensors must still match. `expect_manifest`: see `manifest_differences`.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.utils import unwrap_model

    path = _resolve(path)
    info = read_checkpoint_info(path)
    if expect_manifest is not None:
        diffs = manifest_differences(info["manifest"], expect_manifest)
        if diffs:
            raise ValueError(f"checkpoint {path} was saved with another configuration: {'; '.join(diffs)}")
    meta = _read_meta(path)
    if optimizer is not None and not meta.get("optimizer", True):
        raise ValueError(f"checkpoint {path} holds no optimizer state; load it without an optimizer "
                         f"(weights only) or resume from a checkpoint saved with one")
    state = _sharded_model_state(model_chunks)
    requested = _global_shapes(state)
    stored = _stored_shapes(path)
    saved_model = set(meta.get("model_keys") or (k for k in stored if not k.startswith("optimizer.")))
    missing, unexpected, misshaped = _mismatches(requested, {k: v for k, v in stored.items() if k in saved_model})
    if misshaped:
        raise ValueError(f"checkpoint {path} does not fit the model: tensors of another shape: "
                         f"{_short(misshaped)}")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"checkpoint tensors the model lacks: {_short(missing)}")
        if unexpected:
            parts.append(f"model tensors the checkpoint lacks: {_short(unexpected)}")
        raise ValueError(f"checkpoint {path} does not fit the model ({'; '.join(parts)}); compare the model / "
                         f"TTT configuration with the checkpoint's manifest, or load with strict=False")
    if optimizer is not None:
        _refuse_unsupported_resume(optimizer, path)
        state["optimizer"] = _optimizer_state(optimizer, state, is_loading=True)
        opt_missing, opt_unexpected, opt_misshaped = _mismatches(
            _global_shapes({"optimizer": state["optimizer"]}),
            {k: v for k, v in stored.items() if k not in saved_model})
        if opt_missing or opt_unexpected or opt_misshaped:
            raise ValueError(f"checkpoint {path}: its optimizer state does not fit this optimizer "
                             f"(checkpoint tensors not requested: {_short(opt_missing) or 'none'}; requested "
                             f"tensors absent: {_short(opt_unexpected) or 'none'}; other shape: "
                             f"{_short(opt_misshaped) or 'none'}); load weights only (optimizer=None) to start "
                             f"a fresh optimizer")
    if (missing or unexpected) and _rank() == 0:
        warnings.warn(f"checkpoint {path}: not loaded: {_short(missing)}; left as initialised: {_short(unexpected)}",
                      stacklevel=2)
    loaded = dist_checkpointing.load(state, str(path), strict=StrictHandling.LOG_UNEXPECTED if unexpected
                                     else StrictHandling.ASSUME_OK_UNEXPECTED)
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return info

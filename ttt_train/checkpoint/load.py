"""Loading a checkpoint into model chunks (and an optimizer), at any TP/PP/DP layout, refusing by
name what does not fit; and this rank's own state."""

from __future__ import annotations

import os
import re
import warnings

import torch

from ttt_train.checkpoint import integrity, ranks, sharded
from ttt_train.checkpoint.format import rank_state_file, read_checkpoint_info, read_meta, resolve
from ttt_train.checkpoint.manifest import manifest_differences


def load_rank_state(path: str | os.PathLike):
    """This rank's `rank_state` of a checkpoint, or None if absent or saved with another world size."""
    path = resolve(path)
    meta = read_meta(path)
    file = rank_state_file(path, ranks.rank())
    if meta.get("world_size") != ranks.world() or not file.is_file():
        return None
    return torch.load(file, weights_only=False)  # our own file: RNG states hold numpy arrays


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


TTT_ONLY = ".mlp.ttt_target."
"""What names the tensors only an In-Place TTT layer has (its LM-aligned target: conv and projection)."""


def load_checkpoint(path: str | os.PathLike, model_chunks, optimizer=None, *, strict: bool = True,
                    expect_manifest: dict | None = None, new_ttt: bool = False) -> dict:
    """Load a checkpoint (an iter_* folder or a root with `latest`) into `model_chunks` (and `optimizer`).

    Collective. Works across TP/PP/DP layouts. Returns `read_checkpoint_info(path)`. The files are
    verified first (sizes and checksums, `integrity.verify`): CheckpointDamaged names what is wrong.
    strict: refuse (ValueError naming them) checkpoint tensors the model lacks, model tensors the
    checkpoint lacks and tensors of another global shape. strict=False loads the tensors both have
    (e.g. a plain checkpoint into a TTT model: the TTT tensors keep their initialisation); shapes
    and the optimizer's tensors must still match. `expect_manifest`: see `manifest_differences`.
    new_ttt: In-Place TTT inserted into a checkpoint without it: the model's TTT target tensors are
    the only ones the checkpoint may lack (they keep their initialisation); anything else missing
    is refused as with `strict`.
    """
    path = resolve(path)
    problems = integrity.verify(path)
    if problems:
        raise integrity.CheckpointDamaged(f"checkpoint {path} is damaged: {', '.join(problems)}; load an older "
                                          f"iter_* folder of {path.parent} or restore the files")
    info = read_checkpoint_info(path)
    if expect_manifest is not None:
        diffs = manifest_differences(info["manifest"], expect_manifest)
        if diffs:
            raise ValueError(f"checkpoint {path} was saved with another configuration: {'; '.join(diffs)}")
    meta = read_meta(path)
    if optimizer is not None and not meta.get("optimizer", True):
        raise ValueError(f"checkpoint {path} holds no optimizer state; load it without an optimizer "
                         f"(weights only) or resume from a checkpoint saved with one")
    state = sharded.model_state(model_chunks)
    requested = sharded.global_shapes(state)
    stored = sharded.stored_shapes(path)
    saved_model = set(meta.get("model_keys") or (k for k in stored if not k.startswith("optimizer.")))
    missing, unexpected, misshaped = _mismatches(requested, {k: v for k, v in stored.items() if k in saved_model})
    if misshaped:
        raise ValueError(f"checkpoint {path} does not fit the model: tensors of another shape: "
                         f"{_short(misshaped)}")
    if new_ttt:
        unexpected_other = [k for k in unexpected if TTT_ONLY not in k and not k.endswith("._extra_state")]
        if missing or unexpected_other:
            parts = [f"checkpoint tensors the model lacks: {_short(missing)}"] if missing else []
            parts += [f"model tensors other than TTT's the checkpoint lacks: {_short(unexpected_other)}"] \
                if unexpected_other else []
            raise ValueError(f"checkpoint {path}: In-Place TTT cannot be inserted ({'; '.join(parts)}); compare "
                             f"the model configuration with the checkpoint's manifest")
    elif strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"checkpoint tensors the model lacks: {_short(missing)}")
        if unexpected:
            parts.append(f"model tensors the checkpoint lacks: {_short(unexpected)}")
        raise ValueError(f"checkpoint {path} does not fit the model ({'; '.join(parts)}); compare the model / "
                         f"TTT configuration with the checkpoint's manifest, or load with strict=False")
    if optimizer is not None:
        sharded.refuse_unsupported_resume(optimizer, path)
        state["optimizer"] = sharded.optimizer_state(optimizer, state, is_loading=True)
        opt_missing, opt_unexpected, opt_misshaped = _mismatches(
            sharded.global_shapes({"optimizer": state["optimizer"]}),
            {k: v for k, v in stored.items() if k not in saved_model})
        if opt_missing or opt_unexpected or opt_misshaped:
            raise ValueError(f"checkpoint {path}: its optimizer state does not fit this optimizer "
                             f"(checkpoint tensors not requested: {_short(opt_missing) or 'none'}; requested "
                             f"tensors absent: {_short(opt_unexpected) or 'none'}; other shape: "
                             f"{_short(opt_misshaped) or 'none'}); load weights only (optimizer=None) to start "
                             f"a fresh optimizer")
    if (missing or unexpected) and not new_ttt and ranks.rank() == 0:
        warnings.warn(f"checkpoint {path}: not loaded: {_short(missing)}; left as initialised: {_short(unexpected)}",
                      stacklevel=2)
    loaded = sharded.load(state, path, allow_unexpected=bool(unexpected))
    sharded.load_into_models(model_chunks, loaded, strict and not new_ttt)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return info

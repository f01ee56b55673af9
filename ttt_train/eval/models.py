"""The models an evaluation compares: HF directories (exported or plain transformers models) or
ttt-train checkpoints exported on the fly, their labels, and loading them for inference.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

_GENERIC_NAMES = {"checkpoints", "stages", "hf", "export"}


@dataclass(frozen=True)
class ModelEntry:
    """`label` (tables, plots, result records), `source` (the path given, absolute) and `hf_dir` (the
    HF directory evaluated: `source` itself, or the export of the checkpoint `source` names)."""

    label: str
    source: str
    hf_dir: Path


def is_checkpoint(path: Path) -> bool:
    """A ttt-train checkpoint root (holds `latest`) or one iter_* checkpoint folder."""
    return (path / "latest").is_file() or (path.name.startswith("iter_") and (path / "ttt_meta.json").is_file())


def default_label(path: Path) -> str:
    """The folder's name; for a checkpoint, its run's name (the folder above `stages/`, else the first
    folder above it that is not generic like `checkpoints` or `iter_*`)."""
    parts = path.resolve().parts
    if is_checkpoint(path):
        if "stages" in parts[:-1]:
            return parts[len(parts) - 1 - parts[::-1].index("stages") - 1]
        names = [p for p in reversed(parts) if p not in _GENERIC_NAMES and not p.startswith("iter_")]
        return names[0] if names else path.name
    return path.name


def export_cached(checkpoint: Path, cache_dir: Path) -> Path:
    """HF directory of `checkpoint` (root or iter_* folder), exported by
    `ttt_train.models.hf.export_checkpoint` (verified) into `cache_dir` once per iter_* folder path."""
    from ttt_train.checkpoint import read_checkpoint_info

    source = Path(read_checkpoint_info(checkpoint)["path"]).resolve()
    out = cache_dir / f"{default_label(checkpoint)}-{source.name}-{hashlib.sha256(str(source).encode()).hexdigest()[:8]}"
    stamp = out / "ttt_export_source.json"  # written once the export is verified
    if stamp.is_file():
        return out
    if out.exists():  # an export whose verification failed or was interrupted
        shutil.rmtree(out)
    from ttt_train.models.hf import export_checkpoint  # heavy (megatron): only when a checkpoint is given

    print(f"exporting checkpoint {source} -> {out}")
    export_checkpoint(source, out)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps({"checkpoint": str(source)}) + "\n")
    os.replace(tmp, stamp)
    return out


def resolve_models(paths: list[str], labels: list[str] | None, cache_dir: str) -> list[ModelEntry]:
    """One entry per path, in order; checkpoints are exported (cached). Refuses (naming the key and
    the path) a missing path, a folder that is neither an HF directory nor a checkpoint, and
    duplicate labels."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"labels: {len(labels)} labels for {len(paths)} models; give one per model or none")
    chosen = list(labels) if labels is not None else [default_label(Path(p).expanduser()) for p in paths]
    duplicates = sorted({label for label in chosen if chosen.count(label) > 1})
    if duplicates:
        raise ValueError(f"models: several models are labelled {duplicates}; name them with labels=[A,B,...]")
    entries = []
    for path_str, label in zip(paths, chosen):
        path = Path(path_str).expanduser().absolute()
        if not path.exists():
            raise FileNotFoundError(f"models: {path} does not exist")
        if is_checkpoint(path):
            hf_dir = export_cached(path, Path(cache_dir).expanduser().absolute())
        elif (path / "config.json").is_file():
            hf_dir = path
        else:
            raise ValueError(
                f"models: {path} is neither an HF directory (no config.json) nor a ttt-train checkpoint "
                "(no `latest`, not an iter_* folder with ttt_meta.json)"
            )
        entries.append(ModelEntry(label, str(path), hf_dir))
    return entries


def load_model(hf_dir: Path, *, dtype: str, device: str, ttt_lr: float | None = None,
               ttt_max_update_norm: float | None = None):
    """(model in eval mode on `device`, tokenizer with left padding) of an HF directory.

    `ttt_lr` / `ttt_max_update_norm` override the In-Place TTT inner lr and clip tau at inference
    (from_pretrained kwargs); giving one for a model without TTT is an error.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=True)
    overrides = {k: v for k, v in (("ttt_lr", ttt_lr), ("ttt_max_update_norm", ttt_max_update_norm)) if v is not None}
    if overrides and not getattr(config, "ttt_mode", False):
        raise ValueError(
            f"ttt.lr / ttt.max_update_norm: model {hf_dir} has no In-Place TTT (config.json has no ttt_mode); "
            "drop these overrides for it"
        )
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch_dtype, **overrides)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {hf_dir} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device

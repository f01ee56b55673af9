"""HuggingFace folder -> ttt-train dist_checkpoint (`python -m ttt_train.convert import ...`).

Output root `out/`: `iter_0000000/` + `latest` (loads at any TP/PP layout; its manifest records
the model, TTT and tokenizer), `model.yaml` (and `ttt.yaml` with TTT) beside it, and `tokenizer/`
(the folder's tokenizer files; the manifest's tokenizer spec is its absolute path). A non-empty `out`
is refused (`force` replaces an earlier import, nothing else); the root is written beside it and
renamed into place. Collective when run on several ranks (torchrun or `run_local_ranks`); a single
process otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch.distributed as dist

from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models.config import ModelConfig
from ttt_train.models.hf.hf_config import (
    config_mismatches,
    model_config_from_cfg,
    read_hf_config,
    ttt_config_from_cfg,
)
from ttt_train.models.hf.hf_files import SafetensorsFolder
from ttt_train.models.hf.loader import hf_ttt_layers, load_hf_weights
from ttt_train.models.hf.out_dir import check_out, sibling_tmp, swap_in
from ttt_train.runtime.distributed import ParallelConfig

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def resolve_configs(hf_dir: str | Path, preset: ModelConfig | None = None,
                    ttt: TTTConfig | None = None) -> tuple[ModelConfig, TTTConfig | None]:
    """The model config (from config.json, or `preset` when it agrees on every shape field) and the
    TTT config (`ttt`, else the folder's official-release `ttt_*` keys, else None)."""
    cfg = read_hf_config(hf_dir)
    where = str(Path(hf_dir) / "config.json")
    model_cfg = model_config_from_cfg(cfg, Path(hf_dir).resolve().name, where)
    if preset is not None:
        mismatches = config_mismatches(preset, model_cfg)
        if mismatches:
            raise ValueError(f"preset {preset.name!r} does not match {where}: " + "; ".join(mismatches))
        model_cfg = preset
    if ttt is None:
        files = SafetensorsFolder(hf_dir)
        conv = next((files.shape(f"model.layers.{i}.mlp.ttt_conv.weight")[-1]
                     for i in sorted(hf_ttt_layers(files.names()))), None)
        ttt, dropped = ttt_config_from_cfg(cfg, model_cfg.num_layers, conv)
        if dropped:
            log.warning("%s: ttt_layers %s do not exist in this %d-layer model: dropped", where, dropped,
                        model_cfg.num_layers)
    return model_cfg, ttt


def copy_tokenizer(hf_dir: Path, out: Path) -> Path | None:
    """Copy the tokenizer files of `hf_dir` into `out/tokenizer`; None if it has none."""
    files = [hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
    if not files:
        return None
    folder = out / "tokenizer"
    folder.mkdir()
    for file in files:
        shutil.copy2(file, folder / file.name)
    return folder.resolve()


def _write_side_files(hf_dir: Path, out: Path, model_cfg: ModelConfig, ttt: TTTConfig | None) -> Path | None:
    """Tokenizer, model.yaml and ttt.yaml into the (temporary, not yet visible) root `out`."""
    from omegaconf import OmegaConf

    tokenizer = copy_tokenizer(hf_dir, out)
    (out / "model.yaml").write_text(OmegaConf.to_yaml(dataclasses.asdict(model_cfg)))
    if ttt is not None:
        (out / "ttt.yaml").write_text(OmegaConf.to_yaml(dataclasses.asdict(ttt)))
    return tokenizer


def _broadcast(value):
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


IMPORT_ENTRIES = {"iter_0000000", "latest", "model.yaml", "ttt.yaml", "tokenizer"}


def earlier_import(out: Path) -> str | None:
    """None when `out` holds only what `import_hf` writes (its checkpoint records `imported_from`),
    else what shows it is something else (e.g. a run's checkpoints)."""
    from ttt_train.checkpoint import read_checkpoint_info

    others = sorted(p.name for p in out.iterdir() if p.name not in IMPORT_ENTRIES and not p.name.startswith("."))
    if others:
        return f"it holds {others[:4]}{' ...' if len(others) > 4 else ''}"
    try:
        if "imported_from" in read_checkpoint_info(out / "iter_0000000")["metadata"]:
            return None
    except (OSError, ValueError, KeyError):
        pass
    return "its iter_0000000 does not record an import"


def import_summary(hf_dir: Path, path: Path, model_cfg: ModelConfig, ttt: TTTConfig | None, from_folder: list[int]) -> str:
    """`imported DIR -> PATH (...)`, saying which layers run In-Place TTT and where their weights came from."""
    if ttt is None:
        return f"imported {hf_dir} -> {path} (no In-Place TTT)"
    layers = ttt.layer_indices(model_cfg.num_layers)
    fresh = sorted(set(layers) - set(from_folder))
    parts = [f"target weights from the folder in layers {from_folder}"] if from_folder else []
    parts += [f"freshly initialised in layers {fresh}"] if fresh else []
    return f"imported {hf_dir} -> {path} (In-Place TTT in layers {layers}: {'; '.join(parts)})"


def import_hf(hf_dir: str | Path, out: str | Path, *, parallel: ParallelConfig | None = None,
              preset: ModelConfig | None = None, ttt: TTTConfig | None = None, verify: bool = True,
              tolerance: float = 1e-3, progress: bool = True, force: bool = False) -> Path:
    """Convert `hf_dir` into a checkpoint root `out`; return the iter_* folder. Collective.

    `out` must be absent or empty; `force` replaces an earlier import there (never anything else,
    e.g. a run's checkpoints). The root is written beside `out` and renamed onto it at the end."""
    from ttt_train.checkpoint import build_manifest, save_checkpoint, tokenizer_manifest
    from ttt_train.data.tokenizer import load_tokenizer
    from ttt_train.models import build_gpt_model, to_transformer_config
    from ttt_train.runtime.distributed import initialize

    hf_dir, out = Path(hf_dir), Path(out)
    parallel = parallel or ParallelConfig()
    check_out(out, force, "convert import", earlier_import)
    model_cfg, ttt = resolve_configs(hf_dir, preset, ttt)
    initialize(parallel)
    # every parameter is then written from the folder (or is a TTT target, initialised by its own
    # module): skip megatron's random initialisation, the slowest part of building a large model
    config = to_transformer_config(model_cfg, parallel, perform_initialization=False)
    chunks = [build_gpt_model(model_cfg, config, ttt=ttt)]
    from_folder = load_hf_weights(hf_dir, chunks, model_cfg, ttt, progress=progress)
    first = dist.get_rank() == 0
    tmp = Path(_broadcast(str(sibling_tmp(out)) if first else None))
    try:
        tokenizer_dir = _broadcast(_write_side_files(hf_dir, tmp, model_cfg, ttt) if first else None)
        tokenizer = None
        if tokenizer_dir is not None:  # recorded where it will be once the folder is renamed into place
            tokenizer = dict(tokenizer_manifest(load_tokenizer(str(tokenizer_dir))),
                             spec=str(out.resolve() / "tokenizer"))
        else:
            log.warning("%s has no tokenizer files; the checkpoint's manifest records none", hf_dir)
        manifest = build_manifest(model_cfg, ttt, parallel, dtype="fp32", tokenizer=tokenizer)
        saved = save_checkpoint(tmp, 0, chunks, metadata={"imported_from": str(hf_dir.resolve())}, manifest=manifest)
        dist.barrier()
        if first:
            swap_in(tmp, out)
        dist.barrier()
    finally:
        if first and tmp.exists():
            shutil.rmtree(tmp)
    path = out / saved.name
    if first:
        print(import_summary(hf_dir, path, model_cfg, ttt, from_folder), flush=True)
    if verify:
        verify_import(hf_dir, chunks, model_cfg, ttt, tolerance)
    return path


def verify_import(hf_dir: Path, chunks, model_cfg: ModelConfig, ttt: TTTConfig | None, tolerance: float) -> float:
    """Compare the imported model's logits with transformers' on the HF folder (collective).

    A folder with official-release TTT tensors is run with ttt-train's own HF modeling code."""
    from ttt_train.models.hf.verify import (
        compare_logits,
        hf_model_logits,
        prompt_lengths,
        sample_prompts,
    )

    with_ttt_tensors = bool(hf_ttt_layers(SafetensorsFolder(hf_dir).names()))

    def hf_logits(prompts):
        return hf_model_logits(load_hf_model(hf_dir, model_cfg, ttt if with_ttt_tensors else None), prompts)

    lengths = prompt_lengths(model_cfg.max_position_embeddings, ttt.chunk_size if ttt is not None else None)
    return compare_logits(chunks, sample_prompts(model_cfg.vocab_size, lengths), hf_logits, model_cfg.vocab_size,
                          tolerance, f"import {hf_dir.name}")


def load_hf_model(hf_dir: Path, model_cfg: ModelConfig, ttt: TTTConfig | None):
    """transformers model of `hf_dir` in float32 (with TTT: ttt-train's remote-code class)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ttt_train.models.hf.verify import load_causal_lm

    if ttt is None:
        return load_causal_lm(AutoModelForCausalLM.from_pretrained, hf_dir, dtype=torch.float32)
    from ttt_train.models.hf.exporter import remote_classes
    from ttt_train.models.hf.hf_config import family_for, hf_config_kwargs, ttt_config_keys

    config_cls, model_cls = remote_classes(family_for(model_cfg))
    config = config_cls(**hf_config_kwargs(model_cfg), **ttt_config_keys(ttt, model_cfg.num_layers))
    return load_causal_lm(model_cls.from_pretrained, hf_dir, config=config, dtype=torch.float32)

"""HuggingFace folder -> ttt-train dist_checkpoint (`python -m ttt_train.convert import ...`).

Output root `out/`: `iter_0000000/` + `latest` (loads at any TP/PP layout; its manifest records
the model, TTT and tokenizer), `model.yaml` (and `ttt.yaml` with TTT) beside it, and `tokenizer/`
(the folder's tokenizer files; the manifest's tokenizer spec is its absolute path). Collective when
run on several ranks (torchrun or `run_local_ranks`); a single process otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
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


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def copy_tokenizer(hf_dir: Path, out: Path) -> Path | None:
    """Copy the tokenizer files of `hf_dir` into `out/tokenizer` (atomically); None if it has none."""
    files = [hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
    if not files:
        return None
    final = out / "tokenizer"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tokenizer."))
    for file in files:
        shutil.copy2(file, tmp / file.name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final.resolve()


def _write_side_files(hf_dir: Path, out: Path, model_cfg: ModelConfig, ttt: TTTConfig | None) -> Path | None:
    from omegaconf import OmegaConf

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = copy_tokenizer(hf_dir, out)
    _write_text_atomic(out / "model.yaml", OmegaConf.to_yaml(dataclasses.asdict(model_cfg)))
    if ttt is not None:
        _write_text_atomic(out / "ttt.yaml", OmegaConf.to_yaml(dataclasses.asdict(ttt)))
    return tokenizer


def _broadcast(value):
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def import_hf(hf_dir: str | Path, out: str | Path, *, parallel: ParallelConfig | None = None,
              preset: ModelConfig | None = None, ttt: TTTConfig | None = None, verify: bool = True,
              tolerance: float = 1e-3, progress: bool = True) -> Path:
    """Convert `hf_dir` into a checkpoint root `out`; return the iter_* folder. Collective."""
    from ttt_train.checkpoint import build_manifest, save_checkpoint
    from ttt_train.data.tokenizer import load_tokenizer
    from ttt_train.models import build_gpt_model, to_transformer_config
    from ttt_train.runtime.distributed import initialize

    hf_dir, out = Path(hf_dir), Path(out)
    parallel = parallel or ParallelConfig()
    model_cfg, ttt = resolve_configs(hf_dir, preset, ttt)
    initialize(parallel)
    # every parameter is then written from the folder (or is a TTT target, initialised by its own
    # module): skip megatron's random initialisation, the slowest part of building a large model
    config = to_transformer_config(model_cfg, parallel, perform_initialization=False)
    chunks = [build_gpt_model(model_cfg, config, ttt=ttt)]
    load_hf_weights(hf_dir, chunks, model_cfg, ttt, progress=progress)
    tokenizer_dir = _broadcast(_write_side_files(hf_dir, out, model_cfg, ttt) if dist.get_rank() == 0 else None)
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(str(tokenizer_dir))
    else:
        log.warning("%s has no tokenizer files; the checkpoint's manifest records none", hf_dir)
    manifest = build_manifest(model_cfg, ttt, parallel, dtype="fp32", tokenizer=tokenizer)
    path = save_checkpoint(out, 0, chunks, metadata={"imported_from": str(hf_dir.resolve())}, manifest=manifest)
    if dist.get_rank() == 0:
        print(f"imported {hf_dir} -> {path}", flush=True)
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

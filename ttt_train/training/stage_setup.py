"""Everything a stage trains with, built on this rank: parallel state, tokenizer, model chunks,
optimizer, schedule, data; and where its weights come from (init, the previous stage, a resume)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy
import torch

from ttt_train.training.curriculum import Stage


@dataclasses.dataclass
class Built:
    chunks: list
    optimizer: object
    scheduler: object
    tokenizer: object
    ttt_layers: list
    train_set: object
    valid_set: object | None
    manifest: dict
    recall_set: dict | None = None  # validation.recall_records as one batch of this rank's rows


def build(stage: Stage) -> Built:
    """Initialise the stage's layout and build its model, optimizer, schedule and datasets (collective)."""
    from ttt_train.checkpoint import build_manifest
    from ttt_train.data.datasets import build_datasets, dataset_fingerprint
    from ttt_train.data.indexed import dataset_identity
    from ttt_train.data.tokenizer import load_tokenizer
    from ttt_train.models import build_gpt_model, to_transformer_config
    from ttt_train.runtime.distributed import initialize
    from ttt_train.training.optimizer import build_optimizer
    from ttt_train.training.schedule import build_scheduler, ttt_layers
    from ttt_train.training.setup import wrap_for_training

    dp = initialize(stage.parallel)
    t, validation = stage.training, stage.validation
    tokenizer = load_tokenizer(stage.data.tokenizer, stage.data.eod_token)
    valid_samples = validation.num_batches * t.micro_batch_size * dp if validation.every_steps > 0 else 0
    train_set, valid_set, _ = build_datasets(stage.data, tokenizer,
                                             (stage.steps * t.global_batch_size, valid_samples, 0))
    config = to_transformer_config(stage.model, stage.parallel, dtype=t.dtype, recompute=t.recompute)
    model = build_gpt_model(stage.model, config, ttt=stage.ttt)
    chunks = wrap_for_training(model, config, stage.ddp)
    optimizer = build_optimizer(stage.optimizer, chunks, config,
                                use_distributed_optimizer=stage.ddp.use_distributed_optimizer)
    scheduler = build_scheduler(optimizer, stage.schedule, stage.optimizer, stage.steps)
    manifest = build_manifest(stage.model, stage.ttt, stage.parallel, t.dtype, tokenizer=tokenizer,
                              data_fingerprint=dataset_fingerprint(stage.data),
                              datasets={e.path: dataset_identity(e.path) for e in stage.data.blend})
    return Built(chunks, optimizer, scheduler, tokenizer, ttt_layers(chunks), train_set,
                 valid_set if valid_samples else None, manifest, recall_rows(stage, validation, tokenizer, dp))


def recall_rows(stage: Stage, validation, tokenizer, dp: int) -> dict | None:
    """This data-parallel rank's share of `validation.recall_records` as one batch (None when off):
    the first `recall_count` records rounded down to a multiple of dp * micro_batch_size."""
    if validation.every_steps <= 0 or validation.recall_records is None:
        return None
    from megatron.core import parallel_state as ps

    from ttt_train.data.recall import read_records, recall_batch

    group = dp * stage.training.micro_batch_size
    count = validation.recall_count // group * group
    records = read_records(validation.recall_records, count)
    if len(records) < group:
        raise ValueError(f"validation.recall_records={validation.recall_records} holds {len(records)} records; "
                         f"{group} at least are needed (data-parallel size x micro_batch_size)")
    records = records[:len(records) // group * group]
    return recall_batch(records[ps.get_data_parallel_rank()::dp], tokenizer, stage.seq_length)


def rank_state() -> dict:
    """This rank's RNG states (torch, CUDA, megatron's tracker, Python, NumPy)."""
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
            "python": random.getstate(), "numpy": numpy.random.get_state()}


def restore_rank_state(state: dict | None) -> None:
    """Put back what `rank_state` captured (None: saved with another world size; seeds stay as set)."""
    from megatron.core import tensor_parallel

    if state is None:
        return
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])


def load_start(stage: Stage, built: Built, *, resume: Path | None, previous: Path | None, init,
               carry_optimizer: bool) -> dict:
    """Fill the freshly built stage from where it starts; return the checkpoint info (or {}).

    resume: this stage's own checkpoint (model, optimizer, schedule, RNG; the manifest must match).
    previous: the previous stage's final checkpoint (weights; its optimizer state too when
    `carry_optimizer`, with this stage's own learning rates), refused if of another tokenizer.
    Otherwise stage 0's `init` (held against the experiment beforehand: `check_init`).
    """
    from ttt_train.checkpoint import load_checkpoint, load_rank_state, read_checkpoint_info
    from ttt_train.training.schedule import keep_fresh_hyperparameters

    if resume is not None:
        info = load_checkpoint(resume, built.chunks, built.optimizer, expect_manifest=built.manifest)
        built.scheduler.load_state_dict(info["metadata"]["scheduler"])
        restore_rank_state(load_rank_state(resume))
        return info
    if previous is not None:  # the same tokenizer (a stage may change rotary settings, layout, data)
        same_tokens = {"tokenizer": built.manifest["tokenizer"]}
        if carry_optimizer:
            keep_fresh_hyperparameters(built.optimizer, lambda: load_checkpoint(
                previous, built.chunks, built.optimizer, expect_manifest=same_tokens))
            built.scheduler.step(0)  # this stage's step-0 lr from its own max_lr/min_lr
            return {}
        load_checkpoint(previous, built.chunks, expect_manifest=same_tokens)
        return {}
    if init.checkpoint:
        new_ttt = stage.ttt.enabled and init.strict and (read_checkpoint_info(init.checkpoint)["manifest"] or {}).get("ttt") is None
        load_checkpoint(init.checkpoint, built.chunks, strict=init.strict, new_ttt=new_ttt)
        if new_ttt and torch.distributed.get_rank() == 0:
            unchanged = ("the outputs are unchanged at step 0" if stage.ttt.target_init == "dropin" else
                         "the outputs change from step 0 (dropin keeps them)")
            print(f"In-Place TTT inserted into layers {stage.ttt.layer_indices(stage.model.num_layers)} of a checkpoint "
                  f"without it (their target tensors initialised; ttt.target_init={stage.ttt.target_init}: "
                  f"{unchanged})", flush=True)
    elif init.hf:
        from ttt_train.models.hf import load_hf_weights

        load_hf_weights(init.hf, built.chunks, stage.model, stage.ttt)
    return {}


START_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "vocab_size", "rotary_base", "llama3_rope_factor", "yarn", "sliding_window",
              "qk_layernorm", "tie_embeddings", "norm_eps")
"""Model keys a start point (init.hf, init.checkpoint) must agree on with the experiment: the tensors'
shapes and the function they compute (rotary base and scaling, YaRN, attention window, norms)."""


def model_mismatches(model_cfg, source_cfg, source: str) -> list[str]:
    """`model.KEY: <source> X, experiment Y` for each of `START_KEYS` that differs."""
    out = []
    for key in START_KEYS:
        have, want = getattr(source_cfg, key), getattr(model_cfg, key)
        if have != want:
            shown = {"kv_channels": "head_dim"}.get(key, key)
            out.append(f"model.{shown}: {source} {have!r}, experiment {want!r}")
    return out


def _check_hf_shards(folder: Path, where: str) -> None:
    """Refuse a sharded HF folder whose index names safetensors files it lacks (before any rank loads)."""
    import json

    from ttt_train.training.config import ConfigError

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ConfigError(f"{where}: {index.name} names {len(shards)} shards, {len(missing)} missing: "
                              f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; complete the download")
    elif not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{where}: no *.safetensors weights in the folder")


def _tokenizer_files(folder: str) -> bool:
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def check_init(init, stage) -> None:
    """Refuse (ConfigError naming the keys and the fix) an `init.hf` or `init.checkpoint` that does not
    match stage 0: the model keys of `START_KEYS` (from config.json, or from the checkpoint's manifest)
    and the tokenizer (the HF folder's own, or the manifest's) against the data's `data.tokenizer`."""
    from ttt_train.data.tokenizer import load_tokenizer
    from ttt_train.models.config import ModelConfig
    from ttt_train.training.config import ConfigError

    key, path = ("hf", init.hf) if init.hf else ("checkpoint", init.checkpoint)
    if not path:
        return
    where = f"init.{key}={path}"
    if not Path(path).is_dir():
        raise ConfigError(f"{where}: no such directory")
    try:
        if key == "hf":
            from ttt_train.models.hf import model_config_from_hf

            source, tokens = model_config_from_hf(path), None
            _check_hf_shards(Path(path), where)
            if _tokenizer_files(path) and Path(path).resolve() != Path(stage.data.tokenizer).expanduser().resolve():
                tokens = load_tokenizer(path).fingerprint
        else:
            from ttt_train.checkpoint import read_checkpoint_info

            manifest = read_checkpoint_info(path)["manifest"]
            if manifest is None or manifest.get("model") is None:
                raise ConfigError(f"{where}: the checkpoint records no model configuration (manifest) to check "
                                  f"against the experiment; save it with ttt-train's convert or driver")
            source = ModelConfig.from_dict(manifest["model"])
            tokens = (manifest.get("tokenizer") or {}).get("fingerprint")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{where}: {err}") from err
    label = "config.json" if key == "hf" else "checkpoint"
    differences = model_mismatches(stage.model, source, label)
    if differences:
        raise ConfigError(f"{where} does not match the experiment's model: {'; '.join(differences)}; choose the "
                          f"matching model= preset or override those keys (stage overrides: {stage.label})")
    data_tokenizer = load_tokenizer(stage.data.tokenizer, stage.data.eod_token)
    if tokens is not None and not data_tokenizer.matches(tokens):
        raise ConfigError(f"{where} was trained with another tokenizer than data.tokenizer={stage.data.tokenizer} "
                          f"(fingerprints differ): tokenize the data with the model's tokenizer (set data.tokenizer "
                          f"to it) or start from a model of that tokenizer")

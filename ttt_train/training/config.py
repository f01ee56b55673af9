"""The training driver's configuration: Hydra structured configs built from the project's dataclasses.

`configs/train.yaml` composes on top of `TrainConfig` (registered as `train_schema`), so Hydra
type-checks every value and refuses an unknown key by name. Sections:

    model (ModelConfig)  ttt (TTTConfig + lr_warmup)  parallel (ParallelConfig)  ddp (DDPConfig)
    optimizer (OptimizerArgs)  schedule  data (DataConfig; seq_length comes from each stage)
    training (batch sizes, precision, recompute, numerics)  checkpoint  logging  validation  init  run
    stages (the curriculum: list of StageConfig)

A stage may override any section (`stages.1.parallel: {cp: 8}`); its overrides are checked against
the section's schema when the stage is resolved (`ttt_train.training.curriculum`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttt_train.data.datasets import BlendEntry
from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models.config import ModelConfig, YarnConfig
from ttt_train.runtime.distributed import ParallelConfig
from ttt_train.training.optimizer import OptimizerArgs
from ttt_train.training.setup import DDPConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SECTIONS = ("model", "ttt", "parallel", "ddp", "optimizer", "schedule", "data", "training")
"""Top-level sections a stage may override."""


class ConfigError(ValueError):
    """A configuration the driver refuses before any compute; the message names the key and a fix."""


@dataclass
class InnerLRWarmup:
    """TTT inner-lr warm-up: from `start` to `ttt.lr` over the first `steps` steps of the run
    (counted across stages); `style` linear or exponential (geometric, for ranges spanning decades)."""

    start: float = 1e-3
    steps: int = 0
    style: str = "linear"


@dataclass
class TTTSection(TTTConfig):
    """`TTTConfig` plus the inner-lr warm-up the driver applies per step."""

    lr_warmup: InnerLRWarmup = field(default_factory=InnerLRWarmup)


@dataclass
class DataSection:
    """`DataConfig` fields; `seq_length` is set by each stage (a value here is overwritten)."""

    blend: list[BlendEntry] = field(default_factory=list)
    seq_length: int | None = None
    split: str = "98,1,1"
    seed: int = 1234
    cache_dir: str = "data_cache"
    tokenizer: str = "byte"
    eod_token: str | None = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    mid_level_dataset_surplus: float = 0.005
    num_workers: int = 0


@dataclass
class ScheduleConfig:
    """Outer learning-rate schedule (megatron's OptimizerParamScheduler), restarted in every stage.

    style: cosine | linear | constant | constant_with_decay (warm-up, constant, then a decay over the
    last `decay_fraction` of the stage, shaped by `decay_style`: linear, cosine, exponential,
    minus_sqrt). Warm-up from `warmup_init_lr` to `optimizer.lr` over `warmup_steps` steps or over
    `warmup_fraction` of the stage (set one). The decay ends at `optimizer.min_lr`.
    """

    style: str = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    warmup_init_lr: float = 0.0
    decay_fraction: float = 0.2
    decay_style: str = "linear"


@dataclass
class TrainingConfig:
    """Batch, precision and numerics. global_batch_size counts sequences per optimizer step (all data-
    parallel ranks, gradient accumulation included); it must be a multiple of micro_batch_size x dp.
    max_skipped_steps: consecutive non-finite steps tolerated (skipped) before the run stops."""

    micro_batch_size: int = 1
    global_batch_size: int = 1
    dtype: str = "fp32"
    recompute: str | None = None
    max_skipped_steps: int = 3


@dataclass
class StageConfig:
    """One stage of the curriculum: `tokens` trained at `seq_length` with rotary `yarn` (null: the
    model's own rotary settings, e.g. Llama-3.1's scaling). The other fields override top-level
    sections for this stage only (same keys as the section)."""

    name: str = "???"
    tokens: int = "???"  # type: ignore[assignment]
    seq_length: int = "???"  # type: ignore[assignment]
    yarn: YarnConfig | None = None
    model: dict[str, Any] = field(default_factory=dict)
    ttt: dict[str, Any] = field(default_factory=dict)
    parallel: dict[str, Any] = field(default_factory=dict)
    ddp: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """Checkpoints of each stage go to `<run.dir>/stages/<k>_<name>/checkpoints`. Saved every
    `every_steps` steps and every `every_minutes` minutes (0: off), at each stage's end and on
    preemption; the newest `keep_last` are kept. `carry_optimizer`: a stage starts with the previous
    stage's optimizer state (its own schedule and learning rates) instead of a fresh optimizer."""

    every_steps: int = 0
    every_minutes: float = 0.0
    keep_last: int = 2
    carry_optimizer: bool = False


@dataclass
class WandbConfig:
    """wandb run (one per experiment; resumed across restarts). mode: offline | online | disabled."""

    mode: str = "offline"
    project: str = "ttt-train"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    """Every `interval` steps: a console line, a metrics.jsonl record and a wandb log (rank 0).
    `peak_tflops`: the device's peak TFLOP/s at the training dtype, for MFU (null: MFU not logged)."""

    interval: int = 10
    peak_tflops: float | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ValidationConfig:
    """Held-out loss on `num_batches` micro-batches per data-parallel rank of the data's validation
    split every `every_steps` steps (0: off) and at each stage's end, plus the loss by token position
    in `position_buckets` equal buckets up to seq_length.

    `recall_records`: a JSON-lines file of `data_tools.synthetic` records (held-out documents with
    `recall_spans`); at each validation the loss on exactly their recall tokens (what only a memory of
    the context predicts) is logged as `val/recall_loss`, over the first `recall_count` records."""

    every_steps: int = 0
    num_batches: int = 2
    position_buckets: int = 8
    recall_records: str | None = None
    recall_count: int = 32


@dataclass
class InitConfig:
    """Where stage 0's weights come from: random init (both null), a ttt-train checkpoint folder
    (`checkpoint`), or a HuggingFace directory (`hf`). `strict`: refuse a checkpoint that lacks some
    of the model's tensors (false: e.g. a model without TTT seeds a TTT model, whose new tensors keep
    their initialisation)."""

    checkpoint: str | None = None
    hf: str | None = None
    strict: bool = True


@dataclass
class RunConfig:
    """name: the experiment (default: the `experiment=` choice). dir: run folder (default
    runs/<name>). dry_run: print the plan and exit. world_size: ranks to plan for in a dry run (and,
    if set, checked at launch). exit_after_minutes: save and exit (code 75) once this much wall time
    has passed (0: off). signals: signal names that trigger a save and exit 75 at the next step."""

    name: str | None = None
    dir: str | None = None
    dry_run: bool = False
    world_size: int | None = None
    exit_after_minutes: float = 0.0
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: TTTSection = field(default_factory=TTTSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    init: InitConfig = field(default_factory=InitConfig)
    stages: list[StageConfig] = field(default_factory=list)


SCHEMAS = {"model": ModelConfig, "ttt": TTTSection, "parallel": ParallelConfig, "ddp": DDPConfig,
           "optimizer": OptimizerArgs, "schedule": ScheduleConfig, "data": DataSection,
           "training": TrainingConfig}


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _known_keys(path: list[str]) -> set[str] | None:
    """Field names of the schema node at `path` (e.g. ["stages", "1", "parallel"]), or None."""
    import dataclasses
    import typing

    node = TrainConfig
    for part in path:
        if node is StageConfig and part in SCHEMAS:
            node = SCHEMAS[part]
            continue
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if node is TrainConfig and part == "stages":
            node = "list"
        elif node == "list" and part.isdigit():
            node = StageConfig
        elif part in hints and dataclasses.is_dataclass(hints[part]):
            node = hints[part]
        else:
            return None
    return {f.name for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else None


def _explain(err: Exception) -> str:
    """Hydra's message in one line, with the cause, and a precise hint for a key it cannot override."""
    import re

    message = " ".join(str(err).split())
    if err.__cause__ is not None and str(err.__cause__).split("\n")[0] not in message:
        message += ": " + " ".join(str(err.__cause__).split())
    match = re.search(r"Could not override '([^']+)'", message)
    if match:
        key = match.group(1).lstrip("+~")
        *parent, leaf = key.split(".")
        known = _known_keys(parent)
        if known is not None and leaf not in known:
            return f"unknown config key {key!r}; known keys of {'.'.join(parent) or 'the root'}: {sorted(known)}"
        if known is not None:
            return f"{key} is not set in this config; add it with +{key}=VALUE"
    return message


def compose(overrides: list[str]):
    """The composed, type-checked config (an OmegaConf DictConfig) for Hydra `overrides`.

    Raises ConfigError with Hydra's message (it names the key) on an unknown key, a bad type or a
    missing experiment. `run.name` defaults to the chosen experiment.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    _register()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
            cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err)) from err
    experiment = cfg.hydra.runtime.choices.get("experiment")
    with open_dict(cfg):
        del cfg["hydra"]
    if cfg.run.name is None:
        cfg.run.name = experiment
    if cfg.run.dir is None:
        cfg.run.dir = str(Path("runs") / cfg.run.name)
    OmegaConf.set_readonly(cfg, True)
    return cfg

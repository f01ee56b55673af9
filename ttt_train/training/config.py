"""The training driver's configuration: Hydra structured configs built from the project's dataclasses.

`configs/train.yaml` composes on top of `TrainConfig` (registered as `train_schema`), so Hydra
type-checks every value, and `compose` refuses any key `TrainConfig` lacks, whatever the override
syntax (`key=`, `+key=`, `++key=`), naming the closest known key. Sections:

    model (ModelConfig)  ttt (TTTConfig + lr_warmup)  parallel (ParallelConfig)  ddp (DDPConfig)
    optimizer (OptimizerArgs)  schedule  data (DataConfig less seq_length, which each stage sets)
    training (batch sizes, precision, recompute, numerics)  checkpoint  logging  validation  init  run
    stages (the curriculum: list of StageConfig)

A stage may override any key of the sections in `SECTIONS` (`stages.1.parallel.tp=2`, no `+` needed);
its overrides are checked against the section's schema here and when the stage is resolved
(`ttt_train.training.curriculum`). `~stages.K` (an index or a stage name) removes a stage.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttt_train.config_compose import (
    check_schema,
    explain,
    first_unknown,
    nullable_parent,
    one_line,
    optional_dataclass_at,
    parse,
    schema_lookup,
    unknown_key,
)
from ttt_train.config_keys import ConfigError
from ttt_train.data.datasets import BlendEntry, DataConfig  # noqa: F401 - BlendEntry: DataSection's hints
from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models.config import ModelConfig, YarnConfig
from ttt_train.runtime.distributed import ParallelConfig
from ttt_train.training.optimizer import OptimizerArgs
from ttt_train.training.setup import DDPConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

__all__ = ["ConfigError", "TrainConfig", "StageConfig", "SECTIONS", "section_schema", "compose"]


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


def _section_of(cls, name: str, *, drop: tuple[str, ...], doc: str):
    """Dataclass `name`: the fields of `cls` except `drop`, each with a default (a config section)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in drop:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default = field(default_factory=list) if typing.get_origin(hints[f.name]) is list else field(default=None)
        else:
            default = field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)
        fields.append((f.name, hints[f.name], default))
    section = dataclasses.make_dataclass(name, fields)
    section.__module__, section.__doc__ = __name__, doc
    return section


DataSection = _section_of(DataConfig, "DataSection", drop=("seq_length",),
                          doc="`DataConfig`'s keys but `seq_length`, which each stage sets (`stages.K.seq_length`).")


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


def _overrides_of(section: str):
    """A stage's overrides of top-level `section`: a mapping of some of that section's keys."""
    return field(default_factory=dict, metadata={"keys_of": lambda: section_schema(section)})


@dataclass
class StageConfig:
    """One stage of the curriculum: `tokens` trained at `seq_length` with rotary `yarn` (null: the
    model's own rotary settings, e.g. Llama-3.1's scaling). The other fields override top-level
    sections for this stage only (any key of the section)."""

    name: str = "???"
    tokens: int = "???"  # type: ignore[assignment]
    seq_length: int = "???"  # type: ignore[assignment]
    yarn: YarnConfig | None = None
    model: dict[str, Any] = _overrides_of("model")
    ttt: dict[str, Any] = _overrides_of("ttt")
    parallel: dict[str, Any] = _overrides_of("parallel")
    ddp: dict[str, Any] = _overrides_of("ddp")
    optimizer: dict[str, Any] = _overrides_of("optimizer")
    schedule: dict[str, Any] = _overrides_of("schedule")
    data: dict[str, Any] = _overrides_of("data")
    training: dict[str, Any] = _overrides_of("training")
    validation: dict[str, Any] = _overrides_of("validation")


SECTIONS = tuple(f.name for f in dataclasses.fields(StageConfig) if "keys_of" in f.metadata)
"""Top-level sections a stage may override."""


@dataclass
class CheckpointConfig:
    """Checkpoints of each stage go to `<run.dir>/stages/<k>_<name>/checkpoints`. Saved every
    `every_steps` steps and every `every_minutes` minutes (0: off), at each stage's end and on
    preemption; the newest `keep_last` are kept. `carry_optimizer`: a stage starts with the previous
    stage's optimizer state (its own schedule and learning rates) instead of a fresh optimizer.
    `on_save_error`: when a periodic save fails (e.g. a full disk; the previous checkpoint stays the
    one `latest` names), `stop` the run (exit 1, one line naming the folder and the space needed)
    or `retry` at the next interval while training on. A failed save at a stage's end or on a stop
    always stops the run."""

    every_steps: int = 0
    every_minutes: float = 0.0
    keep_last: int = 2
    carry_optimizer: bool = False
    on_save_error: str = "stop"


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
    (`checkpoint`), or a HuggingFace directory (`hf`). A checkpoint without TTT seeds a TTT experiment
    as the paper's drop-in: its TTT target tensors are the only ones allowed missing (initialised by
    `ttt.target_init`; `dropin` keeps the outputs unchanged at step 0). `strict`: refuse a checkpoint
    whose tensors differ from the model's otherwise (false: load the tensors both have, leave the rest
    as initialised)."""

    checkpoint: str | None = None
    hf: str | None = None
    strict: bool = True


@dataclass
class RunConfig:
    """name: the experiment (default: the `experiment=` choice). dir: run folder (default
    runs/<name>). dry_run: print the plan and exit. world_size: ranks to plan for in a dry run (and,
    if set, checked at launch). exit_after_minutes: save and exit (code 75) once this much wall time
    has passed (0: off). signals: signal names that trigger a save and exit 75 at the next step
    (SIGINT: Ctrl-C). stages: train only these stages (indices or names, e.g. [1] or [ctx4k]; null:
    every stage not finished); each needs the stage before it finished. restart_stages: with `stages`,
    train the chosen stages again from their start: their folders and those of the stages after
    them are moved aside (`stages/<k>_<name>.replaced-<time>`), never deleted.
    lock_timeout_minutes: the run folder's lock (`run.lock`, refreshed every few seconds by the
    running job) is taken over by a new start once its heartbeat is this old, or at once when its
    owner was on this host and is dead.
    collective_timeout_minutes: a rank stuck this long in one micro-batch or step (after a stage's
    first step) stops the run with a message naming the unresponsive rank and what it was doing, and
    no checkpoint (0: no watchdog); startup_timeout_minutes: the same before a stage's first step and
    in checkpoint saves and loads (see ttt_train/runtime/watchdog.py)."""

    name: str | None = None
    dir: str | None = None
    dry_run: bool = False
    world_size: int | None = None
    exit_after_minutes: float = 0.0
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    stages: list[Any] | None = None
    restart_stages: bool = False
    lock_timeout_minutes: float = 10.0
    collective_timeout_minutes: float = 10.0
    startup_timeout_minutes: float = 30.0


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


def section_schema(section: str):
    """The dataclass of top-level section `section` (e.g. `ParallelConfig` for "parallel")."""
    return typing.get_type_hints(TrainConfig)[section]


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


_STAGE_KEY = re.compile(rf"stages\.\d+\.({'|'.join(SECTIONS)})\..+")
_STAGE = re.compile(r"stages\.([^.]+)")
_NAMED_STAGE = re.compile(r"stages\.([^.\d][^.]*)(\..+)")
_HINTS = {re.compile(r"(stages\.\d+\.)?data\.seq_length"): "; each stage sets its own: stages.K.seq_length"}


def _hinted(err: ConfigError) -> ConfigError:
    """`err` with the advice of `_HINTS` for the unknown key it names, if any."""
    match = re.match(r"unknown config key '([^']+)'", str(err))
    hint = next((h for pattern, h in _HINTS.items() if match and pattern.fullmatch(match.group(1))), "")
    return ConfigError(f"{err}{hint}") if hint else err


def _lookup(parts: list[str]):
    return schema_lookup(TrainConfig, parts)


def _hydra_compose(items: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    _register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
        return hydra_compose("train", overrides=items, return_hydra_config=True)


def _composed(parsed: list, items: list[str]):
    """Hydra's composition of `items`, its errors as ConfigError (one line naming the key)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _hydra_compose(items)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(explain(err, _lookup)) from err
    except AssertionError as err:  # OmegaConf, on a key set below a null value (e.g. stages.0.yarn.factor)
        raise _below_null(parsed, items, err) from err


def _below_null(parsed: list, items: list[str], err: AssertionError) -> ConfigError:
    """The refusal of an override that sets a key below an optional section that is null here."""
    from omegaconf import OmegaConf

    below = {o.input_line: nullable_parent(TrainConfig, o.key_or_group.split(".")) for o in parsed}
    below = {line: found for line, found in below.items() if found}
    try:
        reference = _hydra_compose([line for line in items if line.lstrip("+") not in below])
    except Exception:  # noqa: BLE001 - only to find the culprit; the original error is reported instead
        return ConfigError(f"cannot apply the overrides: {one_line(err)}")
    for line, (path, keys) in below.items():
        if OmegaConf.select(reference, path) is None:
            return ConfigError(f"{line}: {path} is null here, so a key below it cannot be set alone; set it whole, "
                               f"e.g. {path}={{{keys[0]}: ..., {keys[1]}: ...}} (keys: {keys})")
    return ConfigError(f"cannot apply the overrides: {one_line(err)}")


def stage_index(ref, names: list[str], what: str) -> int:
    """Index of stage `ref` (an index or a name) among the stage `names`; ConfigError naming `what`."""
    text = str(ref)
    index = int(text) if text.isdigit() else names.index(text) if text in names else None
    if index is None or index >= len(names):
        listing = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
        raise ConfigError(f"{what}: no stage {text!r}; this experiment's stages are {listing or 'none'}")
    return index


def _by_index(parsed: list, removed: list) -> list:
    """`parsed` with `stages.NAME.KEY=V` rewritten to `stages.INDEX.KEY=V` (the experiment's stage names
    come from a composition without those overrides)."""
    named = [o for o in parsed if _NAMED_STAGE.fullmatch(o.key_or_group) and o not in removed]
    if not named:
        return parsed
    base = _composed(parsed, _items([o for o in parsed if o not in named], removed))
    names = [s.name for s in base.stages]
    lines = []
    for o in parsed:
        match = _NAMED_STAGE.fullmatch(o.key_or_group) if o in named else None
        if match is None:
            lines.append(o.input_line)
            continue
        prefix = o.input_line[:o.input_line.index(o.key_or_group)]
        value = o.input_line[len(prefix) + len(o.key_or_group):]
        lines.append(f"{prefix}stages.{stage_index(match.group(1), names, o.input_line)}{match.group(2)}{value}")
    return parse(lines)


def _items(parsed: list, removed: list) -> list[str]:
    """The override lines for Hydra: `~stages.K` left out (applied after composing), and a stage's
    `stages.K.SECTION.KEY=V` made `++` (the stage's mapping holds only the keys it overrides)."""
    from hydra.core.override_parser.types import OverrideType

    return [("++" if o.type is OverrideType.CHANGE and _STAGE_KEY.fullmatch(o.key_or_group) else "") + o.input_line
            for o in parsed if o not in removed]


def _set_section(cfg, override) -> None:
    """Apply `KEY={...}` for an optional config dataclass at KEY (e.g. a stage's `yarn`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cls = optional_dataclass_at(TrainConfig, override.key_or_group.split("."))
    current = OmegaConf.select(cfg, override.key_or_group)
    try:  # merged into the current value, as Hydra does, or into the defaults when it is null
        node = OmegaConf.merge(current if current is not None else OmegaConf.structured(cls), override.value())
        OmegaConf.update(cfg, override.key_or_group, node, merge=False)
    except (OmegaConfBaseException, ValueError) as err:
        found = first_unknown(override.value(), cls, tuple(override.key_or_group.split(".")))
        raise (unknown_key(*found) if found else ConfigError(f"{override.input_line}: {one_line(err)}")) from None


def _remove_stages(cfg, references: list[str]) -> None:
    """Delete the stages named by index or name in `references` (the `~stages.K` overrides)."""
    names = [s.name for s in cfg.stages]
    indices = {stage_index(ref, names, f"~stages.{ref}") for ref in references}
    cfg.stages = [stage for i, stage in enumerate(cfg.stages) if i not in indices]


def compose(overrides: list[str]):
    """The composed, type-checked config (an OmegaConf DictConfig) for Hydra `overrides`.

    Raises ConfigError (one line naming the key, and the closest known key for a misspelt one) on an
    unknown key whatever its syntax, a bad type or a missing experiment. `stages.K.SECTION.KEY=V`
    sets any key of the section for stage K (an index or a name); `~stages.K` removes stage K.
    `run.name` defaults to the chosen experiment.
    """
    from omegaconf import OmegaConf, open_dict

    parsed = parse(overrides)
    is_removal = lambda o: o.is_delete() and _STAGE.fullmatch(o.key_or_group)  # noqa: E731
    parsed = _by_index(parsed, [o for o in parsed if is_removal(o)])
    removed = [o for o in parsed if is_removal(o)]
    # OmegaConf 2.3 cannot merge a mapping into a null optional section (e.g. `stages.0.yarn={...}` when the
    # experiment has yarn: null): such overrides are applied after composing
    whole = [o for o in parsed if not o.is_delete() and isinstance(o.value(), dict)
             and optional_dataclass_at(TrainConfig, o.key_or_group.split("."))]
    items = _items([o for o in parsed if o not in whole], removed)
    try:
        cfg = _composed(parsed, items)
    except ConfigError as err:
        raise _hinted(err) from err.__cause__
    experiment = cfg.hydra.runtime.choices.get("experiment")
    with open_dict(cfg):
        del cfg["hydra"]
    for o in whole:
        _set_section(cfg, o)
    if removed:
        _remove_stages(cfg, [_STAGE.fullmatch(o.key_or_group).group(1) for o in removed])
    try:
        check_schema(cfg, TrainConfig)
    except ConfigError as err:
        raise _hinted(err) from None
    if cfg.run.name is None:
        cfg.run.name = experiment
    if cfg.run.dir is None:
        cfg.run.dir = str(Path("runs") / cfg.run.name)
    OmegaConf.set_readonly(cfg, True)
    return cfg

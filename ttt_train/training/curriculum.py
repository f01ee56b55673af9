"""The curriculum: each stage of a composed config resolved into validated dataclasses (where a
(re)started run picks up: `ttt_train.training.start`).

A stage's effective config is the top-level sections with the stage's overrides merged on top
(checked against each section's schema), its `seq_length`, and its rotary `yarn`. Steps come from
`tokens // (global_batch_size * seq_length)`. Every refusal is a `ConfigError` naming the key and a
fix, raised before any compute.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ttt_train.config_keys import checked_mapping
from ttt_train.data.datasets import DataConfig
from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models.config import DTYPES, ModelConfig
from ttt_train.runtime.cp_attention_rules import resolve_cp_comm_type
from ttt_train.runtime.distributed import ParallelConfig
from ttt_train.training.config import (
    SECTIONS,
    ConfigError,
    InnerLRWarmup,
    ScheduleConfig,
    TrainingConfig,
    ValidationConfig,
)
from ttt_train.training.optimizer import OptimizerArgs
from ttt_train.training.setup import DDPConfig

SCHEDULE_STYLES = ("cosine", "linear", "constant", "constant_with_decay")
DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
RECOMPUTE = (None, "selective", "full")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass
class Stage:
    """One resolved stage. `folder`: `<run.dir>/stages/<index>_<name>`; `data` is None only in a dry run
    whose data files are missing (`missing` lists them)."""

    index: int
    name: str
    folder: Path
    tokens: int
    seq_length: int
    steps: int
    dp: int
    model: ModelConfig
    ttt: TTTConfig
    lr_warmup: InnerLRWarmup
    parallel: ParallelConfig
    ddp: DDPConfig
    optimizer: OptimizerArgs
    schedule: ScheduleConfig
    training: TrainingConfig
    data: DataConfig | None
    missing: list[str]
    validation: ValidationConfig

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def num_microbatches(self) -> int:
        return self.training.global_batch_size // (self.training.micro_batch_size * self.dp)

    @property
    def tokens_per_step(self) -> int:
        return self.training.global_batch_size * self.seq_length

    @property
    def label(self) -> str:
        return f"stages.{self.index} ({self.name})"


def _section(cfg, stage_cfg, section: str, where: str) -> dict:
    """Top-level `section` with the stage's overrides merged on top (schema-checked), as a plain dict."""
    try:
        merged = OmegaConf.merge(cfg[section], stage_cfg[section])
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}.{section}: {' '.join(str(err).split())}") from err
    return OmegaConf.to_container(merged, resolve=True)


def _build(cls, values: dict, section: str, where: str):
    """`cls` from `values` through its `from_dict` (strict keys and types) or checked keys."""
    try:
        if hasattr(cls, "from_dict"):
            return cls.from_dict(values)
        return cls(**checked_mapping(cls, values, section))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from err


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_schedule(s: ScheduleConfig, steps: int, where: str) -> None:
    _need(s.style in SCHEDULE_STYLES, f"{where}.schedule.style={s.style!r}: use one of {SCHEDULE_STYLES}")
    _need(s.decay_style in DECAY_STYLES, f"{where}.schedule.decay_style={s.decay_style!r}: use one of {DECAY_STYLES}")
    _need(s.warmup_steps >= 0 and 0 <= s.warmup_fraction < 1,
          f"{where}.schedule: warmup_steps must be >= 0 and warmup_fraction in [0, 1)")
    _need(not (s.warmup_steps and s.warmup_fraction),
          f"{where}.schedule: set warmup_steps or warmup_fraction, not both (set the other to 0)")
    _need(0 < s.decay_fraction <= 1, f"{where}.schedule.decay_fraction={s.decay_fraction}: must be in (0, 1]")
    _need(warmup_steps(s, steps) < steps,
          f"{where}.schedule: warm-up of {warmup_steps(s, steps)} steps does not fit the stage's {steps} steps; "
          f"lower schedule.warmup_steps or raise the stage's tokens")


def warmup_steps(s: ScheduleConfig, steps: int) -> int:
    return s.warmup_steps or int(s.warmup_fraction * steps)


def _check_rotary(model: ModelConfig, seq: int, where: str) -> None:
    if model.yarn is not None:
        limit = int(model.yarn.factor * model.yarn.original_max_position_embeddings)
        _need(seq <= limit, f"{where}.seq_length={seq} exceeds what its YaRN settings allow (factor "
              f"{model.yarn.factor} x original_max_position_embeddings {model.yarn.original_max_position_embeddings}"
              f" = {limit}); raise {where}.yarn.factor or lower the seq_length")
    _need(seq <= model.max_position_embeddings,
          f"{where}.seq_length={seq} exceeds model.max_position_embeddings={model.max_position_embeddings} "
          f"(the context its rotary settings are for); set {where}.yarn to extend it (e.g. factor "
          f"{math.ceil(seq / model.max_position_embeddings)}) and {where}.model.max_position_embeddings={seq}")


def _check_parallel_fit(stage_ttt: TTTConfig, model: ModelConfig, parallel: ParallelConfig, seq: int,
                        where: str) -> None:
    cp = parallel.cp
    try:
        resolve_cp_comm_type(parallel.cp_comm_type, cp=cp, tp=parallel.tp, backend=model.backend,
                             sliding_window=model.sliding_window, num_attention_heads=model.num_attention_heads,
                             num_query_groups=model.num_query_groups)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    if cp > 1:
        _need(seq % (2 * cp) == 0, f"{where}.seq_length={seq} does not split into 2 * parallel.cp = {2 * cp} "
              f"shards; use a multiple of {2 * cp}")
        if stage_ttt.enabled:
            shard = seq // (2 * cp)
            _need(shard % stage_ttt.chunk_size == 0,
                  f"{where}: seq_length / (2 * parallel.cp) = {seq}/{2 * cp} = {shard} is not a multiple of "
                  f"ttt.chunk_size={stage_ttt.chunk_size} (chunks may not straddle context-parallel shards); "
                  f"change ttt.chunk_size, parallel.cp or the seq_length")
    _need(model.num_layers % parallel.pp == 0, f"{where}: model.num_layers={model.num_layers} does not split "
          f"evenly over parallel.pp={parallel.pp} pipeline stages; choose a pp that divides it")
    if stage_ttt.enabled and stage_ttt.target == "input_embed" and parallel.pp > 1:
        first = model.num_layers // parallel.pp
        late = [i for i in stage_ttt.layer_indices(model.num_layers) if i >= first]
        _need(not late, f"{where}: ttt.target=input_embed with TTT layers {late} past the first pipeline stage "
              f"(layers 0..{first - 1}), which alone has the token embeddings; use ttt.target=hidden_states, "
              f"parallel.pp=1, or TTT layers on the first stage (ttt.layers)")


def _check_data_files(values: dict, where: str) -> list[str]:
    """Paths of the stage's data that do not exist (datasets, tokenizer)."""
    missing = []
    _need(bool(values.get("blend")), f"{where}.data.blend is empty: list at least one dataset "
          f"{{path: PREFIX, weight: 1.0}} (build one with python -m data_tools.tokenize)")
    for i, entry in enumerate(values["blend"]):
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(entry["path"] + suffix):
                missing.append(f"{where}.data.blend[{i}].path: {entry['path']}{suffix} not found")
    tok = values.get("tokenizer", "byte")
    if tok != "byte" and not os.path.exists(os.path.expanduser(tok)):
        missing.append(f"{where}.data.tokenizer: {tok} not found")
    return missing


def resolve_stage(cfg, index: int, world_size: int | None, *, check_files: bool = True) -> Stage:
    """Stage `index` of composed config `cfg`, validated (ConfigError on any problem).

    check_files=False (dry run) records missing data files in `Stage.missing` instead of refusing.
    world_size None: the stage is not trained by this launch; its layout is checked on its own
    (tp * pp * cp ranks, dp 1).
    """
    st = cfg.stages[index]
    where = f"stages.{index}"
    _need(isinstance(st.name, str) and _NAME.match(st.name) is not None,
          f"{where}.name={st.name!r}: use letters, digits, '_', '-' or '.' (it names the stage's folder)")
    values = {section: _section(cfg, st, section, where) for section in SECTIONS}
    seq, tokens = st.seq_length, st.tokens
    _need(isinstance(seq, int) and seq > 0, f"{where}.seq_length={seq!r}: must be a positive integer")
    _need(isinstance(tokens, int) and tokens > 0, f"{where}.tokens={tokens!r}: must be a positive integer")

    model_values = values["model"]
    model_values["yarn"] = OmegaConf.to_container(st.yarn) if st.yarn is not None else model_values.get("yarn")
    model = _build(ModelConfig, model_values, "model", where)
    ttt_values = values["ttt"]
    lr_warmup = InnerLRWarmup(**ttt_values.pop("lr_warmup"))
    ttt = _build(TTTConfig, ttt_values, "ttt", where)
    try:
        ttt.validate(model.num_layers)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err
    _need(lr_warmup.style in ("linear", "exponential"),
          f"{where}.ttt.lr_warmup.style={lr_warmup.style!r}: use linear or exponential")
    _need(lr_warmup.steps >= 0 and lr_warmup.start > 0,
          f"{where}.ttt.lr_warmup: steps must be >= 0 and start > 0 (got {lr_warmup.steps}, {lr_warmup.start})")
    parallel = _build(ParallelConfig, values["parallel"], "parallel", where)
    try:
        dp = parallel.validate(world_size or parallel.tp * parallel.pp * parallel.cp)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err
    ddp = _build(DDPConfig, values["ddp"], "ddp", where)
    optimizer = _build(OptimizerArgs, values["optimizer"], "optimizer", where)
    schedule = ScheduleConfig(**values["schedule"])
    training = TrainingConfig(**values["training"])

    micro, gbs = training.micro_batch_size, training.global_batch_size
    _need(micro >= 1, f"{where}.training.micro_batch_size={micro}: must be >= 1")
    _need(gbs >= 1 and gbs % (micro * dp) == 0,
          f"{where}: training.global_batch_size={gbs} is not a multiple of training.micro_batch_size x dp = "
          f"{micro} x {dp} = {micro * dp} (dp = world size {world_size} / (tp*pp*cp)); set it to a multiple "
          f"of {micro * dp}")
    _need(training.dtype in DTYPES, f"{where}.training.dtype={training.dtype!r}: use one of {sorted(DTYPES)}")
    _need(training.recompute in RECOMPUTE, f"{where}.training.recompute={training.recompute!r}: use one of {RECOMPUTE}")
    _need(training.max_skipped_steps >= 0, f"{where}.training.max_skipped_steps must be >= 0")
    _check_rotary(model, seq, where)
    _check_parallel_fit(ttt, model, parallel, seq, where)
    steps = tokens // (gbs * seq)
    _need(steps >= 1, f"{where}.tokens={tokens} is less than one step of global_batch_size x seq_length = "
          f"{gbs} x {seq} = {gbs * seq} tokens; raise the tokens or lower the batch")
    _check_schedule(schedule, steps, where)

    data_values = {**values["data"], "seq_length": seq}
    missing = _check_data_files(data_values, where)
    if missing and check_files:
        raise ConfigError(missing[0] + " (build the dataset first, or fix the path)")
    data = None if missing else _build(DataConfig, data_values, "data", where)
    if data is not None:
        _check_vocab(model, data, where)
    validation = ValidationConfig(**values["validation"])
    _need(validation.num_batches >= 1 and validation.position_buckets >= 1 and validation.recall_count >= 1,
          f"{where}.validation: num_batches, position_buckets and recall_count must be >= 1")
    if validation.every_steps > 0 and data is not None:
        split = [float(x) for x in data.split.split(",")] + [0.0, 0.0]
        _need(split[1] > 0, f"{where}.data.split={data.split!r} has no validation share but validation.every_steps="
              f"{validation.every_steps}; give the split a second value (e.g. '98,2,0') or set "
              f"validation.every_steps=0")
    recall_group = dp * micro
    _need(validation.every_steps <= 0 or validation.recall_records is None or validation.recall_count >= recall_group,
          f"{where}.validation.recall_count={validation.recall_count} is less than one record per micro-batch row "
          f"on every data-parallel rank (micro_batch_size x dp = {micro} x {dp} = {recall_group}); set it to a "
          f"multiple of {recall_group}")
    if validation.every_steps > 0 and validation.recall_records is not None \
            and not Path(validation.recall_records).is_file():
        missing.append(f"{where}.validation.recall_records={validation.recall_records}: no such file; write it with "
                       "`python -m data_tools.synthetic TASK --num N --length L --output FILE.jsonl`")
        if check_files:
            raise ConfigError(missing[-1])
    folder = Path(cfg.run.dir) / "stages" / f"{index}_{st.name}"
    return Stage(index=index, name=st.name, folder=folder, tokens=tokens, seq_length=seq, steps=steps, dp=dp,
                 model=model, ttt=ttt, lr_warmup=lr_warmup, parallel=parallel, ddp=ddp, optimizer=optimizer,
                 schedule=schedule, training=training, data=data, missing=missing, validation=validation)


def _check_vocab(model: ModelConfig, data: DataConfig, where: str) -> None:
    """The tokenizer loads, fits the model's vocabulary and is the one each dataset's sidecar names
    (its fingerprint; the sidecar's file sizes match the files): before any rank sets up."""
    from ttt_train.data.indexed import check_fingerprint, read_sidecar
    from ttt_train.data.tokenizer import check_model_vocab, load_tokenizer

    try:
        tokenizer = load_tokenizer(data.tokenizer, data.eod_token)
        check_model_vocab(model.vocab_size, tokenizer)
        for i, entry in enumerate(data.blend):
            try:
                check_fingerprint(entry.path, read_sidecar(entry.path), tokenizer)
            except ValueError as err:
                raise ValueError(f"data.blend[{i}]: {err}") from None
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{where}: {err}") from err


def resolve(cfg, world_size: int, *, check_files: bool = True) -> list[Stage]:
    """Every stage of `cfg`, validated, plus the run-level checks (world size, names; stage 0's `init`
    is held against the experiment when a launch starts from it: `stage_setup.check_init`). Stages that
    `run.stages` leaves out are checked without this launch's world size and data files."""
    _need(len(cfg.stages) > 0, "stages: the experiment lists no stages; add at least one "
          "{name, tokens, seq_length, yarn} under stages:")
    init = cfg.init
    _need(not (init.checkpoint and init.hf), "init: set init.checkpoint or init.hf, not both (init.hf=null)")
    if cfg.run.world_size is not None:
        _need(cfg.run.world_size == world_size or not check_files,
              f"run.world_size={cfg.run.world_size} but the launch has {world_size} ranks; launch with "
              f"{cfg.run.world_size} ranks or set run.world_size={world_size} (or null)")
    from ttt_train.training.start import selected

    chosen = selected(cfg)  # stages not trained by this launch may need another allocation and their data later
    stages = [resolve_stage(cfg, i, world_size if i in chosen else None, check_files=check_files and i in chosen)
              for i in range(len(cfg.stages))]
    names = [s.name for s in stages]
    _need(len(set(names)) == len(names), f"stages: names {names} repeat; give each stage its own name")
    for key, minimum in (("every_steps", 0), ("every_minutes", 0), ("keep_last", 1)):
        _need(cfg.checkpoint[key] >= minimum, f"checkpoint.{key}={cfg.checkpoint[key]}: must be >= {minimum}")
    _need(cfg.logging.interval >= 1, f"logging.interval={cfg.logging.interval}: must be >= 1")
    _need(cfg.logging.wandb.mode in ("offline", "online", "disabled"),
          f"logging.wandb.mode={cfg.logging.wandb.mode!r}: use offline, online or disabled")
    _need(cfg.logging.wandb.mode == "disabled" or importlib.util.find_spec("wandb") is not None,
          f"logging.wandb.mode={cfg.logging.wandb.mode}: the wandb package is not installed; pip install wandb, "
          f"or set logging.wandb.mode=disabled (metrics.jsonl is written either way)")
    _need(cfg.run.exit_after_minutes >= 0, "run.exit_after_minutes must be >= 0 (0: off)")
    for key in ("collective_timeout_minutes", "startup_timeout_minutes"):
        _need(getattr(cfg.run, key) >= 0, f"run.{key}={getattr(cfg.run, key)}: must be >= 0 (0: no hang watchdog)")
    _need(cfg.run.lock_timeout_minutes > 0, f"run.lock_timeout_minutes={cfg.run.lock_timeout_minutes}: must be > 0")
    _need(cfg.checkpoint.on_save_error in ("stop", "retry"),
          f"checkpoint.on_save_error={cfg.checkpoint.on_save_error!r}: use stop or retry")
    return stages

"""Where a (re)started run picks up, held against the run it continues.

`plan_start(cfg, stages)` reads the run folder (call it on one rank): every stage's latest checkpoint
and `config.yaml`, the config of the last accepted start. It returns the stages to train (all not
finished, or those `run.stages` names) and where the first starts, or refuses (ConfigError) naming the
key and the way out.

A stage that has started (it has a checkpoint, or a later stage has) keeps the settings it started
with: its model, TTT, data, optimizer, schedule, tokens, sequence length and batch define the run
(its learning-rate schedule is built from tokens and batch; its samples from the data). A change to
one of them is refused, naming the key, with the two ways to get it: train the stage again
(`run.stages=[K] run.restart_stages=true`) or start a new run from its latest checkpoint
(`run.dir=NEW init.checkpoint=...`). Data moved to other paths is no change: `data.blend`, `split`,
`seed` and `tokenizer` are applied when the checkpoint's data and tokenizer fingerprints still match. The keys of `APPLIED_ON_RESUME` change how the run is observed,
saved or laid out, not what it computes: their changes are applied (and listed). A stage that has not
started takes any change.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ttt_train.training.config import SECTIONS, ConfigError, stage_index

APPLIED_ON_RESUME = (
    "logging", "validation", "checkpoint.every_steps", "checkpoint.every_minutes", "checkpoint.keep_last",
    "checkpoint.on_save_error", "run.name", "run.world_size", "run.exit_after_minutes", "run.signals", "run.stages",
    "run.restart_stages", "run.dry_run", "run.lock_timeout_minutes",
    "run.collective_timeout_minutes", "run.startup_timeout_minutes", "parallel.tp", "parallel.pp", "parallel.cp",
    "parallel.sequence_parallel", "parallel.cp_comm_type", "parallel.cp_scan", "parallel.cp_scan_wire",
    "parallel.links", "ddp.overlap_grad_reduce", "ddp.bucket_size", "training.micro_batch_size", "training.recompute",
    "training.max_skipped_steps", "data.num_workers", "data.cache_dir", "model.name", "model.extra",
)
"""Keys (or sections) whose change a resumed stage applies: logging, validation, checkpoint intervals
and what a failed save does, the run folder's lock and hang-watchdog timeouts, the parallel layout and
how its ranks communicate (checkpoints reshard on load), micro-batching (the same samples per step),
recompute, data-loader workers and index-cache folder, labels. Every other key is held."""

CONFIG = "config.yaml"


@dataclasses.dataclass
class StartPlan:
    """What a launch trains. `todo`: stage indices, in order; `resume`: the checkpoint `todo[0]`
    resumes (None: it starts from the previous stage's final checkpoint, or `init`); `applied`:
    changes since the last start that take effect ("key: old -> new"); `aside`: stage folders to move
    aside first (`run.restart_stages`); `remaining`: stages neither finished nor chosen; `done`: why
    there is nothing to train (when `todo` is empty)."""

    todo: list[int]
    resume: Path | None = None
    applied: list[str] = dataclasses.field(default_factory=list)
    aside: list[Path] = dataclasses.field(default_factory=list)
    remaining: list[int] = dataclasses.field(default_factory=list)
    done: str = ""


def selected(cfg, stages=None) -> list[int]:
    """Indices of the stages `run.stages` names (all when null), increasing; ConfigError otherwise."""
    names = [s.name for s in (stages if stages is not None else cfg.stages)]
    if cfg.run.stages is None:
        return list(range(len(names)))
    chosen = [stage_index(ref, names, f"run.stages={list(cfg.run.stages)}") for ref in cfg.run.stages]
    if not chosen or len(set(chosen)) != len(chosen) or chosen != sorted(chosen):
        raise ConfigError(f"run.stages={list(cfg.run.stages)}: name each stage once, in curriculum order "
                          f"(e.g. run.stages=[{names[-1]}] or run.stages=[0,1]), or null for all")
    return chosen


def _progress(stages) -> list[tuple[int, Path] | None]:
    """(step, path) of each stage's latest checkpoint, or None."""
    from ttt_train.checkpoint import latest_checkpoint, read_checkpoint_info

    found = []
    for stage in stages:
        path = latest_checkpoint(stage.checkpoints)
        found.append(None if path is None else (read_checkpoint_info(path)["step"], path))
    return found


def _flat(value, prefix: str = "") -> dict:
    """{dotted key: value} of nested mappings (lists are values)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out = {}
    for key, sub in value.items():
        out.update(_flat(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _merged(base, override):
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    return {**base, **{k: _merged(base.get(k), v) for k, v in override.items()}}


def stage_view(cfg: dict, index: int) -> dict:
    """{key: value} that stage `index` of plain config `cfg` trains with: its sections (the stage's
    overrides merged in), `yarn` as `model.yarn` when the stage sets it, its name, tokens and length."""
    stage = cfg["stages"][index]
    view = {}
    for section in SECTIONS:
        view.update(_flat(_merged(cfg.get(section) or {}, stage.get(section) or {}), section))
    if stage.get("yarn") is not None:
        view = {k: v for k, v in view.items() if not k.startswith("model.yarn")}
        view.update(_flat(stage["yarn"], "model.yarn"))
    view.update(name=stage.get("name"), tokens=stage.get("tokens"), seq_length=stage.get("seq_length"))
    return view


def _applied(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in APPLIED_ON_RESUME)


def _user_key(cfg: dict, index: int, key: str) -> str:
    """How the user sets `key` of stage `index`: at the stage (`stages.K.KEY`) or at the top level."""
    stage = cfg["stages"][index]
    if key in ("name", "tokens", "seq_length") or (key.startswith("model.yarn") and stage.get("yarn") is not None):
        return f"stages.{index}.{'yarn' + key[len('model.yarn'):] if key.startswith('model.yarn') else key}"
    section, _, rest = key.partition(".")
    return f"stages.{index}.{key}" if rest and rest.split(".")[0] in (stage.get(section) or {}) else key


def held_changes(old: dict, new: dict, fixed: list[int]) -> dict[int, list[tuple[str, object, object]]]:
    """{stage: [(key, started with, now)]} of the held keys that differ for each started stage in `fixed`
    (keys absent from either config are not compared: a config from before a key existed)."""
    held = {}
    for index in fixed:
        if index >= len(new["stages"]) or index >= len(old["stages"]):
            continue
        before, now = stage_view(old, index), stage_view(new, index)
        diffs = [(_user_key(new, index, k), before[k], now[k]) for k in sorted(set(before) & set(now))
                 if before[k] != now[k] and not _applied(k)]
        for key in ("init.checkpoint", "init.hf", "init.strict") if index == 0 else ("checkpoint.carry_optimizer",):
            section, name = key.split(".")
            a, b = (old.get(section) or {}).get(name), (new.get(section) or {}).get(name)
            if a != b:
                diffs.append((key, a, b))
        if diffs:
            held[index] = diffs
    return held


def _everything(cfg: dict) -> dict:
    """{dotted key: value} of a whole plain config, stages as `stages.K.KEY`."""
    out = _flat({k: v for k, v in cfg.items() if k != "stages"})
    for i, stage in enumerate(cfg.get("stages") or []):
        out.update(_flat(stage, f"stages.{i}"))
    return out


def _changed(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every key of the whole config that differs (but `run.dry_run`)."""
    a, b = _everything(old), _everything(new)
    unset = "(unset)"
    return [f"{k}: {a.get(k, unset)!r} -> {b.get(k, unset)!r}".replace(repr(unset), unset)
            for k in sorted(set(a) | set(b)) if a.get(k, unset) != b.get(k, unset) and k != "run.dry_run"]


_SAMPLE_KEYS = ("data.blend", "data.split", "data.seed")  # what the checkpoint's data fingerprint covers


def _same_samples(held: dict, stages, progress) -> list[tuple]:
    """The held data changes that do not change what trains: `data.blend` / `split` / `seed` when the
    stage's data fingerprint (content, weights, split, seed) is the checkpoint's, `data.tokenizer` when
    the tokenizer's fingerprint is (data or a tokenizer moved to another path)."""
    from ttt_train.checkpoint import read_checkpoint_info
    from ttt_train.data.datasets import dataset_fingerprint
    from ttt_train.data.tokenizer import load_tokenizer

    same = []
    for index, diffs in held.items():
        stage = stages[index]
        keys = {key: key.split(".", 2)[2] if key.startswith("stages.") else key for key, _, _ in diffs}
        if stage.data is None or progress[index] is None or not any(
                k in (*_SAMPLE_KEYS, "data.tokenizer") for k in keys.values()):
            continue
        manifest = read_checkpoint_info(progress[index][1])["manifest"] or {}
        samples = manifest.get("data_fingerprint") == dataset_fingerprint(stage.data)
        recorded = (manifest.get("tokenizer") or {}).get("fingerprint")
        tokens = bool(recorded) and load_tokenizer(stage.data.tokenizer, stage.data.eod_token).matches(recorded)
        same += [d for d in diffs if (samples and keys[d[0]] in _SAMPLE_KEYS) or (tokens and keys[d[0]] == "data.tokenizer")]
    return same


def _read_config(run_dir: Path) -> dict | None:
    from omegaconf import OmegaConf

    path = run_dir / CONFIG
    if not path.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # noqa: BLE001 - any YAML / interpolation problem: name the file
        raise ConfigError(f"{path} (the config of this run's last start) cannot be read ({err}); restore it, or "
                          f"move it aside to resume without checking the settings against it") from None


def _stray_folders(run_dir: Path, stages) -> list[str]:
    """Stage folders of the run that the config does not name (renamed or removed stages) and hold checkpoints."""
    names = {s.folder.name for s in stages}
    root = run_dir / "stages"
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.iterdir()
                  if p.is_dir() and ".replaced-" not in p.name and p.name not in names and (p / "checkpoints").is_dir()
                  and any((p / "checkpoints").iterdir()))


def _refusal(run_dir: Path, stages, held: dict, progress, old: dict, init_hf) -> ConfigError:
    index = min(held)
    stage = stages[index]
    step = progress[index][0] if progress[index] else None
    view = stage_view(old, index)
    steps = view["tokens"] // (view["training.global_batch_size"] * view["seq_length"])  # as it was started
    where = f"has trained {step} of {steps} steps" if step is not None and step < steps else \
        "has finished" if step is not None else "is finished (later stages trained from it)"
    diffs = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in held[index][:6])
    more = f" (and {len(held[index]) - 6} more)" if len(held[index]) > 6 else ""
    checkpoint = progress[index][1].parent if progress[index] else stage.checkpoints
    top = [key for key, _, _ in held[index] if not key.startswith("stages.")]
    per_stage = (f" (to change a later stage only, set it there: e.g. stages.{index + 1}.{top[0]})"
                 if top and index + 1 < len(stages) else "")
    fresh = " init.hf=null" if init_hf else ""
    return ConfigError(
        f"{run_dir}: {stage.label} {where}, and this command changes settings it trained with: {diffs}{more}. A "
        f"started stage keeps its model, TTT, data, optimizer, schedule, tokens and batch. Put the old values "
        f"back{per_stage}; or train the stage again: run.stages=[{index}] run.restart_stages=true (moves "
        f"{stage.folder} aside); or start a new run from its latest checkpoint: run.dir=NEW_DIR "
        f"init.checkpoint={checkpoint}{fresh}")


def plan_start(cfg, stages) -> StartPlan:
    """The `StartPlan` of composed config `cfg` with resolved `stages` (reads the file system only; call
    on one rank and broadcast). ConfigError: a refusal naming the key and what to do."""
    from omegaconf import OmegaConf

    run_dir = Path(cfg.run.dir)
    chosen = selected(cfg, stages)
    stray = _stray_folders(run_dir, stages)
    if stray:
        raise ConfigError(f"{run_dir} holds checkpoints of stages this config does not name ({', '.join(stray)}): "
                          f"a stage was renamed or removed; keep the curriculum's names (run one stage with "
                          f"run.stages=[...]) or use a new run.dir")
    progress = _progress(stages)
    later = [any(p is not None for p in progress[i + 1:]) for i in range(len(stages))]
    done = [bool(p is not None and p[0] >= s.steps) or later[i] for i, (p, s) in enumerate(zip(progress, stages))]
    fixed = [i for i in range(len(stages)) if progress[i] is not None or done[i]]
    old, new = _read_config(run_dir), OmegaConf.to_container(cfg, resolve=True)
    held = held_changes(old, new, fixed) if old is not None else {}

    aside = []
    if cfg.run.restart_stages:
        if cfg.run.stages is None:
            raise ConfigError("run.restart_stages=true needs run.stages=[...] naming the stages to train again "
                              "(e.g. run.stages=[1] run.restart_stages=true)")
        again = [i for i in chosen if done[i] or i in held]
        if again:
            first = again[0]
            aside = [s.folder for s in stages[first:] if s.folder.exists()]
            progress = progress[:first] + [None] * (len(stages) - first)
            done = done[:first] + [False] * (len(stages) - first)
            held = {i: d for i, d in held.items() if i < first}
    same_data = _same_samples(held, stages, progress)
    held = {i: [d for d in diffs if d not in same_data] for i, diffs in held.items()}
    held = {i: diffs for i, diffs in held.items() if diffs}
    if held:
        raise _refusal(run_dir, stages, held, progress, old, cfg.init.hf)

    todo = [i for i in chosen if not done[i]]
    applied = _changed(old, new) if old is not None else []
    if same_data:
        applied.append(f"(data paths or tokenizer moved: {', '.join(sorted({d[0] for d in same_data}))} name the same "
                       f"samples and tokenizer as the checkpoint's fingerprints)")
    remaining = [i for i in range(len(stages)) if not done[i] and i not in todo]
    if not todo:
        return StartPlan([], applied=applied, remaining=remaining,
                         done=_finished(stages, chosen, progress, cfg.run.stages is None))
    resume = progress[todo[0]][1] if progress[todo[0]] else None
    for k, index in enumerate(todo):
        starts_fresh = index > 0 and (k > 0 or resume is None)
        if starts_fresh and not (k > 0 and todo[k - 1] == index - 1):
            before = progress[index - 1]
            if before is None or before[0] < stages[index - 1].steps:
                state = "has no checkpoint" if before is None else f"is at step {before[0]} of {stages[index - 1].steps}"
                raise ConfigError(f"{stages[index].label} starts from {stages[index - 1].label}'s final checkpoint, but "
                                  f"{stages[index - 1].label} {state} in {run_dir}: train it first (run.stages="
                                  f"[{index - 1},{index}] or without run.stages)")
    return StartPlan(todo, resume, applied, aside, remaining)


def _finished(stages, chosen: list[int], progress, everything: bool) -> str:
    from ttt_train.checkpoint import latest_checkpoint

    if everything:
        return (f"finished already (all {len(stages)} stages done; final checkpoint "
                f"{latest_checkpoint(stages[-1].checkpoints)}); nothing to do")
    labels = ", ".join(stages[i].label for i in chosen)
    folders = " and ".join(str(s.folder) for s in stages[chosen[0]:] if s.folder.exists())
    return (f"{labels} finished already; nothing to do (to train {'it' if len(chosen) == 1 else 'them'} again add "
            f"run.restart_stages=true, which moves {folders or 'their folders'} aside)")


def describe(plan: StartPlan, stages) -> str:
    """One line: what a launch with `plan` does."""
    if not plan.todo:
        return plan.done
    first = stages[plan.todo[0]]
    how = f"resuming {plan.resume}" if plan.resume else "from the previous stage" if first.index else "from init"
    parts = [f"trains {', '.join(stages[i].label for i in plan.todo)} ({first.label} {how})"]
    if plan.aside:
        parts.append(f"after moving aside {', '.join(map(str, plan.aside))}")
    if plan.applied:
        parts.append(f"applying {'; '.join(plan.applied)}")
    return ", ".join(parts)


def move_aside(folders: list[Path]) -> list[str]:
    """Rename each stage folder to `<name>.replaced-<time>` (nothing is deleted); return 'old -> new' lines."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for folder in folders:
        target = folder.with_name(f"{folder.name}.replaced-{stamp}")
        folder.rename(target)
        moved.append(f"{folder} -> {target}")
    return moved

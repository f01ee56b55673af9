"""Train an experiment through its curriculum: `python -m ttt_train.train experiment=NAME [key=value ...]`.

The same command under the launch scripts (`launch/single_node.sh N ...`, `multi_node.sh`,
`slurm.sbatch`) runs on N ranks. Every option is a Hydra override of `configs/train.yaml` (e.g.
`stages.1.seq_length=65536`, `optimizer.lr=1e-5`, `stages.1.parallel.tp=2`); a key the config lacks is
refused, `+` or not. `run.dry_run=true` prints the plan (resolved config, layouts, steps and tokens per
stage, memory per rank, and what a launch in the run folder would do) without compute.

The run folder (`run.dir`, default `runs/<experiment>`) holds `config.yaml` (the config of the last
accepted start), `metrics.jsonl`, `status.json` (the last outcome), `wandb/` and
`stages/<k>_<name>/checkpoints/`. Rerunning the same command resumes where the run stopped, holding
the command against the run (`ttt_train.training.start`); a finished run says so. `run.stages=[...]`
trains chosen stages alone, `run.restart_stages=true` trains them again. Exit codes: 0 done, 75 saved
and stopped early (preemption signal, Ctrl-C or run.exit_after_minutes: rerun to continue), 2 refused
(one line naming the key), 1 failed (one line; a bug shows its traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ttt_train.config_compose import one_line
from ttt_train.training.config import ConfigError, compose
from ttt_train.training.curriculum import Stage, resolve
from ttt_train.training.preemption import EXIT_PREEMPTED, StopFlags
from ttt_train.training.start import selected

EXIT_REFUSED = 2
EXIT_FAILED = 1


def _world_size(cfg) -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if cfg.run.dry_run and cfg.run.world_size:
        return cfg.run.world_size
    return int(os.environ.get("WORLD_SIZE", "1"))


def describe_stage(stage: Stage, world: int) -> str:
    """One paragraph of the plan for `stage`."""
    p, t, m = stage.parallel, stage.training, stage.model
    rotary = (f"YaRN {stage.model.yarn}" if m.yarn else
              f"llama3 scaling x{m.llama3_rope_factor}" if m.llama3_rope_factor else "plain RoPE")
    ttt = f"TTT layers {stage.ttt.layer_indices(m.num_layers)} chunk {stage.ttt.chunk_size} lr {stage.ttt.lr}" \
        if stage.ttt.enabled else "no TTT"
    return (f"{stage.label}: {stage.tokens:,} tokens at seq_length {stage.seq_length:,} = {stage.steps:,} steps of "
            f"{t.global_batch_size} sequences ({stage.tokens_per_step:,} tokens)\n"
            f"  layout: {world} ranks = tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {stage.dp}"
            f"{' (sequence parallel)' if p.sequence_parallel and p.tp > 1 else ''}; micro-batch "
            f"{t.micro_batch_size} x {stage.num_microbatches} accumulation; {t.dtype}, recompute {t.recompute}, "
            f"{'distributed' if stage.ddp.use_distributed_optimizer else 'replicated'} optimizer\n"
            f"  model {m.name} ({m.num_layers} layers, d {m.hidden_size}), rotary: {rotary} (base {m.rotary_base}, "
            f"max positions {m.max_position_embeddings}); {ttt}\n"
            f"  folder: {stage.folder}")


def print_plan(cfg, stages: list[Stage], world: int) -> None:
    from omegaconf import OmegaConf

    from ttt_train.training.plan import format_plan

    print(f"# resolved config of {cfg.run.name}\n{OmegaConf.to_yaml(cfg)}")
    print(f"# plan: {len(stages)} stage(s), {sum(s.tokens for s in stages):,} tokens, run folder {cfg.run.dir}")
    for stage in stages:
        print(describe_stage(stage, world))
        t = stage.training
        print("  " + format_plan(stage.model, stage.ttt, stage.parallel, micro_batch=t.micro_batch_size,
                                 seq_length=stage.seq_length, dtype=t.dtype, recompute=t.recompute,
                                 distributed_optimizer=stage.ddp.use_distributed_optimizer, dp=stage.dp,
                                 tokens_per_step=stage.tokens_per_step,
                                 peak_tflops=cfg.logging.peak_tflops).replace("\n", "\n  "))
    missing = [m for s in stages for m in s.missing]
    for key in ("checkpoint", "hf"):
        if cfg.init[key] and not os.path.isdir(cfg.init[key]):
            missing.append(f"init.{key}: {cfg.init[key]} not found")
    if missing:
        print("# not found here (a real run refuses these):\n  " + "\n  ".join(missing))
    if Path(cfg.run.dir).is_dir():
        from ttt_train.training.start import describe

        planned = _plan(cfg, stages)
        print(f"# a launch now: {'refused: ' + planned[1] if isinstance(planned[0], int) else describe(planned[0], stages)}")


def _write_status(run_dir: Path, **status) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    os.replace(tmp, run_dir / "status.json")


def _refused_status(run_dir: Path, code: int, error: str) -> None:
    """Record a start that was refused (or could not read the run folder), keeping the run's own state."""
    path = run_dir / "status.json"
    try:
        previous = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        previous = None
    if previous and previous.get("state") in ("refused", "unreadable"):
        previous = previous.get("previous")
    if run_dir.is_dir():
        _write_status(run_dir, state="refused" if code == EXIT_REFUSED else "unreadable", exit_code=code,
                      error=error, **({"previous": previous} if previous else {}))


def _finished_status(stages: list[Stage], plan) -> dict:
    """status.json of a launch that trained what it planned: "finished", or "stages_finished" with
    the stages still to train when `run.stages` left some out."""
    if not plan.remaining:
        return {"state": "finished", "exit_code": 0}
    return {"state": "stages_finished", "exit_code": 0, "remaining": [stages[i].name for i in plan.remaining]}


def _broadcast(value):
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _wandb_id(stages: list[Stage], start: int, resume: Path | None) -> str | None:
    """The wandb run id stored in the checkpoint this run continues from, if any (rank 0)."""
    from ttt_train.checkpoint import latest_checkpoint, read_checkpoint_info

    source = resume or (latest_checkpoint(stages[start - 1].checkpoints) if start > 0 else None)
    return read_checkpoint_info(source)["metadata"].get("wandb_id") if source is not None else None


def _plan(cfg, stages: list[Stage]):
    """(StartPlan, wandb id) of this launch, or (exit code, message) when it cannot start (rank 0)."""
    from ttt_train.training.start import plan_start

    try:
        plan = plan_start(cfg, stages)
        return plan, _wandb_id(stages, plan.todo[0], plan.resume) if plan.todo else None
    except ConfigError as err:
        return EXIT_REFUSED, str(err)
    except (OSError, ValueError, KeyError) as err:
        return EXIT_FAILED, f"cannot resume from {cfg.run.dir}: {one_line(err)}"


def _expected_failures() -> tuple:
    """Exceptions that end a run with one line (exit 1, status "failed"): bad files and data, a checkpoint
    that does not fit, too many non-finite steps, out of memory. Anything else is a bug: a traceback."""
    import torch

    from ttt_train.training.numerics import NonFiniteError

    return ValueError, OSError, NotImplementedError, NonFiniteError, torch.OutOfMemoryError


def run(cfg, stages: list[Stage], flags) -> int:
    """Train the stages this launch plans (collective); return the exit code. `flags`: the StopFlags
    installed as early as possible (a signal during set-up then stops the run at its first step)."""
    import torch.distributed as dist

    from ttt_train.runtime.distributed import init_process_group

    init_process_group()
    rank = dist.get_rank()
    run_dir = Path(cfg.run.dir)
    lock = _lock_run_folder(run_dir, cfg.run.lock_timeout_minutes, rank)
    if lock is False:
        return EXIT_REFUSED
    try:
        return _run(cfg, stages, flags, rank, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _lock_run_folder(run_dir: Path, timeout_minutes: float, rank: int):
    """Collective: rank 0 takes the run folder's lock (its RunLock; None on other ranks); False on
    every rank, after rank 0 printed why, when another live run holds it."""
    from ttt_train.runtime.run_lock import RunFolderLocked, RunLock

    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir, timeout_minutes * 60)
        except (RunFolderLocked, OSError) as err:
            error = str(err) if isinstance(err, RunFolderLocked) else f"cannot lock run folder {run_dir}: {err}"
            print(f"error: {error}", file=sys.stderr, flush=True)
        if lock is not None and lock.taken_over:
            print(f"warning: {lock.taken_over}", file=sys.stderr, flush=True)
    return False if _broadcast(error) else lock


def _run(cfg, stages: list[Stage], flags, rank: int, run_dir: Path) -> int:
    """`run` once the run folder is this run's."""
    import traceback

    from omegaconf import OmegaConf

    from ttt_train.checkpoint import CheckpointDamaged, CheckpointSaveError, latest_checkpoint, recover_latest
    from ttt_train.runtime import watchdog
    from ttt_train.training.loop import RunState, train_stage
    from ttt_train.training.metrics import MetricsWriter, new_wandb_id
    from ttt_train.training.plan import flops_per_token
    from ttt_train.training.stage_setup import build, load_start
    from ttt_train.training.start import CONFIG, move_aside

    _start_watchdog(cfg.run, run_dir, rank)
    try:  # a damaged newest checkpoint: fall back to the newest intact one before anything is read
        notes = recover_latest([stage.checkpoints for stage in stages])
    except CheckpointDamaged as err:
        if rank == 0:
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
            _write_status(run_dir, state="failed", exit_code=EXIT_FAILED, error=one_line(err))
        return EXIT_FAILED
    for note in notes if rank == 0 else []:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    planned = _broadcast(_plan(cfg, stages) if rank == 0 else None)
    if isinstance(planned[0], int):  # refused, or the run folder is unreadable: every rank stops
        code, message = planned
        if rank == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
            _refused_status(run_dir, code, message)
        return code
    plan, wandb_id = planned
    if not plan.todo:
        if rank == 0:
            print(f"{cfg.run.name}: {plan.done}", flush=True)
            _write_status(run_dir, **_finished_status(stages, plan))
        return 0
    names = [stages[i].name for i in plan.todo]
    if rank == 0:
        for line in move_aside(plan.aside):
            print(f"{cfg.run.name}: run.restart_stages: moved {line}", flush=True)
        if plan.applied:
            print(f"{cfg.run.name}: changed since the last start, applied: {'; '.join(plan.applied)}", flush=True)
        _write_status(run_dir, state="starting", stages=names)
    wandb_id = _broadcast(wandb_id or (new_wandb_id() if rank == 0 else None))
    writer = MetricsWriter(run_dir, cfg.logging.wandb, cfg.run.name, OmegaConf.to_container(cfg, resolve=True),
                           wandb_id, enabled=rank == 0)
    flags.shield_checkpoint_writer()
    code, state, error, trace = 0, "finished", None, None
    try:
        for k, index in enumerate(plan.todo):
            stage = stages[index]
            resume = plan.resume if k == 0 else None
            watchdog.phase(f"building {stage.label}", generous=True)
            built = build(stage)
            previous = latest_checkpoint(stages[index - 1].checkpoints) if index and resume is None else None
            watchdog.phase(f"loading the start of {stage.label}", generous=True)
            info = load_start(stage, built, resume=resume, previous=previous, init=cfg.init,
                              carry_optimizer=cfg.checkpoint.carry_optimizer)
            if k == 0 and rank == 0:  # the start is accepted and set up: the run folder now describes it
                (run_dir / f".{CONFIG}.tmp").write_text(OmegaConf.to_yaml(cfg, resolve=True))
                os.replace(run_dir / f".{CONFIG}.tmp", run_dir / CONFIG)
                _write_status(run_dir, state="running", stages=names)
            start_step = info.get("step", 0)
            how = f"resumed at step {start_step} from {resume}" if resume else \
                f"from {previous}" if previous else \
                f"from {cfg.init.checkpoint or cfg.init.hf or 'random initialisation'}"
            writer.print(f"{cfg.run.name} {stage.label}: {stage.steps} steps at {stage.seq_length} tokens, {how}")
            state_ = RunState(cfg, writer, flags, wandb_id, sum(s.steps for s in stages[:stage.index]),
                              flops_per_token(stage.model, stage.ttt, stage.seq_length))
            if not train_stage(stage, built, state_, start_step):
                code, state = EXIT_PREEMPTED, "preempted"
                writer.print(f"{cfg.run.name}: saved and stopped ({flags.reason()}); rerun the same command to "
                             f"continue (exit code {EXIT_PREEMPTED})")
                break
        else:
            left = [stages[i].label for i in plan.remaining]
            if left:
                writer.print(f"{cfg.run.name}: finished {', '.join(stages[i].label for i in plan.todo)}; still to "
                             f"train: {', '.join(left)} (rerun without run.stages, or name them); run folder {run_dir}")
            else:
                writer.print(f"{cfg.run.name}: finished all {len(stages)} stages; run folder {run_dir}")
    except ConfigError as err:
        code, state, error = EXIT_REFUSED, "refused", one_line(err)
    except CheckpointSaveError as err:
        code, state, error, trace = EXIT_FAILED, "failed", one_line(err), traceback.format_exc()
        error += "; free space there and rerun the same command" if err.disk_full else "; rerun the same command"
        if err.disk_full and cfg.checkpoint.on_save_error != "retry":
            error += ", or set checkpoint.on_save_error=retry to train on through failed periodic saves"
    except _expected_failures() as err:
        code, state, error, trace = EXIT_FAILED, "failed", one_line(err), traceback.format_exc()
    except KeyboardInterrupt:
        code, state = EXIT_FAILED, "interrupted"
        error = ("interrupted by SIGINT, which run.signals does not list: the steps since the last checkpoint are "
                 "lost (add SIGINT to run.signals to save on Ctrl-C)")
    except BaseException as err:  # a bug: its traceback follows; the status says so
        if rank == 0:
            _write_status(run_dir, state="failed", exit_code=EXIT_FAILED,
                          error=f"unexpected {type(err).__name__}: {one_line(err)} (traceback on the console)")
        raise
    finally:
        writer.close()
    if error and rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    if rank == 0:
        extra = {"error": error} if error else {}
        if trace:
            extra["traceback"] = trace
        status = _finished_status(stages, plan) if state == "finished" else {"state": state, "exit_code": code}
        _write_status(run_dir, **status, **extra)
    return code


def _start_watchdog(run_cfg, run_dir: Path, rank: int) -> None:
    """The hang watchdog (`ttt_train.runtime.watchdog`) with the run's timeouts; rank 0 records a hang in
    status.json before the process ends. Off when run.collective_timeout_minutes is 0."""
    from ttt_train.runtime import watchdog

    if run_cfg.collective_timeout_minutes <= 0:
        return

    def on_hang(message: str) -> None:
        if rank == 0:
            _write_status(run_dir, state="failed", exit_code=watchdog.EXIT_HUNG, error=message)

    watchdog.start(run_cfg.collective_timeout_minutes * 60, run_cfg.startup_timeout_minutes * 60,
                   keys=("run.collective_timeout_minutes", "run.startup_timeout_minutes"), on_hang=on_hang)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from ttt_train.cli_help import CONFIG_ROOT, config_help, wants_help

    if wants_help(argv):
        print(config_help(__doc__, CONFIG_ROOT / "train.yaml"))
        return 0
    try:
        cfg = compose(argv)
        world = _world_size(cfg)
        stages = resolve(cfg, world, check_files=not cfg.run.dry_run)
        chosen = selected(cfg, stages)
        if not cfg.run.dry_run and _starts_from_init(cfg, stages, chosen):
            from ttt_train.training.stage_setup import check_init

            check_init(cfg.init, stages[0])
    except ConfigError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    if cfg.run.dry_run:
        print_plan(cfg, stages, world)
        return 0
    try:
        flags = StopFlags(list(cfg.run.signals), cfg.run.exit_after_minutes, cfg.checkpoint.every_minutes)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    from ttt_train.runtime.parent_watch import launched_by_torchrun, stop_with_parent

    if launched_by_torchrun():  # killing only torchrun must not leave this worker training
        stop_with_parent()
    try:
        return run(cfg, stages, flags)
    finally:
        from ttt_train.runtime import watchdog

        watchdog.stop()
        flags.restore()


def _starts_from_init(cfg, stages: list[Stage], chosen: list[int]) -> bool:
    """Whether this launch may start stage 0 from `init` (it is chosen and nothing has trained yet, or
    it is trained again): only then must init.hf / init.checkpoint exist and match the experiment."""
    if chosen[0] != 0:
        return False
    return cfg.run.restart_stages or not any((s.checkpoints / "latest").is_file() for s in stages)


if __name__ == "__main__":
    from ttt_train.runtime import quiet  # noqa: F401 - megatron's expected CPU warnings

    sys.exit(main())

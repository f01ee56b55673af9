"""Train an experiment through its curriculum: `python -m ttt_train.train experiment=NAME [key=value ...]`.

The same command under `torchrun --nproc-per-node N -m ttt_train.train ...` runs on N ranks. Every
option is a Hydra override of `configs/train.yaml` (e.g. `stages.1.seq_length=65536`,
`optimizer.lr=1e-5`, `stages.1.parallel.tp=2`); `run.dry_run=true` prints the plan (resolved
config, layouts, steps and tokens per stage, memory per rank) without compute.

The run folder (`run.dir`, default `runs/<experiment>`) holds `config.yaml`, `metrics.jsonl`,
`status.json`, `wandb/` and `stages/<k>_<name>/checkpoints/`. Rerunning the same command resumes
where the run stopped; a finished run says so. Exit codes: 0 done, 75 saved and stopped early
(preemption signal or run.exit_after_minutes: rerun to continue), 2 refused configuration,
1 failure (e.g. too many non-finite steps).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ttt_train.training.config import ConfigError, compose
from ttt_train.training.curriculum import Stage, resolve, resume_point
from ttt_train.training.preemption import EXIT_PREEMPTED, StopFlags

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


def _write_status(run_dir: Path, **status) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    os.replace(tmp, run_dir / "status.json")


def _broadcast(value):
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _wandb_id(stages: list[Stage], start: int, resume: Path | None) -> str | None:
    """The wandb run id stored in the checkpoint this run continues from, if any (rank 0)."""
    from ttt_train.training.checkpoint import latest_checkpoint, read_checkpoint_info

    source = resume or (latest_checkpoint(stages[start - 1].checkpoints) if start > 0 else None)
    return read_checkpoint_info(source)["metadata"].get("wandb_id") if source is not None else None


def run(cfg, stages: list[Stage], flags) -> int:
    """Train every stage not yet finished (collective); return the exit code. `flags`: the StopFlags
    installed as early as possible (a signal during set-up then stops the run at its first step)."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from ttt_train.runtime.distributed import init_process_group
    from ttt_train.training.checkpoint import latest_checkpoint
    from ttt_train.training.loop import RunState, train_stage
    from ttt_train.training.metrics import MetricsWriter, new_wandb_id
    from ttt_train.training.numerics import NonFiniteError
    from ttt_train.training.plan import flops_per_token
    from ttt_train.training.stage_setup import build, load_start

    init_process_group()
    rank = dist.get_rank()
    run_dir = Path(cfg.run.dir)
    planned = _broadcast(_plan_start(stages) if rank == 0 else None)
    if isinstance(planned, str):  # rank 0 could not read the run folder: every rank stops with its message
        if rank == 0:
            print(f"error: {planned}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    start, resume, wandb_id = planned
    if start == len(stages):
        if rank == 0:
            print(f"{cfg.run.name}: finished already (all {len(stages)} stages done; final checkpoint "
                  f"{latest_checkpoint(stages[-1].checkpoints)}); nothing to do", flush=True)
        return 0
    if rank == 0:
        (run_dir).mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        _write_status(run_dir, state="running", stage=start)
    wandb_id = _broadcast(wandb_id or (new_wandb_id() if rank == 0 else None))
    writer = MetricsWriter(run_dir, cfg.logging.wandb, cfg.run.name, OmegaConf.to_container(cfg, resolve=True),
                           wandb_id, enabled=rank == 0)
    flags.shield_checkpoint_writer()
    code, state, error = 0, "finished", None
    try:
        for stage in stages[start:]:
            built = build(stage, cfg.validation)
            previous = latest_checkpoint(stages[stage.index - 1].checkpoints) if stage.index and resume is None else None
            info = load_start(stage, built, resume=resume, previous=previous, init=cfg.init,
                              carry_optimizer=cfg.checkpoint.carry_optimizer)
            start_step = info.get("step", 0)
            how = f"resumed at step {start_step} from {resume}" if resume else \
                f"from {previous}" if previous else \
                f"from {cfg.init.checkpoint or cfg.init.hf or 'random initialisation'}"
            writer.print(f"{cfg.run.name} {stage.label}: {stage.steps} steps at {stage.seq_length} tokens, {how}")
            state_ = RunState(cfg, writer, flags, wandb_id, sum(s.steps for s in stages[:stage.index]),
                              flops_per_token(stage.model, stage.ttt, stage.seq_length))
            resume = None
            if not train_stage(stage, built, state_, start_step):
                code, state = EXIT_PREEMPTED, "preempted"
                writer.print(f"{cfg.run.name}: saved and stopped ({flags.reason()}); rerun the same command to "
                             f"continue (exit code {EXIT_PREEMPTED})")
                break
        else:
            writer.print(f"{cfg.run.name}: finished all {len(stages)} stages; run folder {run_dir}")
    except NonFiniteError as err:
        code, state, error = EXIT_FAILED, "failed", str(err)
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
    finally:
        writer.close()
    if rank == 0:
        _write_status(run_dir, state=state, exit_code=code, **({"error": error} if error else {}))
    return code


def _plan_start(stages: list[Stage]) -> tuple[int, Path | None, str | None] | str:
    """(stage to run, checkpoint to resume, wandb id), or the error that prevents reading them."""
    try:
        start, resume = resume_point(stages)
        return start, resume, _wandb_id(stages, start, resume) if start < len(stages) else None
    except (OSError, ValueError, KeyError) as err:
        return f"cannot resume from {stages[0].folder.parent}: {err}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        cfg = compose(argv)
        world = _world_size(cfg)
        stages = resolve(cfg, world, check_files=not cfg.run.dry_run)
        if cfg.init.hf and not cfg.run.dry_run:
            from ttt_train.training.stage_setup import check_hf_init

            check_hf_init(cfg.init, stages[0].model)
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
    try:
        return run(cfg, stages, flags)
    finally:
        flags.restore()


if __name__ == "__main__":
    from ttt_train.runtime import quiet  # noqa: F401 - megatron's expected CPU warnings

    sys.exit(main())

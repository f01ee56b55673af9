"""The training loop of one stage: step, log, validate, checkpoint, stop when asked.

Every rank runs the same sequence of collectives whatever happens: one small agreement at the
stage's start (a signal during the hand-off or the build stops the run there, with nothing new to
save), the step (with one agreement on non-finite gradients), one small agreement per step
(`StopFlags.agree`), on a skipped step the search for where the non-finite values came from, and,
at log intervals only, the gathering of losses and TTT stats on rank 0 (host syncs for metrics happen
there and nowhere else; the TTT layers record statistics on the steps that are logged only).

Each rank names what it is doing for the hang watchdog (`ttt_train.runtime.watchdog`): one phase per
micro-batch, generous phases for the stage's start and for saves, the lowered collective timeout
after the stage's first step.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.distributed as dist

from ttt_train.runtime import watchdog
from ttt_train.training import fault_injection
from ttt_train.training.curriculum import Stage
from ttt_train.training.metrics import (
    console_line,
    flatten_ttt_stats,
    gather_ttt_stats,
    peak_memory_gib,
    record_ttt_stats,
)
from ttt_train.training.numerics import NonFiniteLocator, SkipCounter
from ttt_train.training.schedule import inner_lr, set_inner_lr
from ttt_train.training.stage_setup import Built, rank_state
from ttt_train.training.step import run_step


@dataclasses.dataclass
class RunState:
    """What the loop needs from the run around it."""

    cfg: object  # the composed config
    writer: object  # MetricsWriter
    flags: object  # StopFlags
    wandb_id: str
    run_step_offset: int  # steps of the earlier stages
    flops_per_token: float | None


def _from_last_rank(value, pp: int):
    """`value` of the last pipeline stage (where losses live) on every rank (collective when pp > 1)."""
    if pp == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=dist.get_world_size() - 1)
    return holder[0]


def _micro_batches(batches, count: int, what: str):
    """The next `count` micro-batches of `batches`, each named to the watchdog (`what`: the step)."""
    for i in range(count):
        watchdog.phase(f"{what} micro-batch {i + 1}/{count}")
        if i == 0:
            fault_injection.at("step")
        yield next(batches)


def save(stage: Stage, built: Built, run: RunState, step: int, *, reason: str) -> None:
    """Checkpoint `step` of `stage` into its folder (collective). A failed periodic save with
    `checkpoint.on_save_error=retry` is reported and training goes on (the next interval retries);
    any other failed save raises CheckpointSaveError (the same on every rank)."""
    from ttt_train.checkpoint import CheckpointSaveError, save_checkpoint

    gbs = stage.training.global_batch_size
    metadata = {"stage": stage.index, "stage_name": stage.name, "step": step, "run_step": run.run_step_offset + step,
                "consumed_samples": step * gbs, "consumed_tokens": step * gbs * stage.seq_length,
                "scheduler": built.scheduler.state_dict(), "wandb_id": run.wandb_id, "reason": reason,
                "stage_complete": step >= stage.steps}
    watchdog.phase(f"{stage.label} saving step {step} ({reason})", generous=True)
    try:
        path = save_checkpoint(stage.checkpoints, step, built.chunks, built.optimizer, metadata,
                               manifest=built.manifest, rank_state=rank_state(), keep_last=run.cfg.checkpoint.keep_last)
    except CheckpointSaveError as err:
        run.flags.saved()  # the next try comes at the next interval, not at the next step
        if reason != "periodic" or run.cfg.checkpoint.on_save_error != "retry":
            raise
        run.writer.print(f"warning: {err}; training on (checkpoint.on_save_error=retry), next try at the next interval")
        return
    run.flags.saved()
    run.writer.print(f"saved {path} ({reason})")


def validate(stage: Stage, built: Built, run: RunState, step: int) -> None:
    """Held-out loss and loss by position bucket on the validation split; logged by rank 0."""
    from megatron.core import parallel_state as ps

    from ttt_train.data.datasets import build_dataloader

    v = stage.validation
    loader = build_dataloader(built.valid_set, built.tokenizer.eod_id, 0, stage.training.micro_batch_size,
                              ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    for chunk in built.chunks:
        chunk.eval()
    with torch.no_grad():
        result = run_step(built.chunks, _micro_batches(iter(loader), v.num_batches, f"{stage.label} validation at step "
                                                       f"{step}"), num_microbatches=v.num_batches,
                          micro_batch_size=stage.training.micro_batch_size,
                          seq_length=stage.seq_length // stage.parallel.cp, forward_only=True,
                          position_buckets=v.position_buckets)
        recall = _recall_loss(stage, built) if built.recall_set is not None else None
    for chunk in built.chunks:
        chunk.train()
    loss, by_position, recall = _from_last_rank((result["loss"], result["position_loss"], recall), stage.parallel.pp)
    sums, counts = by_position.tolist()
    record = {"stage": stage.index, "stage_name": stage.name, "step": step, "run_step": run.run_step_offset + step,
              "val/loss": loss}
    if recall is not None:
        record["val/recall_loss"] = recall
    edges = [round((i + 1) * stage.seq_length / v.position_buckets) for i in range(v.position_buckets)]
    record.update({f"val/loss_pos_{edge}": s / c if c else float("nan") for edge, s, c in zip(edges, sums, counts)})
    run.writer.log(record)
    run.writer.print(f"{stage.label}  step {step}/{stage.steps}  validation loss {loss:.4f}"
                     + (f"  recall loss {recall:.4f}" if recall is not None else "") + "  by position "
                     + " ".join(f"{record[f'val/loss_pos_{e}']:.3f}" for e in edges))


def _recall_loss(stage: Stage, built: Built) -> float | None:
    """Mean loss on the recall tokens of this rank's `validation.recall_records` rows (all ranks
    reduce; None off the last pipeline stage)."""
    rows, micro = built.recall_set, stage.training.micro_batch_size
    batches = iter([{k: v[i:i + micro] for k, v in rows.items()} for i in range(0, len(rows["tokens"]), micro)])
    return run_step(built.chunks, batches, num_microbatches=len(rows["tokens"]) // micro, micro_batch_size=micro,
                    seq_length=stage.seq_length // stage.parallel.cp, forward_only=True)["loss"]


def train_stage(stage: Stage, built: Built, run: RunState, start_step: int) -> bool:
    """Train `stage` from `start_step` to its end; return False if asked to stop (after saving, if
    anything changed since the checkpoint it started from)."""
    watchdog.steady(False)
    fault_injection.install(built.chunks, stage=stage.index, signal_seen=lambda: run.flags.received is not None)
    locator = NonFiniteLocator(built.chunks)
    try:
        return _train(stage, built, run, start_step, locator)
    finally:
        locator.remove()
        fault_injection.remove()


def _train(stage: Stage, built: Built, run: RunState, start_step: int, locator: NonFiniteLocator) -> bool:
    from megatron.core import parallel_state as ps

    from ttt_train.data.datasets import build_dataloader

    t, cfg = stage.training, run.cfg
    if start_step == 0 and stage.index > 0:
        fault_injection.at("handoff")
    watchdog.phase(f"{stage.label} starting at step {start_step}", generous=True)
    stop, _ = run.flags.agree()
    if stop:
        run.writer.print(f"{stage.label}: stopping before step {start_step + 1} ({run.flags.reason()}); nothing new "
                         f"to save")
        return False
    batches = iter(build_dataloader(built.train_set, built.tokenizer.eod_id, start_step * t.global_batch_size,
                                    t.micro_batch_size, ps.get_data_parallel_rank(),
                                    ps.get_data_parallel_world_size(), stage.data.num_workers))
    skips = SkipCounter(t.max_skipped_steps)
    pending: list[tuple] = []  # (loss, lr, grad norm, where the non-finite values came from or None) since the last log
    interval_start = stage_start = time.perf_counter()
    step = start_step
    while step < stage.steps:
        logged = (step + 1) % cfg.logging.interval == 0 or step + 1 == stage.steps
        record_ttt_stats(built.ttt_layers, logged)
        locator.reset()
        fault_injection.position(step + 1)
        set_inner_lr(built.ttt_layers, inner_lr(stage.ttt.lr, stage.lr_warmup, run.run_step_offset + step))
        lr = built.optimizer.param_groups[0]["lr"]
        result = run_step(built.chunks, _micro_batches(batches, stage.num_microbatches, f"{stage.label} step {step + 1}"),
                          num_microbatches=stage.num_microbatches, micro_batch_size=t.micro_batch_size,
                          seq_length=stage.seq_length // stage.parallel.cp, optimizer=built.optimizer,
                          skip_nonfinite=True)
        built.scheduler.step(1)
        step += 1
        watchdog.phase(f"{stage.label} after step {step}")
        if step == start_step + 1:
            watchdog.steady()
        where = locator.describe() if result["skipped"] else None
        if where:
            run.writer.print(f"{stage.label}  step {step}: update skipped (loss {result['loss']}, gradient norm "
                             f"{result['grad_norm']}): {where}")
        skips.update(result["skipped"], step, result["loss"], result["grad_norm"], where)
        pending.append((result["loss"], lr, result["grad_norm"], where))
        if logged:
            now = time.perf_counter()
            _log(stage, built, run, step, pending, now - interval_start, now - stage_start, start_step, skips.total)
            record_ttt_stats(built.ttt_layers, False)
            pending, interval_start = [], time.perf_counter()
        if stage.validation.every_steps and (step % stage.validation.every_steps == 0 or step == stage.steps):
            validate(stage, built, run, step)
        stop, save_due = run.flags.agree()
        if step == stage.steps:
            save(stage, built, run, step, reason="stage end")
            return not stop or stage.index == len(cfg.stages) - 1  # the last stage: finished, not stopped
        if stop:
            save(stage, built, run, step, reason=f"stopping: {run.flags.reason()}")
            return False
        elif not result["skipped"] and (save_due or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)):
            save(stage, built, run, step, reason="periodic")
    return True


def _log(stage: Stage, built: Built, run: RunState, step: int, pending: list, interval_s: float, stage_s: float,
         start_step: int, skipped_total: int) -> None:
    """One metrics record (rank 0) for the steps in `pending` (collective: losses and TTT stats)."""
    losses = _from_last_rank([p[0] for p in pending], stage.parallel.pp)
    ttt = flatten_ttt_stats(gather_ttt_stats(built.ttt_layers))
    if not run.writer.enabled:
        return
    n = len(pending)
    tokens_per_s = n * stage.tokens_per_step / interval_s
    world = dist.get_world_size()
    finite = [x for x in losses if x is not None and math.isfinite(x)]
    record = {"stage": stage.index, "stage_name": stage.name, "step": step, "run_step": run.run_step_offset + step,
              "loss": sum(finite) / len(finite) if finite else float("nan"), "losses": losses,
              "lr": pending[-1][1], "grad_norm": pending[-1][2], "skipped_steps": skipped_total,
              "ttt_lr": built.ttt_layers[0].ttt_lr if built.ttt_layers else 0.0,
              "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / world,
              "consumed_tokens": step * stage.tokens_per_step, "peak_memory_gib": peak_memory_gib(), **ttt}
    skipped = [p[3] for p in pending if p[3]]
    if skipped:
        record["nonfinite"] = skipped[-1]  # where the last skipped step's non-finite values came from
    if run.flops_per_token is not None:
        record["tflops_per_device"] = run.flops_per_token * tokens_per_s / world / 1e12
        if run.cfg.logging.peak_tflops:
            record["mfu"] = record["tflops_per_device"] / run.cfg.logging.peak_tflops
    run.writer.log(record)
    eta = (stage.steps - step) * stage_s / max(step - start_step, 1)
    run.writer.print(console_line(record, f"{stage.label}", stage.steps, eta))

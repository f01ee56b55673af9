"""Functions run inside local ranks (`run_local_ranks`) by the fault and statistics tests."""

from __future__ import annotations

import torch

CHUNK, SEQ, LR, TAU = 4, 48, 2.0, 1.3


def ttt_stats_over_cp() -> dict:
    """One float64 TTTMLP at CP=2 (2 ranks): two micro-batches recorded, one forward not recorded; returns
    (on every rank) the aggregated statistics (`gather_ttt_stats`, rank 0), this rank's own, whether the
    unrecorded forward left them alone, and the inputs a hand computation needs."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    from tests.support.scenarios import _depthwise_conv_per_chunk_f64
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
    from ttt_train.runtime.distributed import ParallelConfig, initialize
    from ttt_train.training.metrics import gather_ttt_stats, record_ttt_stats

    parallel = ParallelConfig(cp=2)
    initialize(parallel)
    model_cfg = load_model_config("tiny", num_layers=1)
    config = to_transformer_config(model_cfg, parallel)
    config.params_dtype = torch.float64
    ttt = TTTConfig(layers=[0], chunk_size=CHUNK, lr=LR, max_update_norm=TAU)
    model = build_gpt_model(model_cfg, config, ttt=ttt).double()
    mlp = model.decoder.layers[0].mlp
    g = torch.Generator().manual_seed(0)  # the same weights and inputs on both ranks
    with torch.no_grad():
        for param in mlp.parameters():
            param.copy_(0.05 * torch.randn(param.shape, generator=g, dtype=torch.float64))
    batches = []
    for _ in range(2):
        x = torch.randn(2, SEQ, model_cfg.hidden_size, generator=g, dtype=torch.float64)  # [b, S, d]
        cut = int(torch.randint(5, SEQ - 5, (1,), generator=g))
        doc_ids = torch.stack([torch.zeros(SEQ, dtype=torch.long), (torch.arange(SEQ) >= cut).long()])
        batches.append((x, doc_ids))
    record_ttt_stats([mlp], True)
    with torch.no_grad():
        for x, doc_ids in batches:
            local = get_batch_on_this_cp_rank({"x": x, "doc_ids": doc_ids})
            mlp(local["x"].transpose(0, 1).contiguous(), padding_mask=local["doc_ids"])
        own = {k: v.item() for k, v in mlp.ttt_stats().items()}
        record_ttt_stats([mlp], False)
        before = mlp.stats_accumulator().clone()
        local = get_batch_on_this_cp_rank({"x": batches[0][0], "doc_ids": batches[0][1]})
        mlp(local["x"].transpose(0, 1).contiguous(), padding_mask=local["doc_ids"])
        untouched = bool(torch.equal(before, mlp.stats_accumulator()))
        gathered = gather_ttt_stats([mlp])
        inputs = []
        for x, doc_ids in batches:  # z and v of the whole sequence, recomputed independently
            gate, up = (x @ mlp.linear_fc1.weight.T).chunk(2, dim=-1)
            v = _depthwise_conv_per_chunk_f64(x, mlp.ttt_target.conv.weight, CHUNK, doc_ids) @ mlp.ttt_target.proj.weight.T
            inputs.append((F.silu(gate) * up, v, doc_ids))
    return dict(rank=ps.get_context_parallel_rank(), gathered=gathered, own=own, untouched=untouched,
                inputs=inputs, weight=mlp.linear_fc2.weight.detach().clone())


def ttt_stats_by_hand(inputs, weight, cp: int) -> tuple[dict, list[dict]]:
    """The statistics from their definition: (over both micro-batches and every CP rank, per rank).

    Every chunk of the sequence is updated by the rank holding it (each rank runs its shards to their end):
    `||lr V_c^T Z_c||` over the chunk's last-document tokens. The fast weight rank r reports is the one the
    last chunk of its second shard (shard 2 cp - 1 - r) applies to its first document: W_down plus the
    clipped updates of every earlier chunk of that document, whichever rank computed them."""
    shard = SEQ // (2 * cp)
    norms, clipped, targets = [], [], []
    rel = {r: [] for r in range(cp)}
    for z, v, doc_ids in inputs:
        targets.append(v.norm(dim=-1).flatten())
        for b in range(z.shape[0]):
            updates = []
            for c in range(0, SEQ, CHUNK):
                docs = doc_ids[b, c:c + CHUNK]
                rows = docs == docs[-1]
                u = LR * v[b, c:c + CHUNK][rows].T @ z[b, c:c + CHUNK][rows]
                updates.append((c, docs[-1], u))
                norms.append(u.norm())
                clipped.append(u.norm() > TAU)
            for r in range(cp):
                last = (2 * cp - 1 - r) * shard + shard - CHUNK
                state = weight.clone()
                for c, doc, u in updates:
                    if c < last and doc == doc_ids[b, last]:
                        state = state + u * min(1.0, TAU / u.norm().item())
                rel[r].append(((state - weight).norm() / weight.norm()).item())
    norms, targets = torch.stack(norms), torch.cat(targets)
    every = [x for r in range(cp) for x in rel[r]]
    total = dict(update_norm_mean=norms.mean().item(), update_norm_max=norms.max().item(),
                 clipped_fraction=torch.stack(clipped).double().mean().item(),
                 fast_weight_rel_change=sum(every) / len(every), fast_weight_rel_change_max=max(every),
                 target_norm=targets.mean().item(), target_norm_max=targets.max().item())
    per_rank = [dict(fast_weight_rel_change=sum(rel[r]) / len(rel[r]), fast_weight_rel_change_max=max(rel[r]))
                for r in range(cp)]
    return total, per_rank


def driver_with_parameters(overrides: list[str]) -> dict:
    """Run the driver (TTT_FAULTS comes through the ranks' environment); return its exit code and this
    rank's parameters at the end (names without wrappers, and which are replicated over TP)."""
    from megatron.core import parallel_state as ps

    from ttt_train import train
    from ttt_train.training import loop
    from ttt_train.training.numerics import strip_wrappers

    captured = []
    original = loop.train_stage

    def capturing(stage, built, run, start_step):
        captured.append(built)
        return original(stage, built, run, start_step)

    loop.train_stage = capturing
    try:
        code = train.main(overrides)
    finally:
        loop.train_stage = original
    chunk = captured[-1].chunks[0]
    params = {strip_wrappers(n): p.detach().clone() for n, p in chunk.named_parameters()}
    replicated = {strip_wrappers(n) for n, p in chunk.named_parameters() if not getattr(p, "tensor_model_parallel", False)}
    return dict(code=code, params=params, replicated=replicated, tp_rank=ps.get_tensor_model_parallel_rank(),
                cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank())


def driver_on_a_fake_clock(overrides: list[str], step_seconds: float) -> tuple[int, list[bool]]:
    """Run the driver with StopFlags on a clock that advances `step_seconds` per training step (nothing
    sleeps); return the exit code and, for each TTT op call, whether it recorded statistics."""
    import functools

    from ttt_train import train
    from ttt_train.layers import ttt_mlp
    from ttt_train.training import loop, preemption

    now = [0.0]
    recorded = []
    run_step, op, flags = loop.run_step, ttt_mlp.inplace_ttt, train.StopFlags

    def stepping(*args, **kwargs):
        result = run_step(*args, **kwargs)
        if not kwargs.get("forward_only"):
            now[0] += step_seconds
        return result

    def recording(*args, **kwargs):
        recorded.append(bool(kwargs.get("return_stats")))
        return op(*args, **kwargs)

    loop.run_step, ttt_mlp.inplace_ttt = stepping, recording
    train.StopFlags = functools.partial(preemption.StopFlags, clock=lambda: now[0])
    try:
        return train.main(overrides), recorded
    finally:
        loop.run_step, ttt_mlp.inplace_ttt, train.StopFlags = run_step, op, flags


def collectives_with_a_stopped_rank(report: str, stop_at: int | None) -> None:
    """All-reduces in named phases under a watchdog (3 s once steady, 6 s before); rank 1 SIGSTOPs itself as
    phase `stop_at` starts (None: none does, but one phase is slow: 2.4 s, within the limit). Each rank's
    hang report goes to `report` (a file)."""
    import os
    import signal
    import time

    import torch.distributed as dist

    from ttt_train.runtime import watchdog

    rank = dist.get_rank()
    watchdog.start(3.0, 6.0, keys=("run.collective_timeout_minutes", "run.startup_timeout_minutes"),
                   on_hang=lambda message: open(report, "a").write(f"{time.time()} {message}\n"))
    tensor = torch.ones(4)
    try:
        for i in range(1, 12):
            watchdog.phase(f"step {i}")
            if i == 2:
                watchdog.steady()
            if rank == 1 and i == stop_at:
                open(report, "a").write(f"{time.time()} stopped\n")
                os.kill(os.getpid(), signal.SIGSTOP)
            if stop_at is None and i == 5:
                time.sleep(2.4)
            dist.all_reduce(tensor)
    finally:
        watchdog.stop()

"""Small megatron scenarios run inside local ranks: training, recompute, YaRN, pipeline, checkpoints.

Each function is module-level so `run_local_ranks` can start it in fresh rank processes.
"""

from __future__ import annotations

import torch

from tests.support.parallel_cases import make_batch
from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
from ttt_train.runtime.distributed import ParallelConfig, initialize
from ttt_train.training.optimizer import OptimizerArgs, build_optimizer
from ttt_train.training.setup import DDPConfig, wrap_for_training
from ttt_train.training.step import run_step


def _repeat(batch: dict, micro: int):
    while True:
        for i in range(0, batch["tokens"].shape[0], micro):
            yield {k: v[i:i + micro] for k, v in batch.items()}


def train_losses(layout: dict, steps: int = 12, distributed_optimizer: bool = False, dtype: str = "fp32",
                 recompute: str | None = None, model_overrides: dict | None = None, seq: int = 32,
                 lr: float = 3e-3) -> list[float | None]:
    """Train the tiny model on one fixed batch with megatron DDP + AdamW; return the loss per step."""
    parallel = ParallelConfig(**layout)
    dp = initialize(parallel)
    model_cfg = load_model_config("tiny", **(model_overrides or {}))
    config = to_transformer_config(model_cfg, parallel, dtype=dtype, recompute=recompute)
    chunks = wrap_for_training(build_gpt_model(model_cfg, config), config,
                               DDPConfig(use_distributed_optimizer=distributed_optimizer))
    optimizer = build_optimizer(OptimizerArgs(lr=lr, weight_decay=0.0), chunks, config,
                                use_distributed_optimizer=distributed_optimizer)
    batch = make_batch(3, 4, seq, model_cfg.vocab_size)
    from megatron.core import parallel_state as ps

    rows = slice(ps.get_data_parallel_rank() * 4 // dp, (ps.get_data_parallel_rank() + 1) * 4 // dp)
    data = _repeat({k: v[rows] for k, v in batch.items()}, 2)
    return [run_step(chunks, data, num_microbatches=4 // dp // 2, micro_batch_size=2, seq_length=seq,
                     optimizer=optimizer)["loss"] for _ in range(steps)]


def optimizer_groups(optimizer_args: dict, ttt: dict | None = None) -> list[dict]:
    """The param groups `build_optimizer` makes for the tiny TTT model: per group the parameter names
    (sorted), max_lr, min_lr and wd_mult."""
    from ttt_train.layers.ttt_config import TTTConfig

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny")
    config = to_transformer_config(model_cfg, parallel)
    model = build_gpt_model(model_cfg, config, ttt=TTTConfig(**(ttt or {"every": 2})))
    chunks = wrap_for_training(model, config, DDPConfig())
    optimizer = build_optimizer(OptimizerArgs(**optimizer_args), chunks, config)
    names = {id(p): n for n, p in chunks[0].named_parameters()}
    return [{"names": sorted(names[id(p)] for p in g["params"]), "max_lr": g["max_lr"], "min_lr": g["min_lr"],
             "wd_mult": g["wd_mult"]} for g in optimizer.param_groups]


def yarn_rotary(seq: int, settings: list[dict]) -> list[dict]:
    """For each YaRN setting (model.yarn keys): the rotary embedding megatron builds from
    `to_transformer_config` / `build_gpt_model` (class, inverse frequencies, the concentration factor
    attention applies to q and k), and a forward on `seq` tokens (past the original context)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    parallel = ParallelConfig()
    initialize(parallel)
    results = []
    for yarn in settings:
        model_cfg = load_model_config("tiny", num_layers=1, yarn=yarn)
        config = to_transformer_config(model_cfg, parallel)
        model = build_gpt_model(model_cfg, config)
        emb, _ = model.rotary_pos_emb.get_emb(2)  # [2, 1, 1, head_dim]: angles of positions 0 and 1
        batch = make_batch(1, 1, seq, model_cfg.vocab_size)
        with torch.no_grad():
            out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        results.append(dict(rotary=type(model.rotary_pos_emb).__name__, inv_freq=emb[1, 0, 0, :model_cfg.kv_channels // 2],
                            mscale=_yarn_get_concentration_factor_from_config(config),
                            head_dim=model_cfg.kv_channels, rotary_base=model_cfg.rotary_base,
                            finite=bool(torch.isfinite(out).all())))
    return results


def crash_during_save(root: str) -> dict:
    """Save step 1, then crash inside the save of step 2; return what `latest` says afterwards."""
    from unittest import mock

    from megatron.core import dist_checkpointing

    from ttt_train.checkpoint import CheckpointSaveError, latest_checkpoint, load_checkpoint, save_checkpoint

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny")
    config = to_transformer_config(model_cfg, parallel)
    chunks = wrap_for_training(build_gpt_model(model_cfg, config), config, DDPConfig())
    save_checkpoint(root, 1, chunks, metadata={"note": "good"})
    real_save = dist_checkpointing.save

    def broken_save(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)
        raise OSError("disk full (injected)")

    with mock.patch.object(dist_checkpointing, "save", broken_save):
        try:
            save_checkpoint(root, 2, chunks)
        except CheckpointSaveError as err:  # the OSError, reported alike on every rank
            error = str(err)
    meta = load_checkpoint(root, chunks)
    return dict(error=error, latest=latest_checkpoint(root).name, meta=meta)


def pp_tied_build() -> bool:
    """Build the tiny (tied-embedding) model split over two pipeline stages."""
    parallel = ParallelConfig(pp=2)
    initialize(parallel)
    model_cfg = load_model_config("tiny")
    build_gpt_model(model_cfg, to_transformer_config(model_cfg, parallel))
    return True


def checkpoint_save(root: str) -> bool:
    from ttt_train.checkpoint import save_checkpoint

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny")
    config = to_transformer_config(model_cfg, parallel)
    save_checkpoint(root, 0, wrap_for_training(build_gpt_model(model_cfg, config), config, DDPConfig()))
    return True


def ttt_spec_layers(ttt: dict, pp: int) -> list[int]:
    """Global indices of this stage's TTT layers in a 12-layer tiny model split over `pp` stages."""
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.layers.ttt_mlp import TTTMLP

    parallel = ParallelConfig(pp=pp)
    initialize(parallel)
    model_cfg = load_model_config("tiny", num_layers=12)
    model = build_gpt_model(model_cfg, to_transformer_config(model_cfg, parallel), ttt=TTTConfig.from_dict(ttt))
    return [layer.layer_number - 1 for layer in model.decoder.layers if isinstance(layer.mlp, TTTMLP)]


def ttt_drop_in(target: str) -> dict:
    """A 12-layer model with TTT every 6 layers, freshly initialised, against the same model without TTT."""
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.layers.ttt_mlp import TTTMLP
    from ttt_train.training.step import model_inputs

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny", num_layers=12)
    torch.manual_seed(5)
    base = build_gpt_model(model_cfg, to_transformer_config(model_cfg, parallel))
    torch.manual_seed(5)
    ttt = build_gpt_model(model_cfg, to_transformer_config(model_cfg, parallel),
                          ttt=TTTConfig(every=6, chunk_size=8, lr=3.0, target=target))
    batch = make_batch(2, 2, 64, model_cfg.vocab_size, with_docs=True)
    no_docs = {k: v for k, v in batch.items() if k != "doc_ids"}
    with torch.no_grad():
        ref = base(batch["tokens"], batch["position_ids"], None)
        plain = ttt(batch["tokens"], batch["position_ids"], None, **model_inputs(ttt, no_docs))
        with_docs = ttt(batch["tokens"], batch["position_ids"], None, **model_inputs(ttt, batch))
    loss = ttt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], **model_inputs(ttt, batch))
    loss.float().mean().backward()
    mlps = [layer.mlp for layer in ttt.decoder.layers if isinstance(layer.mlp, TTTMLP)]
    return dict(bitwise_equal_no_docs=torch.equal(plain, ref), max_diff_no_docs=(plain - ref).abs().max().item(),
                max_diff_docs=(with_docs - ref).abs().max().item(),
                conv_grad=min(m.ttt_target.conv.weight.grad.abs().max().item() for m in mlps),
                proj_grad=max(m.ttt_target.proj.weight.grad.abs().max().item() for m in mlps),
                ttt_layers=[layer.layer_number - 1 for layer in ttt.decoder.layers if isinstance(layer.mlp, TTTMLP)])


def _depthwise_conv_per_chunk_f64(x, weight, chunk, doc_ids):
    """Independent float64 target convolution: y_t = sum_j w[:, j+p] x_{t+j}, same chunk and document only."""
    B, T, d = x.shape
    p = weight.shape[-1] // 2
    y = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            for j in range(-p, p + 1):
                s = t + j
                if 0 <= s < T and s // chunk == t // chunk and doc_ids[b, s] == doc_ids[b, t]:
                    y[b, t] += weight[:, 0, j + p] * x[b, s]
    return y


def ttt_mlp_vs_float64() -> dict:
    """One TTTMLP (float64 parameters) against a re-computation from its weights with the reference op."""
    import torch.nn.functional as F

    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.layers.ttt_mlp import TTTMLP
    from ttt_train.ops import inplace_ttt_reference

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny", num_layers=1)
    config = to_transformer_config(model_cfg, parallel)
    config.params_dtype = torch.float64
    tau = 11.0  # the updates' norms lie between 8 and 13: some clip, some not
    ttt_cfg = TTTConfig(layers=[0], chunk_size=8, lr=2.0, max_update_norm=tau)
    model = build_gpt_model(model_cfg, config, ttt=ttt_cfg).double()
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp, TTTMLP)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mlp.ttt_target.conv.weight.copy_(torch.randn(mlp.ttt_target.conv.weight.shape, generator=g, dtype=torch.float64))
        mlp.ttt_target.proj.weight.add_(0.1 * torch.randn(mlp.ttt_target.proj.weight.shape, generator=g,
                                                          dtype=torch.float64))
    x = torch.randn(30, 2, model_cfg.hidden_size, generator=g, dtype=torch.float64)  # [s, b, d]
    doc_ids = torch.tensor([[0] * 11 + [1] * 19, [0] * 30])
    with torch.no_grad():
        out, _ = mlp(x, padding_mask=doc_ids)
        w1 = mlp.linear_fc1.weight
        gate, up = (x @ w1.T).chunk(2, dim=-1)
        z = (F.silu(gate) * up).transpose(0, 1)
        v = _depthwise_conv_per_chunk_f64(x.transpose(0, 1), mlp.ttt_target.conv.weight, 8, doc_ids)
        v = v @ mlp.ttt_target.proj.weight.T
        ref = inplace_ttt_reference(z, v, mlp.linear_fc2.weight, chunk_size=8, lr=2.0, doc_ids=doc_ids,
                                    max_update_norm=tau).transpose(0, 1)
        plain = z.transpose(0, 1) @ mlp.linear_fc2.weight.T
    return dict(out_rel_err=((out - ref).abs().max() / ref.abs().max()).item(),
                changed_by_ttt=((ref - plain).abs().max() / plain.abs().max()).item(),
                stats={k: v.item() for k, v in mlp.ttt_stats().items()},
                expected_stats=_ttt_stats_by_hand(z, v, mlp.linear_fc2.weight, chunk=8, lr=2.0, tau=tau,
                                                  doc_ids=doc_ids))


def _ttt_stats_by_hand(z, v, weight, chunk, lr, tau, doc_ids) -> dict:
    """`TTTMLP.ttt_stats()` from its definition: the update of each chunk but the last (its last
    document's tokens), and the state the last chunk reads (its first document's earlier updates)."""
    T = z.shape[1]
    last = (T - 1) // chunk * chunk
    norms, rel = [], []
    for b in range(z.shape[0]):
        state = weight.clone()
        for s in range(0, last, chunk):
            docs = doc_ids[b, s:s + chunk]
            rows = docs == docs[-1]
            u = lr * v[b, s:s + chunk][rows].T @ z[b, s:s + chunk][rows]
            norms.append(u.norm())
            if docs[-1] == doc_ids[b, last]:
                state = state + u * min(1.0, tau / u.norm().item())
        rel.append((state - weight).norm() / weight.norm())
    norms = torch.stack(norms)
    return dict(update_norm_mean=norms.mean().item(), update_norm_max=norms.max().item(),
                clipped_fraction=(norms > tau).double().mean().item(),
                fast_weight_rel_change=torch.stack(rel).mean().item(), fast_weight_rel_change_max=max(rel).item(),
                target_norm=v.norm(dim=-1).mean().item(), target_norm_max=v.norm(dim=-1).max().item())


def resume_losses(root: str, layout: dict) -> dict:
    """Train 4 steps straight; and train 2, save model + optimizer, rebuild from scratch with another
    seed, load, train 2 more. Returns both loss lists (they must agree exactly)."""
    from ttt_train.checkpoint import load_checkpoint, save_checkpoint
    from ttt_train.layers.ttt_config import TTTConfig

    def build(seed):
        parallel = ParallelConfig(seed=seed, **layout)
        initialize(parallel)
        model_cfg = load_model_config("tiny", num_layers=2)
        config = to_transformer_config(model_cfg, parallel)
        chunks = wrap_for_training(build_gpt_model(model_cfg, config, ttt=TTTConfig(layers=[0], chunk_size=8)),
                                   config, DDPConfig())
        return chunks, build_optimizer(OptimizerArgs(lr=3e-3), chunks, config), model_cfg

    def steps(chunks, optimizer, first, count, vocab):
        losses = []
        for i in range(first, first + count):
            batch = make_batch(100 + i, 2, 32, vocab, with_docs=True)
            losses.append(run_step(chunks, _repeat(batch, 2), num_microbatches=1, micro_batch_size=2,
                                   seq_length=32, optimizer=optimizer)["loss"])
        return losses

    chunks, optimizer, model_cfg = build(1)
    straight = steps(chunks, optimizer, 0, 4, model_cfg.vocab_size)
    chunks, optimizer, _ = build(1)
    resumed = steps(chunks, optimizer, 0, 2, model_cfg.vocab_size)
    save_checkpoint(root, 2, chunks, optimizer, metadata={"consumed_samples": 4})
    chunks, optimizer, _ = build(99)
    meta = load_checkpoint(root, chunks, optimizer)
    resumed += steps(chunks, optimizer, meta["step"], 2, model_cfg.vocab_size)
    return dict(straight=straight, resumed=resumed, meta=meta)


def step_gradient_vs_autograd() -> dict:
    """Gradients left by `run_step` (2 micro-batches, DDP, per-token loss) against plain autograd of
    the mean masked token loss over the whole batch on an identical unwrapped model."""
    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny", num_layers=2)
    config = to_transformer_config(model_cfg, parallel)
    torch.manual_seed(3)
    plain = build_gpt_model(model_cfg, config)
    torch.manual_seed(3)
    chunks = wrap_for_training(build_gpt_model(model_cfg, config), config, DDPConfig())
    batch = make_batch(9, 4, 32, model_cfg.vocab_size)
    token_loss = plain(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss = (token_loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss.backward()
    reported = run_step(chunks, _repeat(batch, 2), num_microbatches=2, micro_batch_size=2, seq_length=32)["loss"]
    worst = max(((p.main_grad - q.grad).abs().max() / q.grad.abs().max()).item()
                for p, q in zip(chunks[0].module.parameters(), plain.parameters()))
    return dict(loss=loss.item(), reported=reported, worst_grad_rel_err=worst)

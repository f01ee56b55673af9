"""Run the same model and batch under several parallel layouts inside one local process group.

Every layout of a case runs in the same N ranks, one after another: the first layout builds the
model from a seed and saves a dist_checkpoint, every later layout loads that checkpoint (so all
layouts hold the same weights) and computes the loss, the logits and the gradients of the same
global batch. Gradients are gathered to full (unsharded) tensors with layout-independent names,
so the test can compare every layout against the first element by element.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from ttt_train.checkpoint import load_checkpoint, save_checkpoint
from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
from ttt_train.runtime.distributed import ParallelConfig, initialize
from ttt_train.training.setup import DDPConfig, wrap_for_training
from ttt_train.training.step import run_step


def make_batch(seed: int, batch: int, seq: int, vocab: int, with_docs: bool = False) -> dict:
    """Random next-token batch, identical on every rank: tokens/labels/loss_mask/position_ids [batch, seq],
    and with `with_docs` a `doc_ids` [batch, seq] of a few packed documents (boundaries on and off
    chunk edges, the last row one document)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.1).float()
    out = dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=mask,
               position_ids=torch.arange(seq).expand(batch, -1).contiguous())
    if with_docs:
        starts = torch.zeros(batch, seq, dtype=torch.long)
        for row in range(batch - 1):
            cuts = torch.randperm(seq - 1, generator=g)[:3] + 1
            starts[row, cuts] = 1
        starts[0, seq // 2] = 1  # one boundary exactly on a chunk edge for power-of-two chunks
        out["doc_ids"] = starts.cumsum(1)
    return out


def randomize_ttt_targets(model, seed: int) -> None:
    """Give every TTT target a non-zero convolution, so the fast weights really change (tests only)."""
    g = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "ttt_target.conv" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)


def _micro_batches(batch: dict, micro: int):
    n = batch["tokens"].shape[0]
    while True:
        for i in range(0, n, micro):
            yield {k: v[i:i + micro] for k, v in batch.items()}


def full_grads(chunk, config) -> dict[str, torch.Tensor]:
    """This pipeline stage's parameter gradients (DDP `main_grad`, as float32), gathered over tensor
    parallelism, keyed by layout-independent names (global layer numbers; no bf16 wrapper prefix)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config)
    tp_group = ps.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group)
    grads = {}
    for name, param in chunk.module.named_parameters():
        grad = param.main_grad.detach().clone().float()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(parts, grad.contiguous(), group=tp_group)
            if name.endswith("linear_fc1.weight") and config.gated_linear_unit:  # [gate_r; up_r] per rank
                halves = [p.chunk(2, dim=0) for p in parts]
                grad = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                grad = torch.cat(parts, dim=param.partition_dim)
        name = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + offset}.", name)
        name = name.removeprefix("module.")  # Float16Module (bf16)
        grads[name] = grad
    return grads


def ttt_layer_stats(model) -> dict[int, dict[str, float]]:
    """`TTTMLP.ttt_stats()` of this rank's TTT layers (every forward recorded so far), by global layer index."""
    from ttt_train.layers.ttt_mlp import TTTMLP

    return {m.layer_number - 1: {k: v.item() for k, v in m.ttt_stats().items()}
            for m in model.modules() if isinstance(m, TTTMLP)}


def ttt_scan_stats(model) -> dict[int, dict]:
    """Counts of each TTT layer's last context-parallel scan (`TTTMLP.scan_stats`, forward and its
    backward), by global layer index; empty without context parallelism."""
    from ttt_train.layers.ttt_mlp import TTTMLP

    return {m.layer_number - 1: m.scan_stats.as_dict() for m in model.modules()
            if isinstance(m, TTTMLP) and m.scan_stats is not None}


def _logits(model, batch: dict) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, vocab] on the last pipeline stage (single-stage models only)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from ttt_train.training.step import model_inputs

    with torch.no_grad():
        out = model(batch["tokens"], batch["position_ids"], None, **model_inputs(model, batch))
    return gather_from_tensor_model_parallel_region(out).float()


def _layout_model(model_cfg, ttt_cfg, layout: dict, precision: dict, first: bool, seed: int, ckpt_dir: str):
    """(parallel, dp, transformer config, DDP chunks) of the model at `layout`: the first layout of a case
    randomises the TTT targets and saves the weights, every later one loads them (same weights everywhere)."""
    parallel = ParallelConfig(**layout)
    dp = initialize(parallel)
    config = to_transformer_config(model_cfg, parallel, **precision)
    chunks = wrap_for_training(build_gpt_model(model_cfg, config, ttt=ttt_cfg), config, DDPConfig())
    if first:
        randomize_ttt_targets(chunks[0].module, seed)
        save_checkpoint(ckpt_dir, 0, chunks)
    else:
        load_checkpoint(ckpt_dir, chunks)
    return parallel, dp, config, chunks


def equivalence_case(layouts: list[dict], ckpt_dir: str, model_name: str = "tiny", seq: int = 32,
                     global_batch: int = 4, micro_batch: int = 2, seed: int = 7, model_overrides: dict | None = None,
                     ttt: dict | None = None, with_docs: bool = False) -> list[dict]:
    """For each layout: loss, logits (pp == 1 only) and full gradients of one global batch.

    A layout holds `ParallelConfig` keys, and optionally `dtype` ("fp32" or "bf16") and `recompute`
    (None, "selective" or "full") for `to_transformer_config`.

    Returns (on every rank) a list with one dict per layout; entries that a rank does not hold are
    None/empty, and the caller merges ranks. The first layout saves the weights the others load
    (with TTT, after giving the targets non-zero convolutions).
    """
    from megatron.core import parallel_state as ps

    from ttt_train.layers.ttt_config import TTTConfig

    model_cfg = load_model_config(model_name, **(model_overrides or {}))
    ttt_cfg = TTTConfig.from_dict(ttt) if ttt is not None else None
    results = []
    for i, layout in enumerate(layouts):
        options = dict(layout)
        precision = dict(dtype=options.pop("dtype", "fp32"), recompute=options.pop("recompute", None))
        parallel, dp, config, chunks = _layout_model(model_cfg, ttt_cfg, options, precision, i == 0, seed, ckpt_dir)
        batch = make_batch(seed, global_batch, seq, model_cfg.vocab_size, with_docs)
        rank_rows = slice(ps.get_data_parallel_rank() * global_batch // dp,
                          (ps.get_data_parallel_rank() + 1) * global_batch // dp)
        local = {k: v[rank_rows] for k, v in batch.items()}
        loss = run_step(chunks, _micro_batches(local, micro_batch), num_microbatches=global_batch // dp // micro_batch,
                        micro_batch_size=micro_batch, seq_length=seq // parallel.cp)["loss"]
        grads = full_grads(chunks[0], config)
        stats = ttt_layer_stats(chunks[0])  # of every micro-batch since the build (before the logits' forward)
        keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        logits = None
        if parallel.pp == 1 and parallel.cp == 1:
            logits = _logits(chunks[0].module, {k: v[:micro_batch] for k, v in batch.items()})
        results.append(dict(layout=layout, loss=loss, grads=grads if keep else {},
                            logits=logits if keep else None, ttt_stats=stats))
        del chunks
    return results


def merge_ranks(per_rank: list[list[dict]], layouts: list[dict]) -> list[dict]:
    """Combine what each rank returned from `equivalence_case` into one result per layout:
    the loss (from a last pipeline stage), all gradients, logits where a rank had them, and every
    rank's TTT statistics (`ttt_stats`: a list by rank of {global layer: stats})."""
    merged = []
    for i, layout in enumerate(layouts):
        grads = {}
        for rank in per_rank:
            grads.update(rank[i]["grads"])
        losses = [r[i]["loss"] for r in per_rank if r[i]["loss"] is not None]
        logits = next((r[i]["logits"] for r in per_rank if r[i]["logits"] is not None), None)
        merged.append(dict(layout=layout, loss=losses[0], grads=grads, logits=logits,
                           ttt_stats=[r[i]["ttt_stats"] for r in per_rank]))
    return merged


def clipped_fractions(ttt_stats: list[dict]) -> list[float]:
    """Every rank's and TTT layer's `clipped_fraction` from merged `ttt_stats`."""
    return [stats["clipped_fraction"] for rank in ttt_stats for stats in rank.values()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def doc_layout_batch(seed: int, batch: int, seq: int, vocab: int, starts: list[list[int]]) -> dict:
    """Random next-token batch whose row `b` starts new documents exactly at the token offsets `starts[b]`."""
    out = make_batch(seed, batch, seq, vocab)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    for row, cuts in enumerate(starts):
        for t in cuts:
            ids[row, t:] += 1
    out["doc_ids"] = ids
    return out


def doc_layouts_case(layouts: list[dict], ckpt_dir: str, starts: list[list[list[int]]], ttt: dict,
                     seq: int = 64, micro_batch: int = 1, seed: int = 5, model_overrides: dict | None = None
                     ) -> list[list[dict]]:
    """For each parallel layout, for each document layout `starts[k]` (per row, where documents start):
    loss and full gradients of one global batch of `len(starts[k])` rows (see `equivalence_case`;
    the first layout saves the weights, the others load them). Returns [layout][document layout]."""
    from megatron.core import parallel_state as ps

    from ttt_train.layers.ttt_config import TTTConfig

    model_cfg = load_model_config("tiny", **(model_overrides or {}))
    ttt_cfg = TTTConfig.from_dict(ttt)
    results = []
    for i, layout in enumerate(layouts):
        parallel, dp, config, chunks = _layout_model(model_cfg, ttt_cfg, layout, {}, i == 0, seed, ckpt_dir)
        keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        per_docs = []
        for k, rows in enumerate(starts):
            global_batch = len(rows)
            batch = doc_layout_batch(seed + k, global_batch, seq, model_cfg.vocab_size, rows)
            mine = slice(ps.get_data_parallel_rank() * global_batch // dp,
                         (ps.get_data_parallel_rank() + 1) * global_batch // dp)
            local = {key: v[mine] for key, v in batch.items()}
            loss = run_step(chunks, _micro_batches(local, micro_batch),
                            num_microbatches=global_batch // dp // micro_batch, micro_batch_size=micro_batch,
                            seq_length=seq // parallel.cp)["loss"]
            grads = full_grads(chunks[0], config)  # collective over TP: every rank gathers
            per_docs.append(dict(loss=loss, grads=grads if keep else {}, ttt_stats=ttt_layer_stats(chunks[0]),
                                 scan_stats=ttt_scan_stats(chunks[0])))
        results.append(per_docs)
        del chunks
    return results

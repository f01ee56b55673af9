"""One training (or evaluation) step through megatron's pipeline schedules.

Batches are dicts of `[micro_batch, seq]` tensors: `tokens`, `labels`, `loss_mask`,
`position_ids` and optionally `doc_ids` (document index per token, for TTT resets). The loss is
the token-level cross-entropy summed over unmasked tokens and normalised by the global number of
such tokens (megatron's `calculate_per_token_loss`), which stays exact under data and context
parallelism.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor, buckets: torch.Tensor | None = None,
               num_buckets: int = 0):
    """(sum of masked token losses, number of tokens, report) as megatron's schedules expect.

    With `buckets` (`[B, T]` bucket index of each token's position) the report also holds
    "position loss": `[2, num_buckets]` sums of masked losses and token counts per bucket.
    """
    mask = loss_mask.reshape(-1).float()
    losses = output.reshape(-1).float() * mask
    loss_sum = losses.sum()
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}
    if buckets is not None:
        index = buckets.reshape(-1)
        report["position loss"] = torch.stack([
            torch.bincount(index, weights=losses.detach().double(), minlength=num_buckets),
            torch.bincount(index, weights=mask.double(), minlength=num_buckets)]).float()
    return loss_sum, num_tokens, report


def model_inputs(model, batch: dict) -> dict:
    """Keyword arguments that carry TTT inputs into megatron's GPTModel.forward.

    `doc_ids` travel as `padding_mask` (routed to every layer's MLP); with the `input_embed` TTT
    target, the first stage embeds the tokens itself and passes the embeddings both as
    `decoder_input` and as the block's `context`, which TTT layers read.
    """
    from megatron.core.utils import unwrap_model

    kwargs = {}
    if batch.get("doc_ids") is not None:
        kwargs["padding_mask"] = batch["doc_ids"]
    gpt = unwrap_model(model)
    ttt = getattr(gpt, "ttt_config", None)
    if ttt is not None and ttt.enabled and ttt.target == "input_embed" and gpt.pre_process:
        embeddings = gpt.embedding(input_ids=batch["tokens"], position_ids=batch["position_ids"])
        kwargs.update(decoder_input=embeddings, extra_block_kwargs={"context": embeddings})
    return kwargs


def split_for_context_parallel(batch: dict) -> dict:
    """This CP rank's part of a full-sequence batch (megatron's load-balanced shards r and 2*CP-1-r).

    Document ids are global (computed on the whole sequence), so fast-weight resets and the
    context-parallel scan agree across ranks. Entries without a sequence dimension (a blend's
    `dataset_id`, `[B]`) are kept whole.
    """
    from ttt_train.runtime import megatron_compat

    per_sequence = {k: v for k, v in batch.items() if v is not None and v.dim() < 2}
    split = megatron_compat.batch_on_this_cp_rank(
        {k: v for k, v in batch.items() if v is not None and v.dim() >= 2})
    return {**per_sequence, **split}


def forward_step(data_iterator: Iterator[dict], model, position_buckets: int = 0):
    """megatron `forward_step_func`: run the model on the next micro-batch, return (output, loss_func).

    Micro-batches hold whole sequences; under context parallelism each rank keeps its shards.
    `position_buckets` > 0 also reports the loss by token position (see `_loss_func`).
    """
    from functools import partial

    batch = dict(next(data_iterator))
    if position_buckets:
        b, t = batch["tokens"].shape
        batch["position_bucket"] = (torch.arange(t) * position_buckets // t).expand(b, t).contiguous().to(batch["tokens"].device)
    batch = split_for_context_parallel(batch)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   **model_inputs(model, batch))
    return output, partial(_loss_func, batch["loss_mask"], buckets=batch.get("position_bucket"),
                           num_buckets=position_buckets)


def _reduce_reports(reports: list[dict], key: str) -> torch.Tensor | None:
    """Sum of report `key` over all micro-batches and data/context-parallel ranks (None off the last stage)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not reports:
        return None
    total = torch.stack([r[key] for r in reports]).sum(0).double()
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return total


def _reduce_losses(reports: list[dict]) -> float | None:
    """Mean token loss over all micro-batches and data/context-parallel ranks (None off the last stage)."""
    total = _reduce_reports(reports, "lm loss")
    return None if total is None else (total[0] / total[1].clamp(min=1)).item()


def run_step(model_chunks, data_iterator, *, num_microbatches: int, micro_batch_size: int, seq_length: int,
             forward_only: bool = False, optimizer=None, skip_nonfinite: bool = False,
             position_buckets: int = 0) -> dict:
    """Forward/backward over `num_microbatches` micro-batches, then an optimizer step if one is given.

    Returns {"loss": mean token loss (last pipeline stage, else None), "grad_norm", "skipped"}.
    Without an optimizer the reduced gradients stay in the DDP buffers (`param.main_grad`).
    `seq_length` is the length each rank sees (already divided by the context-parallel size).
    skip_nonfinite: skip the update when the gradient norm is not finite (`numerics.guarded_step`).
    position_buckets > 0: also "position_loss", `[2, position_buckets]` float64 sums of token losses
    and counts by position bucket (last pipeline stage, else None).
    """
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        if optimizer is not None:
            optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, position_buckets=position_buckets), data_iterator=data_iterator,
        model=model_chunks, num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)
    result = {"loss": _reduce_losses(reports), "grad_norm": None, "skipped": False}
    if position_buckets:
        result["position_loss"] = _reduce_reports(reports, "position loss")
    if optimizer is not None and not forward_only:
        if skip_nonfinite:
            from ttt_train.training.numerics import guarded_step

            ok, grad_norm = guarded_step(optimizer)
        else:
            ok, grad_norm, _ = optimizer.step()
        result.update(grad_norm=grad_norm, skipped=not ok)
    return result

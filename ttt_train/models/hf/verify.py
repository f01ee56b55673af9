"""Conversion check: logits of a few prompts from the megatron model and from the HF side.

`compare_logits` is collective (every rank of the model's layout enters it): the megatron logits
are computed through megatron's pipeline schedule (any TP/PP layout), gathered over TP, and one rank
that holds them also runs the HF model and broadcasts the maximum absolute difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


class VerificationError(RuntimeError):
    """The converted model's logits differ from the source's by more than the tolerance."""


def sample_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Random token prompts `[1, L]` (ids below `vocab_size`), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (1, n), generator=g) for n in lengths]


def prompt_lengths(max_positions: int, chunk_size: int | None) -> list[int]:
    """Short and long prompts; with TTT, lengths that cross chunk boundaries off the chunk grid."""
    lengths = [7, 33] if chunk_size is None else [chunk_size // 2 + 1, 2 * chunk_size + 3]
    return [min(n, max_positions) for n in lengths]


@torch.no_grad()
def megatron_logits(model_chunks, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary float32 logits `[1, L, vocab_padded]` on the last pipeline stage, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from ttt_train.runtime.distributed import device
    from ttt_train.training.step import model_inputs

    tokens = tokens.to(device())
    batch = dict(tokens=tokens, position_ids=torch.arange(tokens.shape[1], device=tokens.device)[None])

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        return model(b["tokens"], b["position_ids"], None, **model_inputs(model, b)), None

    for chunk in model_chunks:
        chunk.eval()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter([batch]) for _ in model_chunks] if len(model_chunks) > 1
        else iter([batch]), model=model_chunks, num_microbatches=1, seq_length=tokens.shape[1],
        micro_batch_size=1, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(outputs[0]).float().cpu()


def compare_logits(model_chunks, prompts: list[torch.Tensor], hf_logits: Callable[[list[torch.Tensor]], list],
                   vocab_size: int, tolerance: float, what: str) -> float:
    """Max |megatron - HF| logit difference over `prompts` (first `vocab_size` logits); collective.

    `hf_logits(prompts)` runs on one rank only (the first that holds megatron's logits) and returns
    `[1, L, >= vocab_size]` tensors. Prints the difference on that rank; raises VerificationError
    on every rank when it exceeds `tolerance`.
    """
    from megatron.core import parallel_state as ps

    ours = [megatron_logits(model_chunks, p) for p in prompts]
    holder = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, holder)
    source = ranks.index(True)
    result = torch.zeros(2, dtype=torch.float64)
    if dist.get_rank() == source:
        theirs = hf_logits(prompts)
        diff = max((a[..., :vocab_size] - b[..., :vocab_size].float().cpu()).abs().max().item()
                   for a, b in zip(ours, theirs))
        scale = max(b[..., :vocab_size].abs().max().item() for b in theirs)
        result = torch.tensor([diff, scale], dtype=torch.float64)
        print(f"verify {what}: max |logit difference| {diff:.3g} over {len(prompts)} prompts of lengths "
              f"{[p.shape[1] for p in prompts]} (max |logit| {scale:.3g}, tolerance {tolerance:g})", flush=True)
    dist.broadcast(result, src=source)
    diff = result[0].item()
    if not diff <= tolerance:
        raise VerificationError(f"verify {what}: logits differ by {diff:.3g} > tolerance {tolerance:g}; the "
                                "conversion is wrong (or pass a larger --tolerance / --no-verify)")
    return diff


def load_causal_lm(loader: Callable, *args, **kwargs):
    """`loader(*args, **kwargs)` (a transformers `from_pretrained`) in evaluation mode."""
    return loader(*args, **kwargs).eval()


def hf_model_logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float32 logits of a transformers causal LM for each prompt."""
    with torch.no_grad():
        return [model(input_ids=p).logits.float() for p in prompts]

"""Greedy generation for a batch of prompts with left padding."""

from __future__ import annotations

import torch


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations (at most `max_new_tokens`, stopping at the model's eos) of `prompts`,
    batched with left padding; special tokens are dropped from the decoded text."""
    from transformers import GenerationConfig

    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(model.device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id,
        bos_token_id=model.generation_config.bos_token_id,
    )
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=config)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def count_tokens(tokenizer, text: str) -> int:
    """Tokens the model reads for `text` (special tokens the tokenizer adds included)."""
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])

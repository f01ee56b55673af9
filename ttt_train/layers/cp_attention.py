"""Core attention for context parallelism without transformer-engine (the local spec, CPU runs).

Each rank holds the query/key/value of its two load-balanced shards (megatron's layout: shards r and
2*CP-1-r of the sequence). Keys and values of the whole sequence are gathered over the CP group with
megatron's `gather_from_sequence_parallel_region` (all-gather forward, reduce-scatter backward), and
the causal (optionally sliding-window) mask is applied by global token positions. Memory is O(sequence)
per rank for K/V; transformer-engine's ring attention is the scalable GPU path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule


def load_balanced_positions(local_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions `[local_len]` of the tokens a CP rank holds (shards r and 2*cp-1-r; the whole
    sequence, of any length, without context parallelism)."""
    if cp_size == 1:
        return torch.arange(local_len)
    half = local_len // 2
    first = torch.arange(cp_rank * half, (cp_rank + 1) * half)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * half, (2 * cp_size - cp_rank) * half)
    return torch.cat([first, second])


class GatherKVAttention(MegatronModule):
    """Drop-in for megatron's `DotProductAttention` under context parallelism (and without it).

    forward(query `[s, b, heads/tp, hn]`, key/value `[s, b, groups/tp, hn]`, ...) -> `[s, b, heads/tp * hn]`.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.attention_dropout:
            raise ValueError("GatherKVAttention supports attention_dropout=0 only (set model attention_dropout: 0)")
        self.cp_group = ps.get_context_parallel_group()
        self.cp_size = dist.get_world_size(self.cp_group)
        self.cp_rank = dist.get_rank(self.cp_group)
        self.scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        self.window = config.window_size[0] + 1 if config.window_size is not None else None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None:
            raise ValueError("GatherKVAttention does not take packed_seq_params (THD); pass padded batches")
        s, b, heads, hn = query.shape
        if self.cp_size > 1:
            key = gather_from_sequence_parallel_region(key.contiguous(), tensor_parallel_output_grad=True,
                                                       group=self.cp_group)
            value = gather_from_sequence_parallel_region(value.contiguous(), tensor_parallel_output_grad=True,
                                                         group=self.cp_group)
        q_pos = load_balanced_positions(s, self.cp_size, self.cp_rank)
        k_pos = torch.cat([load_balanced_positions(s, self.cp_size, r) for r in range(self.cp_size)])
        allowed = q_pos[:, None] >= k_pos[None, :]
        if self.window is not None:
            allowed &= (q_pos[:, None] - k_pos[None, :]) < self.window
        groups = key.shape[2]
        q = query.permute(1, 2, 0, 3)  # [b, heads, s, hn]
        k = key.permute(1, 2, 0, 3).repeat_interleave(heads // groups, dim=1)
        v = value.permute(1, 2, 0, 3).repeat_interleave(heads // groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.to(query.device), scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * hn)

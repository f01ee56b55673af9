"""What attention under context parallelism allows, decided before anything is built.

`parallel.cp_comm_type` names megatron's (transformer-engine's) CP communication for attention:
`p2p` (K/V passed round a ring, overlapped with compute), `a2a` (Ulysses: heads scattered over the
CP group, each rank attends over the whole sequence for its heads), `all_gather` (K/V of the whole
sequence gathered, not overlapped), `a2a+p2p` (hierarchical); `auto` picks one. The rules, each
refused by name with its fix:

- transformer-engine attends with a sliding window under CP only with `a2a` or `all_gather`
  (its `attn_forward_func_with_cp` asserts so); `auto` then takes `a2a` where the heads split
  over the CP group, else `all_gather`;
- `a2a` needs the query heads and the key/value groups of a TP rank divisible by CP;
- `a2a+p2p` needs hierarchical CP groups, which ttt-train does not set up;
- the local backend's `GatherKVAttention` all-gathers K/V: `all_gather` (or `auto`) only;
- packed (THD) sequences under CP must each be padded to a multiple of 2 * CP, or
  transformer-engine silently drops tokens (`check_thd_padding`). ttt-train's own batches are
  padded `[b, s]` rows with document ids (no THD), split by megatron into 2 * CP shards.
"""

from __future__ import annotations

import torch

CP_COMM_TYPES = ("auto", "p2p", "a2a", "all_gather", "a2a+p2p")
SLIDING_WINDOW_TYPES = ("a2a", "all_gather")


def resolve_cp_comm_type(requested: str, *, cp: int, tp: int, backend: str, sliding_window: int | None,
                         num_attention_heads: int, num_query_groups: int) -> str | None:
    """megatron's `TransformerConfig.cp_comm_type` for this layout (None without CP), or ValueError
    naming `parallel.cp_comm_type` and the fix."""
    if requested not in CP_COMM_TYPES:
        raise ValueError(f"parallel.cp_comm_type={requested!r}: use one of {CP_COMM_TYPES}")
    if cp == 1:
        return None
    key = f"parallel.cp_comm_type={requested}"
    if backend == "local":
        if requested not in ("auto", "all_gather"):
            raise ValueError(f"{key}: model.backend=local attends with GatherKVAttention, which all-gathers K/V; "
                             f"set parallel.cp_comm_type=all_gather (or auto), or model.backend=te for {requested}")
        return "all_gather"
    heads_split = (num_attention_heads // tp) % cp == 0 and (num_query_groups // tp) % cp == 0
    if requested == "a2a+p2p":
        raise ValueError(f"{key}: hierarchical context parallelism needs hierarchical CP groups, which ttt-train "
                         f"does not set up; set parallel.cp_comm_type=p2p or a2a")
    if requested == "a2a" and not heads_split:
        raise ValueError(f"{key}: a2a scatters heads over the CP group, but the {num_attention_heads // tp} query "
                         f"heads / {num_query_groups // tp} key-value groups per TP rank do not divide by "
                         f"parallel.cp={cp}; set parallel.cp_comm_type=all_gather (or p2p without a sliding window)")
    if sliding_window is not None:
        if requested == "auto":
            return "a2a" if heads_split else "all_gather"
        if requested not in SLIDING_WINDOW_TYPES:
            raise ValueError(f"{key}: transformer-engine attends with a sliding window (model.sliding_window="
                             f"{sliding_window}) under context parallelism only with a2a or all_gather; set "
                             f"parallel.cp_comm_type={'a2a' if heads_split else 'all_gather'} (or auto)")
    return "p2p" if requested == "auto" else requested


def check_thd_padding(cu_seqlens_padded, cp: int) -> None:
    """Refuse packed (THD) sequences that are not each padded to a multiple of 2 * CP.

    `cu_seqlens_padded`: cumulative (padded) sequence starts, `[n + 1]` or megatron's `[1, n + 1]`
    (a tensor or a list)."""
    if cp == 1:
        return
    bounds = torch.as_tensor(cu_seqlens_padded).reshape(-1).tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    bad = [n for n in lengths if n % (2 * cp)]
    if bad:
        raise ValueError(f"packed (THD) sequences under parallel.cp={cp}: lengths {bad[:8]} are not multiples of "
                         f"2 * cp = {2 * cp} (transformer-engine would drop tokens); pad each sequence to a "
                         f"multiple of {2 * cp} (cu_seqlens_padded)")

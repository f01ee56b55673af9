"""Where the scan's segments live over a context-parallel (CP) group, and shard-size checks.

A packed sequence is cut into `n` segments in global order (segment 0 holds the first tokens).
Layouts (`cp` = CP group size, `r` = rank within the group):

- ``"contiguous"``: n = cp, rank r holds segment r.
- ``"load_balanced"`` (megatron's CP layout for causal attention): n = 2*cp, rank r holds
  segments r and 2*cp-1-r, in that local order (the local sequence is [seg r ; seg 2cp-1-r]).
"""

from __future__ import annotations

import math

LAYOUTS = ("contiguous", "load_balanced")


def _check(cp_size: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown CP layout {layout!r}; expected one of {LAYOUTS}")
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"context_parallel_size must be a positive int, got {cp_size!r}")


def num_segments(cp_size: int, layout: str) -> int:
    """Number of segments `n` the sequence is cut into (cp or 2*cp)."""
    _check(cp_size, layout)
    return cp_size if layout == "contiguous" else 2 * cp_size


def segment_order(cp_size: int, layout: str) -> list[list[int]]:
    """Global segment indices held by each CP rank, in local order: ``order[r] = [s0, (s1)]``."""
    _check(cp_size, layout)
    if layout == "contiguous":
        return [[r] for r in range(cp_size)]
    return [[r, 2 * cp_size - 1 - r] for r in range(cp_size)]


def segment_owner(cp_size: int, layout: str) -> list[tuple[int, int]]:
    """For each global segment s: ``(cp rank, local index)`` that holds it."""
    owner: list[tuple[int, int] | None] = [None] * num_segments(cp_size, layout)
    for r, segs in enumerate(segment_order(cp_size, layout)):
        for i, s in enumerate(segs):
            owner[s] = (r, i)
    return owner  # type: ignore[return-value]


def validate_cp_alignment(seq_length: int, cp_size: int, chunk_size: int,
                          layout: str = "load_balanced") -> int:
    """Check that each CP shard is a whole number of TTT chunks; return the shard length.

    The shard length is ``seq_length / (2*cp)`` (load-balanced) or ``seq_length / cp``
    (contiguous). It must be an integer multiple of ``chunk_size`` so that no chunk straddles
    two ranks (METHOD.md section 6). Raises ValueError naming the three settings otherwise.
    """
    n = num_segments(cp_size, layout)
    for name, v in (("seq_length", seq_length), ("chunk_size", chunk_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    need = n * chunk_size
    split = f"{n} shards" + (" (2 * context_parallel_size, load_balanced layout)"
                             if layout == "load_balanced" else " (contiguous layout)")
    if seq_length % need == 0:
        return seq_length // n
    if seq_length % n:
        shard = f"seq_length / {n} = {seq_length / n:g} is not an integer"
    else:
        shard = (f"the shard length seq_length / {n} = {seq_length // n} is not a multiple of "
                 f"chunk_size={chunk_size}")
    lower = (seq_length // need) * need
    fixes = [f"make seq_length a multiple of {n} * chunk_size = {need}"
             + (f" (e.g. {lower} or {lower + need})" if lower else f" (e.g. {need})")]
    if seq_length % n == 0:
        fixes.append(f"use a chunk_size that divides {seq_length // n} "
                     f"(e.g. {math.gcd(seq_length // n, chunk_size)})")
    fixes.append("change context_parallel_size")
    raise ValueError(
        f"TTT chunks would straddle context-parallel shards: seq_length={seq_length}, "
        f"context_parallel_size={cp_size}, chunk_size={chunk_size} split into {split}: {shard}. "
        f"Fix: {'; or '.join(fixes)}.")


def chain_walk(cp_size: int, layout: str, rank: int, reverse: bool = False
               ) -> list[tuple[int, int, int | None, int | None]]:
    """Rank ``rank``'s part of the sequential chain over the global segments.

    The forward scan walks segments 0 -> n-1 (the running prefix is handed from the holder of
    segment s-1 to the holder of s); the backward walks n-1 -> 0. Returns, in walk order,
    ``(local index, global segment, src, dst)`` where ``src`` / ``dst`` is the CP rank the state
    comes from / goes to, or None where it stays on this rank (or the chain starts / ends).
    """
    owner = segment_owner(cp_size, layout)
    n = len(owner)
    step = -1 if reverse else 1
    walk = []
    for i, s in sorted(enumerate(segment_order(cp_size, layout)[rank]), key=lambda x: step * x[1]):
        prev, nxt = s - step, s + step
        src = owner[prev][0] if 0 <= prev < n and owner[prev][0] != rank else None
        dst = owner[nxt][0] if 0 <= nxt < n and owner[nxt][0] != rank else None
        walk.append((i, s, src, dst))
    return walk

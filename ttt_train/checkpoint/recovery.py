"""Choosing the checkpoint to resume from: the newest intact one that `latest` leads to.

A checkpoint damaged after it was published (a truncated shard, a flipped byte, a lost metadata
file) is found before any tensor is read into a model (`integrity.verify`), moved aside as
`iter_XXXXXXX.damaged-<nonce>` (kept for inspection; nothing deletes it) and `latest` is pointed at
the newest older checkpoint that is intact, with a warning naming what was wrong. When none is
intact nothing is changed and `CheckpointDamaged` says how to go on.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ttt_train.checkpoint import integrity, ranks
from ttt_train.checkpoint.format import LATEST, step_of, write_atomic
from ttt_train.checkpoint.integrity import CheckpointDamaged


def _candidates(root: Path) -> tuple[str, list[str]]:
    """(name `latest` holds, folders to try newest first: that one, then older iter_* folders)."""
    named = (root / LATEST).read_text().strip()
    limit = step_of(named)
    older = sorted((p.name for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None
                    and p.name != named and (limit is None or step_of(p.name) < limit)),
                   key=step_of, reverse=True)
    first = [named] if (root / named).is_dir() else \
        sorted(p.name for p in root.glob(f"{named}.old-*"))[:1]  # a re-save cut between its renames
    return named, first + older


def newest_intact(root: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """Collective: (the intact checkpoint to resume from, or None without `latest`; warnings).

    Tries the checkpoint `root/latest` names, then older ones newest first. Damaged ones newer than
    the one chosen are moved aside and `latest` is rewritten (rank 0). Raises CheckpointDamaged on
    every rank when `latest` exists but no checkpoint is intact.
    """
    root = Path(root)
    if not ranks.on_rank0(lambda: (root / LATEST).is_file(), f"reading {root}"):
        return None, []
    named, candidates = ranks.on_rank0(lambda: _candidates(root), f"listing the checkpoints of {root}")
    damaged = []
    for name in candidates:
        problems = integrity.verify(root / name)
        if not problems:
            warnings = ranks.on_rank0(lambda name=name: _set_aside(root, damaged, name),
                                      f"setting damaged checkpoints of {root} aside") if damaged else []
            return root / name, warnings
        damaged.append((name, problems))
    found = "; ".join(f"{name}: {', '.join(problems)}" for name, problems in damaged) or \
        f"{named} does not exist and there is no other checkpoint"
    raise CheckpointDamaged(
        f"no intact checkpoint to resume from in {root} ({found}); nothing was changed. Restore the damaged "
        f"files, or start this stage again from its beginning with the folder moved aside: mv {root} "
        f"{root}.damaged")


def _set_aside(root: Path, damaged: list[tuple[str, list[str]]], chosen: str) -> list[str]:
    """Rank 0: rename each damaged folder aside, point `latest` at `chosen`; one warning per folder."""
    warnings = []
    for name, problems in damaged:
        note = "it does not exist"
        if (root / name).is_dir():
            aside = f"{name}.damaged-{uuid.uuid4().hex[:8]}"
            os.replace(root / name, root / aside)
            note = f"moved aside to {aside}"
        redo = step_of(name) - step_of(chosen) if step_of(name) and step_of(chosen) is not None else 0
        lost = f" ({redo} step{'s' if redo != 1 else ''} to redo)" if redo > 0 else ""
        warnings.append(f"checkpoint {root / name} is damaged: {', '.join(problems)}; {note}; resuming from "
                        f"{chosen} instead{lost}")
    write_atomic(root / LATEST, chosen + "\n")
    return warnings


def recover_latest(roots: list[str | os.PathLike]) -> list[str]:
    """Collective: `newest_intact` for the last of `roots` (e.g. a run's stage folders in order) that
    has a `latest`; returns its warnings. Raises CheckpointDamaged as `newest_intact` does."""
    for root in reversed([Path(r) for r in roots]):
        if ranks.on_rank0(lambda root=root: (root / LATEST).is_file(), f"reading {root}"):
            return newest_intact(root)[1]
    return []

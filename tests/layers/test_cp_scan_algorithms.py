"""Both context-parallel scans inside the model (`parallel.cp_scan: ring | log`): at CP 2, 4 and 8, with
and without TP (sequence parallel), with documents starting at every shard start (one at a time and all
together) and at random places, and update clipping that clips, the loss and every gradient equal CP=1's
and the two algorithms equal each other (a bf16 wire, `parallel.cp_scan_wire`, to bf16 rounding). Each TTT
layer's counted scan traffic (rounds, bytes sent and received per rank, both directions) equals the dry-run
plan's prediction (`training.plan.scan_cost`)."""

from functools import partial

import pytest

from tests.layers.test_cp_document_layouts import (
    TTT,
    assert_same,
    check,
    merged,
    random_layouts,
    shard_start_layouts,
)
from tests.support.parallel_cases import doc_layouts_case
from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models import load_model_config
from ttt_train.runtime.distributed import ParallelConfig
from ttt_train.runtime.local_ranks import run_local_ranks
from ttt_train.training import plan

CHUNK = TTT["chunk_size"]
MODEL = dict(num_layers=2)


def packed_shard_starts(cp: int, rows: int, seq: int) -> list[list[list[int]]]:
    """A document starting at each shard start, one per row (rows of a micro-batch differ), then at
    all shard starts in every row."""
    shard = seq // (2 * cp)
    starts = [k * shard for k in range(1, 2 * cp)]
    singles = [[[s] for s in starts[i:i + rows]] for i in range(0, len(starts), rows)]
    singles[-1] += [[]] * (rows - len(singles[-1]))
    return singles + [[starts] * rows]


def _with_algorithms(*layouts: dict) -> list[dict]:
    return [dict(layout, cp_scan=algorithm) for layout in layouts for algorithm in ("ring", "log")]


def _run_and_check(tmp_path, world: int, reference: dict, cp_layouts: list[dict], starts, seq: int,
                   micro_batch: int, timeout: int, bf16_wire: list[dict] = ()):
    """`bf16_wire`: layouts run after the others, whose scans send bfloat16 partial sums: equal to the
    reference to bf16 rounding only (loss 1e-4, gradients 1e-2 relative)."""
    exact = [reference] + _with_algorithms(*cp_layouts)
    layouts = exact + [dict(layout, cp_scan_wire="bf16") for layout in bf16_wire]
    case = partial(doc_layouts_case, ttt=TTT, seq=seq, micro_batch=micro_batch, model_overrides=MODEL)
    per_rank = run_local_ranks(case, world, layouts, str(tmp_path), starts, timeout=timeout)
    check(per_rank, exact, starts)  # every exact layout against the reference (CP=1)
    for i in range(1, len(exact), 2):  # log against ring, same parallel layout
        for k in range(len(starts)):
            assert_same(merged(per_rank, i + 1, k), merged(per_rank, i, k), (layouts[i + 1], starts[k]),
                        loss_tol=1e-6, grad_tol=1e-5)
    for i in range(len(exact), len(layouts)):
        for k in range(len(starts)):
            assert_same(merged(per_rank, i, k), merged(per_rank, 0, k), (layouts[i], starts[k]), loss_tol=1e-4,
                        grad_tol=1e-2)
    _check_counts_against_plan(per_rank, layouts, starts, micro_batch)


def _check_counts_against_plan(per_rank, layouts, starts, micro_batch):
    """The counted traffic of each TTT layer's last scan call equals `plan.scan_cost`'s per-call prediction:
    rounds (the deepest on any rank) and the most bytes one rank sent / received, forward and backward."""
    model_cfg, ttt_cfg = load_model_config("tiny", **MODEL), TTTConfig.from_dict(TTT)
    for i, layout in enumerate(layouts):
        if layout.get("cp", 1) == 1:
            continue
        algorithm = layout["cp_scan"]
        want = plan.scan_cost(model_cfg, ttt_cfg, ParallelConfig(**layout), micro_batch=micro_batch)[algorithm]
        for k in range(len(starts)):
            counted = [stats for rank in per_rank for stats in rank[i][k]["scan_stats"].values()]
            assert counted and {c["algorithm"] for c in counted} == {algorithm}, (layout, counted)
            for d, direction in enumerate(("forward", "backward")):
                got = (max(c[direction]["rounds"] for c in counted),
                       max(c[direction]["bytes_sent"] for c in counted),
                       max(c[direction]["bytes_received"] for c in counted))
                assert got == (want["rounds"][d], want["sent"][d], want["received"][d]), (layout, direction, got, want)


@pytest.mark.slow
def test_cp2_ring_and_log_match_cp1_and_each_other(tmp_path):
    seq = 64
    # rows of one micro-batch differ (mixed); 4 rows: a micro-batch of 2 on each of the CP=1 layout's 2 ranks
    starts = shard_start_layouts(2, 4, mixed=True, seq=seq) + random_layouts(2, 4, range(3), seq=seq, chunk=CHUNK)
    _run_and_check(tmp_path, 2, dict(), [dict(cp=2)], starts, seq, micro_batch=2, timeout=900,
                   bf16_wire=[dict(cp=2, cp_scan="log")])


@pytest.mark.slow
def test_cp4_and_cp2_tp2_ring_and_log_match_cp1_and_each_other(tmp_path):
    seq = 64
    starts = (packed_shard_starts(4, 4, seq) + packed_shard_starts(2, 4, seq)
              + random_layouts(4, 4, range(2), seq=seq, chunk=CHUNK))
    _run_and_check(tmp_path, 4, dict(), [dict(cp=4), dict(cp=2, tp=2, sequence_parallel=True)], starts, seq,
                   micro_batch=1, timeout=1800)


@pytest.mark.slow
def test_cp8_and_cp4_tp2_ring_and_log_match_cp1_and_each_other(tmp_path):
    # the CP=1 reference runs at TP=2 (dp 4: one row per rank); shards of 128 / 16 = 8 tokens, one chunk
    seq = 128
    starts = packed_shard_starts(8, 4, seq) + random_layouts(8, 4, range(2), seq=seq, chunk=CHUNK)
    _run_and_check(tmp_path, 8, dict(tp=2), [dict(cp=8), dict(cp=4, tp=2, sequence_parallel=True)], starts, seq,
                   micro_batch=1, timeout=2400)

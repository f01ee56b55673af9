"""Context parallelism whatever the document layout: every rank must enter the prefix scan's backward
(a collective), also when no row on some rank continues the document its received prefix ends in.

Document boundaries sit exactly at each shard start (one at a time, and all together), at CP=2, CP=4
and CP=2 x TP=2 (sequence parallel), and at random places (shard starts, chunk edges, anywhere) in
a sweep of seeds; loss and every gradient must equal CP=1's, with update clipping that really clips.
A hang fails within the time-out.
"""

import random
from functools import partial

import pytest

from tests.support.parallel_cases import clipped_fractions, doc_layouts_case, rel_err
from ttt_train.runtime.local_ranks import run_local_ranks

SEQ, CHUNK = 64, 8
TTT = dict(layers=[0, 1], chunk_size=CHUNK, lr=1.0, target="hidden_states", max_update_norm=0.07)  # norms ~0.07
TIMEOUT = 120  # a rank stuck in the scan's backward fails the test in two minutes, not at pytest's limit


def shard_start_layouts(cp: int, rows: int, mixed: bool, seq: int = SEQ) -> list[list[list[int]]]:
    """Every row starts a document exactly at shard k's first token, for each k; then at all of them;
    with `mixed`, then only the first row does (rows of one micro-batch differ)."""
    shard = seq // (2 * cp)
    starts = [k * shard for k in range(1, 2 * cp)]
    layouts = [[[s]] * rows for s in starts] + [[starts] * rows]
    return layouts + ([[[s]] + [[]] * (rows - 1) for s in starts] if mixed else [])


def random_layouts(cp: int, rows: int, seeds: range, seq: int = SEQ, chunk: int = CHUNK) -> list[list[list[int]]]:
    """Per seed and row: 0-3 boundaries drawn from shard starts, chunk edges and arbitrary tokens."""
    shard = seq // (2 * cp)
    pools = [list(range(shard, seq, shard)), list(range(chunk, seq, chunk)), list(range(1, seq))]
    layouts = []
    for seed in seeds:
        rng = random.Random(seed)
        layouts.append([sorted({rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 3))})
                        for _ in range(rows)])
    return layouts


def merged(per_rank, layout: int, docs: int) -> tuple[float, dict]:
    """(loss, full gradients) of parallel layout `layout` and document layout `docs`, over all ranks."""
    grads = {}
    for rank in per_rank:
        grads.update(rank[layout][docs]["grads"])
    return next(r[layout][docs]["loss"] for r in per_rank if r[layout][docs]["loss"] is not None), grads


def assert_same(a: tuple[float, dict], b: tuple[float, dict], where, loss_tol: float = 2e-6, grad_tol: float = 2e-5):
    """Loss and every gradient of `a` equal `b`'s (relative tolerances)."""
    (loss, grads), (ref_loss, ref_grads) = a, b
    assert abs(loss - ref_loss) <= loss_tol * abs(ref_loss), (where, loss, ref_loss)
    assert set(grads) == set(ref_grads), where
    for name, grad in ref_grads.items():
        assert rel_err(grads[name], grad) < grad_tol, (where, name, rel_err(grads[name], grad))


def check(per_rank, layouts, starts):
    """Merge ranks and compare every layout and document layout with the first (CP=1)."""
    for i, layout in enumerate(layouts):
        fractions = clipped_fractions([r[i][k]["ttt_stats"] for r in per_rank for k in range(len(starts))])
        assert 0.1 < sum(fractions) / len(fractions) < 0.9, (layout, fractions)
    for k in range(len(starts)):
        for i, layout in enumerate(layouts[1:], 1):
            assert_same(merged(per_rank, i, k), merged(per_rank, 0, k), (layout, starts[k]))


@pytest.mark.slow
def test_cp2_any_document_layout_matches_cp1(tmp_path):
    layouts = [dict(), dict(cp=2)]
    starts = shard_start_layouts(2, 4, mixed=True) + random_layouts(2, 4, range(16))
    case = partial(doc_layouts_case, ttt=TTT, seq=SEQ, micro_batch=2, model_overrides=dict(num_layers=2))
    per_rank = run_local_ranks(case, 2, layouts, str(tmp_path), starts, timeout=TIMEOUT)
    check(per_rank, layouts, starts)


@pytest.mark.slow
def test_cp4_and_cp2_tp2_any_document_layout_matches_cp1(tmp_path):
    layouts = [dict(), dict(cp=4), dict(cp=2, tp=2, sequence_parallel=True)]
    # one row per micro-batch here: rows that differ within a micro-batch are the CP=2 test's
    starts = shard_start_layouts(4, 4, mixed=False) + shard_start_layouts(2, 4, mixed=False) \
        + random_layouts(4, 4, range(4))
    case = partial(doc_layouts_case, ttt=TTT, seq=SEQ, micro_batch=1, model_overrides=dict(num_layers=2))
    per_rank = run_local_ranks(case, 4, layouts, str(tmp_path), starts, timeout=TIMEOUT)
    check(per_rank, layouts, starts)

"""The local multi-rank launcher: results in rank order, every failing rank reported, time-outs enforced."""

import time

import pytest
import torch
import torch.distributed as dist

from ttt_train.runtime.local_ranks import LocalRanksError, run_local_ranks


def _sum_of_ranks(offset):
    t = torch.tensor([dist.get_rank() + offset])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "sum": t}


def _fail_on_odd_ranks():
    if dist.get_rank() % 2:
        raise ValueError(f"rank {dist.get_rank()} refuses")
    return "ok"


def _hang_on_rank_one():
    if dist.get_rank() == 1:
        time.sleep(60)
    return "done"


def test_results_come_back_in_rank_order():
    results = run_local_ranks(_sum_of_ranks, 3, 10, timeout=120)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["sum"].item() == 33 for r in results)


def test_each_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(LocalRanksError, match=r"(?s)failed on 1 of 2 ranks.*rank 1/2: error.*rank 1 refuses"):
        run_local_ranks(_fail_on_odd_ranks, 2, timeout=120)


def test_time_out_kills_the_group():
    start = time.monotonic()
    with pytest.raises(LocalRanksError, match=r"rank 1/2: timeout"):
        run_local_ranks(_hang_on_rank_one, 2, timeout=5)
    assert time.monotonic() - start < 30


def test_world_size_must_be_positive():
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        run_local_ranks(_sum_of_ranks, 0, 0)

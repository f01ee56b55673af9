"""Per-TTT-layer statistics: aggregated over every recorded micro-batch and over context-parallel ranks
(means and maxima), equal to a hand computation from the definition; not recorded when switched off."""

import pytest

from tests.faults import scenarios as sc
from ttt_train.runtime.local_ranks import run_local_ranks

pytestmark = pytest.mark.slow


def test_stats_aggregate_micro_batches_and_cp_ranks():
    ranks = run_local_ranks(sc.ttt_stats_over_cp, 2, timeout=600)
    first = ranks[0]
    expected, per_rank = sc.ttt_stats_by_hand(first["inputs"], first["weight"], cp=2)
    (gathered,) = first["gathered"].values()
    assert gathered.keys() == expected.keys()
    for key, value in expected.items():
        assert gathered[key] == pytest.approx(value, rel=1e-6), key
    assert 0.2 < gathered["clipped_fraction"] < 0.8  # some updates clipped, some not
    assert ranks[1]["gathered"] == {}  # rank 0 only
    for result in ranks:  # each rank's own statistics: its part only
        mine = per_rank[result["rank"]]
        for key, value in mine.items():
            assert result["own"][key] == pytest.approx(value, rel=1e-6), (result["rank"], key)
        assert result["untouched"]  # a forward with recording off leaves the statistics alone
    assert per_rank[0]["fast_weight_rel_change"] != pytest.approx(per_rank[1]["fast_weight_rel_change"])

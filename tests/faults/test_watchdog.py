"""The hang watchdog on 2 local ranks: a rank stopped inside the collectives is named, with the phase it was
last seen in, by the rank left waiting, which stops within the timeout; a slow phase is not a hang."""

import pytest

from tests.faults import scenarios as sc
from ttt_train.runtime.local_ranks import LocalRanksError, run_local_ranks

pytestmark = pytest.mark.slow


def test_a_stopped_rank_is_named_and_the_waiting_rank_stops(tmp_path):
    report = tmp_path / "report.txt"
    with pytest.raises(LocalRanksError, match="rank 0/2: error\nprocess exited with code 1"):
        run_local_ranks(sc.collectives_with_a_stopped_rank, 2, str(report), 4, timeout=60)
    (stopped, stopped_line), (hung, message) = [line.split(" ", 1) for line in report.read_text().splitlines()]
    assert stopped_line == "stopped"
    assert message.startswith("rank 0 waited "), message
    assert " s in 'step 4' (run.collective_timeout_minutes=0.05, limit 3 s): rank(s) 1 stopped responding: rank 1 " \
           "(pid " in message, message
    assert "last seen in 'step " in message and message.endswith("stopping without saving (the last checkpoint is "
                                                                 "intact)")
    assert 2.5 < float(hung) - float(stopped) < 8  # the timeout (3 s) after the phase's start, and the load


def test_a_slow_phase_is_not_a_hang(tmp_path):
    report = tmp_path / "report.txt"
    assert run_local_ranks(sc.collectives_with_a_stopped_rank, 2, str(report), None, timeout=60) == [None, None]
    assert not report.exists()

"""Fixtures of the fault tests: the synthetic data and one uninterrupted reference run (2 workers)."""

import pytest

from tests.faults import fault_helpers as fh
from tests.training import driver_helpers as h


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return h.make_data(tmp_path_factory.mktemp("fault_data"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data):
    """The test-size curriculum run straight through (stage 0 CP1 x DP2, stage 1 CP2)."""
    run_dir = tmp_path_factory.mktemp("fault_reference") / "run"
    code, out = fh.run(fh.overrides(run_dir, data))
    assert code == 0, out[-5000:]
    return run_dir

"""Non-finite values on one rank only, under tensor and context parallelism (2 local ranks, the
driver in-process): every rank skips the same steps, no rank's weights drift from its replicas', the
skipped step names where the values came from, and K skips in a row stop the run naming the layer."""

import json

import pytest
import torch

from tests.faults import fault_helpers as fh
from tests.faults import scenarios as sc
from tests.training import driver_helpers as h
from ttt_train.runtime.local_ranks import run_local_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # several driver runs (2 shared cores)


def _overrides(run_dir, data, steps, *extra):
    return h.tiny_overrides(run_dir, data, steps=steps, extra=["logging.wandb.mode=disabled", "validation.every_steps=0",
                                                               "checkpoint.every_steps=1", "checkpoint.keep_last=8", *extra])


def _run(overrides, faults):
    return run_local_ranks(sc.driver_with_parameters, 2, overrides, timeout=900, env={"TTT_FAULTS": faults})


GRAD_SITE = "decoder.layers.1.mlp.linear_fc1.weight"
LAYER = "layer 1's MLP (TTT)"


def test_an_inf_gradient_on_one_tp_rank_is_skipped_by_every_rank(tmp_path, data):
    """A tensor-parallel duplicate (megatron's gradient norm counts it on TP rank 0 only) made inf on TP rank 1."""
    run_dir, site = tmp_path / "run", "decoder.layers.1.pre_mlp_layernorm.weight"
    overrides = _overrides(run_dir, data, (3, 1), "parallel=tp2", "stages.1.parallel.cp=1", "run.stages=[0]")
    ranks = _run(overrides, f"inf@grad,rank=1,stage=0,step=2,site={site}")
    assert [r["code"] for r in ranks] == [0, 0]
    records = [r for r in h.records(run_dir) if "losses" in r]
    assert [(r["stage"], r["step"], r["skipped_steps"]) for r in records] == [(0, 1, 0), (0, 2, 1), (0, 3, 1)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[1]["nonfinite"] == f"activations finite; non-finite gradients from {LAYER} down ({site}, rank 1)"
    checkpoints = sorted(p.name for p in (run_dir / "stages" / "0_ctx1k" / "checkpoints").glob("iter_*"))
    assert checkpoints == ["iter_0000001", "iter_0000003"]  # a skipped step saves nothing
    same = ranks[0]["replicated"]
    assert same and ranks[0]["params"].keys() == ranks[1]["params"].keys()
    for name in same:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
    fh.report(fault="inf gradient on one TP rank", injected="TTT_FAULTS inf@grad", outcome="every rank skipped "
              "step 2, trained on; replicas equal", steps_lost=0, data_lost=0)


def test_inf_on_one_cp_rank_is_skipped_by_every_rank_then_stops_the_run_naming_the_layer(tmp_path, data):
    """CP=2 (both ranks hold the whole model, their gradients all-reduced): an inf gradient on rank 1 at
    step 2 after the all-reduce (rank 0's norm stays finite) is skipped by both; inf activations on rank 1
    from step 4 on stop the run after 2 skips in a row (training.max_skipped_steps=1), naming the layer."""
    run_dir = tmp_path / "run"
    overrides = _overrides(run_dir, data, (6, 1), "parallel.cp=2", "training.max_skipped_steps=1")
    ranks = _run(overrides, f"inf@grad,rank=1,stage=0,step=2,site={GRAD_SITE};"
                            "inf@activation,rank=1,stage=0,step=4+,site=decoder.layers.1.mlp")
    assert [r["code"] for r in ranks] == [1, 1]
    assert [r["cp_rank"] for r in ranks] == [0, 1]
    records = [r for r in h.records(run_dir) if "losses" in r]
    assert [(r["stage"], r["step"], r["skipped_steps"]) for r in records][:3] == [(0, 1, 0), (0, 2, 1), (0, 3, 1)]
    assert records[1]["nonfinite"] == f"activations finite; non-finite gradients from {LAYER} down ({GRAD_SITE}, " \
                                      "rank 1)"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed"
    assert status["error"].startswith("step 5: loss "), status["error"]
    assert ("not finite for 2 steps in a row (training.max_skipped_steps=1); non-finite values first in the output "
            f"of {LAYER} (rank 1). Lower optimizer.lr") in status["error"], status["error"]
    checkpoints = sorted(p.name for p in (run_dir / "stages" / "0_ctx1k" / "checkpoints").glob("iter_*"))
    assert checkpoints == ["iter_0000001", "iter_0000003"]  # skipped steps save nothing
    for name, value in ranks[0]["params"].items():  # both CP ranks hold the whole model: the same one
        assert torch.equal(value, ranks[1]["params"][name]), name
        assert torch.isfinite(value).all(), name
    fh.report(fault="inf gradient, then inf activations, on one CP rank", injected="TTT_FAULTS inf@grad, "
              "inf@activation", outcome="every rank skipped the same steps; 2 in a row: exit 1 naming the layer",
              steps_lost=0, data_lost=0)

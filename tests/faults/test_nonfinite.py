"""Non-finite values on one rank only, under data, tensor and context parallelism (2 local ranks, the
driver in-process): every rank skips the same steps, no rank's weights drift from its replicas', the
skipped step names where the values came from, and K skips in a row stop the run naming the layer."""

import json

import pytest
import torch

from tests.faults import scenarios as sc
from tests.training import driver_helpers as h
from ttt_train.runtime.local_ranks import run_local_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # several driver runs (2 shared cores)


def _overrides(run_dir, data, steps, *extra):
    return h.tiny_overrides(run_dir, data, steps=steps, extra=["logging.wandb.mode=disabled", "validation.every_steps=0",
                                                               "checkpoint.every_steps=1", "checkpoint.keep_last=8", *extra])


def _run(overrides, faults):
    return run_local_ranks(sc.driver_with_parameters, 2, overrides, timeout=900, env={"TTT_FAULTS": faults})


@pytest.mark.parametrize("layout, extra, site", [
    # a gradient after the data-parallel all-reduce: the norm of rank 0 stays finite
    ("dp", [], "decoder.layers.1.mlp.linear_fc1.weight"),
    # a tensor-parallel duplicate: megatron's gradient norm counts it on TP rank 0 only
    ("tp", ["parallel=tp2", "stages.1.parallel.cp=1"], "decoder.layers.1.pre_mlp_layernorm.weight"),
])
def test_an_inf_gradient_on_one_rank_is_skipped_by_every_rank(tmp_path, data, layout, extra, site):
    run_dir = tmp_path / "run"
    ranks = _run(_overrides(run_dir, data, (3, 1), *extra), f"inf@grad,rank=1,stage=0,step=2,site={site}")
    assert [r["code"] for r in ranks] == [0, 0]
    records = [r for r in h.records(run_dir) if "losses" in r]
    assert [(r["stage"], r["step"], r["skipped_steps"]) for r in records] == [(0, 1, 0), (0, 2, 1), (0, 3, 1), (1, 1, 0)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    layer = "layer 1's MLP (TTT)"
    assert records[1]["nonfinite"] == f"activations finite; non-finite gradients from {layer} down ({site}, rank 1)"
    checkpoints = sorted(p.name for p in (run_dir / "stages" / "0_ctx1k" / "checkpoints").glob("iter_*"))
    assert checkpoints == ["iter_0000001", "iter_0000003"]  # a skipped step saves nothing
    same = ranks[0]["params"].keys() if layout == "dp" else ranks[0]["replicated"]
    assert same and ranks[0]["params"].keys() == ranks[1]["params"].keys()
    for name in same:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name


def test_inf_activations_on_one_cp_rank_stop_the_run_naming_the_layer(tmp_path, data):
    run_dir = tmp_path / "run"
    overrides = _overrides(run_dir, data, (4, 1), "parallel.cp=2", "training.max_skipped_steps=1")
    ranks = _run(overrides, "inf@activation,rank=1,stage=0,step=2+,site=decoder.layers.1.mlp")
    assert [r["code"] for r in ranks] == [1, 1]
    assert [r["cp_rank"] for r in ranks] == [0, 1]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed"
    assert status["error"].startswith("step 3: loss "), status["error"]
    assert ("not finite for 2 steps in a row (training.max_skipped_steps=1); non-finite values first in the output "
            "of layer 1's MLP (TTT) (rank 1). Lower optimizer.lr") in status["error"], status["error"]
    assert sorted(p.name for p in (run_dir / "stages" / "0_ctx1k" / "checkpoints").glob("iter_*")) == ["iter_0000001"]
    for name, value in ranks[0]["params"].items():  # both CP ranks hold the whole model: the same one
        assert torch.equal(value, ranks[1]["params"][name]), name
        assert torch.isfinite(value).all(), name

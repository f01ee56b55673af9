"""In-Place TTT inserted into a checkpoint trained without it (the paper's drop-in form: a TTT
experiment whose `init.checkpoint` is a plain run's). Only the TTT tensors may be missing, and with
the drop-in initialisation the model computes what the plain one did: the first step's loss (the
weights before any update, on the same batch) equals the plain model's continued from the same
checkpoint; with the from-scratch initialisation it does not (the control that lets this fail)."""

import pytest

from tests.training import driver_helpers as h
from tests.training import driver_scenarios as sc
from ttt_train.runtime.local_ranks import run_local_ranks


def one_stage(run_dir, data, steps, *extra):
    return h.tiny_overrides(run_dir, data, extra=[
        "run.world_size=1", f"stages=[{{name:ctx,tokens:{steps * 4 * h.SHORT},seq_length:{h.SHORT},yarn:null}}]",
        "logging.wandb.mode=disabled", "validation.every_steps=0", *extra])


def first_loss(run_dir) -> float:
    return next(r["loss"] for r in h.records(run_dir) if r.get("step") == 1 and "loss" in r)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("insertion")
    data = h.make_data(root / "data")
    assert run_local_ranks(sc.run_driver, 1, one_stage(root / "plain", data, 2, "ttt=none"), timeout=400) == [0]
    start = f"init.checkpoint={root / 'plain' / 'stages' / '0_ctx' / 'checkpoints'}"
    out = {}
    for name, extra in (("plain", ["ttt=none"]), ("dropin", ["ttt.target_init=dropin"]),
                        ("next_token", ["ttt.target_init=next_token"])):
        run_dir = root / f"continued_{name}"
        results = run_local_ranks(sc.run_driver_printed, 1, one_stage(run_dir, data, 1, start, *extra), timeout=400)
        assert [code for code, _ in results] == [0], results
        out[name] = (first_loss(run_dir), results[0][1])
    return out


@pytest.mark.slow
def test_drop_in_insertion_keeps_the_plain_models_outputs(runs):
    plain, dropin, next_token = (runs[k][0] for k in ("plain", "dropin", "next_token"))
    assert dropin == pytest.approx(plain, rel=1e-6, abs=0)
    assert abs(next_token - plain) > 1e-5 * plain  # 10x the tolerance: the from-scratch target writes from step 0


@pytest.mark.slow
def test_insertion_is_named(runs):
    assert "In-Place TTT inserted into layers [1, 3] of a checkpoint without it" in runs["dropin"][1]
    assert "ttt.target_init=dropin: the outputs are unchanged at step 0" in runs["dropin"][1]
    assert "ttt.target_init=next_token: the outputs change from step 0" in runs["next_token"][1]
    assert "inserted" not in runs["plain"][1]

"""The driver's recall validation (`validation.recall_records`): `val/recall_loss` is the loss on
exactly the recall tokens of held-out synthetic records, equal to the `recall` evaluation suite's on
the exported checkpoint (an independent forward: the HF modeling file). The vocabulary is a multiple
of 128, so megatron's padded softmax (which training's losses use) equals the export's."""

import pytest

from data_tools import synthetic
from tests.eval.test_eval_run import run as run_eval
from tests.training import driver_helpers as h
from tests.training import driver_scenarios as sc
from ttt_train.runtime.local_ranks import run_local_ranks


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_recall_loss_equals_the_eval_suite_on_the_export(tmp_path):
    data = h.make_data(tmp_path / "data")
    records = tmp_path / "heldout.jsonl"
    assert synthetic.main(["mqar", "passkey", "--num", "4", "--length", "250", "--seed", "900", "--num-pairs", "8",
                           "--output", str(records)]) == 0
    run_dir = tmp_path / "run"
    overrides = h.tiny_overrides(run_dir, data, steps=(3, 1), extra=[
        "run.world_size=1", "stages=[{name:ctx,tokens:3072,seq_length:256,yarn:null}]",
        "logging.wandb.mode=disabled", f"validation.recall_records={records}", "validation.recall_count=4",
        "ttt.target_init=next_token", "ttt.lr=1.0", "ttt.lr_warmup.steps=0",
        "model.vocab_size=384"])  # the export runs at ttt.lr
    assert run_local_ranks(sc.run_driver, 1, overrides, timeout=600) == [0]
    logged = [r for r in h.records(run_dir) if "val/recall_loss" in r]
    assert [r["step"] for r in logged] == [3]
    rows = run_eval([f"models=[{run_dir}/stages/0_ctx/checkpoints]", "labels=[ttt]", "suite=recall",
                     f"suite.records={records}", "samples=4", f"out={tmp_path / 'eval'}", "device=cpu"])
    (suite,) = [r for r in rows if r["task"] == "all"]
    assert suite["recall_tokens"] == 2 * 8 + 2 * 5
    assert logged[0]["val/recall_loss"] == pytest.approx(suite["recall_loss"], rel=1e-4)

"""Driver behaviour probed inside the ranks: the inner-lr warm-up reaches every TTT layer's op, a
carried optimizer takes the new stage's learning rate, non-finite steps are skipped then stop the run."""

import json
import math

import pytest

from tests.training import driver_helpers as h
from tests.training import driver_scenarios as sc
from ttt_train.runtime.local_ranks import run_local_ranks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.make_data(tmp_path_factory.mktemp("driver_data"))


def one_rank(run_dir, data, steps, *extra):
    """The test-size curriculum on one rank (stage 1 without context parallelism), wandb off."""
    return h.tiny_overrides(run_dir, data, steps=steps, extra=["run.world_size=1", "stages.1.parallel.cp=1",
                                                                "logging.wandb.mode=disabled", "validation.every_steps=0", *extra])


def test_inner_lr_warmup_reaches_every_ttt_layer(tmp_path, data):
    (result,) = run_local_ranks(sc.inner_lrs_seen, 1, one_rank(tmp_path / "run", data, (4, 2)), timeout=400)
    code, seen = result
    assert code == 0
    # 2 micro-batches per step in both stages, 2 TTT layers (1 and 3): 4 op calls per step
    assert len(seen) == 6 * 4
    start, target, warmup = 1e-3, 0.03, 4  # tiny_ttt: exponential from 1e-3 to ttt.lr over 4 run steps
    for run_step in range(6):
        calls = seen[4 * run_step: 4 * run_step + 4]
        expected = start * (target / start) ** (run_step / warmup) if run_step < warmup else target
        assert len({layer for layer, _ in calls}) == 2
        assert [lr for _, lr in calls] == pytest.approx([expected] * 4, rel=1e-12), run_step


def test_carried_optimizer_trains_at_the_new_stage_lr(tmp_path, data):
    run_dir = tmp_path / "run"
    overrides = one_rank(run_dir, data, (2, 2), "schedule=constant", "checkpoint.carry_optimizer=true",
                         "+stages.1.optimizer.lr=1.0e-3")
    assert run_local_ranks(sc.run_driver, 1, overrides, timeout=400) == [0]
    lrs = {(r["stage"], r["step"]): r["lr"] for r in h.records(run_dir)}
    assert lrs == {(0, 1): 3e-3, (0, 2): 3e-3, (1, 1): 1e-3, (1, 2): 1e-3}


def test_nonfinite_steps_are_skipped_then_stop_without_checkpoint(tmp_path, data):
    run_dir = tmp_path / "run"
    overrides = one_rank(run_dir, data, (8, 1), "training.max_skipped_steps=2", "checkpoint.every_steps=1",
                         "checkpoint.keep_last=8")
    # 2 micro-batches per step: steps 1-2 are finite, then every step is NaN
    assert run_local_ranks(sc.nan_after, 1, overrides, 4, timeout=400) == [1]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 1
    # NaN multiplied into the per-token losses: every activation is finite, the gradients are not from the
    # last place with parameters down
    assert status["error"].startswith("step 5: loss nan / gradient norm nan not finite for 3 steps in a row "
                                      "(training.max_skipped_steps=2); activations finite; non-finite gradients "
                                      "from the final norm down (decoder.final_layernorm.weight, rank 0)")
    checkpoints = sorted(p.name for p in (run_dir / "stages" / "0_ctx1k" / "checkpoints").glob("iter_*"))
    assert checkpoints == ["iter_0000001", "iter_0000002"]
    skipped = {r["step"]: r["skipped_steps"] for r in h.records(run_dir)}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 2}
    assert all(math.isfinite(r["loss"]) for r in h.records(run_dir) if r["step"] <= 2)


def _tiny_hf(folder, layers: int):
    """A random transformers Qwen3 with the `tiny` preset's shape (4 layers fit it, 3 do not) and a
    vocabulary megatron does not pad (pad rows would join the softmax with their own random weights)."""
    from tests.hf.test_convert_import import make_hf_model

    return make_hf_model(folder, layers=layers, vocab_size=384, intermediate_size=128, head_dim=16,
                         rope={"rope_type": "default", "rope_theta": 1000000.0})


def _hf_loss(hf_dir, prefix: str, seq: int, samples: int) -> float:
    """Mean token loss of the HF model on the first `samples` training samples of the dataset."""
    import torch
    from transformers import AutoModelForCausalLM

    from ttt_train.data.datasets import DataConfig, build_datasets

    cfg = DataConfig.from_dict({"blend": [{"path": prefix, "weight": 1.0}], "seq_length": seq, "split": "95,5,0",
                                "cache_dir": str(hf_dir / "cache")})
    train_set = build_datasets(cfg, None, (samples, 0, 0))[0]
    batch = [train_set[i] for i in range(samples)]
    tokens = torch.stack([torch.as_tensor(b["tokens"]) for b in batch])
    labels = torch.stack([torch.as_tensor(b["labels"]) for b in batch])
    mask = torch.stack([torch.as_tensor(b["loss_mask"]) for b in batch]).float()
    model = AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    with torch.no_grad():
        logits = model(tokens).logits
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return float((losses * mask.flatten()).sum() / mask.sum())


def test_init_hf_starts_from_the_hf_weights(tmp_path, data, capsys):
    """Stage 0 from `init.hf`: the first step's loss is the HF model's own loss on that batch (TTT layers
    start as the plain MLP); a folder of another shape is refused naming the key."""
    from ttt_train import train

    mismatched = _tiny_hf(tmp_path / "hf3", layers=3)
    overrides = one_rank(tmp_path / "run", data, (1, 1), "model.sliding_window=null", "model.vocab_size=384")
    assert train.main([*overrides, f"init.hf={mismatched}"]) == train.EXIT_REFUSED
    assert "model.num_layers" in capsys.readouterr().err

    hf_dir = _tiny_hf(tmp_path / "hf4", layers=4)
    assert run_local_ranks(sc.run_driver, 1, [*overrides, f"init.hf={hf_dir}"], timeout=400) == [0]
    first = h.records(tmp_path / "run")[0]
    assert (first["stage"], first["step"]) == (0, 1)
    assert first["loss"] == pytest.approx(_hf_loss(hf_dir, data["short"], h.SHORT, 4), rel=1e-5)

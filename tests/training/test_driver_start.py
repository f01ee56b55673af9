"""The driver's starts held against the run and the experiment, one process (gloo): a refused resume
leaves config.yaml and status.json telling the truth; one stage trained alone, then the next;
`init.checkpoint` / `init.hf` refused when they do not match the experiment; an expected failure after
set-up is one line (exit 1, recorded), an unexpected one a traceback (recorded too)."""

import json

import pytest

from tests.training import driver_helpers as h
from tests.training import driver_scenarios as sc
from ttt_train import train
from ttt_train.runtime.local_ranks import LocalRanksError, run_local_ranks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.make_data(tmp_path_factory.mktemp("driver_data"))


def one_rank(run_dir, data, *extra):
    """The test-size curriculum on one rank, 2 + 1 steps (stage 1 without context parallelism), wandb off."""
    return h.tiny_overrides(run_dir, data, steps=(2, 1), extra=[
        "run.world_size=1", "stages.1.parallel.cp=1", "logging.wandb.mode=disabled", "validation.every_steps=0",
        *extra])


def status(run_dir) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.fixture(scope="module")
def stage0(tmp_path_factory, data):
    """A run folder whose stage 0 was trained alone (`run.stages=[0]`)."""
    run_dir = tmp_path_factory.mktemp("stage0") / "run"
    ((code, err),) = run_local_ranks(sc.run_driver_captured, 1, one_rank(run_dir, data, "run.stages=[0]"), timeout=900)
    assert code == 0, err
    return run_dir


def test_refused_resume_leaves_the_run_folder_true_then_the_next_stage_runs_alone(stage0, data):
    run_dir = stage0
    assert status(run_dir) == {"state": "stages_finished", "exit_code": 0, "remaining": ["ctx4k"]}
    assert not (run_dir / "stages" / "1_ctx4k").exists()
    config = (run_dir / "config.yaml").read_text()
    # a changed chunk size for the trained stage: refused in one line, nothing rewritten, the run's state kept
    ((code, err),) = run_local_ranks(sc.run_driver_captured, 1, one_rank(run_dir, data, "ttt.chunk_size=32"),
                                     timeout=900)
    assert code == train.EXIT_REFUSED and err.count("\n") == 1 and "Traceback" not in err
    assert "stages.0 (ctx1k) has finished, and this command changes settings it trained with: ttt.chunk_size: " \
           "64 -> 32." in err
    assert (run_dir / "config.yaml").read_text() == config
    refused = status(run_dir)
    assert refused["state"] == "refused" and refused["exit_code"] == 2 and "ttt.chunk_size" in refused["error"]
    assert refused["previous"]["state"] == "stages_finished"
    # stage 1 alone, by name, from stage 0's final checkpoint; a logging change is applied and said
    ((code, err),) = run_local_ranks(sc.run_driver_captured, 1,
                                     one_rank(run_dir, data, "run.stages=[ctx4k]", "logging.interval=2"), timeout=900)
    assert code == 0, err
    assert status(run_dir) == {"state": "finished", "exit_code": 0}
    assert sorted(h.losses(run_dir)) == [(0, 1), (0, 2), (1, 1)]
    assert "interval: 2" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("extra, message", [
    (["model.rotary_base=10000.0"], "model.rotary_base: checkpoint 1000000.0, experiment 10000.0"),
    (["model.sliding_window=null"], "model.sliding_window: checkpoint 128, experiment None"),
    (["model.num_layers=2", "ttt.every=1", "ttt.offset=0"], "model.num_layers: checkpoint 4, experiment 2"),
    (["stages.0.yarn={factor: 2.0, original_max_position_embeddings: 128}", "model.max_position_embeddings=256"],
     "model.yarn: checkpoint None, experiment YarnConfig(factor=2.0"),
    ("tokenizer", "was trained with another tokenizer than data.tokenizer="),
])
def test_init_checkpoint_is_held_against_the_experiment(stage0, data, tmp_path, capsys, extra, message):
    if extra == "tokenizer":  # data (and tokenizer) of another tokenizer than the checkpoint's
        tokenizer, prefix = other_tokenizer_data(tmp_path, data)
        extra = [f"data.tokenizer={tokenizer}", f"data.blend=[{{path:'{prefix}',weight:1.0}}]", "~stages.1"]
    overrides = one_rank(tmp_path / "new", data, f"init.checkpoint={stage0 / 'stages' / '0_ctx1k' / 'checkpoints'}",
                         *extra)
    capsys.readouterr()
    assert train.main(overrides) == train.EXIT_REFUSED
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: init.checkpoint=") and err.count("\n") == 1, err


def other_tokenizer_data(folder, data) -> tuple[str, str]:
    """A tokenizer.json that is the byte tokenizer plus one token, and a dataset tokenized with it."""
    import tokenizers

    from data_tools import synthetic
    from ttt_train.data.tokenizer import BYTE_TOKENIZER_PATH

    backend = tokenizers.Tokenizer.from_file(str(BYTE_TOKENIZER_PATH))
    backend.add_tokens(["<extra>"])
    path = folder / "tokenizer.json"
    backend.save(str(path))
    prefix = folder / "other"
    synthetic.main(["passkey", "--num", "40", "--length", str(h.SHORT), "--seed", "5", "--tokenizer", str(path),
                    "--output-prefix", str(prefix)])
    return str(path), str(prefix)


def test_data_of_another_tokenizer_is_refused_before_set_up(data, tmp_path, capsys):
    tokenizer, _ = other_tokenizer_data(tmp_path, data)
    capsys.readouterr()
    assert train.main(one_rank(tmp_path / "run", data, f"data.tokenizer={tokenizer}")) == train.EXIT_REFUSED
    err = capsys.readouterr().err
    assert err.startswith("error: stages.0: data.blend[0]: dataset ") and "was tokenized with tokenizer 'byte'" in err


def test_init_hf_with_a_missing_shard_is_refused(data, tmp_path, capsys):
    from tests.hf.test_convert_import import make_hf_model

    hf_dir = make_hf_model(tmp_path / "hf", layers=4, vocab_size=384, intermediate_size=128, head_dim=16,
                           rope={"rope_type": "default", "rope_theta": 1000000.0})
    weights = sorted(hf_dir.glob("*.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": weights[0].name, "b": "model-00002-of-00002.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    overrides = one_rank(tmp_path / "run", data, "model.sliding_window=null", "model.vocab_size=384", f"init.hf={hf_dir}")
    assert train.main(overrides) == train.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "model.safetensors.index.json names 2 shards, 1 missing: model-00002-of-00002.safetensors" in err


def test_failures_after_set_up_are_one_line_and_recorded(tmp_path, data):
    run_dir = tmp_path / "run"
    ((code, err),) = run_local_ranks(sc.setup_raises, 1, one_rank(run_dir, data), "data", timeout=900)
    assert code == train.EXIT_FAILED and "Traceback" not in err
    assert err == "error: dataset 'x': a problem found while setting up with a second line\n"
    failed = status(run_dir)
    assert (failed["state"], failed["exit_code"]) == ("failed", 1) and failed["error"] == err[len("error: "):-1]
    assert "DataError" in failed["traceback"]  # kept for a bug report, not shown
    assert not (run_dir / "config.yaml").exists()  # the start never got going
    with pytest.raises(LocalRanksError, match="TypeError: a bug"):  # a bug shows its traceback
        run_local_ranks(sc.setup_raises, 1, one_rank(run_dir, data), "bug", timeout=900)
    assert status(run_dir) == {"state": "failed", "exit_code": 1,
                               "error": "unexpected TypeError: a bug (traceback on the console)"}

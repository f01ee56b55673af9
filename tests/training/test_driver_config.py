"""The driver's configuration: every refusal names the key and a fix, before any compute; the dry-run
plan; the paper experiments compose and resolve at their planned size."""

import pytest

from tests.training import driver_helpers as h
from ttt_train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.make_data(tmp_path_factory.mktemp("driver_data"))


@pytest.fixture
def base(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    return h.tiny_overrides(tmp_path / "run", data)


def refused(overrides, capsys) -> str:
    assert train.main(overrides) == train.EXIT_REFUSED
    return capsys.readouterr().err


@pytest.mark.parametrize("extra, expected", [
    (["optimizer.lrr=1"], "unknown config key 'optimizer.lrr'; known keys of optimizer: ['adam_beta1'"),
    (["stages.1.parallel.cpp=2"], "unknown config key 'stages.1.parallel.cpp'"),
    (["+stages.1.ddp.bucket=2"], "stages.1.ddp: Key 'bucket' not in 'DDPConfig'"),
    (["training.micro_batch_size=x"], "Value 'x' of type 'str' could not be converted to Integer"),
    (["training.global_batch_size=6"], "stages.0: training.global_batch_size=6 is not a multiple of "
                                       "training.micro_batch_size x dp = 2 x 2 = 4"),
    (["parallel.tp=3"], "world size 2 is not divisible by parallel.tp * parallel.pp * parallel.cp = 3*1*1"),
    (["stages.1.seq_length=1002"], "stages.1.seq_length=1002 does not split into 2 * parallel.cp = 4"),
    (["ttt.chunk_size=96"],
     "stages.1: seq_length / (2 * parallel.cp) = 1024/4 = 256 is not a multiple of ttt.chunk_size=96"),
    (["stages.0.seq_length=512"], "stages.0.seq_length=512 exceeds model.max_position_embeddings=256"),
    (["stages.1.yarn.factor=2.0"], "stages.1.seq_length=1024 exceeds what its YaRN settings allow (factor 2.0"),
    (["data.blend=[{path:/nonexistent/ds,weight:1.0}]"], "stages.0.data.blend[0].path: /nonexistent/ds.bin not found"),
    (["init.checkpoint=/nonexistent/ckpt"], "init.checkpoint=/nonexistent/ckpt: no such directory"),
    (["stages=[]"], "stages: the experiment lists no stages"),
    (["ttt.target=input_embed", "parallel.pp=2"],
     "ttt.target=input_embed with TTT layers [3] past the first pipeline stage"),
    (["model.vocab_size=200"], "model.vocab_size 200 is smaller than the vocabulary of tokenizer 'byte'"),
    (["stages.0.tokens=100"], "stages.0.tokens=100 is less than one step"),
    (["run.world_size=8"], "run.world_size=8 but the launch has 2 ranks"),
    (["ttt.chunk_size=0"], "ttt.chunk_size"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_refusals_name_the_key_and_a_fix(base, capsys, extra, expected):
    assert expected in refused(base + extra, capsys)


def test_missing_experiment_lists_the_choices(capsys):
    err = refused([], capsys)
    assert "You must specify 'experiment'" in err and "tiny_ttt" in err and "qwen3_4b_ttt" in err


def test_dry_run_prints_the_plan(base, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE")
    assert train.main(base + ["run.dry_run=true", "run.world_size=2"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config of tiny_ttt" in out and "stages:" in out
    assert "stages.0 (ctx1k): 6,144 tokens at seq_length 256 = 6 steps of 4 sequences (1,024 tokens)" in out
    assert "layout: 2 ranks = tp 1 x pp 1 x cp 2 x dp 1; micro-batch 1 x 2 accumulation" in out
    assert out.count("memory per rank") == 2 and "cp scan (parallel.cp_scan=auto -> " in out
    assert "TTT layers [1, 3] chunk 64" in out


@pytest.mark.parametrize("experiment", ["qwen3_4b_ttt", "qwen3_4b_base", "llama31_8b_ttt", "llama31_8b_base",
                                        "qwen3_14b_ttt", "qwen3_14b_base", "scratch_500m_ttt", "scratch_500m_base",
                                        "scratch_1p5b_ttt", "scratch_1p5b_base", "tiny_base"])
def test_experiments_resolve_at_their_planned_size(experiment):
    from ttt_train.training.config import compose
    from ttt_train.training.curriculum import resolve

    cfg = compose([f"experiment={experiment}"])
    stages = resolve(cfg, cfg.run.world_size, check_files=False)
    assert stages and all(s.steps >= 1 for s in stages)
    assert all(s.ttt.enabled == experiment.endswith("_ttt") for s in stages)
    if experiment.startswith(("qwen3_4b", "llama31", "qwen3_14b")):
        assert [s.seq_length for s in stages] == [32768, 131072]
        assert [s.tokens for s in stages] == [20_000_000_000, 15_000_000_000]
        assert cfg.optimizer.lr == 5e-6 and cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.clip_grad == 1.0
        yarn = stages[1].model.yarn
        if experiment.startswith("llama"):
            assert yarn is None and stages[1].model.llama3_rope_factor == 8.0
        else:
            assert (yarn.factor, yarn.original_max_position_embeddings) == (4.0, 32768)

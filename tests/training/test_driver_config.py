"""The driver's configuration: every refusal names the key and a fix, before any compute; the dry-run
plan; the paper experiments compose and resolve at their planned size."""

from pathlib import Path

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
    (["optimizer.lrr=1"], "unknown config key 'optimizer.lrr' (did you mean 'optimizer.lr'?); known keys of optimizer: ['adam_beta1'"),
    (["stages.1.parallel.cpp=2"], "unknown config key 'stages.1.parallel.cpp'"),
    (["+stages.1.ddp.bucket=2"], "unknown config key 'stages.1.ddp.bucket' (did you mean 'stages.1.ddp.bucket_size'?)"),
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
    (["validation.recall_records=heldout.jsonl", "validation.recall_count=2"],
     "stages.0.validation.recall_count=2 is less than one record per micro-batch row on every data-parallel rank "
     "(micro_batch_size x dp = 2 x 2 = 4); set it to a multiple of 4"),
    # appended keys are checked too, whatever the syntax (Hydra alone would keep them and ignore them)
    (["+optimzer.lr=1e-3"], "unknown config key 'optimzer.lr' (did you mean 'optimizer.lr'?)"),
    (["+trainig.micro_batch_size=8"], "unknown config key 'trainig.micro_batch_size' (did you mean "
                                      "'training.micro_batch_size'?)"),
    (["+foo=1"], "unknown config key 'foo'; known keys of the root: ['checkpoint'"),
    (["++optimzer.lr=2"], "unknown config key 'optimzer.lr' (did you mean 'optimizer.lr'?)"),
    (["+optimizer.lrr=2"], "unknown config key 'optimizer.lrr' (did you mean 'optimizer.lr'?)"),
    (["+stages.1.foo=1"], "unknown config key 'stages.1.foo'; known keys of stages.1: ['data'"),
    (["+stages.1.ttt.lr_warmup.stps=3"], "did you mean 'stages.1.ttt.lr_warmup.steps'?"),
    (["optimzer.lr=1"], "unknown config key 'optimzer.lr' (did you mean 'optimizer.lr'?)"),
    (["+optimizer.lr=3"], "optimizer.lr is a key of this config already: set it without the '+'"),
    (["data.seq_length=512"], "unknown config key 'data.seq_length'; known keys of data: ['blend'"),
    (["stages.0.yarn.factor=2.0"], "stages.0.yarn.factor=2.0: stages.0.yarn is null here, so a key below it cannot be set alone"),
    (["~stages.7"], "~stages.7: no stage '7'; this experiment's stages are 0: ctx1k, 1: ctx4k"),
    (["stages.ctx8k.tokens=1"], "no stage 'ctx8k'; this experiment's stages are 0: ctx1k, 1: ctx4k"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_refusals_name_the_key_and_a_fix(base, capsys, extra, expected):
    assert expected in refused(base + extra, capsys)


def test_no_hydra_advice_to_append_a_misspelt_key(base, capsys):
    err = refused(base + ["optimzer.lr=1"], capsys)
    assert "+optimzer" not in err and "To append" not in err and err.count("\n") == 1


def test_a_stage_sets_any_key_of_a_section_and_stages_go_by_index_or_name():
    from ttt_train.training.config import compose

    cfg = compose(["experiment=tiny_ttt", "stages.1.parallel.tp=2", "stages.0.ttt.lr_warmup.steps=3",
                   "stages.ctx4k.training.dtype=bf16"])
    assert dict(cfg.stages[1].parallel) == {"cp": 2, "tp": 2} and cfg.stages[0].ttt.lr_warmup.steps == 3
    assert cfg.stages[1].training.dtype == "bf16"
    assert [s.name for s in compose(["experiment=tiny_ttt", "~stages.1"]).stages] == ["ctx1k"]
    alone = compose(["experiment=tiny_ttt", "~stages.ctx1k", "stages.1.tokens=8192"])
    assert [(s.name, s.tokens) for s in alone.stages] == [("ctx4k", 8192)]  # indices are the experiment's


def test_schema_is_derived_from_the_dataclasses():
    import dataclasses

    from ttt_train.data.datasets import DataConfig
    from ttt_train.training.config import SECTIONS, StageConfig, TrainConfig, section_schema

    stage_fields = {f.name for f in dataclasses.fields(StageConfig)}
    assert set(SECTIONS) <= stage_fields and {f.name for f in dataclasses.fields(TrainConfig)} >= set(SECTIONS)
    data = {f.name for f in dataclasses.fields(section_schema("data"))}
    assert data == {f.name for f in dataclasses.fields(DataConfig)} - {"seq_length"}


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


SHIPPED = sorted(p.stem for p in (h.ROOT / "configs" / "experiment").glob("*.yaml"))


def _squash(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


@pytest.mark.parametrize("experiment", SHIPPED)
def test_shipped_experiments_agree_on_model_tokenizer_and_data(experiment):
    """The base model the experiment starts from is the model preset it builds, and every stage's data is
    read with that model's own tokenizer (a continual run on another tokenizer's ids trains on garbage);
    a local tokenizer fits the model's vocabulary."""
    from ttt_train.data.tokenizer import check_model_vocab, load_tokenizer
    from ttt_train.training.config import compose
    from ttt_train.training.curriculum import resolve

    cfg = compose([f"experiment={experiment}"])
    stages = resolve(cfg, cfg.run.world_size or 1, check_files=False)
    tokenizers = {s.name: (s.data.tokenizer if s.data else cfg.stages[s.index].data.get("tokenizer", cfg.data.tokenizer))
                  for s in stages}
    assert len(set(tokenizers.values())) == 1, tokenizers
    (tokenizer,) = set(tokenizers.values())
    if cfg.init.hf:
        assert _squash(Path(cfg.init.hf).name).startswith(_squash(cfg.model.name)), (cfg.init.hf, cfg.model.name)
        assert tokenizer == cfg.init.hf, f"{experiment}: data.tokenizer={tokenizer}, but the model is {cfg.init.hf}"
    if tokenizer == "byte":
        check_model_vocab(cfg.model.vocab_size, load_tokenizer(tokenizer))


def test_readme_tokenizes_with_its_experiments_tokenizer():
    """README step 1 tokenizes with the tokenizer the experiments of its training commands read."""
    import re
    import shlex

    from ttt_train.training.config import compose

    text = (h.ROOT / "README.md").read_text()
    tokenizers = {shlex.split(m)[0] for m in re.findall(r"python -m data_tools\.(?:tokenize|mixture) .*--tokenizer (\S+)", text)}
    experiments = set(re.findall(r"experiment=(\w+)", text)) & set(SHIPPED)
    assert tokenizers and experiments
    assert {compose([f"experiment={e}"]).data.tokenizer for e in experiments if e.startswith("qwen3_4b")} == tokenizers


def test_stages_left_out_need_neither_this_allocation_nor_their_data(base):
    from ttt_train.training.config import compose
    from ttt_train.training.curriculum import resolve

    cfg = compose(["experiment=qwen3_4b_ttt", "run.world_size=8", "run.stages=[ctx32k]"])
    stages = resolve(cfg, 8, check_files=False)  # stage 2 needs tp 4 x cp 16 = 64 ranks
    assert [(s.dp, s.parallel.cp) for s in stages] == [(2, 2), (1, 16)]
    cfg = compose(base + ["run.stages=[0]", "stages.1.data.blend=[{path:/not/built/yet,weight:1.0}]"])
    stages = resolve(cfg, 2)
    assert stages[0].data is not None and stages[1].missing == ["stages.1.data.blend[0].path: /not/built/yet.bin not found",
                                                                 "stages.1.data.blend[0].path: /not/built/yet.idx not found"]


def test_any_length_at_cp1_whole_chunks_per_shard_at_cp2(base):
    """The op takes a shorter last chunk, so at cp 1 any seq_length trains; with cp > 1 each of the 2*cp
    load-balanced shards must hold whole chunks (the refusal is in test_refusals_name_the_key_and_a_fix)."""
    from ttt_train.training.config import compose
    from ttt_train.training.curriculum import resolve

    stages = resolve(compose(base + ["stages.0.seq_length=250"]), 2)  # 250 = 3 chunks of 64 + 58
    assert stages[0].seq_length == 250 and stages[0].parallel.cp == 1 and stages[0].ttt.chunk_size == 64

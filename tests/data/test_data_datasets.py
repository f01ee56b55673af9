import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from data_helpers import write_permuted_byte_tokenizer, write_word_tokenizer
from omegaconf import OmegaConf

from data_tools import synthetic, tokenize
from ttt_train.data import indexed
from ttt_train.data.datasets import (
    DataConfig,
    MegatronTokenizerAdapter,
    ResumableBatchSampler,
    build_dataloader,
    build_datasets,
    dataset_fingerprint,
)
from ttt_train.data.documents import document_ids_from_position_ids, document_ids_from_tokens
from ttt_train.data.errors import DataError
from ttt_train.data.tokenizer import check_model_vocab, load_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"
SEQ = 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two small synthetic datasets (byte tokenizer)."""
    root = tmp_path_factory.mktemp("datasets")
    for name, task, seed in [("a", "passkey", 0), ("b", "variable_tracking", 100)]:
        args = [
            task,
            "--num",
            "40",
            "--length",
            "400",
            "--seed",
            str(seed),
            "--output-prefix",
            str(root / name),
        ]
        assert synthetic.main(args) == 0
    return root


def config(data, tmp_path, **overrides) -> DataConfig:
    values = {
        "blend": [str(data / "a")],
        "seq_length": SEQ,
        "split": "90,5,5",
        "cache_dir": str(tmp_path / "cache"),
    }
    return DataConfig.from_dict({**values, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (lambda a: {"blend": ["/no/such/data"]}, "'blend[0].path': /no/such/data.bin not found"),
        (lambda a: {"blend": [{"path": a, "weight": 0}]}, "'blend[0].weight'"),
        (lambda a: {"blend": [{"path": a, "wieght": 1}]}, "'blend[0]'"),
        (lambda a: {"seq_length": 0}, "'seq_length'"),
        (lambda a: {"split": "90;10"}, "'split'"),
        (lambda a: {"tokenizer": "/no/tokenizer"}, "'tokenizer': /no/tokenizer not found"),
        (lambda a: {"eod_mask_loss": "yes"}, "'eod_mask_loss'"),
        (lambda a: {"seqlen": 5}, "unknown data config keys ['seqlen']"),
    ],
)
def test_config_errors_name_the_key(data, tmp_path, overrides, message):
    with pytest.raises(ValueError) as err:
        config(data, tmp_path, **overrides(str(data / "a")))
    assert message in str(err.value)


def test_yaml_configs(tmp_path, byte_tokenizer):
    tiny = OmegaConf.load(CONFIGS / "synthetic_tiny.yaml")
    # The build command in the file's header, writing under tmp_path instead of data/.
    prefix = tmp_path / "synthetic"
    args = ["passkey", "multikey", "variable_tracking", "--num", "96", "--length", "1024", "--seed", "0"]
    assert synthetic.main([*args, "--output-prefix", str(prefix)]) == 0
    tiny.blend[0].path, tiny.cache_dir = str(prefix), str(tmp_path / "cache")
    tiny.seq_length = 512  # a stage's, not the data section's
    cfg = DataConfig.from_dict(tiny)
    assert (cfg.seq_length, cfg.tokenizer, cfg.blend[0].weight) == (512, "byte", 1.0)
    train, valid, test = build_datasets(cfg, byte_tokenizer, num_samples=(64, 4, 4))
    assert len(train) >= 64 and train[0]["tokens"].shape == (512,)
    for name in ("pretrain_example.yaml", "longctx_stage2_example.yaml"):
        with pytest.raises(ValueError, match=r"blend\[0\].path': /data/tokenized/"):
            # placeholder paths are refused, naming the key
            DataConfig.from_dict({**OmegaConf.to_container(OmegaConf.load(CONFIGS / name)), "seq_length": 512})


def test_adapter_is_what_megatron_needs(byte_tokenizer):
    adapter = MegatronTokenizerAdapter(byte_tokenizer)
    assert (adapter.vocab_size, adapter.eod, adapter.pad) == (258, 256, 257)
    assert adapter.tokenize("hi").tolist() == [104, 105] and adapter.detokenize([104, 105]) == "hi"
    assert adapter.unique_identifiers["fingerprint"] == byte_tokenizer.fingerprint


def stream(dataset, consumed, micro, rank=0, world=1, eod=256):
    return [b for b in build_dataloader(dataset, eod, consumed, micro, rank, world)]


def test_build_is_deterministic_and_batches_carry_doc_ids(data, tmp_path, byte_tokenizer):
    cfg = config(
        data, tmp_path, blend=[{"path": str(data / "a"), "weight": 1}, {"path": str(data / "b"), "weight": 3}]
    )
    train, valid, test = build_datasets(cfg, byte_tokenizer, num_samples=(40, 4, 4))
    assert len(train) >= 40 and len(valid) >= 4 and len(test) >= 4
    again, _, _ = build_datasets(
        dataclasses.replace(cfg, cache_dir=str(tmp_path / "other")), byte_tokenizer, (40, 4, 4)
    )
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(len(train)))
    batches = stream(train, 0, 4)
    assert len(batches) == len(train) // 4
    batch = batches[0]
    sources = torch.cat([b["dataset_id"] for b in batches])  # [B] per batch: the blend entry of each sample
    assert batch.pop("dataset_id").shape == (4,) and (sources == 1).float().mean() == pytest.approx(
        0.75, abs=0.1
    )
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "doc_ids"}
    assert all(v.shape == (4, SEQ) for v in batch.values())
    assert torch.equal(batch["doc_ids"], document_ids_from_tokens(batch["tokens"], 256))
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert any(b["doc_ids"].max() > 0 for b in batches)  # packed samples do hold several documents


def test_resume_and_data_parallel_split(data, tmp_path, byte_tokenizer):
    train, _, _ = build_datasets(config(data, tmp_path), byte_tokenizer, num_samples=(48, 0, 0))
    full = stream(train, 0, 2)
    resumed = stream(train, 12, 2)
    assert len(resumed) == len(full) - 6
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(resumed, full[6:]))
    ranks = [list(ResumableBatchSampler(len(train), 12, 2, rank, 3)) for rank in range(3)]
    for step in zip(*ranks):
        indices = [i for batch in step for i in batch]
        assert len(set(indices)) == len(indices) == 6  # disjoint ranks, one global batch per step
    assert ranks[0][0] == [12, 13] and ranks[2][0] == [16, 17]
    with pytest.raises(ValueError, match="multiple of"):
        ResumableBatchSampler(len(train), 7, 2, 0, 2)


def test_options_reach_the_samples(data, tmp_path, byte_tokenizer):
    cfg = config(data, tmp_path, eod_mask_loss=True, reset_position_ids=True)
    train, _, _ = build_datasets(cfg, byte_tokenizer, num_samples=(8, 0, 0))
    batch = stream(train, 0, 8)[0]
    assert torch.equal(batch["loss_mask"] == 0, batch["tokens"] == 256)
    assert torch.equal(document_ids_from_position_ids(batch["position_ids"]), batch["doc_ids"])


def test_refuses_datasets_of_another_tokenizer(data, tmp_path, byte_tokenizer):
    permuted = load_tokenizer(write_permuted_byte_tokenizer(tmp_path / "permuted.json"))
    assert (permuted.vocab_size, permuted.eod_id) == (byte_tokenizer.vocab_size, byte_tokenizer.eod_id)
    with pytest.raises(ValueError, match="was tokenized with tokenizer 'byte' .* not with '.*permuted.json'"):
        build_datasets(config(data, tmp_path), permuted, (8, 0, 0))
    with pytest.raises(ValueError, match="built with EOD id 256 but tokenizer 'byte' has EOD id 257"):
        build_datasets(config(data, tmp_path), load_tokenizer("byte", eod_token="<|pad|>"), (8, 0, 0))
    # Without a sidecar the largest id is scanned, and the dtype tells a larger vocabulary apart.
    for suffix in (".bin", ".idx"):
        shutil.copy(data / f"a{suffix}", tmp_path / f"bare{suffix}")
    bare = config(data, tmp_path, blend=[str(tmp_path / "bare")])
    small = load_tokenizer(write_word_tokenizer(tmp_path / "small.json", 200))
    with pytest.raises(ValueError, match="token id 256 >= vocab size 200"):
        build_datasets(bare, small, (8, 0, 0))
    large = load_tokenizer(write_word_tokenizer(tmp_path / "large.json", 70000))
    with pytest.raises(ValueError, match="token dtype uint16 cannot hold"):
        build_datasets(bare, large, (8, 0, 0))

    (tmp_path / "x.txt").write_text("no end of document here")
    assert (
        tokenize.main(
            [str(tmp_path / "x.txt"), "--output-prefix", str(tmp_path / "noeod"), "--no-append-eod"]
        )
        == 0
    )
    with pytest.raises(ValueError, match="not delimited by EOD"):
        build_datasets(config(data, tmp_path, blend=[str(tmp_path / "noeod")]), byte_tokenizer, (1, 0, 0))


def distributed_rank(rank: int, world: int, init_file: str, cfg: DataConfig, out_dir: str) -> None:
    """One torch.distributed (gloo) rank: build the datasets, save this rank's batches."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        train, _, _ = build_datasets(cfg, load_tokenizer("byte"), num_samples=(24, 2, 2))
        batches = list(build_dataloader(train, 256, 4, 2, rank, world))
        torch.save([b["tokens"] for b in batches], f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_ranks_share_the_cache_and_split_the_stream(data, tmp_path, byte_tokenizer):
    cfg = config(
        data, tmp_path, blend=[{"path": str(data / "a"), "weight": 1}, {"path": str(data / "b"), "weight": 1}]
    )
    args = (2, str(tmp_path / "init"), cfg, str(tmp_path))
    # fork is fast (megatron is already imported) but would copy an initialised default group
    start_method = "spawn" if torch.distributed.is_initialized() else "fork"
    torch.multiprocessing.start_processes(distributed_rank, args=args, nprocs=2, start_method=start_method)
    assert any(
        p.name.endswith("BlendedDataset-train-dataset_index.npy") for p in (tmp_path / "cache").rglob("*")
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    train, _, _ = build_datasets(
        cfg, byte_tokenizer, num_samples=(24, 2, 2)
    )  # one process, no torch.distributed
    single = [b["tokens"] for b in stream(train, 4, 4)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for step, both in zip(single, zip(*ranks)):
        assert torch.equal(step, torch.cat(both))  # rank 0 then rank 1 make up each global batch


def synthetic_dataset(prefix, num: int, length: int, seed: int, *extra: str) -> str:
    args = ["passkey", "--num", str(num), "--length", str(length), "--seed", str(seed)]
    assert synthetic.main([*args, "--output-prefix", str(prefix), *extra]) == 0
    return str(prefix)


def test_index_cache_follows_a_dataset_rebuilt_in_place(tmp_path, byte_tokenizer):
    """megatron keys its cache by path: the same cache folder must not serve a rebuilt dataset's
    old indices (fewer, shorter documents: stale indices point past them)."""
    prefix = synthetic_dataset(tmp_path / "r", 40, 400, 0)
    cfg = config(tmp_path, tmp_path, blend=[prefix], split="1")
    before = dataset_fingerprint(cfg)
    build_datasets(cfg, byte_tokenizer, (8, 0, 0))
    synthetic_dataset(tmp_path / "r", 12, 300, 50, "--force")
    assert dataset_fingerprint(cfg) != before
    cached, _, _ = build_datasets(cfg, byte_tokenizer, (8, 0, 0))
    fresh_cfg = dataclasses.replace(cfg, cache_dir=str(tmp_path / "fresh"))
    fresh, _, _ = build_datasets(fresh_cfg, byte_tokenizer, (8, 0, 0))
    assert len(cached) == len(fresh)
    assert all(torch.equal(cached[i]["tokens"], fresh[i]["tokens"]) for i in range(len(fresh)))


def test_dataset_fingerprint_is_the_identity_of_the_samples(data, tmp_path):
    blend = [{"path": str(data / "a"), "weight": 1}, {"path": str(data / "b"), "weight": 3}]
    fingerprint = dataset_fingerprint(config(data, tmp_path, blend=blend))
    assert len(fingerprint) == 64 and dataset_fingerprint(config(data, tmp_path, blend=blend)) == fingerprint
    for suffix in indexed.SUFFIXES:  # the same data elsewhere is the same data
        shutil.copy(data / f"a{suffix}", tmp_path / f"copy{suffix}")
    moved = [{"path": str(tmp_path / "copy"), "weight": 2}, {"path": str(data / "b"), "weight": 6}]
    assert dataset_fingerprint(config(data, tmp_path, blend=moved)) == fingerprint
    for change in [
        {"seed": 1},
        {"seq_length": SEQ * 2},
        {"split": "80,10,10"},
        {"blend": [blend[0], {**blend[1], "weight": 1}]},
        {"blend": blend[:1]},
    ]:
        assert dataset_fingerprint(config(data, tmp_path, **{"blend": blend, **change})) != fingerprint
    # A dataset whose files changed without its sidecar is refused rather than trusted.
    shutil.copy(data / "b.bin", tmp_path / "copy.bin")
    with pytest.raises(
        ValueError, match="copy.meta.json describes a .bin of .* the dataset changed without its sidecar"
    ):
        dataset_fingerprint(config(data, tmp_path, blend=moved))


def test_model_vocabulary_is_checked_before_compute(data, tmp_path, byte_tokenizer):
    check_model_vocab(258, byte_tokenizer)
    check_model_vocab(512, byte_tokenizer)  # a padded embedding table
    for bad in (200, 257, "258", 258.0):
        with pytest.raises(ValueError) as err:
            check_model_vocab(bad, byte_tokenizer)
        message = str(err.value)
        assert f"model.vocab_size {bad!r}" in message and "tokenizer 'byte' (258 ids" in message
        assert "set model.vocab_size >= 258" in message
    with pytest.raises(ValueError, match="model.vocab_size 200 is smaller"):
        build_datasets(config(data, tmp_path), byte_tokenizer, (8, 0, 0), model_vocab_size=200)


def test_a_split_share_without_documents_is_refused(data, tmp_path, byte_tokenizer):
    # 40 documents: the last 1% of them rounds to none (megatron would look for test samples forever, even
    # with none asked for)
    cfg = config(data, tmp_path, blend=[{"path": str(data / "a"), "weight": 1.0},
                                        {"path": str(data / "b"), "weight": 1.0}], split="98,1,1")
    with pytest.raises(DataError, match=r"data.blend\[0\].path=.*/a: its 40 documents give the test split "
                                        r"\(data.split='98,1,1': 1%\) no document; add documents or raise"):
        build_datasets(cfg, byte_tokenizer, num_samples=(8, 0, 0))

import os
from collections import Counter

import numpy
import pytest
import torch
from data_helpers import make_texts, write_jsonl, write_word_tokenizer

from data_tools import mixture, tokenize
from ttt_train.data import indexed
from ttt_train.data.datasets import DataConfig, build_datasets
from ttt_train.data.documents import document_ids_from_tokens

SEQ, MIN = 128, 256


def test_plan_fills_long_documents_and_packs_short_ones():
    rng = numpy.random.default_rng(0)
    lengths = [rng.integers(300, 700, size=20), rng.integers(5, 120, size=200)]
    plan = mixture.plan_mixture(lengths, [0.5, 0.5], SEQ, MIN, pack_short=True, num_tokens=None, seed=3)
    assert plan == mixture.plan_mixture(lengths, [0.5, 0.5], SEQ, MIN, True, None, 3)
    assert plan.units != mixture.plan_mixture(lengths, [0.5, 0.5], SEQ, MIN, True, None, 4).units
    sizes = [sum(span[3] for span in unit) for unit in plan.units]
    assert sum(size % SEQ != 0 for size in sizes) == plan.partial_units
    # A long document stays whole at the start of its sequence; short ones never exceed their length.
    covered = Counter()
    for unit in plan.units:
        for k, (i, d, offset, length) in enumerate(unit):
            if lengths[i][d] >= MIN:
                assert k == 0 and offset == 0 and length == lengths[i][d]
            assert offset + length <= lengths[i][d]
            covered[i] += length
    drawn = [source["tokens"] for source in plan.drawn]
    assert covered[0] == drawn[0] and covered[1] == drawn[1] - plan.leftover_tokens
    # Shares follow the weights (within a document), and no source is repeated by default.
    assert abs(drawn[0] - drawn[1]) < 700 and [s["epochs"] for s in plan.drawn] == [1, 1]


def test_plan_weights_repeats_and_drop():
    lengths = [numpy.full(10, 300), numpy.full(100, 50)]
    plan = mixture.plan_mixture(lengths, [3, 1], SEQ, MIN, pack_short=True, num_tokens=20000, seed=0)
    assert [s["epochs"] for s in plan.drawn] == [5, 1]
    assert plan.drawn[0]["tokens"] == 15000 and plan.drawn[1]["tokens"] == 5000
    plan = mixture.plan_mixture(lengths[:1], [1], SEQ, MIN, pack_short=False, num_tokens=None, seed=0)
    assert plan.short_documents == 0 and len(plan.units) == 10 and plan.partial_units == 10
    with pytest.raises(ValueError, match="data/web has no documents"):
        mixture.plan_mixture([numpy.full(5, 50)], [1], SEQ, MIN, False, None, 0, names=["data/web"])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A source of long documents and one of short ones, tokenized with the byte tokenizer."""
    root = tmp_path_factory.mktemp("mixture")
    texts = {
        "long": make_texts(12, seed=2, min_words=40, max_words=90),
        "short": make_texts(80, seed=3, max_words=15),
    }
    for name, docs in texts.items():
        write_jsonl(root / f"{name}.jsonl", docs)
        assert tokenize.main([str(root / f"{name}.jsonl"), "--output-prefix", str(root / name)]) == 0
    return root, texts["long"] + texts["short"]


def documents_of(tokens, eod_id):
    """Split a token row into its documents as (bytes without EOD, ends with EOD): with the byte
    tokenizer, token ids are the bytes of the UTF-8 text."""
    ids = document_ids_from_tokens(torch.tensor(tokens), eod_id).numpy()
    out = []
    for d in numpy.unique(ids):
        doc = tokens[ids == d]
        complete = bool(doc[-1] == eod_id)
        out.append(((doc[:-1] if complete else doc).astype(numpy.uint8).tobytes(), complete))
    return out


def test_mixture_preserves_document_boundaries(sources, tmp_path, byte_tokenizer):
    root, texts = sources
    originals = [text.encode() for text in texts]
    by_header = {doc.split(b":")[0]: doc for doc in originals}
    out = tmp_path / "mix"
    args = ["--source", str(root / "long"), "2", "--source", str(root / "short"), "1"]
    assert (
        mixture.main([*args, "--seq-length", str(SEQ), "--min-length", str(MIN), "--output-prefix", str(out)])
        == 0
    )
    meta = indexed.read_sidecar(str(out))
    dataset = indexed.open_dataset(str(out))
    long_seen = 0
    for i in range(len(dataset)):
        unit = dataset[i]
        assert unit.size % SEQ == 0 or meta["partial_sequences"]
        for doc, complete in documents_of(unit, byte_tokenizer.eod_id):
            if complete and doc.startswith(b"doc-"):  # a whole document
                assert doc == by_header[doc.split(b":")[0]]
                long_seen += len(doc) + 1 >= MIN
            else:  # part of a short document cut at the end of a sequence: its start, middle or end
                assert any(
                    (o.endswith(doc) if complete else doc in o) and len(o) + 1 < MIN for o in originals
                ), doc
    assert long_seen == meta["long_documents"] == 12 and meta["split_documents"] > 0
    shares = [s["tokens"] / meta["tokens"] for s in meta["sources"]]
    assert shares[0] == pytest.approx(2 / 3, abs=0.1)

    # Megatron samples of the mixture: every document segment lies inside one original document.
    cfg = DataConfig.from_dict(
        {"blend": [str(out)], "seq_length": SEQ, "split": "1", "cache_dir": str(tmp_path / "c")}
    )
    train, _, _ = build_datasets(cfg, byte_tokenizer, num_samples=(16, 0, 0))
    for k in range(len(train)):
        for doc, _ in documents_of(train[k]["tokens"].numpy(), byte_tokenizer.eod_id):
            assert any(doc in original for original in originals)


def test_mixture_is_deterministic_and_refuses_a_foreign_tokenizer(sources, tmp_path, capsys):
    root, _ = sources
    common = ["--source", str(root / "long"), "1", "--source", str(root / "short"), "1", "--seq-length", "64"]
    common += ["--min-length", "200", "--seed", "5"]
    assert mixture.main([*common, "--output-prefix", str(tmp_path / "a")]) == 0
    assert mixture.main([*common, "--output-prefix", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()
    assert (
        indexed.read_sidecar(str(tmp_path / "a"))["tokenizer"] == "byte"
    )  # the sources' tokenizer by default
    foreign = write_word_tokenizer(tmp_path / "words.json", 200)
    assert mixture.main([*common, "--output-prefix", str(tmp_path / "c"), "--tokenizer", foreign]) == 2
    assert "was tokenized with tokenizer 'byte'" in capsys.readouterr().err
    assert not any(tmp_path.glob("c.*"))


def test_mixture_never_writes_over_a_source(sources, tmp_path, capsys):
    """The output prefix is a source, reached directly, through a symbolic link, or as a hard link."""
    root, _ = sources
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.name.startswith("short.")}
    (tmp_path / "link").symlink_to(root)
    os.link(root / "short.idx", tmp_path / "hard.idx")
    common = ["--source", str(root / "short"), "1", "--seq-length", "64", "--min-length", "200"]
    for out, force in (
        (root / "short", []),
        (tmp_path / "link" / "short", ["--force"]),
        (tmp_path / "hard", ["--force"]),
    ):
        assert mixture.main([*common, "--output-prefix", str(out), *force]) == 2
        err = capsys.readouterr().err
        assert (
            "would overwrite the input" in err and str(root / "short.") in err and len(err.splitlines()) == 1
        )
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.name.startswith("short.")} == before


def test_mixture_replaces_outputs_only_with_force_and_atomically(sources, tmp_path, capsys, monkeypatch):
    root, _ = sources
    common = ["--source", str(root / "short"), "1", "--seq-length", "64", "--min-length", "200"]
    out = ["--output-prefix", str(tmp_path / "mix")]
    assert mixture.main([*common, *out]) == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert mixture.main([*common, *out, "--seed", "9"]) == 2
    assert "mix.bin already exists: pass --force to replace it" in capsys.readouterr().err

    def broken(prefix, documents, dtype):  # a crash in the middle of writing
        raise RuntimeError("disk full")

    monkeypatch.setattr(indexed, "write_documents", broken)
    with pytest.raises(RuntimeError, match="disk full"):  # not a data error: the traceback is kept
        mixture.main([*common, *out, "--seed", "9", "--force"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first  # old output intact, no debris
    monkeypatch.undo()
    assert mixture.main([*common, *out, "--seed", "9", "--force"]) == 0
    assert (tmp_path / "mix.bin").read_bytes() != first["mix.bin"] and len(list(tmp_path.iterdir())) == 3


def test_mixture_without_sequences_fails_and_writes_nothing(sources, tmp_path, capsys):
    root, _ = sources
    common = [
        "--source",
        str(root / "short"),
        "1",
        "--min-length",
        "200",
        "--output-prefix",
        str(tmp_path / "m"),
    ]
    assert mixture.main([*common, "--seq-length", "100000"]) == 1
    err = capsys.readouterr().err
    assert "no sequence to write; nothing was written" in err
    assert "  long documents (>= --min-length 200): none\n  short documents: 80, " in err
    assert "tokens: fewer than one --seq-length 100000" in err
    assert mixture.main([*common, "--seq-length", "64", "--short", "drop"]) == 2
    assert "has no documents to draw (none of at least --min-length 200 tokens)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_mixture_of_mostly_partial_sequences_is_refused_unless_allowed(sources, tmp_path, capsys):
    """Long documents without enough short ones to fill their sequences: most samples would start
    inside another sequence. Refused (nothing written) unless --allow-partial."""
    root, _ = sources
    out = tmp_path / "m"
    args = ["--source", str(root / "long"), "1", "--seq-length", str(SEQ), "--min-length", str(MIN),
            "--short", "drop", "--output-prefix", str(out)]
    assert mixture.main(args) == 2
    err = capsys.readouterr().err
    assert "11 of 12 sequences (92%) are short of a multiple of --seq-length 128 (--short drop)" in err
    assert err.count("\n") == 1
    assert not any(tmp_path.iterdir())
    assert mixture.main([*args, "--allow-partial"]) == 0
    assert indexed.read_sidecar(str(out))["partial_sequences"] == 11

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import make_texts, write_jsonl

from data_tools import tokenize
from ttt_train.data import indexed

REPO = Path(__file__).resolve().parents[2]


def run(inputs, prefix, *options) -> int:
    return tokenize.main([*map(str, inputs), "--output-prefix", str(prefix), *map(str, options)])


def decoded_documents(prefix, tokenizer) -> list[str]:
    """Each document's text, checking it ends with exactly one EOD."""
    dataset = indexed.open_dataset(str(prefix))
    texts = []
    for i in range(len(dataset)):
        ids = dataset[i].tolist()
        assert ids[-1] == tokenizer.eod_id and tokenizer.eod_id not in ids[:-1]
        texts.append(tokenizer.decode(ids[:-1]))
    return texts


def read_bytes(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two JSON-lines files of 35 + 25 documents."""
    root = tmp_path_factory.mktemp("corpus")
    texts = make_texts(60, seed=1)
    write_jsonl(root / "a.jsonl", texts[:35])
    write_jsonl(root / "b.jsonl", texts[35:])
    return root, texts


def test_help_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "data_tools.tokenize", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--output-prefix" in out.stdout and "--resume" in out.stdout


def test_round_trip_text_to_dataset_to_text(corpus, tmp_path, byte_tokenizer, capsys):
    root, texts = corpus
    assert run([root / "*.jsonl"], tmp_path / "out", "--docs-per-piece", "8") == 0
    assert decoded_documents(tmp_path / "out", byte_tokenizer) == texts
    meta = indexed.read_sidecar(str(tmp_path / "out"))
    assert meta["documents"] == 60 and meta["skipped"] == {} and meta["dtype"] == "uint16"
    assert meta["tokens"] == sum(len(t.encode()) + 1 for t in texts)
    assert "documents: 60" in capsys.readouterr().out
    assert not (tmp_path / "out.pieces").exists()


def test_workers_give_the_same_output(corpus, tmp_path):
    root, _ = corpus
    assert run([root / "*.jsonl"], tmp_path / "one", "--docs-per-piece", "7") == 0
    assert run([root / "*.jsonl"], tmp_path / "two", "--docs-per-piece", "7", "--workers", "2") == 0
    assert read_bytes(tmp_path / "one") == read_bytes(tmp_path / "two")


def test_resume_after_interruption_is_byte_identical(corpus, tmp_path, monkeypatch, capsys):
    root, _ = corpus
    inputs, options = [root / "a.jsonl", root / "b.jsonl"], ("--docs-per-piece", "6")
    assert run(inputs, tmp_path / "full", *options) == 0

    real = tokenize.tokenize_piece

    def interrupted(index, records, workdir, settings):
        if index == 4:  # die after writing piece 4's data, before marking it done
            real(index, records, workdir, settings)
            os.remove(os.path.join(workdir, f"piece_{index:06d}.json"))
            raise KeyboardInterrupt
        return real(index, records, workdir, settings)

    monkeypatch.setattr(tokenize, "tokenize_piece", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(inputs, tmp_path / "part", *options)
    monkeypatch.setattr(tokenize, "tokenize_piece", real)
    assert not (tmp_path / "part.bin").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run(inputs, tmp_path / "part", *options)
    with pytest.raises(ValueError, match="differs in settings"):
        run(inputs, tmp_path / "part", "--docs-per-piece", "5", "--resume")
    capsys.readouterr()
    assert run(inputs, tmp_path / "part", *options, "--resume") == 0
    assert "(4 reused" in capsys.readouterr().out
    assert read_bytes(tmp_path / "part") == read_bytes(tmp_path / "full")
    assert indexed.read_sidecar(str(tmp_path / "part")) == indexed.read_sidecar(str(tmp_path / "full"))
    with pytest.raises(FileExistsError, match="already exists"):
        run(inputs, tmp_path / "full", *options)


BAD_LINES = [
    '{"text": "good one"}',
    '{"body": "no text field"}',
    '{"text": "broken',
    '{"text": "   "}',
    "",
    '{"text": 42}',
    '["not", "an", "object"]',
    '{"text": "good two"}',
]


def test_bad_input_is_reported_with_file_and_line(tmp_path, byte_tokenizer, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    assert run([path], tmp_path / "out", "--docs-per-piece", "3") == 0
    assert decoded_documents(tmp_path / "out", byte_tokenizer) == ["good one", "good two"]
    out = capsys.readouterr().out
    for line, reason in [
        (2, "missing_field"),
        (3, "unreadable"),
        (4, "empty"),
        (5, "empty"),
        (6, "not_text"),
        (7, "unreadable"),
    ]:
        assert f"{path}:{line}: {reason}" in out
    meta = indexed.read_sidecar(str(tmp_path / "out"))
    assert meta["skipped"] == {"missing_field": 1, "unreadable": 2, "empty": 2, "not_text": 1}
    assert meta["documents"] == 2


def test_on_error_fail_refuses_at_the_first_bad_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    assert run([path], tmp_path / "out", "--on-error", "fail") == 1
    assert f"{path}:2: missing_field" in capsys.readouterr().err
    assert not (tmp_path / "out.bin").exists()


def test_vocab_mismatch_is_skipped_or_refused(tmp_path, byte_tokenizer, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", ["abc", "東京 is beyond ascii", "def"])
    # A model vocabulary of 200 ids cannot hold the UTF-8 bytes >= 200 (nor the EOD id 256).
    assert run([path], tmp_path / "fail", "--vocab-size", "200", "--no-append-eod", "--on-error", "fail") == 1
    assert f"{path}:2: vocab_mismatch: token id 230 >= vocab size 200" in capsys.readouterr().err
    assert run([path], tmp_path / "skip", "--vocab-size", "200", "--no-append-eod") == 0
    dataset = indexed.open_dataset(str(tmp_path / "skip"))
    assert [byte_tokenizer.decode(dataset[i]) for i in range(len(dataset))] == ["abc", "def"]
    assert indexed.read_sidecar(str(tmp_path / "skip"))["skipped"] == {"vocab_mismatch": 1}


def test_text_and_parquet_inputs(tmp_path, byte_tokenizer):
    (tmp_path / "whole.txt").write_text("first line\nsecond line\n")
    (tmp_path / "paras.txt").write_text("para one\nstill one\n\n\npara two\n")
    assert run([tmp_path / "whole.txt"], tmp_path / "file") == 0
    assert decoded_documents(tmp_path / "file", byte_tokenizer) == ["first line\nsecond line\n"]
    assert run([tmp_path / "paras.txt"], tmp_path / "para", "--txt-mode", "paragraph") == 0
    assert decoded_documents(tmp_path / "para", byte_tokenizer) == ["para one\nstill one", "para two"]
    assert run([tmp_path / "paras.txt"], tmp_path / "line", "--txt-mode", "line") == 0
    assert decoded_documents(tmp_path / "line", byte_tokenizer) == ["para one", "still one", "para two"]

    pq.write_table(pa.table({"content": ["row one", None, "row three"]}), tmp_path / "t.parquet")
    assert run([tmp_path / "t.parquet"], tmp_path / "pq", "--text-field", "content") == 0
    assert decoded_documents(tmp_path / "pq", byte_tokenizer) == ["row one", "row three"]
    assert indexed.read_sidecar(str(tmp_path / "pq"))["skipped"] == {"missing_field": 1}
    assert run([tmp_path / "t.parquet"], tmp_path / "nofield") == 0  # no "text" column: every row reported
    assert indexed.read_sidecar(str(tmp_path / "nofield"))["skipped"] == {"missing_field": 3}


def test_missing_input_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        run([tmp_path / "nothing-here*.jsonl"], tmp_path / "out")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown format"):
        run([tmp_path / "x.csv"], tmp_path / "out")


def test_meta_records_the_build(corpus, tmp_path):
    root, _ = corpus
    assert run([root / "a.jsonl"], tmp_path / "out") == 0
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert (meta["tokenizer"], meta["eod_id"], meta["max_token_id"], meta["eod_delimited"]) == (
        "byte",
        256,
        256,
        True,
    )

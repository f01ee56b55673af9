import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import make_texts, write_jsonl

from data_tools import tokenize
from ttt_train.data import indexed
from ttt_train.data.tokenizer import BYTE_TOKENIZER_PATH

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
    text = " ".join(out.stdout.split())
    assert "(default: byte)" in text and "tokenizer processes (default: 1)" in text  # the defaults are shown


def test_round_trip_text_to_dataset_to_text(corpus, tmp_path, byte_tokenizer, capsys):
    root, texts = corpus
    assert run([root / "*.jsonl"], tmp_path / "out", "--docs-per-piece", "8") == 0
    assert decoded_documents(tmp_path / "out", byte_tokenizer) == texts
    meta = indexed.read_sidecar(str(tmp_path / "out"))
    assert meta["documents"] == 60 and meta["skipped"] == {} and meta["dtype"] == "uint16"
    assert meta["tokens"] == sum(len(t.encode()) + 1 for t in texts)
    out = capsys.readouterr().out
    assert "documents: 60" in out
    assert f"  tokenizer: byte (vocab 258, EOD id 256, fingerprint {byte_tokenizer.fingerprint[:12]}): train with " \
           f"data.tokenizer=byte" in out
    assert not (tmp_path / "out.pieces").exists()


def test_workers_give_the_same_output(corpus, tmp_path):
    root, _ = corpus
    assert run([root / "*.jsonl"], tmp_path / "one", "--docs-per-piece", "7") == 0
    assert run([root / "*.jsonl"], tmp_path / "two", "--docs-per-piece", "7", "--workers", "2") == 0
    assert read_bytes(tmp_path / "one") == read_bytes(tmp_path / "two")


def interrupt_at(monkeypatch, index, marker=False):
    """Make tokenize_piece die at piece `index`: after its data (and, with `marker`, its marker)."""
    real = tokenize.tokenize_piece

    def interrupted(i, records, workdir, settings):
        stats = real(i, records, workdir, settings)
        if i == index:
            if not marker:
                os.remove(os.path.join(workdir, f"piece_{i:06d}.json"))
            raise KeyboardInterrupt
        return stats

    monkeypatch.setattr(tokenize, "tokenize_piece", interrupted)
    return real


def test_resume_after_interruption_is_byte_identical(corpus, tmp_path, monkeypatch, capsys):
    root, _ = corpus
    inputs, options = [root / "a.jsonl", root / "b.jsonl"], ("--docs-per-piece", "6")
    assert run(inputs, tmp_path / "full", *options) == 0

    real = interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(inputs, tmp_path / "part", *options)
    monkeypatch.setattr(tokenize, "tokenize_piece", real)
    assert not (tmp_path / "part.bin").exists()
    capsys.readouterr()
    assert run(inputs, tmp_path / "part", *options) == 2
    assert "continue it with --resume, or start over with --force" in capsys.readouterr().err
    assert run(inputs, tmp_path / "part", "--docs-per-piece", "5", "--resume") == 2
    assert "the run differs in docs_per_piece" in capsys.readouterr().err
    assert run(inputs, tmp_path / "part", *options, "--resume") == 0
    assert "(4 reused from an interrupted run, 0 redone" in capsys.readouterr().out
    assert read_bytes(tmp_path / "part") == read_bytes(tmp_path / "full")
    assert indexed.read_sidecar(str(tmp_path / "part")) == indexed.read_sidecar(str(tmp_path / "full"))
    assert run(inputs, tmp_path / "full", *options) == 2
    assert "full.bin already exists: pass --force to replace it" in capsys.readouterr().err


def test_resume_never_reuses_a_broken_or_stale_piece(tmp_path, monkeypatch, capsys):
    texts = make_texts(30, seed=4)
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    options = ("--docs-per-piece", "5")
    real = interrupt_at(monkeypatch, 3, marker=True)  # pieces 0-3 done, markers written
    with pytest.raises(KeyboardInterrupt):
        run([path], tmp_path / "part", *options)
    monkeypatch.setattr(tokenize, "tokenize_piece", real)
    pieces = tmp_path / "part.pieces"
    # A crash between piece 1's marker and its data reaching the disk: the .bin is cut short.
    (pieces / "piece_000001.bin").write_bytes((pieces / "piece_000001.bin").read_bytes()[:-7])
    # Piece 2's input records change (same file, same size: one character of document 12 differs).
    texts[12] = texts[12][:-1] + ("x" if texts[12][-1] != "x" else "y")
    write_jsonl(tmp_path / "in.jsonl", texts)
    capsys.readouterr()
    assert run([path], tmp_path / "part", *options, "--resume") == 0
    assert "(2 reused from an interrupted run, 2 redone" in capsys.readouterr().out
    assert run([path], tmp_path / "fresh", *options) == 0
    assert read_bytes(tmp_path / "part") == read_bytes(tmp_path / "fresh")


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


def test_on_error_fail_gives_the_command_that_works(tmp_path, byte_tokenizer, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = [json.dumps({"text": f"document {i}"}) for i in range(9)]
    lines = good[:7] + ['{"body": "no text field"}'] + good[7:]
    Path("in.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["in.jsonl", "--output-prefix", "out", "--docs-per-piece", "3", "--on-error", "fail"]
    assert tokenize.main(argv) == 1
    err = capsys.readouterr().err
    assert "in.jsonl:8: missing_field" in err and not Path("out.bin").exists()
    command = next(line.strip() for line in err.splitlines() if line.startswith("  python -m"))
    assert command == "python -m data_tools.tokenize " + " ".join(argv) + " --resume"
    lines[7] = json.dumps({"text": "fixed"})
    Path("in.jsonl").write_text("\n".join(lines) + "\n")
    assert tokenize.main(shlex.split(command)[3:]) == 0
    assert "(2 reused from an interrupted run, 0 redone" in capsys.readouterr().out
    assert decoded_documents("out", byte_tokenizer) == [json.loads(line)["text"] for line in lines]


def test_vocab_mismatch_is_skipped_or_refused(tmp_path, byte_tokenizer, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", ["abc", "東京 is beyond ascii", "def"])
    # A model vocabulary of 200 ids cannot hold the UTF-8 bytes >= 200 (nor the EOD id 256).
    assert run([path], tmp_path / "fail", "--vocab-size", "200", "--no-append-eod", "--on-error", "fail") == 1
    assert f"{path}:2: vocab_mismatch: token id 230 >= vocab size 200" in capsys.readouterr().err
    assert run([path], tmp_path / "eod", "--vocab-size", "200") == 2
    assert "the EOD id 256 is >= --vocab-size 200: raise --vocab-size" in capsys.readouterr().err
    assert run([path], tmp_path / "skip", "--vocab-size", "200", "--no-append-eod") == 0
    dataset = indexed.open_dataset(str(tmp_path / "skip"))
    assert [byte_tokenizer.decode(dataset[i]) for i in range(len(dataset))] == ["abc", "def"]
    assert indexed.read_sidecar(str(tmp_path / "skip"))["skipped"] == {"vocab_mismatch": 1}


def test_text_and_parquet_inputs(tmp_path, byte_tokenizer, capsys):
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
    assert run([tmp_path / "t.parquet"], tmp_path / "nofield") == 1  # no "text" column: every row reported
    assert "  missing_field: 3" in capsys.readouterr().err and not (tmp_path / "nofield.bin").exists()


def test_missing_input_is_refused(tmp_path, capsys):
    assert run([tmp_path / "nothing-here*.jsonl"], tmp_path / "out") == 2
    assert "nothing-here*.jsonl'" + ": no such file" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("a,b\n")
    assert run([tmp_path / "x.csv"], tmp_path / "out") == 2
    assert "unknown format; rename it or convert it" in capsys.readouterr().err


@pytest.mark.parametrize(
    "lines, reasons",
    [
        (
            ['{"body": 1}', "not json", '{"text": ""}', '{"text": "x"}'],
            "empty: 1|missing_field: 1|unreadable: 1",
        ),
        ([], ""),
    ],
)
def test_no_document_fails_with_the_reasons_and_leaves_nothing(tmp_path, capsys, lines, reasons):
    """Every record skipped (the valid one by a vocabulary that cannot hold it), or an empty input."""
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "in.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    assert (
        run([path], tmp_path / "out", "--vocab-size", "100", "--no-append-eod", "--docs-per-piece", "2") == 1
    )
    err = capsys.readouterr().err
    assert f"no document to write ({len(lines)} records in 1 files" in err and "nothing was written" in err
    if lines:
        assert "vocab_mismatch: 1" in err and all(f"  {r}" in err for r in reasons.split("|"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_meta_records_the_build(corpus, tmp_path, byte_tokenizer):
    root, _ = corpus
    assert run([root / "a.jsonl"], tmp_path / "out") == 0
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert (meta["tokenizer"], meta["eod_id"], meta["max_token_id"], meta["eod_delimited"]) == (
        "byte",
        256,
        256,
        True,
    )
    assert meta["tokenizer_fingerprint"] == byte_tokenizer.fingerprint
    assert meta["bin_bytes"] == (tmp_path / "out.bin").stat().st_size


def test_meta_stores_a_portable_tokenizer(tmp_path, monkeypatch):
    """A tokenizer given by a relative path is recorded absolute: the dataset works from any folder."""
    (tmp_path / "work" / "tok").mkdir(parents=True)
    (tmp_path / "work" / "tok" / "t.json").write_text(BYTE_TOKENIZER_PATH.read_text())
    write_jsonl(tmp_path / "work" / "in.jsonl", ["hello"])
    monkeypatch.chdir(tmp_path / "work")
    assert tokenize.main(["in.jsonl", "--output-prefix", "data/ds", "--tokenizer", "tok/t.json"]) == 0
    meta = indexed.read_sidecar("data/ds")
    assert (
        meta["tokenizer"] == str(tmp_path / "work" / "tok" / "t.json")
        and meta["tokenizer_name"] == "tok/t.json"
    )
    assert meta["inputs"] == [str(tmp_path / "work" / "in.jsonl")]
    monkeypatch.chdir(tmp_path)
    assert indexed.sidecar_tokenizer("work/data/ds", meta) == meta["tokenizer"]


def test_never_writes_over_an_input(tmp_path, capsys):
    """A JSON input named like the output's sidecar, an input inside the pieces folder, a tokenizer
    file hard-linked as an output: all refused, even with --force, and left intact."""
    sidecar_like = write_jsonl(tmp_path / "out.meta.json", ["a document"])
    (tmp_path / "out.pieces").mkdir()
    inside = write_jsonl(tmp_path / "out.pieces" / "in.jsonl", ["another"])
    (tmp_path / "tok.json").write_text(BYTE_TOKENIZER_PATH.read_text())
    os.link(tmp_path / "tok.json", tmp_path / "linked.idx")
    plain = write_jsonl(tmp_path / "plain.jsonl", ["third"])
    cases = [
        ([sidecar_like], "out", []),
        ([inside], "out", []),
        ([plain], "linked", ["--tokenizer", tmp_path / "tok.json"]),
    ]
    before = {p: Path(p).read_bytes() for p in (sidecar_like, inside, tmp_path / "tok.json")}
    for inputs, prefix, extra in cases:
        assert run(inputs, tmp_path / prefix, "--force", "--resume", *extra) == 2
        assert "would overwrite the input" in capsys.readouterr().err
    assert {p: Path(p).read_bytes() for p in before} == before

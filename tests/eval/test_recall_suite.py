"""`suite=recall`: teacher-forced loss and argmax accuracy on the recall spans of synthetic records,
against a brute-force recomputation from the models' full logits; restart and table/plot outputs."""

import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_tools import synthetic
from tests.eval.test_eval_run import run
from ttt_train.data.recall import recall_mask
from ttt_train.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recall") / "heldout.jsonl"
    assert synthetic.main(["mqar", "copy", "--num", "4", "--length", "200", "--seed", "5", "--num-pairs", "6",
                           "--copy-length", "12", "--output", str(path)]) == 0
    return path


def brute_force(hf_dir, records):
    """(loss sum, hits, tokens) on recall tokens and on the others, from the full logits."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tokenizer = load_tokenizer(str(hf_dir / "tokenizer.json"))
    recall, other = [0.0, 0, 0], [0.0, 0, 0]
    for record in records:
        ids = tokenizer.encode(record["text"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        hits = logits.argmax(-1) == torch.tensor(ids[1:])
        text, position = record["text"], 0
        for t in range(len(ids) - 1):  # characters of target token t+1, found by decoding the prefix
            start = len(tokenizer.decode(ids[:t + 1]))
            end = len(tokenizer.decode(ids[:t + 2]))
            inside = any(a <= start and end <= b for a, b in record["recall_spans"])
            acc = recall if inside else other
            acc[0] += float(losses[t])
            acc[1] += int(hits[t])
            acc[2] += 1
            position = end
        assert position == len(text)
    return recall, other


def test_recall_equals_brute_force_and_restarts(tmp_path, ttt_dir, plain_dir, records_file, monkeypatch):
    out = tmp_path / "recall"
    args = [f"models=[{ttt_dir},{plain_dir}]", "labels=[ttt,plain]", "suite=recall",
            f"suite.records={records_file}", "samples=4", f"out={out}", "device=cpu"]
    rows = run(args)
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    for label, hf_dir in (("ttt", ttt_dir), ("plain", plain_dir)):
        (row,) = [r for r in rows if r["model"] == label and r["task"] == "all"]
        recall, other = brute_force(hf_dir, records)
        assert row["recall_tokens"] == recall[2] == 2 * 6 + 2 * 12
        assert row["recall_loss"] == pytest.approx(recall[0] / recall[2], rel=1e-4)
        assert row["recall_accuracy_%"] == pytest.approx(100 * recall[1] / recall[2])
        assert row["other_loss"] == pytest.approx(other[0] / other[2], rel=1e-4)
    table = list(csv.DictReader((out / "recall.csv").open()))
    assert [(r["model"], r["task"]) for r in table] == [(m, t) for m in ("ttt", "plain") for t in ("copy", "mqar", "all")]
    positions = list(csv.DictReader((out / "recall_loss_by_position.csv").open()))
    assert positions and all(0 <= float(r["recall_fraction"]) <= 1 for r in positions)
    assert (out / "recall_loss_by_position.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 8
    (out / "results.jsonl").write_text("\n".join(lines[:5]) + "\n")
    assert run(args) == rows


def test_recall_mask():
    offsets = [(0, 1), (1, 2), (2, 4), (4, 5), (5, 5)]
    assert recall_mask(offsets, [[1, 4]]).tolist() == [False, True, True, False, False]
    assert recall_mask(offsets, [[0, 1], [3, 5]]).tolist() == [True, False, False, True, False]


def test_bad_records_are_named(tmp_path, plain_dir):
    with pytest.raises(FileNotFoundError, match="none.jsonl: no such records file"):
        run([f"models=[{plain_dir}]", "suite=recall", f"suite.records={tmp_path}/none.jsonl", f"out={tmp_path}/o"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a record needs `text` and `recall_spans`"):
        run([f"models=[{plain_dir}]", "suite=recall", f"suite.records={bad}", f"out={tmp_path}/o2"])

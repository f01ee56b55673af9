"""`make demo` end to end at a reduced size (overrides of configs/demo/demo.yaml): the commands it
prints and runs, the table, the files it says it wrote; a rerun skips finished work."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from ttt_train.demo import stage_metrics, summarise, verdict

SMALL = [
    "data.0.args=[mqar,passkey,copy,--num,300,--length,128,--num-pairs,8,--copy-length,16,--seed,0]",
    "data.1.args=[mqar,passkey,copy,--num,50,--length,1024,--num-pairs,8,--copy-length,16,--seed,100000]",
    "data.2.args=[mqar,passkey,copy,--num,16,--length,128,--num-pairs,8,--copy-length,16,--seed,900000]",
    "data.3.args=[mqar,passkey,copy,--num,3,--length,1024,--num-pairs,8,--copy-length,16,--seed,910000]",
    'train_overrides=["stages.0.tokens=16384","stages.1.tokens=8192","validation.every_steps=2",'
    '"validation.recall_count=16","stages.1.validation.recall_count=4","logging.interval=1"]',
    'eval.short=["suite=recall","suite.records=data/recall/heldout128.jsonl","samples=6"]',
    'eval.long=["suite=recall","suite.records=data/recall/heldout1024.jsonl","samples=3"]',
]


def demo(cwd, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "ttt_train.demo", *SMALL, *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_demo_end_to_end_and_rerun(tmp_path):
    out = demo(tmp_path)
    commands = re.findall(r"^\$ (.*)$", out, flags=re.M)
    assert [c.split(" run.dir=")[0] for c in commands if c.startswith("torchrun")] == [
        f"torchrun --nproc-per-node 2 -m ttt_train.train experiment={e}" for e in ("recall_tiny_ttt", "recall_tiny_base")]
    assert sum(c.startswith("python -m data_tools.synthetic") for c in commands) == 4
    assert out.count("$ python -m ttt_train.convert export --checkpoint ") == 2
    assert out.count("$ python -m ttt_train.eval ") == 2 and "suite=recall" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("run "))
    for column in ("recall loss", "long loss", "short recall loss", "short recall", "long recall", "recall tok/s"):
        assert column in header
    assert re.search(r"^ *TTT .*%", out, flags=re.M) and re.search(r"^ *baseline .*%", out, flags=re.M)
    assert re.search(r"^TTT (beats baseline|does not beat baseline|meets (every target|\d of 3 targets) on short)",
                     out, flags=re.M)
    runs = tmp_path / "runs" / "demo"
    assert (runs / "summary.md").read_text().strip() in out
    for name in ("short", "long"):
        for file in ("recall.csv", "recall_loss_by_position.png"):
            assert (runs / "eval" / name / file).is_file()
    for experiment in ("recall_tiny_ttt", "recall_tiny_base"):
        assert (runs / "hf" / experiment / "config.json").is_file()
        records = [json.loads(line) for line in (runs / experiment / "metrics.jsonl").read_text().splitlines()]
        assert {r["stage_name"] for r in records if "val/recall_loss" in r} == {"recall", "long"}
        offline = list((runs / experiment / "wandb").glob("offline-run-*"))
        assert offline and f"wandb sync {offline[0].relative_to(tmp_path)}" in out

    again = demo(tmp_path)  # everything is done: nothing is regenerated, retrained or re-exported
    assert "$ python -m data_tools.synthetic" not in again and "$ python -m ttt_train.convert" not in again
    assert again.count("finished already") == 2 and again.count("exported from") == 2
    assert (runs / "summary.md").read_text().strip() in again


def test_table_and_verdict_from_metrics(tmp_path):
    lines = [  # a resumed run logs step 5 twice: the later record wins
        {"stage": 0, "stage_name": "a", "step": 5, "loss": 3.0, "tokens_per_s": 100.0},
        {"stage": 0, "stage_name": "a", "step": 5, "loss": 2.5, "tokens_per_s": 300.0},
        {"stage": 0, "stage_name": "a", "step": 10, "loss": 2.0, "tokens_per_s": 200.0},
        {"stage": 0, "stage_name": "a", "step": 10, "val/loss": 2.2},
        {"stage": 1, "stage_name": "b", "step": 5, "loss": 1.5, "tokens_per_s": 50.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f"{json.dumps(r)}\n" for r in lines))
    metrics = stage_metrics(path)
    assert metrics == {"a": {"val_loss": 2.2, "train_loss": 2.0, "tokens_per_s": 250.0},
                       "b": {"val_loss": None, "train_loss": 1.5, "tokens_per_s": 50.0}}

    def recall_rows(model, loss, accuracy, chance="3.8"):
        return [{"model": model, "task": "mqar", "recall_loss": "9", "recall_accuracy_%": "0", "chance_%": chance},
                {"model": model, "task": "all", "recall_loss": str(loss), "recall_accuracy_%": str(accuracy),
                 "chance_%": chance}]

    recall = {"short": recall_rows("T", 0.4, 90.0) + recall_rows("B", 3.2, 5.0)}
    rows, scores = summarise({"T": metrics, "B": metrics}, recall)
    assert rows[0] == {"run": "T", "a loss": "2.200", "b loss (train)": "1.500", "short recall loss": "0.400",
                       "short recall": "90%", "a tok/s": "250", "b tok/s": "50"}
    assert scores["B"]["short"] == {"recall_loss": 3.2, "recall_accuracy_%": 5.0, "chance_%": 3.8}  # the "all" row
    targets = {"loss_ratio": 0.5, "recall_min": 80.0, "baseline_over_chance": 10.0}
    assert verdict(scores, "T", "B", targets).startswith("T beats B, every target met")
    assert "recall-token loss 0.400 vs 3.200 (12%), recall 90% vs 5%, chance 4%" in verdict(scores, "T", "B", targets)
    scores["B"]["short"]["recall_accuracy_%"] = 20.0  # the baseline well above chance: a target missed
    assert verdict(scores, "T", "B", targets).startswith("T meets 2 of 3 targets on short (targets:")
    scores["T"]["long"], scores["B"]["long"] = dict(scores["T"]["short"]), {**scores["B"]["short"], "recall_accuracy_%": 5.0}
    assert verdict(scores, "T", "B", targets).startswith("T meets 2 of 3 targets on short, every target on long")
    del scores["T"]["long"]
    scores["T"]["short"].update(recall_loss=3.0, **{"recall_accuracy_%": 6.0})
    assert verdict(scores, "T", "B", targets).startswith("T does not beat B at this scale")
    scores["B"]["short"].update(**{"chance_%": math.nan, "recall_accuracy_%": 50.0})  # chance unknown: not failed
    scores["T"]["short"].update(recall_loss=0.1, **{"recall_accuracy_%": 99.0})
    assert verdict(scores, "T", "B", targets).startswith("T beats B")
    assert verdict({"T": {}, "B": {}}, "T", "B", targets).startswith("no evaluation holds both T and B")

"""`make demo` end to end at a reduced size (overrides of configs/demo/demo.yaml): the commands it
prints and runs, the table, the files it says it wrote; a rerun skips finished work."""

import os
import re
import subprocess
import sys

import pytest

from ttt_train.demo import stage_metrics, summarise, verdict

SMALL = [
    "data.0.args=[passkey,multikey,variable_tracking,--num,40,--length,1024,--seed,0]",
    "data.1.args=[passkey,multikey,variable_tracking,--num,16,--length,4096,--seed,100000]",
    "data.2.args=[passkey,--num,2,--length,4096,--seed,900000]",
    'train_overrides=["validation.every_steps=2","stages.0.tokens=8192","stages.1.tokens=8192","logging.interval=1"]',
    'eval.recall=["suite=ruler","suite.tasks=[passkey]","lengths=[1024,2048]","samples=2"]',
    'eval.position=["suite=sliding_ppl","suite.dataset=data/tiny_curriculum/heldout4k","suite.block=256",'
    '"suite.position_length=2048","suite.position_buckets=4","lengths=[0,1024]","samples=2"]',
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
    assert [c.split(" experiment=")[0] for c in commands if c.startswith("torchrun")] == \
        ["torchrun --nproc-per-node 2 -m ttt_train.train"] * 2
    assert sum(c.startswith("python -m data_tools.synthetic") for c in commands) == 3
    assert "python -m ttt_train.convert export --checkpoint " in out and out.count("$ python -m ttt_train.eval ") == 2
    assert "torchrun --nproc-per-node 2 -m ttt_train.train experiment=tiny_ttt run.dir=runs/demo/tiny_ttt" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("run "))
    for column in ("ctx1k loss", "ctx4k loss", "recall@1024", "recall@2048", "ctx1k tok/s", "ctx4k tok/s"):
        assert column in header
    assert re.search(r"^ *TTT .*%", out, flags=re.M) and re.search(r"^ *baseline .*%", out, flags=re.M)
    assert re.search(r"^TTT (beats|does not beat) baseline at this scale|^mixed result", out, flags=re.M)
    runs = tmp_path / "runs" / "demo"
    assert (runs / "summary.md").read_text().strip() in out
    for name in ("ruler_scores.png", "ruler_scores.csv"):
        assert (runs / "eval" / "recall" / name).is_file()
    assert (runs / "eval" / "position" / "loss_by_position.png").is_file()
    for experiment in ("tiny_ttt", "tiny_base"):
        assert (runs / "hf" / experiment / "config.json").is_file()
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
    path.write_text("".join(f"{__import__('json').dumps(r)}\n" for r in lines))
    metrics = stage_metrics(path)
    assert metrics == {"a": {"val_loss": 2.2, "train_loss": 2.0, "tokens_per_s": 250.0},
                       "b": {"val_loss": None, "train_loss": 1.5, "tokens_per_s": 50.0}}
    recall = [{"model": "T", "length": "1024", "average": "50.0"}, {"model": "B", "length": "1024", "average": "0.0"}]
    rows, scores = summarise({"T": metrics, "B": {"a": metrics["a"], "b": {**metrics["b"], "train_loss": 1.0}}},
                             recall, [])
    assert rows[0] == {"run": "T", "a loss": "2.200", "b loss (train)": "1.500", "recall@1024": "50%",
                       "a tok/s": "250", "b tok/s": "50"}
    assert verdict(scores, "T", "B").startswith("mixed result at this scale: mean passkey recall 50% (T) vs 0% (B)")
    scores["T"]["loss"] = 0.5
    assert verdict(scores, "T", "B").startswith("T beats B")
    scores["T"].update(loss=2.0, recall=0.0)
    assert verdict(scores, "T", "B").startswith("T does not beat B")

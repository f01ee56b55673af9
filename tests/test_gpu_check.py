"""`python -m ttt_train.gpu_check` keeps working on a CPU (toy sizes, correctness judged), without
hydra or wandb, and its exit code says whether every line met its target."""

import json
import subprocess
import sys
from pathlib import Path

from ttt_train import gpu_check

ROOT = Path(__file__).resolve().parents[1]
WITHOUT_HYDRA_AND_WANDB = ("import sys; sys.modules.update(wandb=None, hydra=None); "
                           "from ttt_train.gpu_check import main; sys.exit(main(sys.argv[1:]))")


def test_runs_every_check_at_toy_size_without_hydra_or_wandb(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_HYDRA_AND_WANDB, "--size", "toy", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    statuses = {line["check"]: line["status"] for line in result["lines"]}
    assert set(statuses) == {"environment", "process_group", "op_exact", "op_speed", "train_local", "train_te",
                             "hf_prefill", "hf_decode", "tp_cp_nccl"}, statuses
    assert statuses["op_exact"] == statuses["process_group"] == "pass"
    assert statuses["train_te"] == "skip" and statuses["tp_cp_nccl"] == "skip"
    assert result["all_met"] and not result["judged"]  # toy sizes: timings reported, not judged
    decode = [line for line in result["lines"] if line["check"] == "hf_decode"]
    assert [line["values"]["batch"] for line in decode] == [1, 16]
    assert "every line meets its target" in proc.stdout and "op_exact" in proc.stdout


def test_a_missed_target_fails_the_exit_code(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "EXACT_TOLERANCE", 0.0)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--size", "toy", "--only", "op_exact", "--out", str(out)]) == 1
    (line,) = json.loads(out.read_text())["lines"]
    assert line["check"] == "op_exact" and line["status"] == "fail"


def test_unknown_check_is_refused(capsys):
    try:
        gpu_check.main(["--only", "op_exact,warp_drive"])
    except SystemExit as exit:
        assert exit.code == 2
    assert "unknown checks ['warp_drive']" in capsys.readouterr().err

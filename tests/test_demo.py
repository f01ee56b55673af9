"""`make demo`'s job runs end to end under torchrun (2 ranks, context parallel) at a few steps."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_and_checkpoints(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ttt_train.demo", "--steps", "3", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step +\d+/3 +loss ([\d.]+)", proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
    assert (tmp_path / "data" / "synthetic.idx").is_file()

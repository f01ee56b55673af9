"""Exit codes through the launch scripts with the real driver (2 ranks, gloo): a refused configuration
exits 2 in one line, Ctrl-C (SIGINT to the launcher) saves and exits 75 with status "preempted",
neither with torchrun's failure report or a traceback."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.training import driver_helpers as h

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.make_data(tmp_path_factory.mktemp("driver_data"))


def launch(overrides: list[str]) -> subprocess.Popen:
    env = {**h.env(), "PYTHON": sys.executable}
    return subprocess.Popen(["bash", str(h.ROOT / "launch" / "single_node.sh"), "2", *overrides], cwd=h.ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_refused_configuration_exits_2_under_the_launcher(data, tmp_path):
    proc = launch(h.tiny_overrides(tmp_path / "run", data, extra=["+optimzer.lr=1e-3"]))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown config key 'optimzer.lr' (did you mean 'optimizer.lr'?); known keys of the root: "
                      "['checkpoint', 'data', 'ddp', 'init', 'logging', 'model', 'optimizer', 'parallel', 'run', "
                      "'schedule', 'stages', 'training', 'ttt', 'validation']"]
    assert "failed" not in err and "Traceback" not in err


def test_ctrl_c_under_the_launcher_saves_and_exits_75(data, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(h.tiny_overrides(run_dir, data))
    deadline = time.monotonic() + 400
    while not any((r["stage"], r["step"]) == (0, 3) for r in h.records(run_dir)):
        if proc.poll() is not None or time.monotonic() > deadline:
            h.kill_tree(proc.pid)
            raise AssertionError("the run ended or timed out first:\n" + proc.communicate()[1][-4000:])
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the launcher (the workers lead their own sessions)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 75, err[-4000:]
    assert "(stopping: signal SIGINT)" in out and "rerun the same command to continue (exit code 75)" in out
    assert "Traceback" not in err and "failed" not in err, err[-4000:]
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "preempted", "exit_code": 75}

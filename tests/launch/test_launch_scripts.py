"""launch/: the overrides reach every worker unchanged, exit code 75 survives torchrun, signals are
forwarded to the workers, and slurm.sbatch requeues on 75 (with fake `srun`/`scontrol`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ttt_train.runtime.local_ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
OVERRIDES = ["experiment=tiny_ttt", "stages.1.seq_length=65536", "run.name=a b", "+tags=[x,'y z']", "--weird"]
SCRIPTS = ["single_node.sh", "multi_node.sh", "slurm.sbatch", "common.sh"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WANDB_MODE")}
    env.update(PYTHON=sys.executable, TTT_ENTRY="tests.launch.echo_entry", PYTHONPATH=str(ROOT), **extra)
    return env


def _workers(stdout: str) -> list[dict]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def _run(cmd: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean():
    out = subprocess.run(["shellcheck", "-x", *(f"launch/{s}" for s in SCRIPTS)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_single_node_passes_overrides_and_forwards_signals(sig):
    """Two workers get the overrides unchanged; SIGUSR1 (SLURM's warning) or SIGINT (Ctrl-C) sent to the
    launcher alone (workers lead their own sessions) reaches both, which exit 75, and the launcher exits
    75 (torchrun itself says 1) without reporting it as a failure."""
    proc = subprocess.Popen(["bash", str(LAUNCH / "single_node.sh"), "2", *OVERRIDES], cwd=ROOT,
                            env=_env(ECHO_WAIT_SIGNAL="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    watchdog = threading.Timer(120, proc.kill)  # never hang on a launcher that does not start
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if sum(x.startswith("ready") for x in lines) == 2:
                break
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 75, err
    assert sorted(line for line in out.splitlines() if line.startswith("got")) == [f"got {sig.name} 0",
                                                                                    f"got {sig.name} 1"]
    assert "failed" not in err and "Traceback" not in err, err
    workers = _workers("".join(lines))
    assert [w["rank"] for w in workers] == [0, 1] and {w["world_size"] for w in workers} == {2}
    assert all(w["argv"] == OVERRIDES for w in workers)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert {(w["omp_num_threads"], w["wandb_mode"]) for w in workers} == {(threads, "offline")}


@pytest.mark.slow
def test_multi_node_one_node_on_localhost():
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NNODES="1", NODE_RANK="0",
               GPUS_PER_NODE="2", WANDB_MODE="online")
    out = _run(["bash", str(LAUNCH / "multi_node.sh"), *OVERRIDES], env)
    assert out.returncode == 0, out.stderr
    workers = _workers(out.stdout)
    assert [w["rank"] for w in workers] == [0, 1] and all(w["argv"] == OVERRIDES for w in workers)
    assert {w["wandb_mode"] for w in workers} == {"online"}  # a user's setting wins


@pytest.mark.parametrize("script,args,message", [
    ("single_node.sh", [], "usage"),
    ("single_node.sh", ["two"], "NPROC must be a positive integer"),
    ("multi_node.sh", [], "set MASTER_ADDR"),
])
def test_bad_launches_name_what_is_missing(script, args, message):
    env = {k: v for k, v in _env().items() if k not in ("MASTER_ADDR", "SLURM_NODEID")}
    out = _run(["bash", str(LAUNCH / script), *args], env)
    assert out.returncode == 2 and message in out.stderr


def _fake_slurm(tmp_path: Path) -> dict:
    """`srun` runs its command once as node 0 (or exits FAKE_SRUN_EXIT); `scontrol` knows one host
    and records requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "printf '%s\\n' \"$@\" > \"$FAKE_DIR/srun.args\"\n"
        "if [[ -n ${FAKE_SRUN_EXIT:-} ]]; then exit \"$FAKE_SRUN_EXIT\"; fi\n"
        "while [[ $1 == -* ]]; do shift; done\n"
        "SLURM_NODEID=0 exec \"$@\"\n")
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        "case $1 in show) echo localhost ;; requeue) echo \"$2\" >> \"$FAKE_DIR/requeued\" ;; esac\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), SLURM_JOB_ID="4242",
                SLURM_JOB_NODELIST="node[1]", SLURM_NNODES="1", SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="2",
                MASTER_PORT=str(free_port()))


@pytest.mark.slow
def test_slurm_requeues_on_75_and_passes_overrides(tmp_path):
    """The whole chain: sbatch -> srun -> multi_node.sh (c10d on localhost) -> workers exiting 75."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    out = _run(["bash", str(LAUNCH / "slurm.sbatch"), *OVERRIDES], _fake_slurm(tmp_path) | {"ECHO_EXIT": "75", "ECHO_BARRIER": str(barrier)})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    workers = _workers(out.stdout)
    assert [w["rank"] for w in workers] == [0, 1] and all(w["argv"] == OVERRIDES for w in workers)
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    assert srun_args[-len(OVERRIDES):] == OVERRIDES


@pytest.mark.parametrize("code", [0, 1])
def test_slurm_does_not_requeue_otherwise(tmp_path, code):
    out = _run(["bash", str(LAUNCH / "slurm.sbatch"), "x=1"], _fake_slurm(tmp_path) | {"FAKE_SRUN_EXIT": str(code)})
    assert out.returncode == code, out.stderr
    assert not (tmp_path / "requeued").exists()


@pytest.mark.parametrize("codes,expected", [
    ([75, 75], 75),
    ([75, -15], 75),  # torchrun stopped a slower rank after the first exit
    ([75, 1], 1),  # a crash is a crash
    ([-9], 1),
    ([1, 2], 1),
    ([2, 2], 2),  # a refused configuration (every rank refuses)
    ([2, -15], 2),
    ([2, 75], 1),
])
def test_launcher_exit_code(codes, expected):
    """The launcher keeps the driver's 75 and 2; any other failure is 1, and only that one is restarted
    (`--max-restarts`): a group that saved and stopped, or was refused, is not."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("launch_torchrun", LAUNCH / "torchrun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    failures = {rank: SimpleNamespace(exitcode=c) for rank, c in enumerate(codes)}
    assert module.exit_code(failures) == expected
    assert module.restart_allowed(failures) == (expected == 1)

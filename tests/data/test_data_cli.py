"""The data tools' command lines: a bad command line or input is one line naming it and the fix,
with exit code 2; a bug keeps its traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from data_tools import inspect_dataset, mixture, synthetic, tokenize

REPO = Path(__file__).resolve().parents[2]
TOOLS = {"tokenize": tokenize, "inspect_dataset": inspect_dataset, "mixture": mixture, "synthetic": synthetic}


@pytest.mark.parametrize(
    "tool, argv, message",
    [
        (
            "tokenize",
            ["{tmp}/none.jsonl", "--output-prefix", "{tmp}/o"],
            "input '{tmp}/none.jsonl': no such file",
        ),
        ("inspect_dataset", ["{tmp}/none"], "indexed dataset '{tmp}/none': {tmp}/none.bin not found"),
        (
            "mixture",
            [
                "--source",
                "{tmp}/none",
                "1",
                "--seq-length",
                "8",
                "--min-length",
                "8",
                "--output-prefix",
                "{tmp}/o",
            ],
            "{tmp}/none.bin not found",
        ),
        (
            "synthetic",
            ["passkey", "--num", "1", "--length", "300", "--output", "{tmp}/o", "--tokenizer", "{tmp}/t"],
            "tokenizer '{tmp}/t': no such file or directory",
        ),
    ],
)
def test_input_errors_are_one_line_with_exit_code_2(tool, argv, message, tmp_path, capsys):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert TOOLS[tool].main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m data_tools.{tool}: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err


@pytest.mark.parametrize(
    "tool, argv",
    [
        ("tokenize", ["x.jsonl", "--output-prefix", "o", "--workers", "0"]),
        ("inspect_dataset", ["x", "--sample", "one"]),
        (
            "mixture",
            ["--source", "x", "heavy", "--seq-length", "8", "--min-length", "8", "--output-prefix", "o"],
        ),
        ("synthetic", ["passkey", "--num", "1", "--length", "30"]),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(tool, argv, capsys):
    with pytest.raises(SystemExit) as exit:
        TOOLS[tool].main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"python -m data_tools.{tool}: error: ") and err.endswith("--help)\n")


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(patterns):
        raise KeyError("a bug")

    monkeypatch.setattr(tokenize, "expand_inputs", broken)
    with pytest.raises(KeyError, match="a bug"):
        tokenize.main(["x.jsonl", "--output-prefix", str(tmp_path / "o")])


def test_as_a_process():
    out = subprocess.run(
        [sys.executable, "-m", "data_tools.tokenize", "x.jsonl", "--output-prefix", "o", "--workers", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert (
        out.returncode == 2 and out.stderr.count("\n") == 1 and "--workers and --docs-per-piece" in out.stderr
    )

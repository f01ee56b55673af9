"""Every entry point answers `--help` with its options, exit code 0, and does nothing else.

The entry points are discovered: the console scripts of pyproject.toml's `[project.scripts]` (run as
the installed script runs them: the named function, with `--help` in sys.argv), every ttt-train or
data_tools module the Makefile runs with `python -m`, every `data_tools` tool, plus the subcommands
of `convert` and the modules listed in OPTIONAL when they exist. They run one after the other in one
child process (each as its launcher runs it: the script's function, or the module as `__main__` via
runpy), so the imports they share are paid once.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = [["ttt_train.convert", "import"], ["ttt_train.convert", "export"]]
ALWAYS = ["ttt_train.convert", "ttt_train.demo", "ttt_train.eval", "ttt_train.bench", "ttt_train.train"]
OPTIONAL = ["ttt_train.plot", "ttt_train.gpu_check"]  # entry points other work adds


def entry_points() -> dict[str, dict]:
    """Name -> how to run it: {"function": "module:func"} (a console script) or {"module": M} (`python -m M`),
    with its `argv` (ending in --help)."""
    commands = {}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        commands[name] = {"function": target, "argv": [name, "--help"]}
    modules = set(ALWAYS) | set(re.findall(r"-m ((?:ttt_train|data_tools)[\w.]*)", (ROOT / "Makefile").read_text()))
    modules |= {f"data_tools.{p.stem}" for p in (ROOT / "data_tools").glob("*.py")
                if p.stem not in ("__init__", "cli", "readers") and "def main(" in p.read_text()}
    modules |= {m for m in OPTIONAL if importlib.util.find_spec(m) is not None}
    for module in sorted(modules):
        commands[module] = {"module": module, "argv": [module, "--help"]}
    for module, sub in SUBCOMMANDS:
        commands[f"{module} {sub}"] = {"module": module, "argv": [module, sub, "--help"]}
    return commands


DRIVER = r"""
import contextlib, importlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
results = {}
for name, how in json.loads(sys.argv[1]).items():
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = list(how["argv"])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if "function" in how:
                module, func = how["function"].split(":")
                code = getattr(importlib.import_module(module), func)()
            else:
                runpy.run_module(how["module"], run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code
        except BaseException as error:
            import traceback
            err.write("Traceback " + traceback.format_exc())
            code = 99
    results[name] = {"code": code or 0, "out": out.getvalue(), "err": err.getvalue()}
print(json.dumps(results))
"""


def test_every_entry_point_answers_help_with_its_options():
    commands = entry_points()
    assert {"ttt-convert", "ttt-train", "ttt-eval", "data_tools.tokenize", "ttt_train.convert import",
            "ttt_train.models.hf.bench_convert"} <= set(commands)
    child = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert child.returncode == 0, child.stderr[-3000:]
    done = json.loads(child.stdout.strip().splitlines()[-1])
    bad = {name: (d["code"], (d["err"] or d["out"])[-600:]) for name, d in done.items()
           if d["code"] != 0 or "Traceback" in d["err"] or len(d["out"]) < 300}
    assert not bad, bad
    for name, d in done.items():  # options listed: argparse's, a config file's keys (commented, or composed), subcommands
        assert re.search(r"^(options:|Options|Commands:|# configs/\S+\.yaml)", d["out"], flags=re.M), (name, d["out"][:300])
    assert "force: false" in done["ttt_train.convert import"]["out"]
    assert "ttt: none, paper" in done["ttt_train.convert import"]["out"]
    assert "model: " in done["ttt-train"]["out"] and "training:" in done["ttt-train"]["out"]

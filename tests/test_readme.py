"""Every command in README.md's ```bash blocks is exercised, so the README cannot rot.

The commands that need GPUs, models or corpora are checked as far as a CPU machine can: each is
parsed by the program it names exactly as written (the training command composed and resolved as
its dry run does, the Hydra configs of convert/eval/bench/demo composed and validated, the data
tools' and lm-evaluation-harness's argument parsers run, the lm-eval task names looked up, launch
scripts and Makefile targets present). The demo's own commands (data_tools.synthetic, torchrun
tiny_ttt/tiny_base, convert export, eval) run for real in tests/test_demo.py; a command with no
check here fails this test until one is added.
"""

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def hydra_args(words: list[str]) -> list[str]:
    return [w for w in words if "=" in w and not w.startswith("-")]


def check_train(overrides: list[str], world: int | None) -> None:
    from ttt_train.training.config import compose
    from ttt_train.training.curriculum import resolve

    cfg = compose(overrides)
    if world is not None:  # a launch: the driver refuses a run.world_size of another size
        assert cfg.run.world_size in (None, world), f"run.world_size={cfg.run.world_size}, {world} ranks: {overrides}"
    stages = resolve(cfg, cfg.run.world_size or world or 1, check_files=False)
    assert stages, overrides


def check_torchrun(words: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    for flag in ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"):
        parser.add_argument(flag)
    parser.add_argument("-m", dest="module", required=True)
    args, rest = parser.parse_known_args(words[1:])
    assert args.module == "ttt_train.train" and all("=" in w for w in rest), words
    check_train(rest, int(args.nproc_per_node or 1) * int(args.nnodes or 1))


def check_python_module(module: str, args: list[str]) -> None:
    if module == "ttt_train.train":
        check_train(args, None)
    elif module == "ttt_train.convert":
        from ttt_train.convert import compose, to_overrides

        cfg = compose(args[0], to_overrides(args[1:]))
        assert cfg.get("out") and (cfg.get("hf") or cfg.get("checkpoint")), args
    elif module == "ttt_train.eval":
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        from ttt_train.eval.config import check_config

        with initialize_config_dir(config_dir=str(ROOT / "configs" / "eval"), version_base=None):
            check_config(OmegaConf.to_container(compose("eval", overrides=args), resolve=True))
    elif module == "ttt_train.bench":
        from ttt_train.bench import compose

        compose(args)
    elif module == "ttt_train.demo":
        from ttt_train.demo import compose

        compose(args)
    elif module == "ttt_train.gpu_check":
        from ttt_train.gpu_check import parse_args

        parse_args(args)
    elif module in ("data_tools.tokenize", "data_tools.mixture"):
        import importlib

        importlib.import_module(module).parse_args(args)
    else:
        raise AssertionError(f"README runs python -m {module}: add a check for it to tests/test_readme.py")


def check_lm_eval(words: list[str], monkeypatch) -> None:
    from lm_eval._cli import HarnessCLI
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(sys, "argv", list(words))
    args = HarnessCLI().parse_args()
    assert args.model == "hf" and args.model_args["trust_remote_code"] is True
    tasks = args.tasks if isinstance(args.tasks, list) else args.tasks.split(",")
    known = set(TaskManager().all_tasks)
    assert set(tasks) <= known, set(tasks) - known


def check_offline_pip(words: list[str]) -> None:
    """The README's wheels for an offline GPU node: requirements the package (or omegaconf) needs,
    megatron-core without its dependencies (they would bring a torch) and in the supported range."""
    import tomllib

    from packaging.requirements import Requirement

    with_value = {"-d", "-w", "--find-links", "--python-version", "--platform", "--only-binary"}
    names = [w for i, w in enumerate(words[2:], 2) if not w.startswith("-") and words[i - 1] not in with_value]
    if names == ["."]:  # the package itself, from the checkout, its dependencies already there
        assert "-e" in words and "--no-deps" in words, words
        return
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    known = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    for name in names:
        req = Requirement(name)
        assert req.name in known or req.name == "antlr4-python3-runtime", name
        pinned = next(iter(req.specifier), None)
        if req.name in known and pinned is not None:
            assert known[req.name].specifier.contains(pinned.version), (name, known[req.name])
        if req.name == "megatron-core" and words[1] == "download":
            assert "--no-deps" in words, words


def check(words: list[str], monkeypatch) -> None:
    env = {}
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        key, value = words[0].split("=", 1)
        env[key], words = value, words[1:]
    program = words[0]
    if program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert words[1] in targets, words
    elif program == "pip" and (words[1] in ("download", "wheel") or "--no-index" in words):
        check_offline_pip(words)
    elif program == "pip":
        extras = re.search(r'"\.\[([\w,]+)\]"', shlex.join(words)) or re.search(r"\.\[([\w,]+)\]", words[-1])
        pyproject = (ROOT / "pyproject.toml").read_text()
        for extra in extras.group(1).split(","):
            assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), extra
    elif program == "python":
        assert words[1] == "-m", words
        check_python_module(words[2], words[3:])
    elif program == "torchrun":
        check_torchrun(words)
    elif program.startswith("launch/") or program == "sbatch":
        script = next(w for w in words if w.startswith("launch/"))
        assert (ROOT / script).is_file(), script
        after = words[words.index(script) + 1:]
        nodes = next((int(w.split("=")[1]) for w in words if w.startswith("--nodes=")), None)
        per_node = int(env.get("GPUS_PER_NODE", 8))
        nproc = int(after[0]) if after and after[0].isdigit() else per_node * (nodes or int(env.get("NNODES", 1)))
        check_train(hydra_args(after), nproc)
    elif program == "lm_eval":
        check_lm_eval(words, monkeypatch)
    else:
        raise AssertionError(f"README runs {program}: add a check for it to tests/test_readme.py")


COMMANDS = readme_commands()


def test_readme_has_the_main_commands():
    programs = {" ".join(w[:3]) for w in COMMANDS}
    for expected in ("make demo", "make test", "python -m ttt_train.convert", "python -m ttt_train.eval",
                     "python -m ttt_train.bench"):
        assert any(p.startswith(expected) for p in programs), expected
    assert any(w[0] == "lm_eval" for w in COMMANDS) and any(w[0] == "sbatch" for w in COMMANDS)


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:70] for w in COMMANDS])
def test_readme_command(words, monkeypatch):
    check(words, monkeypatch)


def test_demo_sample_output_is_a_real_run():
    """The README's sample output has the demo's table and verdict, not a placeholder."""
    text = (ROOT / "README.md").read_text()
    assert "PLACEHOLDER" not in text
    assert re.search(r"^ +run +recall loss +long loss +short recall loss", text, flags=re.M)
    assert re.search(r"^TTT (beats baseline|does not beat baseline|meets .* on short)", text, flags=re.M)

"""HuggingFace <-> ttt-train conversion, from the command line.

    python -m ttt_train.convert import --hf DIR --out CKPT [--tp N --pp N] [--preset NAME] [ttt=paper ttt.KEY=V ...]
    python -m ttt_train.convert export --checkpoint CKPT --out DIR [--dtype bf16] [--max-position-embeddings N]
    python -m ttt_train.convert {import,export} --help      (every option, with its default)

The arguments are Hydra overrides of `configs/convert/import.yaml` / `export.yaml`; `--key value`
(or `--key=value`) is a shorthand for `key=value` (dashes become underscores), `--force` for
`force=true` and `--no-verify` for `verify=false`; a key the files do not define is refused, `+` or
not. A non-empty `--out` is refused; `--force` replaces an earlier import (or export) there, never
anything else. Import at `--tp`/`--pp` > 1 runs under `torchrun --nproc-per-node tp*pp`; export always
runs in one process. Exit code 0: done; 2: bad input, refused (one-line error); 1: failed (the
verification's logit difference exceeds the tolerance).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PATH_KEYS = ("hf", "out", "checkpoint", "preset")
FLAGS = ("force", "verify", "progress")  # `--flag` alone means flag=true
COMMANDS = {"import": "a HuggingFace Qwen3 / Llama folder -> a ttt-train checkpoint root (In-Place TTT inserted "
                      "with ttt=paper ...), verified by logits against transformers",
            "export": "a ttt-train checkpoint (any layout) -> a HuggingFace folder, verified by logits under "
                      "transformers"}


def to_overrides(args: list[str]) -> list[str]:
    """`--key value`, `--key=value`, `--no-flag` and plain Hydra `key=value` arguments -> Hydra overrides."""
    overrides, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            overrides.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if key.startswith("no_"):
                overrides.append(f"{key[3:]}=false")
                i += 1
                continue
            if key in FLAGS and (i + 1 >= len(args) or args[i + 1].lower() not in ("true", "false")):
                overrides.append(f"{key}=true")
                i += 1
                continue
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"option --{arg[2:]} needs a value (--{arg[2:]} VALUE)")
            value, i = args[i + 1], i + 1
        overrides.append(f"{key}='{value}'" if key in PATH_KEYS and "'" not in value else f"{key}={value}")
        i += 1
    return overrides


def compose(command: str, overrides: list[str]):
    """The composed config of `import` (configs/convert/import.yaml, with the configs/ttt group) or
    `export` (configs/convert/export.yaml); a key they do not define is refused (ConfigError), `+` or not,
    and so is a `ttt.KEY=VALUE` without a TTT preset to set it in."""
    from ttt_train.config_compose import compose_yaml
    from ttt_train.config_keys import ConfigError

    if command == "import":
        keys = [o.partition("=")[0].lstrip("+~") for o in overrides]
        stray = [key for key in keys if key.startswith("ttt.")]
        if stray and "ttt" not in keys:
            raise ConfigError(f"{stray[0]} given without a TTT preset: put ttt=paper (configs/ttt/) before it")
        return compose_yaml(CONFIG_DIR, "convert/import", overrides)
    return compose_yaml(CONFIG_DIR / "convert", "export", overrides)


def run_import(cfg) -> None:
    from omegaconf import OmegaConf

    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import load_model_config
    from ttt_train.models.hf import import_hf
    from ttt_train.runtime.distributed import ParallelConfig

    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.tp * cfg.pp != world:
        raise ValueError(f"tp={cfg.tp} x pp={cfg.pp} needs {cfg.tp * cfg.pp} ranks, this run has {world}: start it "
                         f"with torchrun --nproc-per-node {cfg.tp * cfg.pp} -m ttt_train.convert import ...")
    ttt = None
    if cfg.get("ttt") is not None:
        values = OmegaConf.to_container(cfg.ttt, resolve=True)
        values.pop("lr_warmup", None)  # a training schedule of the inner lr, not part of the model
        ttt = TTTConfig.from_dict(values)
        if not ttt.enabled:
            ttt = None
    import_hf(cfg.hf, cfg.out, parallel=ParallelConfig(tp=cfg.tp, pp=cfg.pp),
              preset=load_model_config(cfg.preset) if cfg.preset else None, ttt=ttt, verify=cfg.verify,
              tolerance=cfg.tolerance, progress=cfg.progress, force=cfg.force)


def run_export(cfg) -> None:
    from ttt_train.models.hf import export_checkpoint

    export_checkpoint(cfg.checkpoint, cfg.out, verify=cfg.verify, tolerance=cfg.tolerance,
                      max_shard_size=str(cfg.max_shard_size), max_position_embeddings=cfg.max_position_embeddings,
                      dtype=cfg.dtype, force=cfg.force)


def usage() -> str:
    return __doc__.strip() + "\n\nCommands:\n" + "\n".join(f"  {name}: {text}." for name, text in COMMANDS.items())


def command_help(command: str) -> str:
    """`convert COMMAND --help`: its usage line, the shorthand and exit codes, then every option."""
    from ttt_train.cli_help import config_help

    paragraphs = __doc__.strip().split("\n\n")  # title, usage lines, the rest
    usage_line = next(line for line in paragraphs[1].splitlines() if f"convert {command} " in line)
    rest = "\n\n".join(paragraphs[2:])
    what = COMMANDS[command]
    return config_help(f"{what[0].upper()}{what[1:]}.\n\n{usage_line}\n\n{rest}",
                       CONFIG_DIR / "convert" / f"{command}.yaml")


def main(argv: list[str] | None = None) -> int:
    from ttt_train.cli_help import wants_help

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS and wants_help(argv[1:]):
        print(command_help(argv[0]))
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stdout if wants_help(argv[:1]) else sys.stderr)
        return 0 if wants_help(argv[:1]) else 2
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.ERROR,
                        format="%(message)s")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ttt_train.config_compose import one_line
    from ttt_train.models.hf.verify import VerificationError

    try:
        cfg = compose(argv[0], to_overrides(argv[1:]))
        (run_import if argv[0] == "import" else run_export)(cfg)
    except VerificationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        from ttt_train.runtime.distributed import destroy

        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())

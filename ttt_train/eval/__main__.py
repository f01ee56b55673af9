"""`python -m ttt_train.eval models=[DIR_A,DIR_B] suite=ruler lengths=[4096,8192] samples=8 out=runs/eval/x`

Hydra overrides of configs/eval/eval.yaml (suites: configs/eval/suite/*.yaml, chosen with `suite=NAME`).
Every key is checked: one the config files do not define is refused, with or without `+`, naming the
closest known key. Exit codes: 0 done, 2 bad input (one line naming the key, file or fix).
"""

import sys
from pathlib import Path

from omegaconf.errors import MissingMandatoryValue

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs" / "eval")
EXIT_REFUSED = 2


def main(argv: list[str] | None = None) -> int:
    from ttt_train.config_compose import compose_yaml, one_line

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        from omegaconf import OmegaConf

        print(f"{__doc__}\n# configs/eval/eval.yaml with its default suite:\n"
              f"{OmegaConf.to_yaml(compose_yaml(CONFIG_DIR, 'eval', []))}")
        return 0
    from ttt_train.eval.run import evaluate

    try:
        evaluate(compose_yaml(CONFIG_DIR, "eval", argv))
    except (ValueError, FileNotFoundError, FileExistsError, MissingMandatoryValue) as err:  # bad input
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())

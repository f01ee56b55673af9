"""`python -m ttt_train.eval models=[DIR_A,DIR_B] suite=ruler lengths=[4096,8192] samples=8 out=runs/eval/x`
(Hydra; configs/eval/eval.yaml and configs/eval/suite/*.yaml)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from ttt_train.eval.run import evaluate

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs" / "eval")


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, MissingMandatoryValue) as err:  # bad input
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""Every Hydra entry point checks every key, whatever the override syntax: an appended (`+key`,
`++key`) or plain key its config lacks is one line naming the closest known key, never Hydra's advice to
append it (which Hydra would then keep, and nothing would read); free mappings take new entries."""

from pathlib import Path

import pytest

from ttt_train.config_keys import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _eval(overrides):
    from ttt_train.config_compose import compose_yaml

    return compose_yaml(ROOT / "configs" / "eval", "eval", ["models=[m]", *overrides])


def _train(overrides):
    from ttt_train.training.config import compose

    return compose(["experiment=tiny_ttt", *overrides])


def _bench(overrides):
    from ttt_train.bench import compose

    return compose(overrides)


def _demo(overrides):
    from ttt_train.demo import compose

    return compose(overrides)


def _import(overrides):
    from ttt_train.convert import compose

    return compose("import", ["hf=/x", "out=/y", *overrides])


def _export(overrides):
    from ttt_train.convert import compose

    return compose("export", ["checkpoint=/x", "out=/y", *overrides])


ENTRY_POINTS = {"train": _train, "eval": _eval, "bench": _bench, "demo": _demo, "import": _import, "export": _export}


@pytest.mark.parametrize("entry, override, message", [
    ("train", "+trainig.micro_batch_size=8", "unknown config key 'trainig.micro_batch_size' (did you mean "
                                             "'training.micro_batch_size'?)"),
    ("eval", "+sammples=3", "unknown config key 'sammples' (did you mean 'samples'?)"),
    ("eval", "++suite.taks=[vt]", "unknown config key 'suite.taks' (did you mean 'suite.tasks'?)"),
    ("eval", "sammples=3", "unknown config key 'sammples' (did you mean 'samples'?); known keys of the root: "
                           "['batch_size', 'device'"),
    ("bench", "+repeets=2", "unknown config key 'repeets' (did you mean 'repeats'?)"),
    ("bench", "prefill.lenghts=[1]", "unknown config key 'prefill.lenghts' (did you mean 'prefill.lengths'?)"),
    ("bench", "model.overrides.rotary_base=5e5", "model.overrides takes new keys: add one with "
                                                 "+model.overrides.rotary_base=VALUE"),
    ("demo", "+nproc=3", "unknown config key 'nproc' (did you mean 'nproc_per_node'?)"),
    ("demo", "+runs.TTT.overides=[]", "unknown config key 'runs.TTT.overides' (did you mean 'runs.TTT.overrides'?)"),
    ("import", "+tolerence=1", "unknown config key 'tolerence' (did you mean 'tolerance'?)"),
    ("import", "+ttt.evry=3", "unknown config key 'ttt.evry' (did you mean 'ttt.every'?)"),
    ("export", "++dtyp=bf16", "unknown config key 'dtyp' (did you mean 'dtype'?)"),
])
def test_unknown_keys_are_refused_whatever_the_syntax(entry, override, message):
    extra = ["ttt=paper"] if override.startswith("+ttt.") else []
    with pytest.raises(ConfigError) as info:
        ENTRY_POINTS[entry]([*extra, override])
    text = str(info.value)
    assert message in text and "\n" not in text and "To append" not in text


@pytest.mark.parametrize("entry, override, key", [
    ("bench", "+model.overrides.rotary_base=5e5", "model.overrides.rotary_base"),  # checked by ModelConfig
    ("demo", "+runs.extra={experiment: tiny_ttt, overrides: []}", "runs.extra.experiment"),
    ("eval", "++samples=3", "samples"),
    ("train", "++optimizer.lr=0.5", "optimizer.lr"),
])
def test_known_keys_and_free_mappings_pass(entry, override, key):
    from omegaconf import OmegaConf

    assert OmegaConf.select(OmegaConf.create(ENTRY_POINTS[entry]([override])), key) is not None


def test_eval_help_shows_the_config(capsys):
    from ttt_train.eval.__main__ import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m ttt_train.eval" in out and "samples: 8" in out and "suite:" in out

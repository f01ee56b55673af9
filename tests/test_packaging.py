"""The package metadata installs into a GPU image as it is: no exact torch, Python 3.12 allowed, and
the megatron-core range is the one `megatron_compat` has branches for."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from ttt_train.runtime import megatron_compat

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _requirement(name: str) -> Requirement:
    found = [Requirement(line) for line in _project()["dependencies"] if Requirement(line).name == name]
    assert len(found) == 1, f"pyproject.toml must list {name} exactly once in [project].dependencies"
    return found[0]


def test_torch_is_a_range_never_an_exact_pin():
    torch = _requirement("torch")
    assert torch.specifier, "torch needs a lower bound (the lowest version verified)"
    operators = {spec.operator for spec in torch.specifier}
    assert not operators & {"==", "===", "~="}, f"torch is pinned ({torch}): a GPU image's CUDA torch would be replaced"
    assert torch.specifier.contains("2.11.0") and torch.specifier.contains("2.13.0")


def test_python_312_is_allowed():
    requires = SpecifierSet(_project()["requires-python"])
    for python in ("3.11.7", "3.12.3", "3.13.0"):
        assert requires.contains(python), f"requires-python {requires} refuses Python {python}"


def test_megatron_range_matches_the_compat_module():
    spec = _requirement("megatron-core").specifier
    low, high = (".".join(map(str, v)) for v in megatron_compat.SUPPORTED)
    assert spec.contains(low) and not spec.contains("0.16.0"), spec
    assert spec.contains("0.19.2") and not spec.contains(high), spec

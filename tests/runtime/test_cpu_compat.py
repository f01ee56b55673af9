"""Each CPU patch is needed: removing it breaks a named megatron path; with all of them it runs."""

import re

import pytest

from tests.support import scenarios
from ttt_train.runtime import cpu_compat
from ttt_train.runtime.local_ranks import LocalRanksError, run_local_ranks

# patch id -> (scenario, world size, args, a fragment of the error it causes when removed)
ABLATIONS = {
    "P1": (scenarios.train_losses, 1, ({}, 1), "CUDA"),
    "P2": (scenarios.train_losses, 1, ({}, 1), "CUDA"),
    "P3": (scenarios.pp_tied_build, 2, (), "CUDA"),
    "P4": (scenarios.train_losses, 1, ({}, 1), "AssertionError"),
    "P5": (scenarios.checkpoint_save, 1, ("{tmp}",), "CUDA"),
    "P6": (scenarios.train_losses, 1, ({}, 1), "get_rng_state"),
    "P7": (scenarios.train_losses, 1, ({}, 1, False, "fp32", "full"), "CUDA"),
    "P8": (scenarios.train_losses, 1, ({}, 1), "CUDA"),  # megatron-core >= 0.19 only
}


@pytest.mark.slow
@pytest.mark.parametrize("patch_id", sorted(ABLATIONS))
def test_each_patch_is_needed(patch_id, tmp_path):
    if patch_id not in cpu_compat.needed():
        pytest.skip(f"{patch_id} is not needed by this megatron-core release (megatron_compat.cpu_patch_ids)")
    fn, world, args, fragment = ABLATIONS[patch_id]
    args = tuple(str(tmp_path / "ckpt") if a == "{tmp}" else a for a in args)
    run_local_ranks(fn, world, *args, timeout=300)  # passes with every patch
    args = tuple(str(tmp_path / "ckpt2") if isinstance(a, str) and "ckpt" in a else a for a in args)
    with pytest.raises(LocalRanksError, match=fragment):
        run_local_ranks(fn, world, *args, timeout=300, env={"TTT_CPU_COMPAT_SKIP": patch_id})


def test_unknown_skip_is_refused(monkeypatch):
    monkeypatch.setenv("TTT_CPU_COMPAT_SKIP", "P9")
    with pytest.raises(ValueError, match="unknown patches.*P9"):
        cpu_compat.apply()


def test_moved_symbol_fails_loudly_with_version(monkeypatch):
    import megatron.core.tensor_parallel.random as rng

    from ttt_train.runtime import megatron_compat

    monkeypatch.delattr(rng, "_get_cuda_rng_state")
    installed = re.escape(megatron_compat.version_string())
    with pytest.raises(cpu_compat.MegatronVersionError, match=rf"megatron-core {installed}.*_get_cuda_rng_state"):
        cpu_compat._megatron_random()


def test_device_mapping():
    import torch

    assert cpu_compat._cpu_device("cuda") == "cpu"
    assert cpu_compat._cpu_device(torch.device("cuda", 1)) == torch.device("cpu")
    assert cpu_compat._cpu_device(0) == "cpu"
    assert cpu_compat._cpu_device("cpu") == "cpu"
    assert cpu_compat._cpu_device(True) is True


def _device_context_after_patches() -> tuple[str, str]:
    """In a fresh process whose torch device context is first used after the patches: where a
    `torch.device("meta")` context puts a factory result and a module's parameters."""
    import torch

    cpu_compat.apply()
    with torch.device("meta"):
        return str(torch.arange(4.0).device), str(torch.nn.Linear(3, 3).weight.device)


@pytest.mark.slow
def test_device_context_still_works_after_the_factory_patch():
    # transformers' from_pretrained builds models under torch.device("meta"); with P2's wrappers cached
    # as torch's "constructors", the context was silently ignored (models built and initialised on the
    # CPU, rotary buffers left uninitialised after loading)
    assert run_local_ranks(_device_context_after_patches, 1, timeout=120) == [("meta", "meta")]

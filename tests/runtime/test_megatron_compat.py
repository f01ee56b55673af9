"""megatron_compat's branches, each taken with the release that needs it (the installed one, or a
release stood in for by patching `version`), and the supported range enforced."""

import functools
import json
from types import SimpleNamespace

import pytest

from ttt_train.runtime import megatron_compat as mc


@pytest.fixture
def release(monkeypatch):
    """Pretend megatron-core `X.Y.Z` is installed (for the branches that ask `at_least`)."""
    def use(text: str):
        monkeypatch.setattr(mc, "version", lambda: tuple(int(p) for p in text.split(".")))
    return use


def test_installed_release_is_supported():
    assert mc.SUPPORTED[0] <= mc.version() < mc.SUPPORTED[1]


def test_out_of_range_releases(monkeypatch):
    from megatron.core import package_info

    mc.version.cache_clear()
    monkeypatch.setattr(package_info, "MINOR", 15)
    with pytest.raises(mc.UnsupportedMegatronError, match=r"megatron-core 0\.15\.\d+ is older.*>=0\.16\.1,<0\.20"):
        mc.version()
    mc.version.cache_clear()
    monkeypatch.setattr(package_info, "MINOR", 20)
    with pytest.warns(UserWarning, match=r"0\.20\.\d+ is newer than ttt-train was tested with"):
        mc.version()
    mc.version.cache_clear()


def test_mlp_submodules_of_either_spec_form():
    submodules = object()
    assert mc.mlp_submodules(functools.partial(print, submodules=submodules)) is submodules  # V0_18
    assert mc.mlp_submodules(SimpleNamespace(submodules=submodules)) is submodules  # V0_16_1


def test_mlp_init_kwargs(release):
    release("0.16.1")
    assert mc.mlp_init_kwargs(tp_group="g", name="decoder.layers.0.mlp") == {"tp_group": "g"}
    release("0.19.2")
    assert mc.mlp_init_kwargs(pg_collection=SimpleNamespace(tp="g"), name="x") == {"tp_group": "g", "name": "x"}


def test_mlp_chunking_is_refused_by_name():
    mc.check_mlp_chunking(SimpleNamespace(), "In-Place TTT")  # 0.16.1: no such fields
    mc.check_mlp_chunking(SimpleNamespace(mlp_chunks_for_training=1, mlp_chunks_for_prefill=1), "In-Place TTT")
    with pytest.raises(ValueError, match="mlp_chunks_for_training=4 splits the MLP.*set mlp_chunks_for_training=1"):
        mc.check_mlp_chunking(SimpleNamespace(mlp_chunks_for_training=4), "In-Place TTT")


def test_dist_checkpoint_files_follow_the_writer(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, config in ((old, {"sharded_backend": "torch_dist", "common_backend": "torch"}),
                           (new, {"sharded_backend": "torch_dist"})):
        folder.mkdir()
        (folder / "metadata.json").write_text(json.dumps(config))
    assert mc.dist_checkpoint_files(old) == ("metadata.json", ".metadata", "common.pt")  # V0_16_1
    assert mc.dist_checkpoint_files(new) == ("metadata.json", ".metadata")  # V0_19
    assert "common.pt" in mc.dist_checkpoint_files(tmp_path / "missing")
    assert mc.stored_tensor_keys(["a", "common_state", "b"]) == ["a", "b"]


def test_cpu_patch_ids(release):
    ids = ("P1", "P7", "P8")
    release("0.16.1")
    assert mc.cpu_patch_ids(ids) == ("P1", "P7")
    release("0.19.2")
    assert mc.cpu_patch_ids(ids) == ids


def test_packed_batches_need_padding_and_a_release_that_splits_them(release):
    group = SimpleNamespace(size=lambda: 2)
    batch = {"tokens": None, "cu_seqlens": [[0, 6, 10]]}
    release("0.16.1")
    with pytest.raises(ValueError, match="packed \\(THD\\) batches under context parallelism need megatron-core >= 0.18"):
        mc.batch_on_this_cp_rank(dict(batch), group)
    release("0.19.2")
    with pytest.raises(ValueError, match=r"lengths \[6\] are not multiples of 2 \* cp = 4"):
        mc.batch_on_this_cp_rank(dict(batch), group)


def build_ttt_model_with_mlp_chunks(chunks: int) -> str:
    """Build a tiny TTT model whose config asks megatron to chunk the MLP (the 0.18 field, set as an
    attribute on older releases); return the error, or "" when it builds."""
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
    from ttt_train.runtime.distributed import ParallelConfig, initialize

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny")
    config = to_transformer_config(model_cfg, parallel)
    config.mlp_chunks_for_training = chunks
    try:
        build_gpt_model(model_cfg, config, ttt=TTTConfig.from_dict({"layers": [0]}))
    except ValueError as err:
        return str(err)
    return ""


def test_ttt_model_refuses_megatron_mlp_chunking():
    from ttt_train.runtime.local_ranks import run_local_ranks

    assert run_local_ranks(build_ttt_model_with_mlp_chunks, 1, 1, timeout=300) == [""]
    (error,) = run_local_ranks(build_ttt_model_with_mlp_chunks, 1, 2, timeout=300)
    assert "In-Place TTT: megatron's mlp_chunks_for_training=2 splits the MLP" in error

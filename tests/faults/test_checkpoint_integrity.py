"""A damaged checkpoint is found before any tensor is read, and every rank reaches the same
decision: sizes and crc32s recorded at save, verified at load; the newest intact checkpoint is
chosen (damaged ones set aside, `latest` re-pointed) or, when none is intact, nothing changes and
the error says how to go on. Two local ranks (gloo)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ttt_train.runtime.local_ranks import run_local_ranks

pytestmark = pytest.mark.timeout(600)


def _damage(folder: Path, kind: str) -> str:
    """Damage checkpoint `folder` as `kind`; return the file damaged."""
    shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    if kind == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        return shard.name
    if kind == "flipped":
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x01]))
        return shard.name
    name = {"no_metadata": ".metadata", "no_meta_json": "ttt_meta.json", "no_rank_state": "rank_states/rank_00001.pt"}[kind]
    (folder / name).unlink()
    return name


KINDS = ("truncated", "flipped", "no_metadata", "no_meta_json", "no_rank_state")


def damaged_checkpoints(root: str) -> dict:
    """Rank function: three checkpoints (steps 1-3) of a tiny model with optimizer and rank states;
    for each kind of damage to the newest: what verification, loading and recovery say."""
    import torch
    import torch.distributed as dist

    from ttt_train import checkpoint as ckpt
    from ttt_train.checkpoint import integrity
    from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
    from ttt_train.runtime.distributed import ParallelConfig, initialize
    from ttt_train.training.optimizer import OptimizerArgs, build_optimizer
    from ttt_train.training.setup import DDPConfig, wrap_for_training

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny", num_layers=2)
    config = to_transformer_config(model_cfg, parallel)
    chunks = wrap_for_training(build_gpt_model(model_cfg, config), config, DDPConfig())
    optimizer = build_optimizer(OptimizerArgs(lr=1e-2), chunks, config)
    pristine, weights = Path(root) / "pristine", {}
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(0.01 * step)
        weights[step] = {k: v.clone() for k, v in chunks[0].module.state_dict().items() if "_extra_state" not in k}
        ckpt.save_checkpoint(pristine, step, chunks, optimizer, rank_state={"rank": dist.get_rank()})
    out = {"recorded": ckpt.read_checkpoint_info(pristine)["path"].joinpath("ttt_meta.json").read_text(),
           "intact": integrity.verify(pristine / "iter_0000003")}

    def attempt(fn):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - the test reads the message
            return f"{type(err).__name__}: {err}"

    for kind in KINDS:
        root_k = Path(root) / kind
        if dist.get_rank() == 0:
            shutil.copytree(pristine, root_k)
            out[f"{kind}/file"] = _damage(root_k / "iter_0000003", kind)
        dist.barrier()
        out[f"{kind}/verify"] = integrity.verify(root_k / "iter_0000003")
        out[f"{kind}/load"] = attempt(lambda root_k=root_k: ckpt.load_checkpoint(root_k / "iter_0000003", chunks))
        chosen, warnings = ckpt.newest_intact(root_k)
        ckpt.load_checkpoint(ckpt.latest_checkpoint(root_k), chunks)
        now = {k: v for k, v in chunks[0].module.state_dict().items() if "_extra_state" not in k}
        out[f"{kind}/recovered"] = (chosen.name, warnings, sorted(p.name.split("-")[0] for p in root_k.iterdir()),
                                    all(v.equal(weights[2][k]) for k, v in now.items()))
    hopeless = Path(root) / "hopeless"
    if dist.get_rank() == 0:
        shutil.copytree(pristine, hopeless)
        for step in (1, 2, 3):
            _damage(hopeless / f"iter_{step:07d}", "flipped")
    dist.barrier()
    before = sorted(p.name for p in hopeless.iterdir())
    out["hopeless"] = attempt(lambda: ckpt.newest_intact(hopeless))
    out["hopeless/unchanged"] = sorted(p.name for p in hopeless.iterdir()) == before and \
        (hopeless / "latest").read_text() == "iter_0000003\n"
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_local_ranks(damaged_checkpoints, 2, str(tmp_path_factory.mktemp("damaged")), timeout=500)


def test_every_rank_reaches_the_same_decision(results):
    decided = [{k: v for k, v in r.items() if not k.endswith("/file")} for r in results]  # rank 0 damaged them
    assert decided[0] == decided[1] and len(decided[0]) == 2 + 3 * len(KINDS) + 2


def test_sizes_and_checksums_of_every_file_are_recorded(results):
    import json

    meta = json.loads(results[0]["recorded"])
    assert meta["format"] == 3 and meta["checksum"] == "crc32"
    names = set(meta["files"])
    assert {".metadata", "common.pt", "metadata.json", "rank_states/rank_00000.pt", "rank_states/rank_00001.pt"} <= names
    assert any(name.endswith(".distcp") for name in names) and "ttt_meta.json" not in names
    assert all(isinstance(size, int) and len(crc) == 8 for size, crc in meta["files"].values())
    assert results[0]["intact"] == []


@pytest.mark.parametrize("kind, problem", [
    ("truncated", "{file} has {{}} bytes, {{}} recorded (truncated)"),
    ("flipped", "{file}: content changed (crc32 "),
    ("no_metadata", ".metadata is missing"),
    ("no_meta_json", "ttt_meta.json is missing (the save did not finish)"),
    ("no_rank_state", "rank_states/rank_00001.pt is missing"),
])
def test_damage_is_named_refused_at_load_and_the_previous_checkpoint_resumed(results, kind, problem):
    out = results[0]
    problem = problem.format(file=out[f"{kind}/file"])
    (found,) = out[f"{kind}/verify"]
    prefix = problem.split("{}")[0]
    assert found.startswith(prefix), found
    assert out[f"{kind}/load"].startswith(("CheckpointDamaged: checkpoint", "FileNotFoundError")), out[f"{kind}/load"]
    assert out[f"{kind}/file"] in out[f"{kind}/load"]
    chosen, warnings, listing, weights_equal = out[f"{kind}/recovered"]
    assert chosen == "iter_0000002" and weights_equal
    (warning,) = warnings
    assert f"iter_0000003 is damaged: {found}; moved aside to iter_0000003.damaged-" in warning
    assert warning.endswith("resuming from iter_0000002 instead (1 step to redo)")
    assert listing == ["iter_0000001", "iter_0000002", "iter_0000003.damaged", "latest"]


def test_with_no_intact_checkpoint_nothing_changes_and_the_fix_is_named(results):
    message = results[0]["hopeless"]
    assert message.startswith("CheckpointDamaged: no intact checkpoint to resume from in ")
    for step in (3, 2, 1):
        assert f"iter_{step:07d}: __" in message and "content changed" in message
    assert "nothing was changed" in message and message.endswith(".damaged")
    assert "mv " in message and results[0]["hopeless/unchanged"]

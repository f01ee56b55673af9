"""A save that fails on one rank (ENOSPC in a checkpoint writer, or too little free space found
before writing) fails alike on every rank, publishes nothing, removes its partial folder and leaves
`latest` naming the previous checkpoint, which still loads; the next save succeeds. Two local ranks."""

from __future__ import annotations

import errno
from pathlib import Path
from unittest import mock

import pytest

from ttt_train.runtime.local_ranks import run_local_ranks

pytestmark = pytest.mark.timeout(600)


def failing_saves(root: str) -> dict:
    import shutil

    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from ttt_train import checkpoint as ckpt
    from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
    from ttt_train.runtime.distributed import ParallelConfig, initialize

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny", num_layers=2)
    chunks = [build_gpt_model(model_cfg, to_transformer_config(model_cfg, parallel))]
    root = Path(root)
    ckpt.save_checkpoint(root, 1, chunks, rank_state={"rank": dist.get_rank()})
    real = filesystem_async._write_item

    def full_disk(*args, **kwargs):  # runs in the writer processes this rank forks
        stream = args[1]
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", stream.name)

    out = {}

    def attempt(step: int) -> str:
        try:
            ckpt.save_checkpoint(root, step, chunks, rank_state={"rank": dist.get_rank()})
        except ckpt.CheckpointSaveError as err:
            return f"disk_full={err.disk_full}: {err}"
        return "saved"

    with mock.patch.object(filesystem_async, "_write_item", full_disk if dist.get_rank() == 0 else real):
        out["enospc"] = attempt(2)
    out["after_enospc"] = (sorted(p.name for p in root.iterdir()), ckpt.latest_checkpoint(root).name)
    usage = shutil.disk_usage(root)
    with mock.patch("shutil.disk_usage", return_value=usage._replace(free=1000)):
        out["no_room"] = attempt(3)
    out["after_no_room"] = sorted(p.name for p in root.iterdir())
    out["loads"] = ckpt.load_checkpoint(root, chunks)["step"]
    out["next"] = attempt(4)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("saves")
    return str(root), run_local_ranks(failing_saves, 2, str(root), timeout=500)


def test_a_failed_save_fails_alike_everywhere_and_publishes_nothing(results):
    root, (rank0, rank1) = results
    assert rank0 == rank1
    assert rank0["enospc"].startswith(f"disk_full=True: checkpoint {root}/iter_0000002 not saved (disk full: rank 0: "
                                      f"[Errno 28] No space left on device: '{root}/iter_0000002.tmp-")
    assert "free there, the checkpoint needs about" in rank0["enospc"]
    assert rank0["enospc"].endswith(f"{root}/latest still names iter_0000001")
    assert rank0["after_enospc"] == (["iter_0000001", "latest"], "iter_0000001")


def test_too_little_free_space_is_found_before_writing(results):
    root, (rank0, _) = results
    assert "(not started: too little free space)" in rank0["no_room"] and "0.0 MiB free there" in rank0["no_room"]
    assert rank0["after_no_room"] == ["iter_0000001", "latest"]
    assert rank0["loads"] == 1 and rank0["next"] == "saved"

"""Checkpoints: strict loading names what does not fit, manifests are compared, per-rank state,
and a crash at every point of a (re-)save leaves a loadable checkpoint that the next save tidies up.

The module-level functions without the `test_` prefix run inside local ranks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ttt_train.runtime.local_ranks import run_local_ranks

# ----------------------------------------------------------------------------- rank-side scenarios


def _build(layout: dict | None = None, ttt: dict | None = None, optimizer: bool = True, seed: int = 1234,
           distributed_optimizer: bool = False, **model_overrides):
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
    from ttt_train.runtime.distributed import ParallelConfig, initialize
    from ttt_train.training.optimizer import OptimizerArgs, build_optimizer
    from ttt_train.training.setup import DDPConfig, wrap_for_training

    parallel = ParallelConfig(seed=seed, **(layout or {}))
    initialize(parallel)
    model_cfg = load_model_config("tiny", **{"num_layers": 2, **model_overrides})
    ttt_cfg = TTTConfig.from_dict({"chunk_size": 8, **ttt}) if ttt is not None else None
    config = to_transformer_config(model_cfg, parallel)
    chunks = wrap_for_training(build_gpt_model(model_cfg, config, ttt=ttt_cfg), config,
                               DDPConfig(use_distributed_optimizer=distributed_optimizer))
    opt = build_optimizer(OptimizerArgs(lr=1e-2), chunks, config,
                          use_distributed_optimizer=distributed_optimizer) if optimizer else None
    return chunks, opt, model_cfg, ttt_cfg, parallel


def _train_step(chunks, optimizer, vocab: int, seed: int = 0, rows: slice = slice(None)) -> float:
    """One optimizer step on the mean token loss of a fixed random batch (this rank's `rows`);
    gradients reduced over data parallelism by megatron DDP. Returns this rank's loss."""
    from tests.support.parallel_cases import make_batch

    batch = {k: v[rows] for k, v in make_batch(seed, 4, 16, vocab).items()}
    chunks[0].zero_grad_buffer()
    optimizer.zero_grad()
    loss = chunks[0](batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean()
    loss.backward()
    chunks[0].finish_grad_sync()
    optimizer.step()
    return loss.item()


def _weights(chunks) -> dict:
    return {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items() if "_extra_state" not in k}


def _error(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test inspects the message
        return f"{type(err).__name__}: {err}"
    return "no error"


def strict_loading(root: str) -> dict:
    """Save a 4-layer TTT model (layer 0) after one step; load it into models that do and do not fit."""
    from ttt_train import checkpoint as ckpt

    chunks, opt, model_cfg, ttt_cfg, parallel = _build(ttt={"layers": [0]}, num_layers=4)
    _train_step(chunks, opt, model_cfg.vocab_size)
    manifest = ckpt.build_manifest(model_cfg, ttt_cfg, parallel, data_fingerprint="data-1")
    ckpt.save_checkpoint(root, 1, chunks, opt, {"stage": "s1"}, manifest=manifest, rank_state={"rng": 7})
    saved = _weights(chunks)
    out = {"info": ckpt.read_checkpoint_info(root)}
    fewer, _, fewer_cfg, _, _ = _build(ttt={"layers": [0]}, optimizer=False, num_layers=2)
    out["fewer_layers"] = _error(lambda: ckpt.load_checkpoint(root, fewer))
    more, _, _, _, _ = _build(ttt={"layers": [0]}, optimizer=False, num_layers=6)
    out["more_layers"] = _error(lambda: ckpt.load_checkpoint(root, more))
    plain, _, plain_cfg, _, _ = _build(optimizer=False, num_layers=4)
    out["no_ttt"] = _error(lambda: ckpt.load_checkpoint(root, plain))
    out["vocab"] = _error(lambda: ckpt.load_checkpoint(root, _build(ttt={"layers": [0]}, optimizer=False,
                                                                     num_layers=4, vocab_size=400)[0]))
    out["manifest"] = _error(lambda: ckpt.load_checkpoint(
        root, plain, expect_manifest=ckpt.build_manifest(plain_cfg, None, parallel)))
    out["manifest_layers"] = _error(lambda: ckpt.load_checkpoint(
        root, fewer, expect_manifest=ckpt.build_manifest(fewer_cfg, ttt_cfg, parallel)))
    # Non-strict: the tensors both have are loaded, the others keep their initialisation.
    ckpt.load_checkpoint(root, plain, strict=False)
    out["non_strict_equal"] = all(v.equal(saved[k]) for k, v in _weights(plain).items())
    # The model it was saved from, freshly built, with the same manifest: everything comes back.
    again, opt2, _, _, _ = _build(ttt={"layers": [0]}, num_layers=4)
    out["loaded"] = ckpt.load_checkpoint(root, again, opt2, expect_manifest=manifest)
    out["weights_equal"] = all(v.equal(saved[k]) for k, v in _weights(again).items())
    out["rank_state"] = ckpt.load_rank_state(root)
    out["no_optimizer_state"] = _error(lambda: ckpt.load_checkpoint(
        ckpt.save_checkpoint(Path(root) / "weights_only", 1, again), again, opt2))
    return out


def _save_with_crash(root: Path, step: int, chunks, op: str, nth: int) -> tuple[str, list[str]]:
    """Save, raising at the `nth` call of `os.replace` or `shutil.rmtree` ("op") inside the save.
    Returns the error ("no error" if the save had fewer such calls) and the completed targets' names."""
    from unittest import mock

    from ttt_train import checkpoint as ckpt
    from ttt_train.checkpoint import save as saving

    real = {"replace": saving.os.replace, "rmtree": saving.shutil.rmtree}
    calls, done = {"replace": 0, "rmtree": 0}, []

    def failing(kind):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            if kind == op and calls[kind] == nth:
                raise OSError(f"crash at {kind} #{nth} (injected)")
            real[kind](*args, **kwargs)
            done.append(Path(args[-1] if kind == "replace" else args[0]).name)
        return wrapped

    with mock.patch.object(saving.os, "replace", failing("replace")), \
            mock.patch.object(saving.shutil, "rmtree", failing("rmtree")):
        error = _error(lambda: ckpt.save_checkpoint(root, step, chunks, metadata={"version": "new"}))
    return error, done


def crash_points(root: str) -> dict:
    """Crash (raise) at each file operation of a new save and of a re-save of the same step, one
    case per operation; after each crash record what `latest` loads, then let a clean save run and
    record what it left behind besides iter_* folders and `latest`."""
    from ttt_train import checkpoint as ckpt

    chunks, _, _, _, _ = _build(optimizer=False)
    root = Path(root)
    results = []
    for resave in (False, True):
        for op in ("replace", "rmtree"):
            for nth in range(1, 10):
                base = 100 * len(results) + 100
                ckpt.save_checkpoint(root, base, chunks, metadata={"version": "old"})
                step = base if resave else base + 1
                error, done = _save_with_crash(root, step, chunks, op, nth)
                if error == "no error":
                    break
                latest = ckpt.latest_checkpoint(root)
                info = ckpt.load_checkpoint(root, chunks)
                ckpt.save_checkpoint(root, base + 50, chunks, metadata={"version": "clean"})
                results.append(dict(resave=resave, op=op, nth=nth, error=error, latest=latest.name, done=done,
                                    final=ckpt.checkpoint_name(step), loaded=info["metadata"]["version"],
                                    left=sorted(p.name for p in root.iterdir() if "." in p.name)))
    kept_root = root / "keep"
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(kept_root, step, chunks, keep_last=2)
    ckpt.save_checkpoint(kept_root, 1, chunks, keep_last=2)
    return dict(results=results, kept=sorted(p.name for p in kept_root.iterdir()))


def _steps(chunks, optimizer, first: int, count: int, vocab: int, dp: int) -> list[float]:
    """`count` steps on batches `first...`, each data-parallel rank on its rows; mean loss over ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    rank = ps.get_data_parallel_rank()
    losses = []
    for i in range(first, first + count):
        loss = _train_step(chunks, optimizer, vocab, seed=100 + i, rows=slice(rank * 4 // dp, (rank + 1) * 4 // dp))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, loss)
        losses.append(sum(gathered) / len(gathered))
    return losses


def two_rank_checks(root: str) -> dict:
    """On 2 ranks: model + optimizer saved at DP=2 resume at TP=2 (against training straight on);
    per-rank states come back per rank; a model that does not fit fails alike on both ranks; the
    distributed optimizer saves, and its state is refused clearly where megatron cannot load it."""
    import torch.distributed as dist

    from ttt_train import checkpoint as ckpt

    root = Path(root)
    chunks, opt, model_cfg, _, _ = _build(seed=1)
    _steps(chunks, opt, 0, 2, model_cfg.vocab_size, 2)
    ckpt.save_checkpoint(root / "plain", 2, chunks, opt, rank_state={"rank": dist.get_rank()})
    straight = _steps(chunks, opt, 2, 2, model_cfg.vocab_size, 2)
    chunks, opt, _, _, _ = _build(layout={"tp": 2}, seed=99)
    ckpt.load_checkpoint(root / "plain", chunks, opt)
    resumed = _steps(chunks, opt, 2, 2, model_cfg.vocab_size, 1)
    out = dict(straight=straight, resumed=resumed, rank_state=ckpt.load_rank_state(root / "plain"))
    other, _, _, _, _ = _build(layout={"tp": 2}, ttt={"layers": [1]}, optimizer=False)
    out["error"] = _error(lambda: ckpt.load_checkpoint(root / "plain", other))
    chunks, opt, _, _, _ = _build(distributed_optimizer=True)
    _steps(chunks, opt, 0, 1, model_cfg.vocab_size, 2)
    ckpt.save_checkpoint(root / "distributed", 1, chunks, opt)
    out["distributed"] = _error(lambda: ckpt.load_checkpoint(root / "distributed", chunks, opt))
    return out


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def strict_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    return run_local_ranks(strict_loading, 1, str(root), timeout=300)[0]


def test_strict_load_names_missing_and_unexpected_tensors(strict_result):
    fewer = strict_result["fewer_layers"]
    assert fewer.startswith("ValueError") and "checkpoint tensors the model lacks" in fewer
    assert "decoder.layers.{2,3}.mlp.linear_fc1.weight" in fewer
    more = strict_result["more_layers"]
    assert "model tensors the checkpoint lacks" in more and "decoder.layers.{4,5}.mlp.linear_fc2.weight" in more
    assert "decoder.layers.0.mlp.ttt_target.conv.weight" in strict_result["no_ttt"]
    assert "decoder.layers.0.mlp.ttt_target.proj.weight" in strict_result["no_ttt"]


def test_strict_load_names_misshaped_tensors(strict_result):
    assert "tensors of another shape: embedding.word_embeddings.weight (checkpoint [384, 64], model [512, 64])" in \
        strict_result["vocab"]


def test_manifest_differences_are_named(strict_result):
    assert "ttt: checkpoint has TTT, expected none" in strict_result["manifest"]
    assert "model.num_layers: checkpoint 4, expected 2" in strict_result["manifest_layers"]


def test_matching_load_restores_weights_manifest_and_rank_state(strict_result):
    info = strict_result["loaded"]
    assert (info["step"], info["metadata"]) == (1, {"stage": "s1"})
    assert info["manifest"]["ttt"]["layers"] == [0] and info["manifest"]["data_fingerprint"] == "data-1"
    assert info["manifest"]["parallel"]["tp"] == 1 and info["manifest"]["model"]["num_layers"] == 4
    assert strict_result["info"] == info and info["path"].name == "iter_0000001"
    assert strict_result["weights_equal"] and strict_result["non_strict_equal"]
    assert strict_result["rank_state"] == {"rng": 7}
    assert "holds no optimizer state" in strict_result["no_optimizer_state"]


def test_crash_at_every_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path):
    result = run_local_ranks(crash_points, 1, str(tmp_path), timeout=300)[0]
    cases = result["results"]
    # every rename of a save and of a re-save, and the deletion of the replaced folder, was a crash point
    assert sorted((c["resave"], c["op"]) for c in cases).count((True, "replace")) == 4
    assert sorted((c["resave"], c["op"]) for c in cases).count((False, "replace")) == 3
    assert [c["op"] for c in cases if c["resave"]].count("rmtree") == 1
    for case in cases:
        assert "(injected)" in case["error"], case
        committed = "latest" in case["done"] or (case["resave"] and case["final"] in case["done"])
        assert case["loaded"] == ("new" if committed else "old"), case
        assert case["left"] == [], case  # the next save removed every *.tmp-* / *.old-* folder
    between = [c for c in cases if c["resave"] and c["op"] == "replace" and c["nth"] == 3]
    assert between[0]["latest"].startswith(between[0]["final"] + ".old-")  # the aside copy, not lost
    assert result["kept"] == ["iter_0000001", "iter_0000003", "iter_0000004", "latest"]


def _fake_checkpoint(folder: Path, **meta) -> None:
    folder.mkdir(parents=True)
    for name in ("metadata.json", ".metadata", "common.pt"):
        (folder / name).write_text("")
    (folder / "ttt_meta.json").write_text(json.dumps({"step": 3, "metadata": {}, "manifest": None, **meta}))


def test_latest_refuses_incomplete_folders_precisely(tmp_path):
    from ttt_train.checkpoint import latest_checkpoint, read_checkpoint_info

    _fake_checkpoint(tmp_path / "iter_0000003", world_size=2, rank_states=True)
    (tmp_path / "iter_0000003" / "rank_states").mkdir()
    (tmp_path / "iter_0000003" / "rank_states" / "rank_00000.pt").write_bytes(b"")
    (tmp_path / "latest").write_text("iter_0000003\n")
    with pytest.raises(FileNotFoundError, match=r"names iter_0000003, .*\(lacks rank_states/rank_00001.pt\)"):
        latest_checkpoint(tmp_path)
    (tmp_path / "iter_0000003" / "rank_states" / "rank_00001.pt").write_bytes(b"")
    (tmp_path / "iter_0000003" / "common.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"\(lacks common.pt\)"):
        read_checkpoint_info(tmp_path)
    (tmp_path / "iter_0000003" / "ttt_meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"\(lacks ttt_meta.json, common.pt\)"):
        read_checkpoint_info(tmp_path / "iter_0000003")


def test_manifest_compares_what_is_expected_and_names_each_difference():
    from ttt_train.checkpoint import build_manifest, manifest_differences
    from ttt_train.data.tokenizer import load_tokenizer
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import load_model_config
    from ttt_train.runtime.distributed import ParallelConfig

    byte = load_tokenizer("byte")
    stored = json.loads(json.dumps(build_manifest(load_model_config("tiny"), TTTConfig(every=2), ParallelConfig(tp=2),
                                                  "bf16", byte, "data-a")))  # as read back from ttt_meta.json
    assert stored["tokenizer"] == {"spec": "byte", "fingerprint": byte.fingerprint, "vocab_size": byte.vocab_size}
    same = build_manifest(dataclasses.replace(load_model_config("tiny"), name="renamed"), TTTConfig(every=2), ParallelConfig(cp=4),
                          "fp32", byte, "data-b")
    assert manifest_differences(stored, same) == []  # layout, dtype, data and the name may change
    other = build_manifest(load_model_config("tiny", yarn={"factor": 2.0}), TTTConfig(every=3, lr=1.0),
                           ParallelConfig(), tokenizer={**stored["tokenizer"], "fingerprint": "x", "spec": "/tok"})
    assert manifest_differences(stored, other) == [
        "model.yarn: checkpoint None, expected {'factor': 2.0, 'original_max_position_embeddings': 32768, "
        "'beta_fast': 32.0, 'beta_slow': 1.0, 'mscale': 1.0, 'mscale_all_dim': 0.0, "
        "'correction_range_round_to_int': True}",
        "ttt.every: checkpoint 2, expected 3", "ttt.lr: checkpoint 3.0, expected 1.0",
        f"tokenizer: checkpoint byte (fingerprint {byte.fingerprint}), expected /tok (fingerprint x)"]
    hand_off = {"model": {k: v for k, v in other["model"].items() if k != "yarn"}, "ttt": None}
    assert manifest_differences(stored, hand_off) == ["ttt: checkpoint has TTT, expected none"]
    assert manifest_differences(None, same) == ["manifest: the checkpoint has none (saved without manifest=)"]


@pytest.mark.slow
def test_two_ranks_resume_at_another_layout_rank_states_and_refusals(tmp_path):
    per_rank = run_local_ranks(two_rank_checks, 2, str(tmp_path), timeout=300)
    result = per_rank[0]
    assert result["resumed"] == pytest.approx(result["straight"], rel=1e-5)  # DP=2 -> TP=2, optimizer included
    assert [r["rank_state"] for r in per_rank] == [{"rank": 0}, {"rank": 1}]
    assert per_rank[0]["error"] == per_rank[1]["error"]
    assert "checkpoint tensors the model lacks: decoder.layers.1.mlp.ttt_target" not in result["error"]
    assert "model tensors the checkpoint lacks: decoder.layers.1.mlp.ttt_target.conv.weight" in result["error"]
    assert "NotImplementedError" in result["distributed"] and "optimizer=None" in result["distributed"]

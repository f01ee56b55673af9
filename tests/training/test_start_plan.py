"""Where a (re)started run picks up (`ttt_train.training.start.plan_start`), on run folders with stand-in
checkpoints: a resume holds the changed settings of a started stage against it (refused, naming the
key and the ways out) and applies the others; `run.stages` runs chosen stages alone;
`run.restart_stages` trains a finished stage again, moving its folder aside."""

import json

import pytest
from omegaconf import OmegaConf

from tests.training import driver_helpers as h
from ttt_train.checkpoint import META, checkpoint_name
from ttt_train.training.config import ConfigError, compose
from ttt_train.training.curriculum import resolve
from ttt_train.training.start import CONFIG, plan_start


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.make_data(tmp_path_factory.mktemp("driver_data"))


def stand_in_checkpoint(stage, step: int, manifest: dict | None = None) -> None:
    """A checkpoint folder `latest_checkpoint` accepts (the files it looks for; no tensors)."""
    path = stage.checkpoints / checkpoint_name(step)
    path.mkdir(parents=True)
    for name in ("metadata.json", ".metadata", "common.pt"):
        (path / name).write_text("")
    (path / META).write_text(json.dumps({"format": 2, "step": step, "metadata": {"wandb_id": "w"},
                                         "manifest": manifest, "world_size": 2, "rank_states": False}))
    (stage.checkpoints / "latest").write_text(path.name + "\n")


class Run:
    """The test-size curriculum (6 + 6 steps) in `folder`: `start(*overrides)` records a launch's config
    as the driver does; `plan(*overrides)` is what the next launch would do."""

    def __init__(self, folder, data):
        self.base = h.tiny_overrides(folder, data)
        self.folder = folder

    def stages(self, *overrides):
        cfg = compose([*self.base, *overrides])
        return cfg, resolve(cfg, 2)

    def start(self, *overrides, progress=()):
        cfg, stages = self.stages(*overrides)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        for index, step in progress:
            stand_in_checkpoint(stages[index], step)
        return stages

    def plan(self, *overrides):
        return plan_start(*self.stages(*overrides))


@pytest.fixture
def run(tmp_path, data):
    return Run(tmp_path / "run", data)


@pytest.mark.parametrize("change, key, was, now", [
    ("optimizer.lr=0.03", "optimizer.lr", "0.003", "0.03"),  # the schedule's peak
    ("stages.0.tokens=61440", "stages.0.tokens", "6144", "61440"),  # the schedule's length
    ("ttt.chunk_size=32", "ttt.chunk_size", "64", "32"),
    ("training.global_batch_size=8", "training.global_batch_size", "4", "8"),
    ("data.seed=7", "data.seed", "1234", "7"),
    ("schedule.style=constant", "schedule.style", "'cosine'", "'constant'"),
    ("model.rotary_base=500000.0", "model.rotary_base", "1000000.0", "500000.0"),
    ("init.checkpoint=/elsewhere", "init.checkpoint", "None", "'/elsewhere'"),
])
def test_a_started_stage_refuses_a_changed_setting(run, change, key, was, now):
    stages = run.start(progress=[(0, 2)])
    with pytest.raises(ConfigError) as info:
        run.plan(change)
    message = str(info.value)
    assert f"stages.0 (ctx1k) has trained 2 of 6 steps, and this command changes settings it trained with: " \
           f"{key}: {was} -> {now}." in message
    assert "run.stages=[0] run.restart_stages=true" in message
    assert f"run.dir=NEW_DIR init.checkpoint={stages[0].checkpoints}" in message and "\n" not in message


def test_a_finished_stage_is_held_too_and_later_stages_take_changes(run):
    run.start(progress=[(0, 6), (1, 2)])
    with pytest.raises(ConfigError, match=r"stages.0 \(ctx1k\) has finished, .* optimizer.lr: 0.003 -> 0.01.* "
                                          r"\(to change a later stage only, set it there: e.g. stages.1.optimizer.lr\)"):
        run.plan("optimizer.lr=0.01")
    with pytest.raises(ConfigError, match=r"stages.1 \(ctx4k\) has trained 2 of 6 steps, .* "
                                          r"stages.1.optimizer.lr: 0.003 -> 0.01"):
        run.plan("stages.1.optimizer.lr=0.01")


def test_a_resume_applies_what_does_not_change_the_training(run):
    stages = run.start(progress=[(0, 2)])
    plan = run.plan("logging.interval=2", "checkpoint.every_steps=4", "validation.every_steps=0",
                    "training.micro_batch_size=1", "parallel.tp=2", "stages.1.parallel.cp=1",
                    "stages.1.tokens=24576", "stages.1.optimizer.lr=0.001")
    assert plan.todo == [0, 1] and plan.resume == stages[0].checkpoints / "iter_0000002"
    assert {line.split(":")[0] for line in plan.applied} == {
        "logging.interval", "checkpoint.every_steps", "validation.every_steps", "training.micro_batch_size",
        "parallel.tp", "stages.1.parallel.cp", "stages.1.tokens", "stages.1.optimizer.lr"}
    assert "logging.interval: 1 -> 2" in plan.applied and "stages.1.optimizer.lr: (unset) -> 0.001" in plan.applied


def test_a_key_from_after_the_run_started_is_not_held(run):
    run.start(progress=[(0, 2)])
    old = OmegaConf.load(run.folder / CONFIG)
    del old.ttt["max_update_norm"]  # as if the run had started before the key existed
    (run.folder / CONFIG).write_text(OmegaConf.to_yaml(old))
    assert run.plan().todo == [0, 1]


def test_run_stages_runs_chosen_stages_alone(run):
    stages = run.start(progress=[(0, 3)])
    with pytest.raises(ConfigError, match=r"stages.1 \(ctx4k\) starts from stages.0 \(ctx1k\)'s final checkpoint, "
                                          r"but stages.0 \(ctx1k\) is at step 3 of 6 in .*: train it first"):
        run.plan("run.stages=[1]")
    plan = run.plan("run.stages=[0]")
    assert (plan.todo, plan.remaining) == ([0], [1])
    stand_in_checkpoint(stages[0], 6)
    for choice in ("run.stages=[1]", "run.stages=[ctx4k]"):
        plan = run.plan(choice)
        assert (plan.todo, plan.resume, plan.remaining) == ([1], None, [])
    plan = run.plan("run.stages=[ctx1k]")
    assert plan.todo == [] and plan.remaining == [1]
    assert plan.done == (f"stages.0 (ctx1k) finished already; nothing to do (to train it again add "
                         f"run.restart_stages=true, which moves {stages[0].folder} aside)")


@pytest.mark.parametrize("choice, message", [
    ("run.stages=[1,0]", r"run.stages=\[1, 0\]: name each stage once, in curriculum order"),
    ("run.stages=[ctx8k]", r"run.stages=\['ctx8k'\]: no stage 'ctx8k'; this experiment's stages are 0: ctx1k, 1: ctx4k"),
    ("run.stages=[]", r"run.stages=\[\]: name each stage once"),
    ("run.restart_stages=true", r"run.restart_stages=true needs run.stages=\[...\]"),
])
def test_bad_stage_choices_are_refused(run, choice, message):
    with pytest.raises(ConfigError, match=message):
        run.plan(choice)


def test_restart_moves_the_stage_and_those_after_it_aside(run):
    stages = run.start(progress=[(0, 6), (1, 2)])
    plan = run.plan("run.stages=[0]", "run.restart_stages=true", "optimizer.lr=0.01")
    assert plan.todo == [0] and plan.resume is None and plan.aside == [stages[0].folder, stages[1].folder]
    # a stage in progress with its settings unchanged resumes: a requeued restart does not restart again
    plan = run.plan("run.stages=[1]", "run.restart_stages=true")
    assert plan.todo == [1] and plan.resume == stages[1].checkpoints / "iter_0000002" and plan.aside == []
    plan = run.plan("run.stages=[1]", "run.restart_stages=true", "stages.1.optimizer.lr=0.01")
    assert plan.todo == [1] and plan.resume is None and plan.aside == [stages[1].folder]


def test_a_renamed_stage_is_refused(run):
    stages = run.start(progress=[(0, 2)])
    with pytest.raises(ConfigError, match=f"{stages[0].folder}.*a stage was renamed or removed"):
        run.plan("stages.0.name=warmup")


def test_data_moved_to_another_path_is_no_change(run, data, tmp_path):
    """The same dataset files at another path (the checkpoint's data fingerprint still matches) resume;
    another seed (other samples) is refused."""
    import shutil

    from ttt_train.checkpoint import build_manifest
    from ttt_train.data.datasets import dataset_fingerprint
    from ttt_train.data.tokenizer import load_tokenizer

    stages = run.start()
    s0 = stages[0]
    manifest = build_manifest(s0.model, s0.ttt, s0.parallel, tokenizer=load_tokenizer("byte"),
                              data_fingerprint=dataset_fingerprint(s0.data))
    stand_in_checkpoint(s0, 2, manifest)
    moved = tmp_path / "moved" / "short"
    moved.parent.mkdir()
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(data["short"] + suffix, str(moved) + suffix)
    plan = run.plan(f"data.blend=[{{path:'{moved}',weight:1.0}}]", f"stages.1.data.blend=[{{path:'{data['long']}',weight:1.0}}]")
    assert plan.todo == [0, 1] and plan.resume is not None
    assert any("name the same samples and tokenizer as the checkpoint's fingerprints" in line for line in plan.applied)
    with pytest.raises(ConfigError, match="data.seed: 1234 -> 7"):
        run.plan(f"data.blend=[{{path:'{moved}',weight:1.0}}]", "data.seed=7")


def test_the_keys_applied_on_resume_are_keys_of_the_config():
    from ttt_train.config_compose import schema_lookup
    from ttt_train.training.config import TrainConfig
    from ttt_train.training.start import APPLIED_ON_RESUME

    assert [key for key in APPLIED_ON_RESUME if schema_lookup(TrainConfig, key.split(".")) is not None] == []

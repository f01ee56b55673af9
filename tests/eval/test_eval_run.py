"""`python -m ttt_train.eval` end to end on tiny models (plain Qwen3 and an exported In-Place TTT
model): RULER at two lengths writes JSON lines, CSV and PNG; a restart skips finished samples;
sliding-window perplexity equals a brute-force recomputation; bad settings are named."""

import csv
import json
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

from ttt_train.eval import report, ruler_suite
from ttt_train.eval.__main__ import CONFIG_DIR
from ttt_train.eval.run import evaluate

SMALL_RULER = ["suite.niah.num_keys=2", "suite.niah.num_values=2", "suite.niah.num_queries=2", "suite.cwe.num_common=2",
               "suite.fwe.num_answers=2", "suite.vt.example_tokens=0", "suite.cwe.examples=0",  # fit 512 bytes
               *[f"suite.max_new_tokens.{t}=12" for t in ruler_suite.TASKS]]
DEFAULT_TASKS = 11  # RULER's 13 but the two QA tasks
# generated for real: one task of each kind (the echo test below runs every default task)
SOME_TASKS = "suite.tasks=[niah_single_1,niah_single_2,niah_multikey_3,niah_multivalue,vt,cwe,fwe]"


def config(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("eval", overrides=overrides)


def run(overrides):
    return evaluate(config(overrides))


@pytest.fixture
def count_generate(monkeypatch):
    """Counts the prompts greedy_generate receives (still generating for real)."""
    prompts = []
    real = ruler_suite.greedy_generate

    def counting(model, tokenizer, batch, max_new_tokens):
        prompts.extend(batch)
        assert all(len(tokenizer(p)["input_ids"]) + max_new_tokens <= 640 for p in batch)  # the model's tokens
        return real(model, tokenizer, batch, max_new_tokens)

    monkeypatch.setattr(ruler_suite, "greedy_generate", counting)
    return prompts


def test_ruler_end_to_end_and_restart(tmp_path, ttt_dir, plain_dir, count_generate, monkeypatch):
    out = tmp_path / "ruler"
    args = [f"models=[{ttt_dir},{plain_dir}]", "labels=[ttt,plain]", "lengths=[512,640]", "samples=2",
            "batch_size=2", f"out={out}", "device=cpu", SOME_TASKS, *SMALL_RULER]
    rows = run(args)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == len(count_generate) == 2 * 2 * 7 * 2
    assert {(r["model"], r["length"]) for r in records} == {(m, n) for m in ("ttt", "plain") for n in (512, 640)}
    assert all(r["prompt_tokens"] + 12 <= r["length"] and 0 <= r["score"] <= 1 for r in records)
    table = list(csv.DictReader((out / "ruler_scores.csv").open()))
    assert [(r["model"], r["length"]) for r in table] == [("ttt", "512"), ("ttt", "640"), ("plain", "512"),
                                                            ("plain", "640")]
    assert [r["samples"] for r in rows] == [14] * 4
    assert (out / "ruler_scores.png").read_bytes()[:4] == b"\x89PNG"

    # restart: nothing left to do; then a run cut short (5 records lost, a torn line) redoes just those
    monkeypatch.setattr(report, "_plot", lambda *args, **kwargs: None)  # slow; checked above
    count_generate.clear()
    run(args)
    assert count_generate == []
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:-5]) + lines[-5][:20])
    run(args)
    assert len(count_generate) == 5
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == records

    with pytest.raises(ValueError, match=r"holds results of other settings \(differing: seed\)"):
        run(args + ["seed=1"])


def test_ruler_scores_an_echo_model_100(tmp_path, plain_dir, monkeypatch):
    """Every reference is in the prompt: a 'model' that repeats its prompt scores 100 on every task."""
    monkeypatch.setattr(ruler_suite, "greedy_generate", lambda model, tokenizer, prompts, n: prompts)
    rows = run([f"models=[{plain_dir}]", "lengths=[700]", "samples=1", f"out={tmp_path}", *SMALL_RULER])
    tasks = config(["models=[x]"]).suite.tasks
    assert rows[0]["average"] == 100 and all(rows[0][t] == 100 for t in tasks) and len(tasks) == DEFAULT_TASKS


def brute_force_loss(model, tokens, first_target):
    """Sum of -log p(tokens[t] | tokens[:t]) for t >= first_target, one forward per token."""
    total = 0.0
    with torch.no_grad():
        for t in range(first_target, len(tokens)):
            logits = model(torch.as_tensor(tokens[:t])[None]).logits[0, -1].double()
            total -= torch.log_softmax(logits, -1)[tokens[t]].item()
    return total


def test_sliding_ppl_equals_brute_force(tmp_path, ttt_dir, dataset_prefix):
    from ttt_train.data import indexed

    out = tmp_path / "ppl"
    rows = run([f"models=[{ttt_dir}]", "suite=sliding_ppl", f"suite.dataset={dataset_prefix}", "suite.block=24",
                "suite.position_length=600", "suite.position_buckets=4", "lengths=[0,40,600]", "samples=2",
                f"out={out}", "device=cpu"])
    model = AutoModelForCausalLM.from_pretrained(ttt_dir, trust_remote_code=True).eval()
    docs = indexed.open_dataset(dataset_prefix)
    long_docs = [1, 3]  # the first two documents with >= 24 + 600 tokens (lengths 100, 700, 300, 650, 690)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    finals = {(r["length"], r["doc"]): r for r in records if r["kind"] == "final_block"}
    assert set(finals) == {(c, d) for c in (0, 40, 600) for d in long_docs}
    for (context, d), record in finals.items():
        if context == 600:
            continue  # long for the brute force; the same code path as the two shorter contexts
        doc = docs[d][:-1].tolist()  # EOD dropped
        window = doc[len(doc) - 24 - context:]
        assert record["tokens"] == 23
        assert record["loss_sum"] == pytest.approx(brute_force_loss(model, window, context + 1), rel=1e-5)
    positions = [r for r in records if r["kind"] == "position"]
    assert {r["doc"] for r in positions} == {1, 3}  # the first two with >= 600 tokens
    with torch.no_grad():
        for r in positions:
            ids = torch.as_tensor(docs[r["doc"]][:600].astype("int64"))[None]
            losses = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1].double(), ids[0, 1:], reduction="none")
            edges = r["bucket_edges"]
            assert edges == [1, 151, 300, 450, 600]  # target positions 1..599 in 4 near-equal buckets
            want = [losses[a - 1:b - 1].sum().item() for a, b in zip(edges, edges[1:])]
            assert r["bucket_loss_sums"] == pytest.approx(want, rel=1e-5)
    assert [row["context"] for row in rows] == [0, 40, 600]
    assert all(row["tokens"] == 46 for row in rows)
    for name in ("sliding_ppl.csv", "loss_by_position.csv"):
        assert (out / name).read_text().count("\n") > 1
    for name in ("perplexity_vs_context.png", "loss_by_position.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("override, message", [
    (["lengths=[1024,x]"], r"lengths=.*: give a list of token counts"),
    (["suite.tasks=[niah_single_1,essay_qa]"], r"suite.tasks: unknown \['essay_qa'\]"),
    (["suite.tasks=[niah_single_1,qa_2]"], r"suite.tasks: qa_2 \(HotpotQA\) need RULER's QA data sets"),
    (["suite.haystack=essays"], r"suite.haystack='essays': choose ruler \(each task's own\) or one of noise, essay"),
    (["suite.metric=exact"], r"suite.metric='exact': choose ruler"),
    (["+suite.vt.depth=0.5"], r"suite.vt: unknown option\(s\) \['depth'\]"),
    (["labels=[a,b]"], r"labels: 2 labels for 1 models"),
    (["ttt.lr=0.5"], r"ttt.lr / ttt.max_update_norm: model .* has no In-Place TTT"),
    (["ttt.max_update_norm=-1"], r"ttt.max_update_norm=-1: a positive number"),
    (["samples=0"], r"samples=0: an integer >= 1"),
])
def test_bad_settings_are_named(tmp_path, plain_dir, override, message):
    with pytest.raises(ValueError, match=message):
        run([f"models=[{plain_dir}]", "lengths=[700]", f"out={tmp_path}", *override])


def test_bad_models_are_named(tmp_path, plain_dir):
    with pytest.raises(FileNotFoundError, match=r"models: .*missing does not exist"):
        run([f"models=[{tmp_path / 'missing'}]", f"out={tmp_path}"])
    with pytest.raises(ValueError, match=r"is neither an HF directory \(no config.json\) nor a ttt-train checkpoint"):
        run([f"models=[{tmp_path}]", f"out={tmp_path / 'o'}"])
    with pytest.raises(ValueError, match=r"several models are labelled \['plain_qwen30'\]"):
        run([f"models=[{plain_dir},{plain_dir}]", f"out={tmp_path / 'o2'}"])


def test_command_line(tmp_path, ttt_dir, monkeypatch, capsys):
    """The Hydra entry point (`python -m ttt_train.eval ...`) runs, prints the table and passes the ttt
    overrides to the model."""
    from ttt_train.eval.__main__ import main

    seen = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens):
        seen.append((model.config.ttt_lr, model.config.ttt_max_update_norm))
        return [""] * len(prompts)

    monkeypatch.setattr(ruler_suite, "greedy_generate", fake_generate)
    out = tmp_path / "cli"
    monkeypatch.setattr(sys, "argv", [
        "ttt_train.eval", f"models=[{ttt_dir}]", "suite.tasks=[niah_single_1]", "lengths=[512]", "samples=2",
        "ttt.lr=0.5", "ttt.max_update_norm=1.0", f"out={out}"])
    main()
    assert "RULER-style score (x100; offline, not official RULER numbers) by model and length" in capsys.readouterr().out
    assert seen == [(0.5, 1.0)] and len((out / "results.jsonl").read_text().splitlines()) == 2

    monkeypatch.setattr(sys, "argv", ["ttt_train.eval", f"models=[{ttt_dir}]", "samples=0", f"out={out}"])
    assert main() == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: samples=0: an integer >= 1 is needed"]
    # an appended key the config lacks is refused too (Hydra alone keeps it, and nothing reads it)
    for typo, message in (("+sammples=3", "unknown config key 'sammples' (did you mean 'samples'?)"),
                          ("sammples=3", "unknown config key 'sammples' (did you mean 'samples'?)"),
                          ("++suite.taks=[x]", "unknown config key 'suite.taks' (did you mean 'suite.tasks'?)")):
        assert main([f"models=[{ttt_dir}]", typo, f"out={out}"]) == 2
        err = capsys.readouterr().err
        assert message in err and "+sammples" not in err and err.count("\n") == 1, err


def test_lengths_beyond_a_models_context_are_marked_in_the_table(tmp_path, plain_dir, monkeypatch):
    """A length beyond a model's context (4096 here) is a table row saying so: skipped, or with
    extrapolate=true evaluated and marked; the same for sliding_ppl's context + block."""
    monkeypatch.setattr(ruler_suite, "greedy_generate", lambda model, tokenizer, prompts, n: [""] * len(prompts))
    monkeypatch.setattr(report, "_plot", lambda *args, **kwargs: None)
    common = [f"models=[{plain_dir}]", "labels=[plain]", "lengths=[512,5000]", "samples=1", "suite.tasks=[vt]",
              *SMALL_RULER]
    rows = run([*common, f"out={tmp_path / 'a'}"])
    assert [(r["length"], r["note"]) for r in rows] == [
        (512, ""), (5000, "not evaluated: beyond its context 4096 (extrapolate=true evaluates it)")]
    table = list(csv.DictReader((tmp_path / "a" / "ruler_scores.csv").open()))
    assert table[1]["note"].startswith("not evaluated") and table[1]["vt"] == ""
    rows = run([*common, f"out={tmp_path / 'b'}", "extrapolate=true"])
    assert [(r["length"], r["note"], r["samples"]) for r in rows] == [(512, "", 1), (5000, "beyond its context 4096", 1)]

    rows = [{"model": "m", "context": 0, "perplexity": 9.0}, {"model": "m", "context": 1024, "perplexity": 7.0}]
    marked = report.beyond_context(rows, "context", {"m": [0, 1024, 4096]}, {"m": 4096}, lambda n, c: n + 512 <= c,
                                   "not evaluated: context + block 512 beyond its context {context}")
    assert [(r["context"], r["perplexity"], r["note"]) for r in marked] == [
        (0, 9.0, ""), (1024, 7.0, ""), (4096, "", "not evaluated: context + block 512 beyond its context 4096")]

"""lm-evaluation-harness runs an exported In-Place TTT directory offline (`--model hf` with
trust_remote_code) on local tasks: its loglikelihoods (multiple choice) and greedy continuations
(generate_until, left-padded batches, across TTT chunk boundaries) are the model's own."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The sky is", "choices": [" blue.", " made of cheese.", " green"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five hundred and six"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius.", " Kelvin."], "answer": 0},
]

TASK_YAML = """\
task: ttt_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


GEN_YAML = """\
task: ttt_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: " {{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


def own_loglikelihood(model, context: str, continuation: str) -> float:
    """sum log p(continuation | context) with the byte tokenizer (token ids are the UTF-8 bytes)."""
    ctx, cont = list(context.encode()), list(continuation.encode())
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logprobs[len(ctx) - 1 + i, tok].item() for i, tok in enumerate(cont))


def test_local_task_loglikelihoods_equal_the_models(tmp_path, ttt_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ttt_local_mc.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "cache"))
    (tasks / "ttt_local_gen.yaml").write_text(GEN_YAML.format(data=data, cache=tmp_path / "cache"))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="hf", model_args=f"pretrained={ttt_dir},trust_remote_code=True,dtype=float32", tasks=["ttt_local_mc", "ttt_local_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=2, device="cpu", log_samples=True,
    )
    samples = results["samples"]["ttt_local_mc"]
    assert len(samples) == len(DOCS) and "acc,none" in results["results"]["ttt_local_mc"]
    model = AutoModelForCausalLM.from_pretrained(ttt_dir, trust_remote_code=True).eval()
    assert type(model).__name__ == "InPlaceTTTQwen3ForCausalLM"
    checked = 0
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            assert float(resp[0][0]) == pytest.approx(own_loglikelihood(model, context, continuation), abs=1e-4)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)

    # generation (left-padded batches of 2): lm-eval's continuations are the model's own greedy ones
    from ttt_train.eval.generation import greedy_generate
    from ttt_train.eval.models import load_model

    model, tokenizer = load_model(ttt_dir, dtype="float32", device="cpu")
    generated = results["samples"]["ttt_local_gen"]
    prompts = [g["arguments"][0][0] for g in generated]
    own = greedy_generate(model, tokenizer, prompts, 12)
    assert [g["resps"][0][0] for g in generated] == [text.split("\n\n")[0] for text in own]


# lm-eval's own RULER tasks that build their data without network: haystack "repeat" / "needle" and random
# strings. ruler_cwe (words from `wonderwords`) and ruler_vt need none either, but not with the tests'
# byte-level tokenizer: cwe's words do not fit (no answer words, lm-eval divides by zero) and vt's
# in-context example never fits its 500 tokens (lm-eval's sampler loops forever).
OFFLINE_RULER = ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_fwe"]


@pytest.mark.slow
def test_lm_eval_ruler_tasks_that_need_no_download_run_offline(ttt_dir, monkeypatch):
    """The offline-buildable tasks of lm-eval's `ruler` group on an export, sized by the export's own
    tokenizer (lm-eval generates RULER's data), scored by RULER's metric at the requested length."""
    pytest.importorskip("wonderwords")  # lm-eval's ruler tasks import both (its `ruler` extra)
    pytest.importorskip("nltk")
    for name, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    from lm_eval import simple_evaluate

    results = simple_evaluate(  # as `lm_eval --model hf --model_args ... --tasks ... --metadata ... --limit 2`
        model="hf", model_args=f"pretrained={ttt_dir},trust_remote_code=True,dtype=float32,max_length=2048",
        tasks=OFFLINE_RULER, metadata={"max_seq_lengths": [2048]}, limit=2, batch_size=2, device="cpu",
        log_samples=True)
    for task in OFFLINE_RULER:
        scores = results["results"][task]
        assert "2048,none" in scores and 0.0 <= scores["2048,none"] <= 1.0, (task, scores)
        samples = results["samples"][task]
        assert len(samples) == 2 and all(s["doc"]["max_length"] == 2048 for s in samples), task

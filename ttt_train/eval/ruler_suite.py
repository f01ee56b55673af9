"""`suite=ruler`: every model x length x task x sample, generated, answered greedily and scored;
one record per sample appended to the results file as soon as it is scored."""

from __future__ import annotations

import functools
import gc
import inspect

from tqdm import tqdm

from ttt_train.eval.generation import count_tokens, greedy_generate
from ttt_train.eval.haystack import HAYSTACKS, NoiseHaystack, TextHaystack, make_haystack
from ttt_train.eval.models import ModelEntry, load_model
from ttt_train.eval.results import ResultsFile
from ttt_train.eval.ruler import QA_TASKS, TASKS, make_sample
from ttt_train.eval.scoring import METRICS
from ttt_train.eval.wordlists import single_words


def record_key(record: dict) -> tuple:
    return record["model_path"], record["task"], record["length"], record["index"]


def check_suite(suite: dict) -> None:
    """Refuse unknown tasks (QA ones: not offline), missing max_new_tokens, task options the
    generators do not take, an unknown metric or haystack."""
    qa = [t for t in suite["tasks"] if t in QA_TASKS]
    if qa:
        named = ", ".join(f"{t} ({QA_TASKS[t]})" for t in qa)
        raise ValueError(f"suite.tasks: {named} need RULER's QA data sets, which cannot be built offline; "
                         "drop them from suite.tasks")
    unknown = [t for t in suite["tasks"] if t not in TASKS]
    if unknown or not suite["tasks"]:
        raise ValueError(f"suite.tasks: unknown {unknown or 'empty list'}; choose from {sorted(TASKS)}")
    for task in suite["tasks"]:
        if not isinstance(suite["max_new_tokens"].get(task), int) or suite["max_new_tokens"][task] < 1:
            raise ValueError(f"suite.max_new_tokens.{task}: a positive integer is needed")
        section = TASKS[task].section
        accepted = set(inspect.signature(TASKS[task].build).parameters) - {"rng", "n", "setting"}
        extra = set(suite.get(section) or {}) - accepted
        if extra:
            raise ValueError(f"suite.{section}: unknown option(s) {sorted(extra)}; accepted: {sorted(accepted)}")
    if suite["metric"] != "ruler" and suite["metric"] not in METRICS:
        raise ValueError(f"suite.metric={suite['metric']!r}: choose ruler (each task's own) or one of "
                         f"{sorted(METRICS)}")
    if suite["haystack"] != "ruler" and suite["haystack"] not in HAYSTACKS:
        raise ValueError(f"suite.haystack={suite['haystack']!r}: choose ruler (each task's own) or one of "
                         f"{', '.join(HAYSTACKS)}")


def task_haystacks(suite: dict) -> dict[str, NoiseHaystack | TextHaystack | None]:
    """Each task's text haystack: RULER's (noise or the essays) with suite.haystack=ruler, else the
    one suite.haystack names for every task that has a text haystack; None for the others."""
    made: dict[str, NoiseHaystack | TextHaystack] = {}
    chosen = {}
    for task in suite["tasks"]:
        kind = TASKS[task].haystack
        if kind is not None:
            kind = kind if suite["haystack"] == "ruler" else suite["haystack"]
            if kind not in made:
                made[kind] = make_haystack(kind, suite["haystack_path"])
        chosen[task] = made.get(kind)
    return chosen


def model_lengths(lengths: list[int] | None, context: int, extrapolate: bool) -> list[int]:
    """The lengths evaluated for a model of `context` tokens: the given ones up to the context (all
    of them with `extrapolate`), or powers of two from 1024 up to the context when none are given."""
    if lengths is None:
        return [2**k for k in range(10, context.bit_length()) if 2**k <= context]
    return [n for n in lengths if extrapolate or n <= context]


def run_ruler(cfg: dict, entries: list[ModelEntry], contexts: dict[str, int], results: ResultsFile,
              device: str) -> None:
    """Evaluate what `results` lacks; `contexts`: each model's context length (by label)."""
    suite = cfg["suite"]
    tasks, samples = suite["tasks"], cfg["samples"]
    plan = {}
    for entry in entries:
        lengths = model_lengths(cfg["lengths"], contexts[entry.label], cfg["extrapolate"])
        skipped = sorted(set(cfg["lengths"] or []) - set(lengths))
        if skipped:
            print(f"{entry.label}: skipping lengths {skipped} beyond its context {contexts[entry.label]} "
                  "(extrapolate=true evaluates them)")
        plan[entry.label] = [
            (length, task, index)
            for length in lengths for task in tasks for index in range(samples)
            if (entry.source, task, length, index) not in results.done
        ]
    total = sum(length for todo in plan.values() for length, _, _ in todo)
    if not total:
        return
    haystacks = task_haystacks(suite)  # before any model loads: a missing source fails fast
    if any(TASKS[t].words for t in tasks):
        single_words()
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="ruler", dynamic_ncols=True)  # ETA by tokens
    done, count = 0, sum(map(len, plan.values()))
    for entry in entries:
        todo = plan[entry.label]
        if not todo:
            continue
        model, tokenizer = load_model(entry.hf_dir, dtype=cfg["dtype"], device=device,
                                         ttt_lr=cfg["ttt"]["lr"], ttt_max_update_norm=cfg["ttt"]["max_update_norm"])
        counter = functools.partial(count_tokens, tokenizer)
        groups: dict[tuple[int, str], list[int]] = {}
        for length, task, index in todo:
            groups.setdefault((length, task), []).append(index)
        for (length, task), indices in groups.items():
            guess = 64
            metric = METRICS[TASKS[task].metric if suite["metric"] == "ruler" else suite["metric"]]
            for start in range(0, len(indices), cfg["batch_size"]):
                batch = []
                for index in indices[start:start + cfg["batch_size"]]:
                    sample, guess = make_sample(
                        task, dict(suite.get(TASKS[task].section) or {}), length=length, index=index,
                        seed=cfg["seed"], haystack=haystacks[task], count_tokens=counter,
                        max_new_tokens=suite["max_new_tokens"][task], answer_prefix=suite["answer_prefix"],
                        guess=guess,
                    )
                    batch.append(sample)
                outputs = greedy_generate(model, tokenizer, [s.prompt for s in batch], batch[0].max_new_tokens)
                for sample, output in zip(batch, outputs):
                    results.append({
                        "suite": "ruler", "model": entry.label, "model_path": entry.source, "task": task,
                        "length": length, "index": sample.index, "score": metric(output, sample.references),
                        "output": output, "references": sample.references,
                        "prompt_tokens": sample.prompt_tokens,
                    })
                    bar.update(length)
                    done += 1
                bar.set_postfix_str(f"{done}/{count} samples, {entry.label} {task} {length}")
        del model
        gc.collect()
    bar.close()

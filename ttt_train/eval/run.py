"""One evaluation: check the settings, resolve the models, run what the results file lacks, then
write the tables and plots and print the summary."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ttt_train.eval import recall, ruler_suite, sliding_ppl
from ttt_train.eval.config import check_config, result_settings
from ttt_train.eval.models import resolve_device, resolve_models
from ttt_train.eval.report import (
    beyond_context,
    format_table,
    recall_report,
    ruler_report,
    sliding_ppl_report,
)
from ttt_train.eval.results import ResultsFile, check_settings


def model_context(hf_dir) -> int:
    """max_position_embeddings of an HF directory's config (its context length)."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(hf_dir, trust_remote_code=True), "max_position_embeddings", None)
    if not isinstance(context, int):
        raise ValueError(f"{hf_dir}/config.json has no max_position_embeddings (the model's context length)")
    return context


def evaluate(cfg: DictConfig | dict) -> list[dict]:
    """Run the suite `cfg` names (see configs/eval/eval.yaml); returns the summary table's rows."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    check_config(cfg)
    out = Path(cfg["out"])
    check_settings(out / "settings.json", result_settings(cfg))
    entries = resolve_models(cfg["models"], cfg["labels"], cfg["export_cache"])
    contexts = {e.label: model_context(e.hf_dir) for e in entries}
    labels = {e.source: e.label for e in entries}
    suite = cfg["suite"]["name"]
    module, runner = {"ruler": (ruler_suite, ruler_suite.run_ruler), "recall": (recall, recall.run_recall),
                      "sliding_ppl": (sliding_ppl, sliding_ppl.run_sliding_ppl)}[suite]
    results = ResultsFile(out / "results.jsonl", module.record_key)
    runner(cfg, entries, contexts, results, resolve_device(cfg["device"]))
    records = [dict(r, model=labels[r["model_path"]]) for r in results.records if r["model_path"] in labels]
    if suite == "ruler":
        wanted = {e.label: set(ruler_suite.model_lengths(cfg["lengths"], contexts[e.label], cfg["extrapolate"]))
                  for e in entries}
        records = [r for r in records if r["length"] in wanted[r["model"]] and r["index"] < cfg["samples"]
                   and r["task"] in cfg["suite"]["tasks"]]
        requested = {e.label: list(cfg["lengths"] or []) for e in entries}
        rows = ruler_report(records, list(labels.values()), cfg["suite"]["tasks"], out, annotate=lambda rows: beyond_context(
            rows, "length", requested, contexts, lambda n, c: n <= c,
            "not evaluated: beyond its context {context} (extrapolate=true evaluates it)"))
        title = "RULER-style score (x100; offline, not official RULER numbers) by model and length"
    elif suite == "recall":
        records = [r for r in records if r["index"] < cfg["samples"]]
        rows = recall_report(records, list(labels.values()), out)
        title = f"teacher-forced recall on {cfg['suite']['records']} (loss in nats per token)"
    else:
        block = cfg["suite"]["block"]
        requested = {e.label: list(cfg["lengths"] or []) for e in entries}
        rows = sliding_ppl_report(records, list(labels.values()), out, annotate=lambda rows: beyond_context(
            rows, "context", requested, contexts, lambda n, c: n + block <= c,
            f"not evaluated: context + block {block} beyond its context {{context}}"))
        title = f"final-block ({block} tokens) perplexity by preceding context"
    print(f"\n{title}\n{format_table(rows)}\n")
    print(f"results: {out / 'results.jsonl'}; tables and plots: {out}/*.csv, {out}/*.png")
    return rows

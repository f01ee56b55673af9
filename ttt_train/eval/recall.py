"""`suite=recall`: teacher-forced recall on synthetic records whose answers lie beyond the window.

The records are `python -m data_tools.synthetic TASK ... --output FILE.jsonl` lines: each holds its
`text` and the `recall_spans` (character ranges) only a memory of the context can predict (mqar's
queried values, copy's second copy, passkey's key). Each record's text is run once through the model
(teacher forcing, no generation); a recall token is one whose characters lie inside a span. Per
record the result holds the loss and the argmax hits on the recall tokens and on all other tokens
(and the hits a uniform guess expects, for tasks whose answers are drawn from one alphabet),
and the per-token loss summed into buckets of `position_width` target positions, so tables and
plots compare models on exactly the same tokens.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy
import torch
from tqdm import tqdm

from ttt_train.data.recall import encode_record, read_records
from ttt_train.data.synthetic import RECALL_ALPHABETS
from ttt_train.eval.models import ModelEntry, load_model
from ttt_train.eval.results import ResultsFile
from ttt_train.eval.sliding_ppl import check_head_path, target_scores


def record_key(record: dict) -> tuple:
    return record["model_path"], record["index"]


def run_recall(cfg: dict, entries: list[ModelEntry], contexts: dict[str, int], results: ResultsFile,
               device: str) -> None:
    """Evaluate the records `results` lacks, for each model (records truncated to its context)."""
    from ttt_train.data.tokenizer import load_tokenizer

    suite = cfg["suite"]
    records = read_records(suite["records"], cfg["samples"])
    todo = {e.label: [i for i in range(len(records)) if (e.source, i) not in results.done] for e in entries}
    if not any(todo.values()):
        return
    bar = tqdm(total=sum(map(len, todo.values())), unit="doc", desc="recall", dynamic_ncols=True)
    for entry in entries:
        if not todo[entry.label]:
            continue
        tokenizer = load_tokenizer(str(Path(entry.hf_dir) / "tokenizer.json"))
        model, _ = load_model(entry.hf_dir, dtype=cfg["dtype"], device=device,
                              ttt_lr=cfg["ttt"]["lr"], ttt_max_update_norm=cfg["ttt"]["max_update_norm"])
        checked = False
        for i in todo[entry.label]:
            token_ids, recall = encode_record(records[i], tokenizer)
            length = min(len(token_ids), contexts[entry.label])
            ids = torch.as_tensor(token_ids[:length], device=device)[None]
            if not checked:
                check_head_path(model, ids[:, :16])
                checked = True
            losses, hits = (t[0].cpu().numpy() for t in target_scores(model, ids, 1))
            losses = losses.astype(numpy.float64)
            recall = recall[1:length]  # the targets: tokens 1..length-1
            edges = numpy.append(numpy.arange(1, length, suite["position_width"]), length)
            results.append({
                "suite": "recall", "model": entry.label, "model_path": entry.source, "index": i,
                "task": records[i].get("task"), "tokens": length, "truncated": length < len(token_ids),
                "recall_tokens": int(recall.sum()), "recall_loss_sum": float(losses[recall].sum()),
                "recall_hits": int(hits[recall].sum()), "other_tokens": int((~recall).sum()),
                "recall_chance": (int(recall.sum()) / RECALL_ALPHABETS[records[i]["task"]]
                                  if records[i].get("task") in RECALL_ALPHABETS else None),
                "other_loss_sum": float(losses[~recall].sum()), "other_hits": int(hits[~recall].sum()),
                "bucket_edges": edges.tolist(),
                "bucket_loss_sums": [float(losses[a - 1:b - 1].sum()) for a, b in zip(edges, edges[1:])],
                "bucket_recall_tokens": [int(recall[a - 1:b - 1].sum()) for a, b in zip(edges, edges[1:])],
            })
            bar.update(1)
        del model
        gc.collect()
    bar.close()

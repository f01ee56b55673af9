"""`suite=recall`: teacher-forced recall on synthetic records whose answers lie beyond the window.

The records are `python -m data_tools.synthetic TASK ... --output FILE.jsonl` lines: each holds its
`text` and the `recall_spans` (character ranges) only a memory of the context can predict (mqar's
queried values, copy's second copy, passkey's key). Each record's text is run once through the model
(teacher forcing, no generation); a recall token is one whose characters lie inside a span. Per
record the result holds the loss and the argmax hits on the recall tokens and on all other tokens,
and the per-token loss summed into buckets of `position_width` target positions, so tables and
plots compare models on exactly the same tokens.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy
import torch
from tqdm import tqdm

from ttt_train.eval.models import ModelEntry, load_model
from ttt_train.eval.results import ResultsFile
from ttt_train.eval.sliding_ppl import check_head_path, target_scores


def record_key(record: dict) -> tuple:
    return record["model_path"], record["index"]


def read_records(path: str, count: int) -> list[dict]:
    """The first `count` records of a JSON-lines file, each with `text` and `recall_spans`."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"suite.records={path}: no such file; write one with "
                                "`python -m data_tools.synthetic TASK --num N --length L --output FILE.jsonl`")
    records = []
    with file.open() as f:
        for line_no, line in enumerate(f, 1):
            if len(records) == count:
                break
            record = json.loads(line)
            if not isinstance(record.get("text"), str) or not isinstance(record.get("recall_spans"), list):
                raise ValueError(f"{path}:{line_no}: a record needs `text` and `recall_spans` "
                                 "(written by python -m data_tools.synthetic)")
            records.append(record)
    return records


def recall_mask(offsets: list[tuple[int, int]], spans: list[list[int]]) -> numpy.ndarray:
    """bool `[n_tokens]`: token i's characters `offsets[i]` lie inside one of `spans` ([start, end))."""
    starts = numpy.array([a for a, _ in offsets])
    ends = numpy.array([b for _, b in offsets])
    mask = numpy.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (ends <= b) & (ends > starts)
    return mask


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
            encoding = tokenizer.backend.encode(records[i]["text"], add_special_tokens=False)
            length = min(len(encoding.ids), contexts[entry.label])
            ids = torch.as_tensor(encoding.ids[:length], device=device)[None]
            if not checked:
                check_head_path(model, ids[:, :16])
                checked = True
            losses, hits = (t[0].cpu().numpy() for t in target_scores(model, ids, 1))
            losses = losses.astype(numpy.float64)
            recall = recall_mask(encoding.offsets[1:length], records[i]["recall_spans"])  # targets 1..length-1
            edges = numpy.append(numpy.arange(1, length, suite["position_width"]), length)
            results.append({
                "suite": "recall", "model": entry.label, "model_path": entry.source, "index": i,
                "task": records[i].get("task"), "tokens": length, "truncated": length < len(encoding.ids),
                "recall_tokens": int(recall.sum()), "recall_loss_sum": float(losses[recall].sum()),
                "recall_hits": int(hits[recall].sum()), "other_tokens": int((~recall).sum()),
                "other_loss_sum": float(losses[~recall].sum()), "other_hits": int(hits[~recall].sum()),
                "bucket_edges": edges.tolist(),
                "bucket_loss_sums": [float(losses[a - 1:b - 1].sum()) for a, b in zip(edges, edges[1:])],
                "bucket_recall_tokens": [int(recall[a - 1:b - 1].sum()) for a, b in zip(edges, edges[1:])],
            })
            bar.update(1)
        del model
        gc.collect()
    bar.close()

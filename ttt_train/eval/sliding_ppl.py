"""`suite=sliding_ppl` on a tokenized dataset (data_tools output).

- final block: for each document (end-of-document token dropped) of n tokens, the loss on its last
  `block` tokens given the `c` tokens before the block, for each context c: the window is
  doc[n-block-c : n] and the targets are always the same block tokens doc[n-block+1 : n] (block - 1
  of them: the block's first token has no prediction at c = 0). The same documents serve every
  context and model: the first `samples` long enough for the longest context evaluated.
- loss by position: the per-token loss over each document's first `position_length` tokens, summed
  into `position_buckets` equal buckets of target positions.
Losses come from the model's final hidden states through its output head, a slice at a time, so no
[tokens, vocab] logits tensor is ever whole.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy
import torch
from tqdm import tqdm

from ttt_train.eval.models import ModelEntry, load_model
from ttt_train.eval.results import ResultsFile

_HEAD_SLICE = 1024  # positions per output-head slice


def record_key(record: dict) -> tuple:
    return record["model_path"], record["kind"], record["length"], record["doc"]


def target_losses(model, input_ids: torch.Tensor, first_target: int) -> torch.Tensor:
    """[b, T - first_target] float32 losses of input_ids[:, first_target:] (first_target >= 1), each
    token predicted from the tokens before it."""
    return target_scores(model, input_ids, first_target)[0]


def target_scores(model, input_ids: torch.Tensor, first_target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_losses` and, bool of the same shape, whether each target is the model's argmax."""
    base = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    with torch.inference_mode():
        hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state
        losses, hits = [], []
        for s in range(first_target - 1, input_ids.shape[1] - 1, _HEAD_SLICE):
            e = min(s + _HEAD_SLICE, input_ids.shape[1] - 1)
            logits = head(hidden[:, s:e]).float()
            targets = input_ids[:, s + 1:e + 1]
            losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))
            hits.append(logits.argmax(-1) == targets)
    return torch.cat(losses, dim=1), torch.cat(hits, dim=1)


def check_head_path(model, input_ids: torch.Tensor) -> None:
    """Refuse a model whose logits are not its output head on its last hidden state (e.g. soft-capped):
    `target_losses` would then not be the model's own losses."""
    with torch.inference_mode():
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        reference = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    if not torch.allclose(target_losses(model, input_ids, 1), reference, rtol=1e-3, atol=1e-3):
        raise ValueError(f"sliding_ppl: {type(model).__name__}'s logits are not its output head on its "
                         "last hidden state; this suite does not support it")


def auto_contexts(block: int, context: int) -> list[int]:
    """0, then powers of two from 1024 while context + block fits the model's length."""
    return [0] + [2**k for k in range(10, context.bit_length()) if 2**k + block <= context]


class Documents:
    """A data_tools dataset's documents, read on demand, end-of-document tokens dropped; checked
    against each model's tokenizer (vocabulary and EOD id) on opening."""

    def __init__(self, prefix: str, tokenizer_dirs: list):
        from ttt_train.data import indexed
        from ttt_train.data.tokenizer import load_tokenizer

        for tokenizer_dir in tokenizer_dirs:
            path = Path(tokenizer_dir) / "tokenizer.json"  # the file: the directory's config may need remote code
            if not path.is_file():
                raise FileNotFoundError(f"sliding_ppl: {path} not found; the model needs a fast tokenizer")
            tokenizer = load_tokenizer(str(path))
            indexed.check_against_tokenizer(prefix, tokenizer, require_eod=False)
        self.eod_id = tokenizer.eod_id
        self.dataset = indexed.open_dataset(prefix)
        # a lower bound of each document's length without its (possible) final EOD token
        self.min_lengths = self.dataset.sequence_lengths.astype(numpy.int64) - 1

    def __getitem__(self, i: int) -> numpy.ndarray:
        doc = self.dataset[i]
        return doc[doc != self.eod_id].astype(numpy.int64)

    def pick(self, min_length: int, count: int, what: str) -> list[int]:
        """Indices of the first `count` documents of at least `min_length` tokens (all if fewer)."""
        chosen = numpy.flatnonzero(self.min_lengths >= min_length)[:count].tolist()
        if not chosen:
            longest = int(self.min_lengths.max(initial=0))
            raise ValueError(
                f"sliding_ppl: no document has the {min_length} tokens {what} needs (longest: {longest}); "
                "lower lengths= / suite.block / suite.position_length or use a dataset of longer documents"
            )
        return chosen


def run_sliding_ppl(cfg: dict, entries: list[ModelEntry], contexts: dict[str, int], results: ResultsFile,
                    device: str) -> None:
    """Evaluate what `results` lacks (records per model, kind, length and document)."""
    suite = cfg["suite"]
    block, batch_size = suite["block"], cfg["batch_size"]
    documents = Documents(suite["dataset"], [e.hf_dir for e in entries])
    longest = min(max(contexts.values()), int(documents.min_lengths.max(initial=0)))
    wanted = cfg["lengths"] if cfg["lengths"] is not None else auto_contexts(block, longest)
    evaluated = {e.label: [c for c in wanted if c + block <= contexts[e.label]] for e in entries}
    final_docs = documents.pick(block + max(max(cs, default=0) for cs in evaluated.values()), cfg["samples"],
                                "the final block with the longest context")
    plan: dict[str, list[tuple[str, int, list[int]]]] = {}
    for entry in entries:
        position_length = min(suite["position_length"] or longest, contexts[entry.label])
        position_docs = documents.pick(position_length, cfg["samples"], "loss by position")
        todo = [("final_block", c, final_docs) for c in evaluated[entry.label]]
        todo.append(("position", position_length, position_docs))
        plan[entry.label] = [
            (kind, length, missing) for kind, length, docs in todo
            if (missing := [d for d in docs if (entry.source, kind, length, d) not in results.done])
        ]
    total = sum((length + (block if kind == "final_block" else 0)) * len(docs)
                for todo in plan.values() for kind, length, docs in todo)
    if not total:
        return
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="sliding_ppl", dynamic_ncols=True)
    for entry in entries:
        if not plan[entry.label]:
            continue
        model, _ = load_model(entry.hf_dir, dtype=cfg["dtype"], device=device,
                                 ttt_lr=cfg["ttt"]["lr"], ttt_max_update_norm=cfg["ttt"]["max_update_norm"])
        check_head_path(model, torch.as_tensor(documents[plan[entry.label][0][2][0]][:16], device=device)[None])
        for kind, length, docs in plan[entry.label]:
            for start in range(0, len(docs), batch_size):
                chunk = docs[start:start + batch_size]
                if kind == "final_block":
                    windows = [doc[len(doc) - block - length:] for doc in map(documents.__getitem__, chunk)]
                    losses = target_losses(model, torch.as_tensor(numpy.stack(windows), device=device), length + 1)
                else:
                    windows = [documents[d][:length] for d in chunk]
                    losses = target_losses(model, torch.as_tensor(numpy.stack(windows), device=device), 1)
                for d, row in zip(chunk, losses.cpu().double()):
                    record = {"suite": "sliding_ppl", "model": entry.label, "model_path": entry.source,
                              "kind": kind, "length": length, "doc": d}
                    if kind == "final_block":
                        record.update(loss_sum=float(row.sum()), tokens=row.numel())
                    else:
                        edges = numpy.linspace(1, length, suite["position_buckets"] + 1).round().astype(int)
                        record.update(
                            bucket_edges=edges.tolist(),
                            bucket_loss_sums=[float(row[a - 1:b - 1].sum()) for a, b in zip(edges, edges[1:])],
                        )
                    results.append(record)
                    bar.update(length + (block if kind == "final_block" else 0))
                bar.set_postfix_str(f"{entry.label} {kind} {length}")
        del model
        gc.collect()
    bar.close()

"""Synthetic records with recall spans (`data_tools.synthetic ... --output FILE.jsonl`) as token-level
batches: the tokens only a memory of the context can predict, marked for the loss.

A record's `recall_spans` are [start, end) character ranges of its `text` (see
`ttt_train.data.synthetic`); a token is a recall token when its characters lie inside one of them.
Used by the training driver's recall validation and by the `recall` evaluation suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import torch

from ttt_train.data.errors import DataError, DataFileNotFoundError


def read_records(path: str, count: int | None = None) -> list[dict]:
    """The first `count` (all: None) records of a JSON-lines file, each with `text` and `recall_spans`."""
    file = Path(path)
    if not file.is_file():
        raise DataFileNotFoundError(f"{path}: no such records file; write one with "
                                    "`python -m data_tools.synthetic TASK --num N --length L --output FILE.jsonl`")
    records = []
    with file.open() as f:
        for line_no, line in enumerate(f, 1):
            if len(records) == count:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_no}: not a JSON line ({error.msg})") from None
            if not isinstance(record.get("text"), str) or not isinstance(record.get("recall_spans"), list):
                raise DataError(f"{path}:{line_no}: a record needs `text` and `recall_spans` "
                                "(written by python -m data_tools.synthetic)")
            records.append(record)
    if not records:
        raise DataError(f"{path}: holds no records")
    return records


def recall_mask(offsets: list[tuple[int, int]], spans: list[list[int]]) -> numpy.ndarray:
    """bool `[n_tokens]`: token i's characters `offsets[i]` lie inside one of `spans` ([start, end))."""
    starts = numpy.array([a for a, _ in offsets], dtype=numpy.int64)
    ends = numpy.array([b for _, b in offsets], dtype=numpy.int64)
    mask = numpy.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (ends <= b) & (ends > starts)
    return mask


def encode_record(record: dict, tokenizer) -> tuple[list[int], numpy.ndarray]:
    """(token ids of the record's text, bool `[n_tokens]` recall mask) in `tokenizer`'s tokens."""
    encoding = tokenizer.backend.encode(record["text"], add_special_tokens=False)
    return encoding.ids, recall_mask(encoding.offsets, record["recall_spans"])


def recall_batch(records: list[dict], tokenizer, seq_length: int) -> dict[str, torch.Tensor]:
    """One training-format batch `[len(records), seq_length]` (tokens, labels, loss_mask, position_ids,
    doc_ids): row i is record i's text (cut to seq_length + 1 tokens, padded with EOD), and the loss
    mask selects exactly the targets that are recall tokens. Padding is a document of its own."""
    n = len(records)
    tokens = torch.full((n, seq_length + 1), tokenizer.eod_id, dtype=torch.long)
    mask = torch.zeros(n, seq_length + 1, dtype=torch.bool)
    doc_ids = torch.ones(n, seq_length, dtype=torch.long)
    for i, record in enumerate(records):
        ids, recall = encode_record(record, tokenizer)
        ids, recall = ids[:seq_length + 1], recall[:seq_length + 1]
        tokens[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = torch.from_numpy(recall)
        doc_ids[i, :len(ids)] = 0
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:].float().contiguous(),
            "position_ids": torch.arange(seq_length).expand(n, seq_length).contiguous(), "doc_ids": doc_ids}

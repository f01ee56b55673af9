"""Input documents for tokenization, and the accounting of bad ones.

Files become `Record`s (source, line, raw payload) in a fixed order; `parse_record` turns one into
its text or a `Problem`. Formats by suffix: JSON lines (.jsonl/.json/.ndjson), text (.txt), parquet
(.parquet); `.gz` works for the first two. Text files hold one document per file, per blank-line
separated block ("paragraph") or per line. Line numbers are 1-based (parquet: row numbers; blocks:
their first line).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from ttt_train.data.errors import DataError, DataFileNotFoundError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt",)
TXT_MODES = ("file", "paragraph", "line")


@dataclass(frozen=True)
class Record:
    """One input document before parsing: `payload` is a raw JSON line (kind "json"), or the text
    as bytes/str, or None when the field is absent (kind "text")."""

    source: str
    line: int
    payload: bytes | str | None
    kind: str


@dataclass(frozen=True)
class Problem:
    """Why a record is not a document. Reasons: unreadable, missing_field, not_text, empty,
    vocab_mismatch."""

    source: str
    line: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}: {self.detail}"


@dataclass
class ProblemLog:
    """Counts of problems by reason, with the first `max_examples` of each as examples."""

    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, problem: Problem) -> None:
        self.update({problem.reason: 1}, {problem.reason: [str(problem)]})

    def update(self, counts: dict[str, int], examples: dict[str, list[str]]) -> None:
        """Fold in another log's `counts` and `examples` (e.g. one piece's, read back from JSON)."""
        for reason, n in counts.items():
            self.counts[reason] += n
            shown = self.examples.setdefault(reason, [])
            shown.extend(examples.get(reason, [])[: self.max_examples - len(shown)])

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}

    def lines(self) -> list[str]:
        out = []
        for reason, n in sorted(self.counts.items()):
            out.append(f"  {reason}: {n}")
            out.extend(f"    {example}" for example in self.examples.get(reason, []))
        return out


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by `patterns` (paths or globs), each glob sorted, duplicates dropped; a pattern
    matching nothing or a file of unknown format is refused."""
    files: list[str] = []
    for pattern in patterns:
        matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
        if not matches:
            raise DataFileNotFoundError(
                f"input {pattern!r}: no such file; check the path or the glob's quoting"
            )
        for path in matches:
            input_format(path)
            if path not in files:
                files.append(path)
    return files


def input_format(path: str) -> str:
    """ "json", "text" or "parquet", from the file name."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if path.endswith(".parquet"):
        return "parquet"
    raise DataError(
        f"input {path!r}: unknown format; rename it or convert it to .jsonl/.json/.ndjson/.txt[.gz] or .parquet"
    )


def iter_records(path: str, text_field: str, txt_mode: str) -> Iterator[Record]:
    fmt = input_format(path)
    if fmt == "parquet":
        yield from _parquet_records(path, text_field)
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        if fmt == "json":
            for number, line in enumerate(f, start=1):
                yield Record(path, number, line, "json")
        elif txt_mode == "file":
            yield Record(path, 1, f.read(), "text")
        elif txt_mode == "line":
            for number, line in enumerate(f, start=1):
                yield Record(path, number, line.rstrip(b"\r\n"), "text")
        else:
            yield from _paragraphs(path, f)


def _paragraphs(path: str, f) -> Iterator[Record]:
    block: list[bytes] = []
    start = 0
    for number, line in enumerate(f, start=1):
        if line.strip():
            start = start or number
            block.append(line)
        elif block:
            yield Record(path, start, b"".join(block).rstrip(b"\r\n"), "text")
            block, start = [], 0
    if block:
        yield Record(path, start, b"".join(block).rstrip(b"\r\n"), "text")


def _parquet_records(path: str, text_field: str) -> Iterator[Record]:
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        for row in range(1, parquet.metadata.num_rows + 1):
            yield Record(path, row, None, "text")
        return
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield Record(path, row, value, "text")


def parse_record(record: Record, text_field: str) -> str | Problem:
    """The document text of `record`, or the Problem that keeps it out."""

    def problem(reason: str, detail: str) -> Problem:
        return Problem(record.source, record.line, reason, detail)

    payload = record.payload
    if record.kind == "json":
        if not payload.strip():
            return problem("empty", "blank line")
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return problem("unreadable", f"not a JSON line ({err})")
        if not isinstance(obj, dict):
            return problem("unreadable", f"a JSON {type(obj).__name__}, not an object")
        payload = obj.get(text_field)
        if payload is None:
            return problem("missing_field", f"no field {text_field!r}")
    elif payload is None:
        return problem("missing_field", f"no field {text_field!r}")
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as err:
            return problem("unreadable", f"invalid UTF-8 ({err})")
    if not isinstance(payload, str):
        return problem("not_text", f"field {text_field!r} is a {type(payload).__name__}, not a string")
    if not payload.strip():
        return problem("empty", "empty document")
    return payload

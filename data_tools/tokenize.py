r"""Tokenize JSON-lines / text / parquet documents into a megatron-core indexed dataset (.bin/.idx).

    python -m data_tools.tokenize 'corpus/*.jsonl' --tokenizer /models/Qwen3-8B-Base \
        --output-prefix data/corpus --workers 8

The input records are cut into pieces of --docs-per-piece consecutive records (a fixed function of
the inputs), tokenized by --workers processes, and each piece is written as a small dataset under
OUTPUT_PREFIX.pieces/ followed by a JSON of its counts. When all pieces exist they are merged in
order into OUTPUT_PREFIX.bin/.idx, with OUTPUT_PREFIX.meta.json describing the build. An interrupted
run continues with --resume, redoing only the missing pieces: the output is byte-identical to an
uninterrupted run's, whatever the number of workers.

Bad records (unreadable line, missing field, non-string or empty text, token ids >= --vocab-size)
are reported with file:line and counted; --on-error skip skips them, --on-error fail stops at the
first one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy
from tqdm import tqdm

from data_tools.cli import doc_parser
from data_tools.readers import (
    TXT_MODES,
    Problem,
    ProblemLog,
    Record,
    expand_inputs,
    iter_records,
    parse_record,
)
from ttt_train.data.tokenizer import load_tokenizer


class InputError(ValueError):
    """A bad record under --on-error fail; the message is `file:line: reason: detail`."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines a piece's content (recorded in the manifest of a run)."""

    tokenizer: str
    eod_token: str | None
    text_field: str
    txt_mode: str
    append_eod: bool
    on_error: str
    vocab_size: int
    dtype: str
    docs_per_piece: int
    max_examples: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = doc_parser("python -m data_tools.tokenize", __doc__)
    parser.add_argument(
        "inputs", nargs="+", help="input files or globs (.jsonl/.json/.ndjson/.txt[.gz], .parquet)"
    )
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx/.meta.json")
    parser.add_argument(
        "--tokenizer", default="byte", help="'byte', a tokenizer.json or a local HF tokenizer dir"
    )
    parser.add_argument("--eod-token", default=None, help="EOD token string (default: the tokenizer's)")
    parser.add_argument("--text-field", default="text", help="field holding the text (JSON lines, parquet)")
    parser.add_argument(
        "--txt-mode",
        choices=TXT_MODES,
        default="file",
        help="a .txt file holds one document per: file, blank-line block, line",
    )
    parser.add_argument(
        "--append-eod", action=argparse.BooleanOptionalAction, default=True, help="end each document with EOD"
    )
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="what a bad record does")
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="refuse token ids >= this (default: tokenizer's)"
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--docs-per-piece", type=int, default=10000, help="records per resumable piece")
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run of the same command"
    )
    parser.add_argument("--keep-pieces", action="store_true", help="keep OUTPUT_PREFIX.pieces/ after merging")
    parser.add_argument("--max-examples", type=int, default=5, help="file:line examples shown per problem")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.docs_per_piece < 1:
        parser.error("--workers and --docs-per-piece must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ttt_train.data import indexed  # imports megatron (seconds): after --help

    started = time.time()
    prefix = args.output_prefix
    files = expand_inputs(args.inputs)
    tokenizer = load_tokenizer(args.tokenizer, args.eod_token)
    vocab_size = args.vocab_size or tokenizer.vocab_size
    if args.append_eod and tokenizer.eod_id >= vocab_size:
        raise ValueError(f"the EOD id {tokenizer.eod_id} is >= --vocab-size {vocab_size}")
    settings = Settings(
        tokenizer=args.tokenizer,
        eod_token=args.eod_token,
        text_field=args.text_field,
        txt_mode=args.txt_mode,
        append_eod=args.append_eod,
        on_error=args.on_error,
        vocab_size=vocab_size,
        dtype=indexed.token_dtype(vocab_size).__name__,
        docs_per_piece=args.docs_per_piece,
        max_examples=args.max_examples,
    )
    if os.path.exists(prefix + ".bin") or os.path.exists(prefix + ".idx"):
        raise FileExistsError(f"output {prefix}.bin/.idx already exists: delete it to rebuild")
    manifest = {
        "settings": dataclasses.asdict(settings),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "inputs": [
            {"path": p, "size": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns} for p in files
        ],
    }
    workdir = prefix + ".pieces"
    _prepare_workdir(workdir, manifest, args.resume)

    records = itertools.chain.from_iterable(iter_records(p, args.text_field, args.txt_mode) for p in files)
    bar = tqdm(desc="tokenize", unit="doc", file=sys.stderr, dynamic_ncols=True)
    counts = {"pieces": 0, "reused": 0, "tokens": 0}

    def pending() -> Iterator[tuple[int, list[Record]]]:
        for index, piece in enumerate(_chunks(records, settings.docs_per_piece)):
            counts["pieces"] += 1
            if os.path.exists(_piece(workdir, index) + ".json"):
                counts["reused"] += 1
                bar.update(len(piece))
                continue
            yield index, piece

    work = functools.partial(tokenize_piece, workdir=workdir, settings=settings)
    try:
        for stats in _run_ordered(work, pending(), args.workers):
            counts["tokens"] += stats["tokens"]
            bar.update(stats["records"])
            bar.set_postfix(tokens=counts["tokens"])
    except InputError as err:
        bar.close()
        print(
            f"error: {err}\nrefused (--on-error fail); fix the input and rerun, or use --on-error skip",
            file=sys.stderr,
        )
        return 1
    bar.close()

    pieces = [_piece(workdir, i) for i in range(counts["pieces"])]
    piece_stats = []
    for piece in pieces:
        with open(piece + ".json") as f:
            piece_stats.append(json.load(f))
    indexed.merge_datasets(pieces, prefix, indexed.token_dtype(vocab_size))
    problems = ProblemLog(args.max_examples)
    for stats in piece_stats:
        problems.update(stats["problems"]["counts"], stats["problems"]["examples"])
    total = {key: sum(s[key] for s in piece_stats) for key in ("records", "documents", "tokens")}
    meta = {
        "tool": "data_tools.tokenize",
        "tokenizer": args.tokenizer,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": vocab_size,
        "eod_id": tokenizer.eod_id,
        "eod_delimited": args.append_eod,
        "dtype": settings.dtype,
        "documents": total["documents"],
        "tokens": total["tokens"],
        "max_token_id": max((s["max_token_id"] for s in piece_stats), default=-1),
        "inputs": files,
        "text_field": args.text_field,
        "skipped": dict(problems.counts),
    }
    indexed.write_sidecar(prefix, meta)
    if not args.keep_pieces:
        shutil.rmtree(workdir)
    _print_summary(prefix, meta, total, problems, counts, time.time() - started)
    return 0


def tokenize_piece(index: int, records: list[Record], workdir: str, settings: Settings) -> dict:
    """Tokenize one piece into `workdir`: its .bin/.idx, then its .json (the piece is done once the
    .json exists). Returns the piece's counts; raises InputError on a bad record under "fail"."""
    from ttt_train.data import indexed

    tokenizer = _tokenizer(settings.tokenizer, settings.eod_token)
    problems = ProblemLog(settings.max_examples)
    texts, sources = [], []
    for record in records:
        parsed = parse_record(record, settings.text_field)
        if isinstance(parsed, Problem):
            _reject(parsed, problems, settings)
        else:
            texts.append(parsed)
            sources.append(record)
    documents = []
    for record, ids in zip(sources, tokenizer.encode_batch(texts)):
        if settings.append_eod:
            ids.append(tokenizer.eod_id)
        if not ids:
            problem = Problem(record.source, record.line, "empty", "no tokens")
        elif max(ids) >= settings.vocab_size:
            detail = f"token id {max(ids)} >= vocab size {settings.vocab_size}"
            problem = Problem(record.source, record.line, "vocab_mismatch", detail)
        else:
            documents.append(numpy.asarray(ids))
            continue
        _reject(problem, problems, settings)

    piece = _piece(workdir, index)
    num_docs, num_tokens = indexed.write_documents(
        piece + ".tmp", documents, numpy.dtype(settings.dtype).type
    )
    os.replace(piece + ".tmp.bin", piece + ".bin")
    os.replace(piece + ".tmp.idx", piece + ".idx")
    stats = {
        "records": len(records),
        "documents": num_docs,
        "tokens": num_tokens,
        "max_token_id": max((int(d.max()) for d in documents), default=-1),
        "problems": problems.as_dict(),
    }
    _write_json(piece + ".json", stats)
    return stats


def _reject(problem: Problem, problems: ProblemLog, settings: Settings) -> None:
    if settings.on_error == "fail":
        raise InputError(str(problem))
    problems.add(problem)


@functools.cache
def _tokenizer(spec: str, eod_token: str | None):
    """One tokenizer per process (worker processes load their own)."""
    return load_tokenizer(spec, eod_token)


def _piece(workdir: str, index: int) -> str:
    return os.path.join(workdir, f"piece_{index:06d}")


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _run_ordered(fn: Callable, tasks: Iterable[tuple], workers: int) -> Iterator:
    """fn(*task) for each task, results in task order; with workers > 1 in a process pool holding
    at most 2 * workers tasks in flight (so memory stays bounded on large inputs)."""
    if workers == 1:
        for task in tasks:
            yield fn(*task)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        inflight: deque = deque()
        for task in tasks:
            inflight.append(pool.submit(fn, *task))
            if len(inflight) >= 2 * workers:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()


def _prepare_workdir(workdir: str, manifest: dict, resume: bool) -> None:
    path = os.path.join(workdir, "manifest.json")
    if os.path.exists(workdir):
        if not resume:
            raise FileExistsError(
                f"{workdir} holds an interrupted run: pass --resume to continue it, or delete it"
            )
        with open(path) as f:
            previous = json.load(f)
        if previous != manifest:
            changed = sorted(k for k in manifest if previous.get(k) != manifest[k])
            raise ValueError(
                f"cannot resume {workdir}: the run differs in {', '.join(changed)}; delete it to start over"
            )
        return
    os.makedirs(workdir)
    _write_json(path, manifest)


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _print_summary(
    prefix: str, meta: dict, total: dict, problems: ProblemLog, counts: dict, seconds: float
) -> None:
    docs, tokens = total["documents"], total["tokens"]
    lines = [
        f"wrote {prefix}.bin/.idx ({meta['dtype']}) and {prefix}.meta.json",
        f"  files: {len(meta['inputs'])}  records: {total['records']}  documents: {docs}  tokens: {tokens}"
        + (f"  mean length: {tokens / docs:.1f}" if docs else ""),
        f"  pieces: {counts['pieces']} ({counts['reused']} reused from an interrupted run)",
        f"  skipped: {sum(problems.counts.values())}",
        *problems.lines(),
        f"  time: {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

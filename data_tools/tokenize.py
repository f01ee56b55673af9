r"""Tokenize JSON-lines / text / parquet documents into a megatron-core indexed dataset (.bin/.idx).

    python -m data_tools.tokenize 'corpus/*.jsonl' --tokenizer /models/Qwen3-8B-Base \
        --output-prefix data/corpus --workers 8

The input records are cut into pieces of --docs-per-piece consecutive records (a fixed function of
the inputs), tokenized by --workers processes, and each piece is written as a small dataset under
OUTPUT_PREFIX.pieces/ followed by a JSON of its counts. When all pieces exist they are merged in
order into OUTPUT_PREFIX.bin/.idx, with OUTPUT_PREFIX.meta.json describing the build (written
atomically; existing outputs are replaced only with --force, never an input). An interrupted run
continues with --resume: a piece is reused only when its records are unchanged (their sha256) and its
files match its marker, any other is redone, so the output is byte-identical to an uninterrupted
run's on the current inputs, whatever the number of workers.

Bad records (unreadable line, missing field, non-string or empty text, token ids >= --vocab-size)
are reported with file:line and counted; --on-error skip skips them, --on-error fail stops at the
first one (fix it, then continue with --resume as the message says). A run that would write no
document fails with the counts of skipped records by reason, and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shlex
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy
from tqdm import tqdm

from data_tools import cli
from data_tools.readers import (
    TXT_MODES,
    Problem,
    ProblemLog,
    Record,
    expand_inputs,
    iter_records,
    parse_record,
)
from ttt_train.data.errors import DataError, DataFileExistsError
from ttt_train.data.tokenizer import load_tokenizer

PROG = "python -m data_tools.tokenize"
# Settings that do not change a piece's data, left out of the manifest a resumed run must match.
_NOT_IN_MANIFEST = ("on_error", "max_examples")


class InputError(ValueError):
    """A bad record under --on-error fail; the message is `file:line: reason: detail`."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What tokenizing a piece needs; all but `_NOT_IN_MANIFEST` is recorded in the run's manifest."""

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
    parser = cli.doc_parser(PROG, __doc__)
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
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing outputs; without --resume, discard an interrupted run",
    )
    parser.add_argument("--keep-pieces", action="store_true", help="keep OUTPUT_PREFIX.pieces/ after merging")
    parser.add_argument("--max-examples", type=int, default=5, help="file:line examples shown per problem")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.docs_per_piece < 1:
        parser.error("--workers and --docs-per-piece must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, PROG)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from ttt_train.data import indexed  # imports megatron (seconds): after --help

    started = time.time()
    prefix = args.output_prefix
    files = expand_inputs(args.inputs)
    workdir = prefix + ".pieces"
    outputs = [prefix + suffix for suffix in indexed.SUFFIXES]
    cli.check_outputs([*outputs, workdir], [*files, *cli.tokenizer_files(args.tokenizer)])
    cli.refuse_existing(outputs, args.force)
    tokenizer = load_tokenizer(args.tokenizer, args.eod_token)
    vocab_size = args.vocab_size or tokenizer.vocab_size
    if args.append_eod and tokenizer.eod_id >= vocab_size:
        raise DataError(f"the EOD id {tokenizer.eod_id} is >= --vocab-size {vocab_size}: raise --vocab-size")
    settings = Settings(
        tokenizer=tokenizer.spec,
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
    recorded = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_IN_MANIFEST}
    manifest = {"settings": recorded, "tokenizer_fingerprint": tokenizer.fingerprint}
    _prepare_workdir(workdir, manifest, args.resume, args.force)

    records = itertools.chain.from_iterable(iter_records(p, args.text_field, args.txt_mode) for p in files)
    bar = tqdm(desc="tokenize", unit="doc", file=sys.stderr, dynamic_ncols=True)
    counts = {"pieces": 0, "reused": 0, "redone": 0, "tokens": 0}

    def pending() -> Iterator[tuple[int, list[Record]]]:
        for index, piece in enumerate(_chunks(records, settings.docs_per_piece)):
            counts["pieces"] += 1
            state = _piece_state(_piece(workdir, index), _records_sha256(piece))
            if state == "done":
                counts["reused"] += 1
                bar.update(len(piece))
                continue
            counts["redone"] += state == "stale"
            yield index, piece

    work = functools.partial(tokenize_piece, workdir=workdir, settings=settings)
    try:
        for stats in _run_ordered(work, pending(), args.workers):
            counts["tokens"] += stats["tokens"]
            bar.update(stats["records"])
            bar.set_postfix(tokens=counts["tokens"])
    except InputError as err:
        bar.close()
        argv = list(sys.argv[1:] if argv is None else argv)
        command = shlex.join([*PROG.split(), *argv, *([] if "--resume" in argv else ["--resume"])])
        print(
            f"{PROG}: error: {err}\nrefused (--on-error fail). Fix that record, then continue (the "
            f"pieces done so far are kept and checked) with:\n  {command}\n"
            "or add --on-error skip to that command to skip bad records instead",
            file=sys.stderr,
        )
        return 1
    bar.close()

    pieces = [_piece(workdir, i) for i in range(counts["pieces"])]
    piece_stats = []
    for piece in pieces:
        with open(piece + ".json") as f:
            piece_stats.append(json.load(f))
    problems = ProblemLog(args.max_examples)
    for stats in piece_stats:
        problems.update(stats["problems"]["counts"], stats["problems"]["examples"])
    total = {key: sum(s[key] for s in piece_stats) for key in ("records", "documents", "tokens")}
    if total["documents"] == 0:
        shutil.rmtree(workdir)
        print(
            f"{PROG}: error: no document to write ({total['records']} records in {len(files)} files, "
            f"{sum(problems.counts.values())} skipped); nothing was written. Skipped by reason:",
            *problems.lines(),
            sep="\n",
            file=sys.stderr,
        )
        return 1
    meta = {
        **indexed.sidecar_fields(
            "data_tools.tokenize", tokenizer, vocab_size=vocab_size, dtype=settings.dtype,
            documents=total["documents"], tokens=total["tokens"],
            max_token_id=max(s["max_token_id"] for s in piece_stats), eod_delimited=args.append_eod,
            tokenizer_name=args.tokenizer,
        ),
        "inputs": [os.path.abspath(p) for p in files],
        "text_field": args.text_field,
        "skipped": dict(problems.counts),
    }
    with indexed.atomic_outputs(prefix) as tmp:
        indexed.merge_datasets(pieces, tmp, indexed.token_dtype(vocab_size))
        indexed.write_sidecar(tmp, meta)
    if not args.keep_pieces:
        shutil.rmtree(workdir)
    _print_summary(prefix, meta, total, problems, counts, time.time() - started)
    return 0


def tokenize_piece(index: int, records: list[Record], workdir: str, settings: Settings) -> dict:
    """Tokenize one piece into `workdir`: its .bin/.idx, then its .json marker (counts, and the sha256
    of its records and of its two files: see `_piece_state`). Returns the piece's counts; raises
    InputError on a bad record under "fail"."""
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
    num_docs, num_tokens, largest = indexed.write_documents(
        piece + ".tmp", documents, numpy.dtype(settings.dtype).type
    )
    for suffix in (".bin", ".idx"):
        os.replace(piece + ".tmp" + suffix, piece + suffix)
    stats = {
        "records": len(records),
        "documents": num_docs,
        "tokens": num_tokens,
        "max_token_id": largest,
        "problems": problems.as_dict(),
        "records_sha256": _records_sha256(records),
        "files_sha256": _files_sha256(piece),
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


def _records_sha256(records: list[Record]) -> str:
    """sha256 of the records (where each comes from and its raw content): a changed input changes it."""
    digest = hashlib.sha256()
    for record in records:
        payload = record.payload.encode() if isinstance(record.payload, str) else record.payload
        digest.update(f"{record.source}\0{record.line}\0{record.kind}\0{payload is None}\0".encode())
        digest.update(b"%d\0" % len(payload or b""))
        digest.update(payload or b"")
    return digest.hexdigest()


def _files_sha256(piece: str) -> dict[str, str]:
    digests = {}
    for suffix in (".bin", ".idx"):
        with open(piece + suffix, "rb") as f:
            digests[suffix] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def _piece_state(piece: str, records_sha256: str) -> str:
    """ "done" when the piece's marker is for these records and its files are the ones it describes
    (a crash may leave a marker whose data files are missing or cut), "stale" when a marker exists
    but is not, "new" when there is none."""
    try:
        with open(piece + ".json") as f:
            marker = json.load(f)
        ok = marker.get("records_sha256") == records_sha256 and marker.get("files_sha256") == _files_sha256(
            piece
        )
    except (OSError, ValueError):
        return "stale" if os.path.exists(piece + ".json") else "new"
    return "done" if ok else "stale"


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


def _prepare_workdir(workdir: str, manifest: dict, resume: bool, force: bool) -> None:
    path = os.path.join(workdir, "manifest.json")
    if os.path.exists(workdir):
        if not resume:
            if not force:
                raise DataFileExistsError(
                    f"{workdir} holds an interrupted run: continue it with --resume, or start over with --force"
                )
            shutil.rmtree(workdir)
        else:
            try:
                with open(path) as f:
                    previous = json.load(f)
            except (OSError, ValueError):
                previous = {}
            if previous != manifest:
                changed = sorted(
                    k
                    for k in manifest["settings"]
                    if previous.get("settings", {}).get(k) != manifest["settings"][k]
                )
                if previous.get("tokenizer_fingerprint") != manifest["tokenizer_fingerprint"]:
                    changed.append("tokenizer (fingerprint)")
                raise DataError(
                    f"cannot resume {workdir}: the run differs in {', '.join(changed) or 'its manifest'}; "
                    "rerun with the same options, or start over with --force instead of --resume"
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
        f"  tokenizer: {meta['tokenizer']} (vocab {meta['vocab_size']}, EOD id {meta['eod_id']}, "
        f"fingerprint {meta['tokenizer_fingerprint'][:12]}): train with data.tokenizer={meta['tokenizer']}",
        f"  files: {len(meta['inputs'])}  records: {total['records']}  documents: {docs}  tokens: {tokens}"
        + (f"  mean length: {tokens / docs:.1f}" if docs else ""),
        f"  pieces: {counts['pieces']} ({counts['reused']} reused from an interrupted run, "
        f"{counts['redone']} redone: input or files changed since)",
        f"  skipped: {sum(problems.counts.values())}",
        *problems.lines(),
        f"  time: {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

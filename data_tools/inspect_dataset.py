"""Describe a megatron-core indexed dataset: documents, tokens, a length histogram, a decoded sample.

    python -m data_tools.inspect_dataset data/corpus --sample 3
    python -m data_tools.inspect_dataset data/corpus --json

With a tokenizer (--tokenizer, else the one named in PREFIX.meta.json) it also checks the token ids
against the vocabulary and counts the documents that do not end with EOD; a tokenizer other than the
one PREFIX.meta.json records (by fingerprint) is refused.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy

from data_tools import cli

PROG = "python -m data_tools.inspect_dataset"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.doc_parser(PROG, __doc__)
    parser.add_argument("prefix", help="dataset prefix (PREFIX.bin/.idx)")
    parser.add_argument(
        "--tokenizer", default=None, help="'byte', a tokenizer.json or a local HF tokenizer dir"
    )
    parser.add_argument("--sample", type=int, default=0, help="index of the document to decode")
    parser.add_argument("--max-chars", type=int, default=500, help="characters of the sample to show")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser.parse_args(argv)


def length_histogram(lengths: numpy.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, count) per power-of-two bin [low, high) covering all lengths."""
    top = int(lengths.max(initial=0)) + 1
    edges = [0] + [2**k for k in range(max(1, (top - 1).bit_length() + 1))]
    counts, _ = numpy.histogram(lengths, bins=edges)
    return [(lo, hi, int(n)) for lo, hi, n in zip(edges[:-1], edges[1:], counts) if n]


def length_stats(lengths: numpy.ndarray) -> dict:
    if not lengths.size:
        return {"min": 0, "mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0}
    return {
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "median": float(numpy.median(lengths)),
        "p90": float(numpy.percentile(lengths, 90)),
        "max": int(lengths.max()),
    }


def describe(prefix: str, tokenizer_spec: str | None, sample: int, max_chars: int) -> dict:
    from ttt_train.data import indexed
    from ttt_train.data.tokenizer import load_tokenizer

    dataset = indexed.open_dataset(prefix)
    meta = indexed.read_sidecar(prefix)
    spec = tokenizer_spec or indexed.sidecar_tokenizer(prefix, meta)
    tokenizer = None if spec is None else load_tokenizer(spec)
    if tokenizer is not None:
        indexed.check_fingerprint(prefix, meta, tokenizer)
    lengths = dataset.sequence_lengths.astype(numpy.int64)
    report = {
        "prefix": prefix,
        "dtype": dataset.index.dtype.__name__,
        "documents": int(lengths.size),
        "megatron_documents": int(dataset.document_indices.size - 1),
        "tokens": int(lengths.sum()),
        "length": length_stats(lengths),
        "histogram": length_histogram(lengths),
        "meta": meta,
        "max_token_id": indexed.max_token_id(dataset, prefix, progress=True),
    }
    if tokenizer is None:
        return report
    report["tokenizer"] = {"name": spec, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id}
    report["ids_within_vocab"] = report["max_token_id"] < tokenizer.vocab_size
    report["documents_without_eod"] = int(
        indexed.sequences_without_eod(dataset, prefix, tokenizer.eod_id).size
    )
    if 0 <= sample < lengths.size:
        text = tokenizer.decode(dataset[sample])
        report["sample"] = {
            "index": sample,
            "tokens": int(lengths[sample]),
            "text": text[:max_chars],
            "chars": len(text),
        }
    return report


def format_text(report: dict) -> str:
    length = report["length"]
    lines = [
        f"dataset {report['prefix']} ({report['dtype']})",
        f"  documents: {report['documents']}  tokens: {report['tokens']}  largest token id: {report['max_token_id']}",
        f"  length: min {length['min']}  mean {length['mean']:.1f}  median {length['median']:.0f}  "
        f"p90 {length['p90']:.0f}  max {length['max']}",
        "  length histogram (tokens):",
    ]
    peak = max((n for _, _, n in report["histogram"]), default=1)
    for lo, hi, n in report["histogram"]:
        lines.append(f"    [{lo:>9}, {hi:>9})  {n:>9}  {'#' * max(1, round(40 * n / peak))}")
    if report["meta"]:
        lines.append(
            f"  built by {report['meta'].get('tool')} with tokenizer {report['meta'].get('tokenizer')}"
        )
    if "tokenizer" in report:
        tok = report["tokenizer"]
        verdict = "ok" if report["ids_within_vocab"] else "MISMATCH: ids >= vocab size"
        lines.append(
            f"  tokenizer {tok['name']}: vocab {tok['vocab_size']} ({verdict}), EOD id {tok['eod_id']}"
        )
        lines.append(f"  documents not ending with EOD: {report['documents_without_eod']}")
    if "sample" in report:
        sample = report["sample"]
        lines.append(
            f"  document {sample['index']} ({sample['tokens']} tokens, first {len(sample['text'])} of {sample['chars']} chars):"
        )
        lines.append("    " + sample["text"].replace("\n", "\n    "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, PROG)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    report = describe(args.prefix, args.tokenizer, args.sample, args.max_chars)
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

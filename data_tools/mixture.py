r"""Build a long-context training mixture from tokenized datasets, e.g. the stage-2 blend of long
natural documents with shorter ones packed.

    python -m data_tools.mixture --source data/books 0.5 --source data/web 0.5 \
        --seq-length 131072 --min-length 65536 --output-prefix data/stage2 --tokenizer /models/Qwen3

Each source gets WEIGHT of the output tokens, drawn as whole documents in a seeded random order
(repeating the source in fresh orders when its share exceeds it). Documents of at least
--min-length tokens ("long") are kept whole; with --short pack the shorter ones are packed after
them, and --short drop leaves them out. Every output sequence is a long document followed by short
documents filling it up to the next multiple of --seq-length, or a pack of exactly --seq-length
tokens of short documents, so megatron's GPTDataset (which concatenates sequences and cuts samples
every --seq-length tokens) starts every sample at the start of a long document or of a pack. A short
document that overflows is continued at the start of another sequence; the packed leftover that is
shorter than one sequence is left out and reported. Documents keep their EOD tokens, so document
boundaries survive packing (the TTT fast weights reset at them). Sequences are written in a seeded
random order, so megatron's train/valid/test split draws from the whole mixture. Writes
OUTPUT_PREFIX.bin/.idx and OUTPUT_PREFIX.meta.json describing the blend, atomically; existing
outputs are replaced only with --force, and never a source. A mixture with no sequence fails with
the counts of what was left out, writing nothing (exit code 1). One where most sequences are short
of a multiple of --seq-length (their samples would start inside other sequences) is refused (exit
code 2, nothing written) unless --allow-partial.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy
from tqdm import tqdm

from data_tools import cli
from ttt_train.data.errors import DataError

PROG = "python -m data_tools.mixture"

# A span is (source index, document index, offset, length): a slice of one source document.
Span = tuple[int, int, int, int]


@dataclass
class Plan:
    """Output sequences as lists of spans, in output order, with what was drawn from each source."""

    units: list[list[Span]]
    drawn: list[dict] = field(default_factory=list)
    long_documents: int = 0
    short_documents: int = 0
    split_documents: int = 0
    partial_units: int = 0
    leftover_tokens: int = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.doc_parser(PROG, __doc__)
    parser.add_argument(
        "--source",
        nargs=2,
        action="append",
        required=True,
        metavar=("PREFIX", "WEIGHT"),
        help="a dataset and its share",
    )
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx/.meta.json")
    parser.add_argument("--seq-length", type=int, required=True, help="training sequence length of the stage")
    parser.add_argument(
        "--min-length", type=int, required=True, help="documents this long (tokens, EOD included) are long"
    )
    parser.add_argument(
        "--short", choices=("pack", "drop"), default="pack", help="what happens to shorter documents"
    )
    parser.add_argument(
        "--num-tokens", type=int, default=None, help="output tokens (default: no source repeated)"
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the draws, packing and order")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer that built the sources (default: the one their .meta.json names)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output (never a source)")
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="write the mixture even when most sequences are short of a multiple of --seq-length",
    )
    args = parser.parse_args(argv)
    try:
        args.source = [(prefix, float(weight)) for prefix, weight in args.source]
    except ValueError:
        parser.error("--source takes PREFIX WEIGHT with a numeric WEIGHT")
    if any(w <= 0 for _, w in args.source) or args.seq_length < 1 or args.min_length < 0:
        parser.error("weights and --seq-length must be > 0, --min-length >= 0")
    if args.num_tokens is not None and args.num_tokens < 1:
        parser.error(f"--num-tokens must be >= 1, got {args.num_tokens}")
    return args


def plan_mixture(
    lengths: list[numpy.ndarray],
    weights: list[float],
    seq_length: int,
    min_length: int,
    pack_short: bool,
    num_tokens: int | None,
    seed: int,
    names: list[str] | None = None,
) -> Plan:
    """Plan the mixture from the document lengths of each source (see the module docstring);
    `names` name the sources in errors."""
    names = names or [f"source {i}" for i in range(len(lengths))]
    if len(weights) != len(lengths):
        raise DataError(f"{len(lengths)} sources but {len(weights)} weights")
    rng = numpy.random.default_rng(seed)
    eligible = [numpy.arange(n.size) if pack_short else numpy.flatnonzero(n >= min_length) for n in lengths]
    available = [int(n[e].sum()) for n, e in zip(lengths, eligible)]
    weights = [w / sum(weights) for w in weights]
    for name, tokens in zip(names, available):
        if tokens == 0:
            raise DataError(
                f"{name} has no documents to draw (none of at least --min-length {min_length} tokens); "
                "lower --min-length or use --short pack"
            )
    total = num_tokens if num_tokens is not None else int(min(a / w for a, w in zip(available, weights)))

    plan = Plan(units=[])
    long: list[tuple[int, int]] = []
    short: list[tuple[int, int]] = []
    for i, (n, e, w) in enumerate(zip(lengths, eligible, weights)):
        docs, epochs = _draw(n, e, w * total, rng)
        plan.drawn.append(
            {
                "documents": len(docs),
                "tokens": int(n[docs].sum()),
                "epochs": epochs,
                "target_tokens": int(w * total),
            }
        )
        for d in docs:
            (long if n[d] >= min_length else short).append((i, int(d)))
    long = [long[j] for j in rng.permutation(len(long))]
    short = [short[j] for j in rng.permutation(len(short))]
    plan.long_documents, plan.short_documents = len(long), len(short)

    stream = _ShortStream(short, lengths)
    for i, d in long:
        size = int(lengths[i][d])
        unit = [(i, d, 0, size)] + stream.take(-size % seq_length)
        plan.partial_units += sum(s[3] for s in unit) % seq_length != 0
        plan.units.append(unit)
    while (unit := stream.take(seq_length)) and sum(s[3] for s in unit) == seq_length:
        plan.units.append(unit)
    plan.leftover_tokens = sum(s[3] for s in unit)
    plan.split_documents = stream.split
    plan.units = [plan.units[j] for j in rng.permutation(len(plan.units))]
    return plan


def _draw(lengths: numpy.ndarray, eligible: numpy.ndarray, budget: float, rng: numpy.random.Generator):
    """Documents in seeded random orders (a fresh order per pass) until `budget` tokens are reached."""
    docs, total, epochs = [], 0, 0
    while total < budget:
        order = rng.permutation(eligible)
        epochs += 1
        cumulative = numpy.cumsum(lengths[order])
        take = min(int(numpy.searchsorted(cumulative, budget - total)) + 1, order.size)
        docs.append(order[:take])
        total += int(cumulative[take - 1])
    return (numpy.concatenate(docs) if docs else numpy.zeros(0, dtype=numpy.int64)), epochs


class _ShortStream:
    """The short documents as one token stream, taken in spans; counts the documents cut."""

    def __init__(self, docs: list[tuple[int, int]], lengths: list[numpy.ndarray]):
        self.docs, self.lengths = docs, lengths
        self.index = self.offset = self.split = 0

    def take(self, count: int) -> list[Span]:
        spans: list[Span] = []
        while count > 0 and self.index < len(self.docs):
            i, d = self.docs[self.index]
            size = min(count, int(self.lengths[i][d]) - self.offset)
            spans.append((i, d, self.offset, size))
            count -= size
            self.offset += size
            if self.offset == self.lengths[i][d]:
                self.index, self.offset = self.index + 1, 0
        if spans and spans[-1][2] == 0 and spans[-1][3] < self.lengths[spans[-1][0]][spans[-1][1]]:
            self.split += 1  # a document's first part ends this take: it is continued in the next
        return spans


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, PROG)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from ttt_train.data import indexed  # imports megatron (seconds): after --help
    from ttt_train.data.tokenizer import load_tokenizer

    started = time.time()
    prefixes = [prefix for prefix, _ in args.source]
    weights = [weight for _, weight in args.source]
    datasets = [indexed.open_dataset(prefix) for prefix in prefixes]
    spec = args.tokenizer or indexed.sidecar_tokenizer(prefixes[0], indexed.read_sidecar(prefixes[0]))
    if spec is None:
        raise DataError(f"{indexed.sidecar_path(prefixes[0])} names no tokenizer: pass --tokenizer")
    outputs = [args.output_prefix + suffix for suffix in indexed.SUFFIXES]
    sources = [prefix + suffix for prefix in prefixes for suffix in indexed.SUFFIXES]
    cli.check_outputs(outputs, [*sources, *cli.tokenizer_files(spec)])
    cli.refuse_existing(outputs, args.force)
    tokenizer = load_tokenizer(spec)
    for prefix in prefixes:
        indexed.check_against_tokenizer(prefix, tokenizer, require_eod=True)
    lengths = [d.sequence_lengths.astype(numpy.int64) for d in datasets]
    plan = plan_mixture(
        lengths,
        weights,
        args.seq_length,
        args.min_length,
        args.short == "pack",
        args.num_tokens,
        args.seed,
        prefixes,
    )
    if not plan.units:  # no long document, and fewer short tokens than one sequence
        print(
            f"{PROG}: error: no sequence to write; nothing was written. Left out:",
            f"  long documents (>= --min-length {args.min_length}): none",
            f"  short documents: {plan.short_documents}, {plan.leftover_tokens} tokens: fewer than one "
            f"--seq-length {args.seq_length}",
            "Lower --seq-length or --min-length, or add data.",
            sep="\n",
            file=sys.stderr,
        )
        return 1
    if plan.partial_units * 2 > len(plan.units) and not args.allow_partial:
        print(
            f"{PROG}: error: {plan.partial_units} of {len(plan.units)} sequences "
            f"({plan.partial_units / len(plan.units):.0%}) are short of a multiple of --seq-length {args.seq_length} "
            f"({'--short drop' if args.short == 'drop' else 'the short documents ran out'}), so most training samples "
            f"would start inside another sequence; nothing was written. Pack more short data (--short pack, "
            f"another --source), lower --seq-length or --min-length, or pass --allow-partial to write it anyway",
            file=sys.stderr,
        )
        return cli.USAGE_ERROR

    def documents():
        for unit in tqdm(plan.units, desc="mixture", unit="seq", file=sys.stderr, dynamic_ncols=True):
            yield numpy.concatenate([datasets[i].get(d, offset=o, length=n) for i, d, o, n in unit])

    dtype = indexed.token_dtype(tokenizer.vocab_size)
    with indexed.atomic_outputs(args.output_prefix) as tmp:
        num_units, tokens, largest = indexed.write_documents(tmp, documents(), dtype)
        meta = {
            **indexed.sidecar_fields(
                "data_tools.mixture", tokenizer, vocab_size=tokenizer.vocab_size, dtype=dtype.__name__,
                documents=num_units, tokens=tokens, max_token_id=largest,
            ),
            "seq_length": args.seq_length,
            "min_length": args.min_length,
            "short": args.short,
            "seed": args.seed,
            "sources": [
                {"prefix": os.path.abspath(p), "weight": w / sum(weights), **drawn}
                for p, w, drawn in zip(prefixes, weights, plan.drawn)
            ],
            "long_documents": plan.long_documents,
            "short_documents": plan.short_documents,
            "split_documents": plan.split_documents,
            "partial_sequences": plan.partial_units,
            "leftover_tokens": plan.leftover_tokens,
        }
        indexed.write_sidecar(tmp, meta)
    print(f"wrote {args.output_prefix}.bin/.idx ({meta['dtype']}) and {args.output_prefix}.meta.json")
    for prefix, source in zip(prefixes, meta["sources"]):
        print(
            f"  {prefix}: weight {source['weight']:.3f}  documents {source['documents']}  "
            f"tokens {source['tokens']}  passes {source['epochs']}"
        )
    print(
        f"  sequences: {num_units}  tokens: {tokens}  long documents: {plan.long_documents}  "
        f"short documents: {plan.short_documents} ({plan.split_documents} continued across sequences)"
    )
    print(
        f"  sequences not a multiple of {args.seq_length} (short documents ran out): {plan.partial_units}  "
        f"leftover short tokens left out: {plan.leftover_tokens}"
    )
    print(f"  time: {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

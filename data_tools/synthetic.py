"""Generate synthetic long-context tasks (passkey, multikey, variable_tracking, mqar, copy) at a target length.

    python -m data_tools.synthetic passkey multikey --num 100 --length 32768 --seed 0 --output eval.jsonl
    python -m data_tools.synthetic passkey --num 64 --length 1024 --output-prefix data/passkey

Record i uses task TASKS[i % len(TASKS)] and seed SEED + i, so any record can be regenerated alone.
--output writes JSON lines (task, context, query, answer, length_tokens, seed, text); --output-prefix
writes the `text` of each record, ended with EOD, as a megatron-core indexed dataset (.bin/.idx) with
a .meta.json sidecar. Lengths are in tokens of --tokenizer (default: the byte-level tokenizer).
Outputs are written atomically; existing ones are replaced only with --force.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import numpy
from tqdm import tqdm

from data_tools import cli
from ttt_train.data.synthetic import TASKS, generate
from ttt_train.data.tokenizer import load_tokenizer

PROG = "python -m data_tools.synthetic"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.doc_parser(PROG, __doc__)
    parser.add_argument(
        "tasks", nargs="+", choices=sorted(TASKS), metavar="TASK", help=f"one or more of {', '.join(TASKS)}"
    )
    parser.add_argument("--num", type=int, required=True, help="number of records")
    parser.add_argument(
        "--length", type=int, required=True, help="target length of a record's text, in tokens"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first record")
    parser.add_argument(
        "--tokenizer", default="byte", help="'byte', a tokenizer.json or a local HF tokenizer dir"
    )
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", help="JSON-lines file to write")
    out.add_argument("--output-prefix", help="indexed dataset prefix to write (PREFIX.bin/.idx/.meta.json)")
    parser.add_argument(
        "--depth", type=float, default=None, help="passkey: depth in [0, 1] (default: random)"
    )
    parser.add_argument("--num-queries", type=int, default=2, help="multikey: keys asked per record")
    parser.add_argument("--num-chains", type=int, default=2, help="variable_tracking: assignment chains")
    parser.add_argument(
        "--num-hops", type=int, default=4, help="variable_tracking: assignments per chain after the first"
    )
    parser.add_argument("--num-pairs", type=int, default=16, help="mqar: key-value pairs (at most 50)")
    parser.add_argument("--copy-length", type=int, default=64, help="copy: letters in the copied string")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    if args.num < 1 or args.length < 1:
        parser.error(f"--num and --length must be >= 1, got {args.num} and {args.length}")
    return args


def task_options(args: argparse.Namespace) -> dict[str, dict]:
    return {
        "passkey": {"depth": args.depth},
        "multikey": {"num_queries": args.num_queries},
        "variable_tracking": {"num_chains": args.num_chains, "num_hops": args.num_hops},
        "mqar": {"num_pairs": args.num_pairs},
        "copy": {"copy_length": args.copy_length},
    }


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, PROG)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.output:
        outputs = [args.output]
    else:
        from ttt_train.data import indexed  # imports megatron (seconds): only when writing a dataset

        outputs = [args.output_prefix + suffix for suffix in indexed.SUFFIXES]
    cli.check_outputs(outputs, cli.tokenizer_files(args.tokenizer))
    cli.refuse_existing(outputs, args.force)
    tokenizer = load_tokenizer(args.tokenizer)
    options = task_options(args)
    records = []
    for i in tqdm(range(args.num), desc="synthetic", unit="record", file=sys.stderr, dynamic_ncols=True):
        task = args.tasks[i % len(args.tasks)]
        records.append(generate(task, args.length, args.seed + i, tokenizer, **options[task]))

    if args.output:
        tmp = f"{args.output}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, args.output)
        written = args.output
    else:
        documents = [numpy.asarray(tokenizer.encode(r["text"]) + [tokenizer.eod_id]) for r in records]
        dtype = indexed.token_dtype(tokenizer.vocab_size)
        with indexed.atomic_outputs(args.output_prefix) as tmp:
            _, tokens, largest = indexed.write_documents(tmp, documents, dtype)
            indexed.write_sidecar(
                tmp,
                {
                    **indexed.sidecar_fields(
                        "data_tools.synthetic", tokenizer, vocab_size=tokenizer.vocab_size,
                        dtype=dtype.__name__, documents=len(documents), tokens=tokens, max_token_id=largest,
                    ),
                    "tasks": args.tasks,
                    "length": args.length,
                    "seed": args.seed,
                    "options": {task: options[task] for task in args.tasks},
                },
            )
        written = f"{args.output_prefix}.bin/.idx"

    lengths = [r["length_tokens"] for r in records]
    per_task = Counter(r["task"] for r in records)
    print(f"wrote {written}: {len(records)} records ({', '.join(f'{t}: {n}' for t, n in per_task.items())})")
    print(
        f"  length in tokens (target {args.length}): min {min(lengths)}  mean {sum(lengths) / len(lengths):.1f}  max {max(lengths)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""megatron-core indexed datasets (`PREFIX.bin` + `PREFIX.idx`) and their sidecar `PREFIX.meta.json`:
writing documents, merging pieces, and checking a dataset against a tokenizer.

Every tool here writes one megatron sequence per document (GPTDataset's unit) and records in the
sidecar what built it (tokenizer, EOD id, largest token id), so a mismatch is caught before training.
"""

from __future__ import annotations

import gc
import json
import os
import warnings
from collections.abc import Iterable

import numpy
from tqdm import tqdm

with warnings.catch_warnings():  # importing megatron.core warns that TE/Apex are absent: expected here
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from ttt_train.data.tokenizer import Tokenizer

_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning a .bin for its largest id


def token_dtype(vocab_size: int) -> type[numpy.number]:
    """The token dtype megatron's GPTDataset assumes for this vocabulary size
    (`GPTDatasetConfig.token_dtype_code`): uint16 up to 65536 ids, else int32."""
    return numpy.uint16 if vocab_size <= numpy.iinfo(numpy.uint16).max + 1 else numpy.int32


def write_documents(prefix: str, documents: Iterable, dtype: type[numpy.number]) -> tuple[int, int]:
    """Write each document (1-D int array-like) as one sequence; returns (documents, tokens).
    The prefix's folder is created if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    num_docs = num_tokens = 0
    for doc in documents:
        doc = numpy.asarray(doc)
        builder.add_document(doc, [doc.size])
        num_docs += 1
        num_tokens += doc.size
    builder.finalize(prefix + ".idx")
    return num_docs, num_tokens


def merge_datasets(prefixes: list[str], out_prefix: str, dtype: type[numpy.number]) -> None:
    """Concatenate datasets in order into `out_prefix`, atomically (temporary files, then rename)."""
    tmp = out_prefix + ".tmp"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    gc.freeze()  # add_index runs gc.collect() per dataset: skip the (large, long-lived) existing heap
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
    finally:
        gc.unfreeze()
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", out_prefix + ".bin")
    os.replace(tmp + ".idx", out_prefix + ".idx")


def open_dataset(prefix: str) -> IndexedDataset:
    """Open `prefix`, refusing with the missing path named when it is absent."""
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise FileNotFoundError(f"indexed dataset {prefix!r}: {prefix + suffix} not found")
    return IndexedDataset(prefix)


def sidecar_path(prefix: str) -> str:
    return prefix + ".meta.json"


def read_sidecar(prefix: str) -> dict | None:
    path = sidecar_path(prefix)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_sidecar(prefix: str, meta: dict) -> None:
    with open(sidecar_path(prefix), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def tokens_array(dataset: IndexedDataset, prefix: str) -> numpy.ndarray:
    """All tokens of the dataset as one read-only memory-mapped array."""
    return numpy.memmap(prefix + ".bin", dtype=dataset.index.dtype, mode="r")


def max_token_id(dataset: IndexedDataset, prefix: str, progress: bool = False) -> int:
    """Largest token id in the dataset (-1 when empty), scanning the .bin in chunks."""
    tokens = tokens_array(dataset, prefix)
    starts = tqdm(
        range(0, tokens.size, _SCAN_CHUNK), desc="scan token ids", unit="chunk", disable=not progress
    )
    return max((int(tokens[i : i + _SCAN_CHUNK].max()) for i in starts), default=-1)


def sequences_without_eod(dataset: IndexedDataset, prefix: str, eod_id: int) -> numpy.ndarray:
    """Indices of the sequences whose last token is not `eod_id` (empty sequences included)."""
    lengths = dataset.sequence_lengths.astype(numpy.int64)
    last = dataset.index.sequence_pointers // dataset.index.dtype_size + lengths - 1
    nonempty = lengths > 0
    ok = numpy.zeros(lengths.size, dtype=bool)
    ok[nonempty] = tokens_array(dataset, prefix)[last[nonempty]] == eod_id
    return numpy.flatnonzero(~ok)


def check_against_tokenizer(prefix: str, tokenizer: Tokenizer, require_eod: bool = True) -> None:
    """Refuse (ValueError naming the dataset) a dataset that `tokenizer` did not build: a dtype too
    small for the vocabulary, a token id >= vocab size, a different EOD id, or (with `require_eod`)
    documents not delimited by EOD, whose boundaries would be lost in packed sequences.

    The sidecar, when there is one, gives the largest id, the EOD id and `eod_delimited`; otherwise
    the .bin is scanned (and every document must end with EOD).
    """
    dataset = open_dataset(prefix)
    dtype, vocab = dataset.index.dtype, tokenizer.vocab_size
    if numpy.iinfo(dtype).max + 1 < vocab:
        raise ValueError(
            f"dataset {prefix!r}: token dtype {dtype.__name__} cannot hold the ids of tokenizer "
            f"{tokenizer.name!r} (vocab size {vocab}): it was built with a different tokenizer"
        )
    meta = read_sidecar(prefix) or {}
    largest = meta["max_token_id"] if "max_token_id" in meta else max_token_id(dataset, prefix)
    if largest >= vocab:
        raise ValueError(
            f"dataset {prefix!r}: token id {largest} >= vocab size {vocab} of tokenizer "
            f"{tokenizer.name!r}: it was built with a different tokenizer"
        )
    if "eod_id" in meta and meta["eod_id"] != tokenizer.eod_id:
        raise ValueError(
            f"dataset {prefix!r}: built with EOD id {meta['eod_id']} but tokenizer {tokenizer.name!r} "
            f"has EOD id {tokenizer.eod_id}"
        )
    if not require_eod or meta.get("eod_delimited"):
        return
    missing = sequences_without_eod(dataset, prefix, tokenizer.eod_id)
    if meta.get("eod_delimited") is False or missing.size:
        raise ValueError(
            f"dataset {prefix!r}: documents are not delimited by EOD id {tokenizer.eod_id} "
            f"({missing.size} do not end with it); their boundaries would be lost. Re-tokenize with --append-eod"
        )

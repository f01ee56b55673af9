"""megatron-core indexed datasets (`PREFIX.bin` + `PREFIX.idx`) and their sidecar `PREFIX.meta.json`:
writing documents atomically, merging pieces, a dataset's identity, and checking it against a tokenizer.

Every tool here writes one megatron sequence per document (GPTDataset's unit) and records in the
sidecar what built it (tokenizer spec and fingerprint, EOD id, largest token id, the sizes of the two
files and a sample of the .bin's content), so a mismatch is caught before training. Opening a
dataset checks its .idx against the .bin's size (`check_index`), sidecar or not.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy
from tqdm import tqdm

with warnings.catch_warnings():  # importing megatron.core warns that TE/Apex are absent: expected here
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.indexed_dataset import (
        _INDEX_HEADER,
        DType,
        IndexedDataset,
        IndexedDatasetBuilder,
    )

from ttt_train.data.errors import DataError, DataFileNotFoundError
from ttt_train.data.tokenizer import Tokenizer

_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning a .bin for its largest id
SUFFIXES = (".bin", ".idx", ".meta.json")  # the files of a dataset, in the order they are published


def token_dtype(vocab_size: int) -> type[numpy.number]:
    """The token dtype megatron's GPTDataset assumes for this vocabulary size
    (`GPTDatasetConfig.token_dtype_code`): uint16 up to 65536 ids, else int32."""
    return numpy.uint16 if vocab_size <= numpy.iinfo(numpy.uint16).max + 1 else numpy.int32


def write_documents(prefix: str, documents: Iterable, dtype: type[numpy.number]) -> tuple[int, int, int]:
    """Write each document (1-D int array-like) as one sequence; returns (documents, tokens, largest
    token id or -1). The prefix's folder is created if missing. Write to a prefix of
    `atomic_outputs` so that nothing half-written is ever seen under the final name."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    num_docs = num_tokens = 0
    largest = -1
    for doc in documents:
        doc = numpy.asarray(doc)
        builder.add_document(doc, [doc.size])
        num_docs += 1
        num_tokens += doc.size
        largest = max(largest, int(doc.max())) if doc.size else largest
    builder.finalize(prefix + ".idx")
    return num_docs, num_tokens, largest


def merge_datasets(prefixes: list[str], out_prefix: str, dtype: type[numpy.number]) -> None:
    """Concatenate datasets in order into `out_prefix` (a prefix of `atomic_outputs`)."""
    builder = IndexedDatasetBuilder(out_prefix + ".bin", dtype=dtype)
    gc.freeze()  # add_index runs gc.collect() per dataset: skip the (large, long-lived) existing heap
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
    finally:
        gc.unfreeze()
    builder.finalize(out_prefix + ".idx")


@contextlib.contextmanager
def atomic_outputs(prefix: str) -> Iterator[str]:
    """Yield a temporary prefix beside `prefix` to write the dataset (.bin, .idx, .meta.json) under.
    On success the files replace PREFIX's by rename (an old .meta.json is removed first, the new one
    comes last: a dataset is complete when its sidecar describes its files); on an exception the
    temporary files are removed."""
    tmp = f"{prefix}.tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        for suffix in SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp + suffix)
        raise
    with contextlib.suppress(FileNotFoundError):
        os.remove(sidecar_path(prefix))
    for suffix in SUFFIXES:
        if os.path.exists(tmp + suffix):
            os.replace(tmp + suffix, prefix + suffix)


def open_dataset(prefix: str) -> IndexedDataset:
    """Open `prefix`, refusing (DataError naming the file) a missing file, an unreadable .idx, and a
    .bin that is not the file its .idx describes (`check_index`)."""
    _require_files(prefix)
    check_index(prefix)
    return IndexedDataset(prefix)


_HEADER = 34  # magic (9), version (8), dtype code (1), sequence count (8), document count (8)


def check_index(prefix: str) -> None:
    """Refuse (DataError naming the file) an .idx that is not a readable megatron index (version 1),
    or a .bin that is not the file it describes: the .bin's size must be the end of the last
    sequence (a truncated or grown .bin, or an .idx of another dataset, fails) and the document
    boundaries must cover every sequence. Reads the header and a few numbers of the .idx only."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    size = os.path.getsize(idx)

    def unreadable(problem: str) -> DataError:
        return DataError(f"indexed dataset {prefix!r}: {idx} is not a readable megatron index ({problem}); "
                         f"rebuild the dataset")

    with open(idx, "rb") as f:
        head = f.read(_HEADER)
        if len(head) < _HEADER or head[:9] != _INDEX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
            raise unreadable("no version-1 index header")
        count, documents = struct.unpack("<QQ", head[18:34])
        try:
            dtype_size = DType.size(DType.dtype_from_code(head[17]))
        except (KeyError, ValueError) as err:
            raise unreadable(f"unknown token dtype code {head[17]}") from err
        if size < _HEADER + 12 * count + 8 * documents:
            raise unreadable(f"{size} bytes, its header describes {_HEADER + 12 * count + 8 * documents}: truncated")

        def number(offset: int, fmt: str) -> int:
            f.seek(offset)
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        expected = 0 if count == 0 else \
            number(_HEADER + 12 * count - 8, "<q") + number(_HEADER + 4 * (count - 1), "<i") * dtype_size
        bounds = (number(_HEADER + 12 * count, "<q"), number(_HEADER + 12 * count + 8 * (documents - 1), "<q")) \
            if documents else None
    actual = os.path.getsize(bin_path)
    if actual != expected:
        cause = "truncated" if actual < expected else "longer than its index says"
        raise DataError(
            f"indexed dataset {prefix!r}: {bin_path} has {actual} bytes but {idx} describes {expected} "
            f"({count} sequences, {expected // dtype_size} tokens): the .bin is {cause}, or the two files belong "
            f"to different datasets; rebuild the dataset"
        )
    if bounds != (0, count):
        raise DataError(f"indexed dataset {prefix!r}: {idx} is inconsistent (its document boundaries do not cover "
                        f"its {count} sequences); rebuild the dataset")


def _require_files(prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise DataFileNotFoundError(f"indexed dataset {prefix!r}: {prefix + suffix} not found")


def sidecar_path(prefix: str) -> str:
    return prefix + ".meta.json"


def read_sidecar(prefix: str) -> dict | None:
    """PREFIX.meta.json, or None when absent; refused when it records file sizes that PREFIX.bin/.idx
    do not have (the dataset was rebuilt or replaced without it)."""
    path = sidecar_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); rebuild the dataset or delete the file") from err
    for suffix in (".bin", ".idx"):
        recorded = meta.get(f"{suffix[1:]}_bytes")
        if (
            recorded is not None
            and os.path.exists(prefix + suffix)
            and os.path.getsize(prefix + suffix) != recorded
        ):
            raise DataError(
                f"{path} describes a {suffix} of {recorded} bytes but {prefix + suffix} has "
                f"{os.path.getsize(prefix + suffix)}: the dataset changed without its sidecar; rebuild it"
            )
    sample = meta.get("bin_sample_sha256")
    if sample is not None and os.path.exists(prefix + ".bin") and \
            _bin_sample_sha256(prefix + ".bin", *_stat_key(prefix + ".bin")) != sample:
        raise DataError(
            f"{prefix}.bin does not hold the tokens {path} describes (a sample of its content differs, its size "
            f"does not): it was replaced or corrupted after the dataset was built; rebuild the dataset"
        )
    return meta


def sidecar_fields(tool: str, tokenizer, *, vocab_size: int, dtype: str, documents: int, tokens: int,
                   max_token_id: int, eod_delimited: bool = True, tokenizer_name: str | None = None) -> dict:
    """The .meta.json fields every data tool writes: the tool, the tokenizer's portable spec, name and
    fingerprint, the vocabulary, EOD id and token dtype, and the counts (tool-specific fields go beside)."""
    return {"tool": tool, "tokenizer": tokenizer.spec, "tokenizer_name": tokenizer_name or tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": vocab_size, "eod_id": tokenizer.eod_id,
            "eod_delimited": eod_delimited, "dtype": dtype, "documents": documents, "tokens": tokens,
            "max_token_id": max_token_id}


def write_sidecar(prefix: str, meta: dict) -> None:
    """Write PREFIX.meta.json (atomically), adding what `read_sidecar` checks: the sizes of
    PREFIX.bin/.idx (`bin_bytes`, `idx_bytes`) and a sample of the .bin's content
    (`bin_sample_sha256`, see `_bin_sample_sha256`)."""
    meta = {**meta, **{f"{s[1:]}_bytes": os.path.getsize(prefix + s) for s in (".bin", ".idx")},
            "bin_sample_sha256": _bin_sample_sha256(prefix + ".bin", *_stat_key(prefix + ".bin"))}
    path = sidecar_path(prefix)
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def sidecar_tokenizer(prefix: str, meta: dict | None) -> str | None:
    """The tokenizer spec recorded in PREFIX's sidecar ("byte" or a path), or None. A relative path
    (older sidecars) is taken relative to the sidecar's folder."""
    spec = (meta or {}).get("tokenizer")
    if spec is None or spec == "byte" or os.path.isabs(os.path.expanduser(spec)):
        return spec
    return str(Path(sidecar_path(prefix)).resolve().parent / spec)


def dataset_identity(prefix: str) -> str:
    """sha256 identifying PREFIX's data whatever its path or mtime: of the .idx bytes (every
    document length and boundary: all megatron's indices depend on), the .bin size and a sample of
    its content (`_bin_sample_sha256`), and the tokenizer fingerprint of the sidecar. Rebuilding or
    replacing a dataset in place changes it."""
    _require_files(prefix)
    meta = read_sidecar(prefix) or {}
    parts = [
        _file_sha256(prefix + ".idx", *_stat_key(prefix + ".idx")),
        str(os.path.getsize(prefix + ".bin")),
        _bin_sample_sha256(prefix + ".bin", *_stat_key(prefix + ".bin")),
        str(meta.get("tokenizer_fingerprint")),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 1 << 16


@functools.lru_cache(maxsize=256)
def _bin_sample_sha256(path: str, *stat_key) -> str:
    """sha256 of 64 blocks of 64 KiB at evenly spaced offsets of the file (the whole file when it is
    smaller than 4 MiB): a few MiB read whatever the size, which catches a .bin replaced by another
    of the same size. Cached per process by `stat_key`."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _SAMPLE_BLOCKS * _SAMPLE_BYTES:
            return hashlib.file_digest(f, "sha256").hexdigest()
        for i in range(_SAMPLE_BLOCKS):
            f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLE_BLOCKS - 1))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _stat_key(path: str) -> tuple[str, int, int, int, int]:
    """What changes whenever `path`'s content may have: resolved path, device, inode, size, mtime."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, *stat_key) -> str:
    """sha256 of the file, cached per process by `stat_key` (a rebuild gets a new one)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def largest_token_id(prefix: str) -> int:
    """The largest token id of PREFIX: from its sidecar, else by scanning the .bin (once per process
    and version of the file)."""
    meta = read_sidecar(prefix) or {}
    if "max_token_id" in meta:
        return int(meta["max_token_id"])
    return _scanned_max_token_id(prefix, *_stat_key(prefix + ".bin"))


@functools.lru_cache(maxsize=256)
def _scanned_max_token_id(prefix: str, *stat_key) -> int:
    return max_token_id(open_dataset(prefix), prefix)


def check_fingerprint(prefix: str, meta: dict | None, tokenizer: Tokenizer) -> None:
    """Refuse (DataError) `tokenizer` when PREFIX's sidecar `meta` records another tokenizer's
    fingerprint (a dataset without one passes: see `check_against_tokenizer`)."""
    built_with = (meta or {}).get("tokenizer_fingerprint")
    if built_with is not None and not tokenizer.matches(built_with):
        raise DataError(
            f"dataset {prefix!r} was tokenized with tokenizer {meta.get('tokenizer')!r} (fingerprint "
            f"{built_with[:12]}), not with {tokenizer.name!r} (fingerprint {tokenizer.fingerprint[:12]}): "
            f"use the tokenizer it was built with, or re-tokenize it with {tokenizer.name!r}"
        )


def check_against_tokenizer(prefix: str, tokenizer: Tokenizer, require_eod: bool = True) -> None:
    """Refuse (DataError naming the dataset and the fix) a dataset that `tokenizer` did not build:
    another tokenizer fingerprint in the sidecar, a dtype too small for the vocabulary, a token id
    >= vocab size, a different EOD id, or (with `require_eod`) documents not delimited by EOD, whose
    boundaries would be lost in packed sequences.

    The sidecar, when there is one, gives the fingerprint, the largest id, the EOD id and
    `eod_delimited`; otherwise the .bin is scanned (and every document must end with EOD).
    """
    dataset = open_dataset(prefix)
    meta = read_sidecar(prefix) or {}
    check_fingerprint(prefix, meta, tokenizer)
    dtype, vocab = dataset.index.dtype, tokenizer.vocab_size
    if numpy.iinfo(dtype).max + 1 < vocab:
        raise DataError(
            f"dataset {prefix!r}: token dtype {dtype.__name__} cannot hold the ids of tokenizer "
            f"{tokenizer.name!r} (vocab size {vocab}): it was built with a different tokenizer; re-tokenize it"
        )
    largest = largest_token_id(prefix)
    if largest >= vocab:
        raise DataError(
            f"dataset {prefix!r}: token id {largest} >= vocab size {vocab} of tokenizer "
            f"{tokenizer.name!r}: it was built with a different tokenizer; re-tokenize it"
        )
    if "eod_id" in meta and meta["eod_id"] != tokenizer.eod_id:
        raise DataError(
            f"dataset {prefix!r}: built with EOD id {meta['eod_id']} but tokenizer {tokenizer.name!r} "
            f"has EOD id {tokenizer.eod_id}; pass the EOD token it was built with"
        )
    if not require_eod or meta.get("eod_delimited"):
        return
    missing = sequences_without_eod(dataset, prefix, tokenizer.eod_id)
    if meta.get("eod_delimited") is False or missing.size:
        raise DataError(
            f"dataset {prefix!r}: documents are not delimited by EOD id {tokenizer.eod_id} "
            f"({missing.size} do not end with it); their boundaries would be lost. Re-tokenize with --append-eod"
        )

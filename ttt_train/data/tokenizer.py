"""Tokenizers for the data pipeline: the shipped byte-level one, a `tokenizer.json` file or a local
HuggingFace tokenizer directory, behind one small wrapper.

Special-token strings inside documents (e.g. a literal "<|endoftext|>") are encoded as plain text,
so the only EOD tokens in a dataset are the ones the pipeline appends: document boundaries stay exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import tokenizers

from ttt_train.data.errors import DataError, DataFileNotFoundError

BYTE_TOKENIZER_PATH = Path(__file__).parent / "assets" / "byte_tokenizer.json"

# Document-end tokens of common tokenizers, tried in order when no `eod_token` is given: Qwen/GPT-2
# ("<|endoftext|>"), Llama 3 ("<|end_of_text|>"). An instruct tokenizer's eos (e.g. "<|im_end|>")
# ends a chat turn, not a pretraining document, so these come before it.
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
# Parts of a serialized tokenizer that never change the ids the pipeline gets (it encodes without
# special tokens, one text at a time): left out of the fingerprint, so a tokenizer.json file and the
# HuggingFace directory holding it (which adds a post-processor) are the same tokenizer.
_NOT_FINGERPRINTED = ("truncation", "padding", "post_processor")


@dataclass(eq=False)
class Tokenizer:
    """Text <-> token ids, plus the special ids the pipeline needs.

    `vocab_size` counts added tokens (every id the tokenizer can emit is < vocab_size); the model may
    pad its embedding table beyond it. `pad_id` is None when the tokenizer has no pad token distinct
    from EOD. `name` is the spec as given (for messages); `spec` is portable: "byte" or an absolute path.
    """

    backend: tokenizers.Tokenizer
    name: str
    spec: str
    eod_id: int
    pad_id: int | None

    def __post_init__(self) -> None:
        self.backend.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer (canonical JSON, without the parts that never change
        the pipeline's ids): identifies it across paths, machines and file/directory forms."""
        serialized = json.loads(self.backend.to_str())
        for key in _NOT_FINGERPRINTED:
            serialized.pop(key, None)
        return hashlib.sha256(json.dumps(serialized, sort_keys=True).encode()).hexdigest()

    def matches(self, fingerprint: str) -> bool:
        """Whether `fingerprint` (e.g. from a dataset's .meta.json) is this tokenizer's; the raw
        sha256 of the serialized tokenizer that older datasets recorded is accepted too."""
        return fingerprint in (self.fingerprint, hashlib.sha256(self.backend.to_str().encode()).hexdigest())

    def manifest(self) -> dict:
        """{"spec", "fingerprint", "vocab_size"}: what a dataset or checkpoint records about it."""
        return {"spec": self.spec, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size}


def portable_spec(spec: str) -> str:
    """ "byte", or the absolute path of a tokenizer file or directory (usable from any folder)."""
    spec = str(spec)
    return spec if spec == "byte" else str(Path(spec).expanduser().resolve())


def check_model_vocab(vocab_size: int, tokenizer: Tokenizer) -> None:
    """Refuse (ValueError naming `model.vocab_size`) a model whose embedding table cannot hold every
    id `tokenizer` emits; call before any compute, which would otherwise fail deep inside."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size {vocab_size!r} is smaller than the vocabulary of tokenizer "
            f"{tokenizer.name!r} ({tokenizer.vocab_size} ids, EOD {tokenizer.eod_id}): set "
            f"model.vocab_size >= {tokenizer.vocab_size}, or use the tokenizer the model was built for"
        )


def load_tokenizer(spec: str, eod_token: str | None = None) -> Tokenizer:
    """Load `spec`: "byte", a `tokenizer.json` file, or a local HuggingFace tokenizer directory.

    The EOD token is `eod_token` when given, else the first of `_EOD_CANDIDATES` in the vocabulary,
    else the tokenizer's eos token. Nothing is downloaded.
    """
    spec = str(spec)
    path = BYTE_TOKENIZER_PATH if spec == "byte" else Path(spec).expanduser()
    if path.is_dir():
        backend, eos, pad = _load_hf_directory(path)
    elif path.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:
            raise DataError(f"tokenizer file {path} is not a readable tokenizer.json: {err}") from err
        eos, pad = None, next((t for t in _PAD_CANDIDATES if backend.token_to_id(t) is not None), None)
    else:
        raise DataFileNotFoundError(
            f"tokenizer {spec!r}: no such file or directory "
            "(expected 'byte', a tokenizer.json file or a local tokenizer directory)"
        )
    eod = eod_token or next((t for t in _EOD_CANDIDATES if backend.token_to_id(t) is not None), eos)
    if eod is None or backend.token_to_id(eod) is None:
        raise DataError(f"tokenizer {spec!r}: no EOD token {eod!r} in its vocabulary; pass eod_token")
    eod_id = backend.token_to_id(eod)
    pad_id = backend.token_to_id(pad) if pad is not None else None
    pad_id = None if pad_id == eod_id else pad_id
    return Tokenizer(backend, name=spec, spec=portable_spec(spec), eod_id=eod_id, pad_id=pad_id)


def _load_hf_directory(path: Path) -> tuple[tokenizers.Tokenizer, str | None, str | None]:
    """(backend, eos token, pad token) of a local HuggingFace tokenizer directory."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise DataError(f"tokenizer directory {path} could not be loaded: {err}") from err
    if not getattr(hf, "is_fast", False):
        raise DataError(f"tokenizer directory {path} has no fast (tokenizer.json) tokenizer")
    return hf.backend_tokenizer, hf.eos_token, hf.pad_token


def build_byte_tokenizer() -> tokenizers.Tokenizer:
    """The shipped byte-level tokenizer: token id == byte value (0..255), then `<|endoftext|>` (256,
    EOD) and `<|pad|>` (257). decode(encode(text)) == text for any text. Saved as BYTE_TOKENIZER_PATH."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(
        [tokenizers.AddedToken("<|endoftext|>", special=True), tokenizers.AddedToken("<|pad|>", special=True)]
    )
    return tok

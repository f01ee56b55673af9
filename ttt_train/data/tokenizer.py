"""Tokenizers for the data pipeline: the shipped byte-level one, a `tokenizer.json` file or a local
HuggingFace tokenizer directory, behind one small wrapper.

Special-token strings inside documents (e.g. a literal "<|endoftext|>") are encoded as plain text,
so the only EOD tokens in a dataset are the ones the pipeline appends: document boundaries stay exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import tokenizers

BYTE_TOKENIZER_PATH = Path(__file__).parent / "assets" / "byte_tokenizer.json"

# Document-end tokens of common tokenizers, tried in order when no `eod_token` is given: Qwen/GPT-2
# ("<|endoftext|>"), Llama 3 ("<|end_of_text|>"). An instruct tokenizer's eos (e.g. "<|im_end|>")
# ends a chat turn, not a pretraining document, so these come before it.
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")


@dataclass(eq=False)
class Tokenizer:
    """Text <-> token ids, plus the special ids the pipeline needs.

    `vocab_size` counts added tokens (every id the tokenizer can emit is < vocab_size); the model may
    pad its embedding table beyond it. `pad_id` is None when the tokenizer has no pad token distinct
    from EOD.
    """

    backend: tokenizers.Tokenizer
    name: str
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
        """sha256 of the serialized tokenizer: identifies it across paths and machines."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()


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
            raise ValueError(f"tokenizer file {path} is not a readable tokenizer.json: {err}") from err
        eos, pad = None, next((t for t in _PAD_CANDIDATES if backend.token_to_id(t) is not None), None)
    else:
        raise FileNotFoundError(
            f"tokenizer {spec!r}: no such file or directory "
            "(expected 'byte', a tokenizer.json file or a local tokenizer directory)"
        )
    eod = eod_token or next((t for t in _EOD_CANDIDATES if backend.token_to_id(t) is not None), eos)
    if eod is None or backend.token_to_id(eod) is None:
        raise ValueError(f"tokenizer {spec!r}: no EOD token {eod!r} in its vocabulary; pass eod_token")
    eod_id = backend.token_to_id(eod)
    pad_id = backend.token_to_id(pad) if pad is not None else None
    return Tokenizer(backend, name=spec, eod_id=eod_id, pad_id=None if pad_id == eod_id else pad_id)


def _load_hf_directory(path: Path) -> tuple[tokenizers.Tokenizer, str | None, str | None]:
    """(backend, eos token, pad token) of a local HuggingFace tokenizer directory."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise ValueError(f"tokenizer directory {path} could not be loaded: {err}") from err
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"tokenizer directory {path} has no fast (tokenizer.json) tokenizer")
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

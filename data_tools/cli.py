"""Shared command-line plumbing of the data tools: argument parsing, errors, and output safety.

A bad command line or bad input (`DataError`, an argparse error) is reported on one line naming the
file / line / option and the fix, with exit code 2; anything else is a bug and keeps its traceback.
No tool writes over one of its inputs, and existing outputs are replaced only with --force.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable

from ttt_train.data.errors import DataError, DataFileExistsError

USAGE_ERROR = 2


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block) and exit with code 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog as written; each option's help ends with its default (unless it has
    none to show: required, off or unset, or the help says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.required or action.default in (None, False) \
                or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def doc_parser(prog: str, doc: str) -> Parser:
    """An argument parser whose description is the first paragraph of a module docstring and whose
    epilog (usage examples, notes) is the rest, printed as written; option defaults are shown."""
    first, _, rest = doc.partition("\n\n")
    return Parser(prog=prog, description=first, epilog=rest, formatter_class=HelpFormatter)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None, prog: str) -> int:
    """`main(argv)`, with a `DataError` printed as `PROG: error: MESSAGE` (one line) and exit code 2."""
    try:
        return main(argv)
    except DataError as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return USAGE_ERROR


def check_outputs(outputs: Iterable[str], inputs: Iterable[str]) -> None:
    """Refuse (DataError) writing any of `outputs` (files or folders, existing or not) that is one of
    `inputs` or holds one: same resolved path (symbolic links followed) or same file (hard links)."""
    seen = []
    for path in inputs:
        if os.path.exists(path):
            st = os.stat(path)
            seen.append((path, os.path.realpath(path), (st.st_dev, st.st_ino)))
    for out in outputs:
        real = os.path.realpath(out)
        st = os.stat(out) if os.path.exists(out) else None
        inode = (st.st_dev, st.st_ino) if st else None
        for path, in_real, in_inode in seen:
            if real == in_real or inode == in_inode or in_real.startswith(real + os.sep):
                raise DataFileExistsError(
                    f"output {out} would overwrite the input {path}: choose another --output-prefix/--output"
                )


def refuse_existing(paths: Iterable[str], force: bool) -> None:
    """Refuse (DataError) outputs that exist, unless `force`."""
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        raise DataFileExistsError(f"output {existing[0]} already exists: pass --force to replace it")


def tokenizer_files(spec: str) -> list[str]:
    """The files a tokenizer spec reads ("byte": none of the user's), for `check_outputs`."""
    if spec == "byte" or not os.path.exists(os.path.expanduser(spec)):
        return []
    path = os.path.expanduser(spec)
    return [os.path.join(path, name) for name in os.listdir(path)] if os.path.isdir(path) else [path]

"""Shared command-line plumbing of the data tools."""

from __future__ import annotations

import argparse


def doc_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of a module docstring and whose
    epilog (usage examples, notes) is the rest, printed as written."""
    first, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=first, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

"""The output folder of an import or export: refused when it holds anything (unless `force` and it holds
only what an earlier run of the same tool wrote), written beside it and swapped in at the end.

`check_out(out, force, what, owned)`: raise FileExistsError (naming the folder, what is in it and the
fix) unless `out` is absent or empty, or `force` and `owned(out)` says it is that tool's output.
`sibling_tmp(out)` makes the temporary folder; `swap_in(tmp, out)` renames it onto `out` (an earlier
folder is moved aside first and deleted only once the new one is in place).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def check_out(out: Path, force: bool, what: str, owned: Callable[[Path], str | None]) -> None:
    """`owned(out)`: None when `out` holds only `what`'s output, else why it does not (a phrase)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise FileExistsError(f"--out {out} exists and is not empty; choose another --out, or pass --force to "
                              f"replace the {what} written there earlier")
    why = owned(out)
    if why is not None:
        raise FileExistsError(f"--out {out} is not the output of an earlier {what} ({why}); --force replaces only "
                              "that: choose another --out or remove the folder yourself")


def sibling_tmp(out: Path) -> Path:
    """A new empty folder beside `out` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


def swap_in(tmp: Path, out: Path) -> None:
    """Rename `tmp` onto `out`; an existing `out` is moved aside first and deleted after."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)

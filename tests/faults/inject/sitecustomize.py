"""Fault injection for the checkpoint fault tests, loaded by every Python process whose PYTHONPATH
starts with this folder (`site` imports `sitecustomize` at start-up); inert without the variable.

TTT_FAULT_ENOSPC="<folder part>:<rank>[,<rank>...]": a checkpoint writer of those ranks that writes
a tensor file whose path contains "<folder part>" (e.g. "iter_0000010.tmp") writes a few bytes,
then fails with ENOSPC, as on a full disk. The writers are processes forked by megatron's
dist_checkpointing from the rank, so the patch is made in the rank before megatron imports the
function it patches.
"""

import os

if os.environ.get("TTT_FAULT_ENOSPC"):
    import errno
    import functools

    import torch.distributed.checkpoint.filesystem as _filesystem

    _part, _ranks = os.environ["TTT_FAULT_ENOSPC"].split(":")
    _real = _filesystem._write_item

    @functools.wraps(_real)  # megatron inspects its signature
    def _write_item(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "write") and hasattr(a, "name"))
        if _part in str(stream.name) and os.environ.get("RANK") in _ranks.split(","):
            stream.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stream.name))
        return _real(*args, **kwargs)

    _filesystem._write_item = _write_item

"""The scan's wire format, and the per-call counts taken where messages are sent and received.

A message is one flat uint8 buffer::

    [ depth: int64 | keys: int64 [n_keys] | states: n_states x [B, d, h] of the state dtype ]

``depth`` is the length of the longest chain of messages the content depends on, this one
included (the sender writes ``1 + the deepest depth it has received in this call``), so a rank's
``rounds`` after a call is the number of dependent communication rounds its results waited for,
counted on the wire rather than derived. ``keys`` are document ids (forward) or 0/1 gates
(backward), one per batch row and state part; the int64 header keeps the states 8-byte aligned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

HEADER = 8  # bytes of one int64


def message_bytes(n_keys: int, n_states: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Size in bytes of a message with ``n_keys`` int64 keys and ``n_states`` states of ``shape``."""
    numel = 1
    for s in shape:
        numel *= s
    return HEADER * (1 + n_keys) + n_states * numel * torch.empty((), dtype=dtype).element_size()


def views(buf: torch.Tensor, n_keys: int, n_states: int, shape: torch.Size, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(depth ``[1]`` int64, keys ``[n_keys]`` int64, states) viewing the message ``buf``."""
    head = HEADER * (1 + n_keys)
    header = buf[:head].view(torch.int64)
    per = (buf.numel() - head) // max(n_states, 1)
    states = [buf[head + i * per:head + (i + 1) * per].view(dtype).view(shape) for i in range(n_states)]
    return header[:1], header[1:], states


def new_message(n_keys: int, n_states: int, shape: torch.Size, dtype: torch.dtype, device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """An uninitialised message and its views (the sender computes straight into the state views)."""
    buf = torch.empty(message_bytes(n_keys, n_states, tuple(shape), dtype), dtype=torch.uint8, device=device)
    return (buf, *views(buf, n_keys, n_states, shape, dtype))


@dataclass
class ScanCount:
    """What one rank did in one direction (forward or backward) of one scan call.

    ``rounds``: dependent communication rounds its results waited for (the deepest message depth
    it received; 0 when it received nothing); ``messages_*`` / ``bytes_*``: counted at the
    ``isend`` / ``irecv`` calls (buffer sizes, header included). The depth is kept on the
    messages' device and read (one host sync) only when ``rounds`` is asked for."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    depth: torch.Tensor | None = field(default=None, repr=False)

    @property
    def rounds(self) -> int:
        return 0 if self.depth is None else int(self.depth)

    def stamp(self, depth_view: torch.Tensor) -> None:
        """Write this rank's next message depth into a message about to be sent."""
        if self.depth is None:
            depth_view.fill_(1)
        else:
            torch.add(self.depth, 1, out=depth_view)

    def sent(self, buf: torch.Tensor) -> None:
        self.messages_sent += 1
        self.bytes_sent += buf.numel() * buf.element_size()

    def received(self, buf: torch.Tensor) -> None:
        """Count a completed receive and take its depth (the message's first int64)."""
        self.messages_received += 1
        self.bytes_received += buf.numel() * buf.element_size()
        depth = buf[:HEADER].view(torch.int64)
        self.depth = depth.clone() if self.depth is None else torch.maximum(self.depth, depth)

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "messages_sent": self.messages_sent, "bytes_sent": self.bytes_sent,
                "messages_received": self.messages_received, "bytes_received": self.bytes_received}


@dataclass
class ScanStats:
    """Counts of one :func:`cp_exclusive_scan` call on this rank: ``forward`` is filled by the call,
    ``backward`` when autograd runs the scan's backward (it stays zero without one)."""

    algorithm: str = ""
    cp: int = 0
    forward: ScanCount = field(default_factory=ScanCount)
    backward: ScanCount = field(default_factory=ScanCount)

    def as_dict(self) -> dict:
        return {"algorithm": self.algorithm, "cp": self.cp, "forward": self.forward.as_dict(),
                "backward": self.backward.as_dict()}

"""The results file (JSON lines, one record per finished sample) and the run's settings file.

Each record is appended and fsync'd as soon as its sample finishes, so an interrupted run loses at
most the sample in flight; a restart drops a torn last line and skips every key already present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class ResultsFile:
    """Append-only JSONL records; `key(record)` identifies a sample for skipping on restart."""

    def __init__(self, path: Path, key):
        self.path = Path(path)
        self.key = key
        self.records: list[dict] = []
        if self.path.exists():
            self._load()
        self.done = {key(r) for r in self.records}

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):  # a torn last line from an interrupted append
            print(f"{self.path}: dropping an incomplete last line ({len(data) - len(complete)} bytes)")
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        for number, line in enumerate(complete.decode().splitlines(), 1):
            if line.strip():
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}:{number}: not a JSON record ({err}); fix or delete the line") from err

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        self.done.add(self.key(record))


def check_settings(path: Path, settings: dict) -> None:
    """Write `settings` (what decides the results) to `path`, or refuse to mix results with a run
    whose settings differ (naming the keys)."""
    path = Path(path)
    if path.exists():
        stored = json.loads(path.read_text())
        differs = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if differs:
            raise ValueError(
                f"out={path.parent} holds results of other settings (differing: {', '.join(differs)}); "
                "use another out= or delete that folder"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)

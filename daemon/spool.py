"""On-disk spool: batches the store could not take, kept in order until it can.

Each batch is one file `<seq>.jsonl` (an event's contract JSON per line),
written to a temporary name, fsynced and renamed, so a crash leaves either the
whole batch or nothing.  The file name doubles as the insert deduplication
token, so a batch replayed after a crash between insert and unlink is not
stored twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from agentwarden.core.events import Event

log = logging.getLogger(__name__)


# the default cap on what the spool holds (store.spool_max_bytes)
DEFAULT_MAX_BYTES = 1 << 30


class SpoolFull(OSError):
    """The batch would take the spool past its cap: it is not written (the caller counts the loss)."""


class Spool:
    def __init__(self, directory: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.dir.glob("*.tmp"):
            stale.unlink()
        files = self._files()
        seqs = [self._seq(p) for p in files]
        self._next = max(seqs, default=0) + 1
        self.bytes = sum(p.stat().st_size for p in files)   # what the spool holds now

    @staticmethod
    def _seq(path: Path) -> int:
        return int(path.stem)

    def _files(self) -> list[Path]:
        return sorted((p for p in self.dir.glob("*.jsonl") if p.stem.isdigit()), key=self._seq)

    def append(self, events: list[Event]) -> Path:
        """Write a batch; SpoolFull (nothing written) when it would take the spool past its cap."""
        data = "".join(ev.to_json() + "\n" for ev in events).encode()
        if self.bytes + len(data) > self.max_bytes:
            raise SpoolFull(f"the spool holds {self.bytes} bytes; {len(events)} more events "
                            f"({len(data)} bytes) would pass store.spool_max_bytes ({self.max_bytes})")
        name = self.dir / f"{self._next:012d}.jsonl"
        self._next += 1
        tmp = name.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, name)
        self.bytes += len(data)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return name

    def batches(self) -> Iterator[tuple[Path, list[Event]]]:
        """Oldest first.  A corrupt line is logged and skipped, never fatal."""
        for path in self._files():
            events: list[Event] = []
            with open(path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        events.append(Event.from_dict(json.loads(line)))
                    except (ValueError, KeyError, TypeError) as e:
                        log.error("spool %s line %d unreadable, skipped: %s", path.name, lineno, e)
            yield path, events

    def remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self.bytes = max(0, self.bytes - size)

    def pending(self) -> int:
        return len(self._files())

    def __bool__(self) -> bool:
        return self.pending() > 0

"""Small state files replaced whole: the approvals, the identity bindings, the chain's head, the
export cursors.  One way to write them, so each gets the same guarantees."""

from __future__ import annotations

import os


def write_atomic(path: str, data: str, mode: int = 0o600, sync: bool = True, sync_dir: bool = False) -> None:
    """Replace `path` with `data`: written to `path.tmp` (never through a symlink planted there),
    given `mode` whatever the umask, fsync'd when `sync`, then renamed over `path`, so a reader or
    a crash sees the old file or the new one, never half of one.  `sync_dir` fsyncs the directory
    too, so the rename itself survives a power cut."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

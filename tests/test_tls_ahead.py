"""daemon/tls_libs.py Ahead: files that export OpenSSL found before their first exec, in a thread
of its own (no daemon, no kernel: the map write is a callback here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from agentwarden.daemon import tls_libs

EXPORTER = r"""
// exports OpenSSL's two calls, and is over 1 MiB like every real TLS library or program
char pad[2 << 20] = {1};
int SSL_write(void *s, const void *b, int n) { return n + pad[n & 1]; }
int SSL_read(void *s, void *b, int n) { return n; }
"""


def _exporter(path: Path) -> None:
    src = path.with_suffix(".c")
    src.write_text(EXPORTER)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(path), str(src)], check=True)
    src.unlink()
    path.chmod(0o755)


class Found:
    def __init__(self) -> None:
        self.inodes: list[int] = []
        self.event = threading.Event()

    def __call__(self, st: os.stat_result) -> None:
        self.inodes.append(st.st_ino)
        self.event.set()

    def wait(self, n: int) -> list[int]:
        deadline = time.monotonic() + 10
        while len(self.inodes) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.inodes


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build an exporter")
def test_an_exporter_on_a_path_is_found_once_and_again_when_its_directory_changes(tmp_path: Path) -> None:
    _exporter(tmp_path / "node-like")
    (tmp_path / "script.sh").write_text("#!/bin/sh\n")
    (tmp_path / "script.sh").chmod(0o755)
    (tmp_path / "not-executable").write_bytes((tmp_path / "node-like").read_bytes())   # mode 0644
    found = Found()
    ahead = tls_libs.Ahead(found)
    ahead.scan([str(tmp_path), str(tmp_path / "missing")])
    assert found.wait(1) == [os.stat(tmp_path / "node-like").st_ino]
    ahead.scan([str(tmp_path)])           # unchanged: not read again
    time.sleep(0.3)
    assert len(found.inodes) == 1
    _exporter(tmp_path / "second")        # the directory changed: read again, both found
    ahead.scan([str(tmp_path)])
    assert sorted(found.wait(3)[1:]) == sorted([os.stat(tmp_path / "node-like").st_ino,
                                                os.stat(tmp_path / "second").st_ino])


def test_path_dirs_are_read_from_the_processs_environment(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "5"], env={"PATH": f"{tmp_path}:relative:/usr/bin"})
    try:
        time.sleep(0.1)
        assert tls_libs.path_dirs(proc.pid) == [str(tmp_path), "/usr/bin"]
    finally:
        proc.kill()
        proc.wait()
    assert tls_libs.path_dirs(proc.pid) == []   # gone


def test_a_directory_that_cannot_be_read_does_not_stop_the_thread(tmp_path: Path) -> None:
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "pipe")          # never opened: stat() alone, not a regular file
    os.symlink("loop", fifo_dir / "loop")  # a dangling link loop
    found = Found()
    ahead = tls_libs.Ahead(found)
    ahead.scan([str(fifo_dir), "/proc/self/fd"])
    if shutil.which("gcc"):
        later = tmp_path / "later"
        later.mkdir()
        _exporter(later / "lib")
        ahead.scan([str(later)])
        assert found.wait(1) == [os.stat(later / "lib").st_ino]

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


IMPORTER = r"""
// calls SSL_write and SSL_read, which another library defines: undefined symbols of its own
int SSL_write(void *s, const void *b, int n);
int SSL_read(void *s, void *b, int n);
int use(void *s) { char b[4]; return SSL_write(s, "x", 1) + SSL_read(s, b, 4); }
"""


def test_exports_names_defined_functions_only(tmp_path: Path) -> None:
    """exports(): a library that defines SSL_write and SSL_read exports them; one that only calls
    them (undefined in its .dynsym) does not; neither does a program that is not ELF."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed")
    _exporter(tmp_path / "libdefines.so")
    (tmp_path / "imp.c").write_text(IMPORTER)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "libcalls.so"), str(tmp_path / "imp.c")], check=True)
    assert tls_libs.exports(str(tmp_path / "libdefines.so"), tls_libs.SSL_EXPORTS) == tls_libs.SSL_EXPORTS
    assert tls_libs.exports(str(tmp_path / "libcalls.so"), tls_libs.SSL_EXPORTS) == set()
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert tls_libs.exports(str(tmp_path / "script"), tls_libs.SSL_EXPORTS) == set()


def _sparse_elf(path: Path, table: int) -> None:
    """An ELF header and two section headers, a .dynsym and its string table of `table` bytes each
    (zeros: a sparse file, no disk): red team 31 mapped ten of 64 MiB and connected again and again,
    each read 0.35 s of the daemon's capture thread."""
    import struct

    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x28, 4096)
    struct.pack_into("<HH", head, 0x3A, 64, 3)
    secs = bytearray(192)
    struct.pack_into("<IIQQQQI", secs, 64, 0, 11, 0, 0, 1 << 20, table, 2)
    struct.pack_into("<IIQQQQI", secs, 128, 0, 3, 0, 0, 1 << 20, table, 0)
    with open(path, "wb") as f:
        f.write(head)
        f.seek(4096)
        f.write(secs)
        f.truncate((1 << 20) + table)


def test_a_dynamic_table_past_the_bound_is_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A .dynsym over MAX_DYNAMIC_TABLE is not read (taken to export nothing, and logged); one within
    it is, and zeros define nothing."""
    big, small = tmp_path / "big.so", tmp_path / "small.so"
    _sparse_elf(big, tls_libs.MAX_DYNAMIC_TABLE + 24)
    _sparse_elf(small, 1 << 20)
    with caplog.at_level("INFO", logger="agentwarden.daemon.tls_libs"):
        assert tls_libs.exports(str(big), tls_libs.SSL_EXPORTS) == set()
        assert tls_libs.exports(str(small), tls_libs.SSL_EXPORTS) == set()
    said = [r.getMessage() for r in caplog.records if "not read for OpenSSL" in r.getMessage()]
    assert said == [f"not read for OpenSSL's names: {big} (a dynamic symbol table over 16 MiB)"], said


def test_exports_of_garbage_is_empty_and_never_raises(tmp_path: Path) -> None:
    """Any bytes, with or without an ELF header in front: a set, never an exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    path = tmp_path / "g.so"

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=4096), st.booleans())
    def run(body: bytes, elf: bool) -> None:
        path.write_bytes((b"\x7fELF\x02\x01" + bytes(58) if elf else b"") + body)
        assert tls_libs.exports(str(path), tls_libs.SSL_EXPORTS) <= tls_libs.SSL_EXPORTS

    run()

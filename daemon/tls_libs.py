"""Which libraries to put uprobes on: OpenSSL (plaintext) and libc (failed execs), the
system's and any a tracked process maps."""

from __future__ import annotations

import os
import re
import subprocess

_LIBSSL = re.compile(r"/\S*libssl\.so[.\d]*$")
_LIBC = re.compile(r"/\S*libc\.so\.6$")


def mapped_libssl(pid: int) -> set[str]:
    """libssl files mapped by a process (its own copy, e.g. a Python wheel's, counts)."""
    return _mapped(pid, _LIBSSL)


def mapped_libc(pid: int) -> set[str]:
    """The glibc a process maps (a container's own, for one)."""
    return _mapped(pid, _LIBC)


def _mapped(pid: int, pattern: re.Pattern[str]) -> set[str]:
    found: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                m = pattern.search(line.rstrip())
                if m:
                    found.add(os.path.realpath(f"/proc/{pid}/root{m.group(0)}")
                              if not os.path.exists(m.group(0)) else os.path.realpath(m.group(0)))
    except OSError:
        pass
    return found


def system_libssl() -> set[str]:
    """The distribution's libssl files (ldconfig's cache), attached at start so a
    process's first TLS connection is not missed while its maps are read."""
    return _system("libssl.so")


def system_libc() -> set[str]:
    """The distribution's glibc (ldconfig's cache), for the failed-exec uprobes."""
    return _system("libc.so.6")


def _system(name: str) -> set[str]:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {os.path.realpath(line.split("=>")[-1].strip()) for line in out.splitlines()
            if name in line and "=>" in line}

"""Which OpenSSL libraries to put uprobes on: the system's, and any a tracked process maps."""

from __future__ import annotations

import os
import re
import subprocess

_LIBSSL = re.compile(r"/\S*libssl\.so[.\d]*$")


def mapped_libssl(pid: int) -> set[str]:
    """libssl files mapped by a process (its own copy, e.g. a Python wheel's, counts)."""
    found: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                m = _LIBSSL.search(line.rstrip())
                if m:
                    found.add(os.path.realpath(f"/proc/{pid}/root{m.group(0)}")
                              if not os.path.exists(m.group(0)) else os.path.realpath(m.group(0)))
    except OSError:
        pass
    return found


def system_libssl() -> set[str]:
    """The distribution's libssl files (ldconfig's cache), attached at start so a
    process's first TLS connection is not missed while its maps are read."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {os.path.realpath(line.split("=>")[-1].strip()) for line in out.splitlines()
            if "libssl.so" in line and "=>" in line}

"""Small, failure-tolerant readers of /proc and the user database.

Processes come and go while we read; every function here returns a default
instead of raising when the process is gone.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache

UNSET_LOGINUID = 4294967295


@dataclass(frozen=True)
class ProcSnapshot:
    pid: int
    ppid: int
    comm: str
    exe: str
    argv: list[str]
    cwd: str
    uid: int
    start_ticks: int
    tty_nr: int
    login_uid: int | None
    tgid: int = 0              # the process a thread id belongs to (its own pid for a process)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def socket_fds(pid: int, task: int | None = None) -> dict[int, int]:
    """inode -> fd of the sockets in a process's file table (or in one of its threads', which may
    have its own); an fd closed while listed is skipped."""
    base = f"/proc/{pid}/fd" if task is None else f"/proc/{pid}/task/{task}/fd"
    out: dict[int, int] = {}
    try:
        fds = os.listdir(base)
    except OSError:
        return out
    for fd in fds:
        target = _link(f"{base}/{fd}")
        if target.startswith("socket:["):
            out[int(target[8:-1])] = int(fd)
    return out


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/pid/stat after the comm, which may contain spaces and parens."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    text = raw.decode(errors="replace")
    return text[text.rfind(")") + 2 :].split()


def snapshot(pid: int) -> ProcSnapshot | None:
    fields = stat_fields(pid)
    if fields is None:
        return None
    comm = (_read(f"/proc/{pid}/comm") or b"").decode(errors="replace").rstrip("\n")
    cmd = _read(f"/proc/{pid}/cmdline") or b""
    argv = [a.decode(errors="surrogateescape") for a in cmd.split(b"\0")[:-1]] if cmd else []
    uid, tgid = -1, pid
    status = _read(f"/proc/{pid}/status") or b""
    for line in status.splitlines():
        if line.startswith(b"Tgid:"):
            tgid = int(line.split()[1])
        elif line.startswith(b"Uid:"):
            uid = int(line.split()[1])
            break
    return ProcSnapshot(
        pid=pid,
        ppid=int(fields[1]),
        comm=comm,
        exe=_link(f"/proc/{pid}/exe"),
        argv=argv,
        cwd=_link(f"/proc/{pid}/cwd"),
        uid=uid,
        start_ticks=int(fields[19]),
        tty_nr=int(fields[4]),
        login_uid=login_uid(pid),
        tgid=tgid,
    )


def login_uid(pid: int) -> int | None:
    raw = _read(f"/proc/{pid}/loginuid")
    if not raw:
        return None
    try:
        v = int(raw)
    except ValueError:
        return None
    return None if v == UNSET_LOGINUID else v


def cwd(pid: int) -> str:
    return _link(f"/proc/{pid}/cwd")


def fd_path(pid: int, fd: int) -> str:
    return _link(f"/proc/{pid}/fd/{fd}")


def alive(pid: int, start_ticks: int | None = None) -> bool:
    fields = stat_fields(pid)
    if fields is None:
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def tty_name(tty_nr: int) -> str:
    """Device name of a controlling terminal number from /proc/pid/stat."""
    if tty_nr == 0:
        return ""
    major = (tty_nr >> 8) & 0xFFF
    minor = (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    if 136 <= major <= 143:
        return f"pts/{(major - 136) * 256 + minor}"
    if major == 4:
        return f"tty{minor}" if minor < 64 else f"ttyS{minor - 64}"
    return f"{major}:{minor}"


@lru_cache(maxsize=1)
def boot_id() -> str:
    return (_read("/proc/sys/kernel/random/boot_id") or b"").decode().strip()


def session_id(host: str, pid: int, start_ticks: int) -> str:
    """Stable per host and boot: the same process always gets the same id."""
    h = hashlib.blake2b(f"{host}|{boot_id()}|{pid}|{start_ticks}".encode(), digest_size=8)
    return h.hexdigest()

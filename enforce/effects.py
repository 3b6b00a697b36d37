"""Everything the enforcer does to the world, behind one typed interface.

The enforcer (enforcer.py) decides; what it decides reaches processes, sockets and the
kernel's guard maps only through an `Effects`.  The daemon gives it `HostEffects` (signals,
`ss -K`, a write to the process's own stderr, the loaded probes' maps); a unit test gives it
a recording fake and builds an `Enforcer` without root (tests/test_enforcer_unit.py).

Reads of the kernel's state (is a pid tracked, which execs wait for a decision) are here too:
they come from the same maps, and a fake answers them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from typing import Any, Protocol

from agentwarden.core import procfs
from agentwarden.enforce import callers
from agentwarden.enforce.kernel import KernelPolicy, Plan

log = logging.getLogger(__name__)


class Effects(Protocol):
    # processes and their connections
    def signal(self, pid: int, start: int | None, sig: int) -> bool: ...
    def tell(self, pid: int, text: str) -> bool: ...
    def close_tcp(self, dst: str, local_port: int, remote_port: int) -> bool: ...

    # the guard maps: the policy's plan and per-session state (enforce/kernel.py)
    def apply(self, plan: Plan, daemon_pid: int,
              programs: dict[tuple[int, int], int] | None = None) -> None: ...
    def add_program(self, key: tuple[int, int], bits: int) -> None: ...
    def set_session(self, session: int, mask: int, mark: int) -> None: ...
    def drop_session(self, session: int) -> None: ...
    def allow_exec(self, session: int, ident: int, until_boot_ns: int, uses: int) -> None: ...
    def allow_statement(self, session: int, stmt_hash: int, until_boot_ns: int) -> None: ...

    # sockets a process already had, put under the stream guards (probes/loader.py)
    def guard_sockets(self, pid: int, session: int) -> tuple[list[tuple[str, int]], bool]: ...

    # the decision stop and git's judged transports (probes/loader.py)
    def decided(self, pid: int) -> None: ...
    def deciding_add(self, pid: int, since_boot_ns: int) -> None: ...
    def judge_transport(self, pid: int, since_boot_ns: int) -> None: ...

    # reads of the same maps
    def deciding(self) -> dict[int, int]: ...
    def stopped_at(self, pid: int) -> int: ...
    def is_tracked(self, pid: int) -> bool: ...
    def session_of(self, pid: int) -> int | None: ...
    def judged_transport(self, pid: int) -> bool: ...


class HostEffects(KernelPolicy):
    """The real ones: this host's processes, and the maps of the loaded probes (the guard maps'
    writes are KernelPolicy's own)."""

    def __init__(self, probes: Any) -> None:
        super().__init__(probes)
        self.probes = probes

    def signal(self, pid: int, start: int | None, sig: int) -> bool:
        return send_signal(pid, start, sig)

    def tell(self, pid: int, text: str) -> bool:
        return tell(pid, text)

    def close_tcp(self, dst: str, local_port: int, remote_port: int) -> bool:
        return close_connection(dst, local_port, remote_port)

    def decided(self, pid: int) -> None:
        self.probes.decided(pid)

    def guard_sockets(self, pid: int, session: int) -> tuple[list[tuple[str, int]], bool]:
        """Every connected TCP socket of pid that no guard holds, in its file table and in any of its
        threads' own (CLONE_FILES; a zombie leader shows none): put in the guard refused, and
        closed.  Returns their peers, and whether a socket could not be reached."""
        from agentwarden.probes.loader import UNREACHABLE

        found: dict[int, tuple[int, int, bool]] = {}    # socket inode -> (task, fd, a thread of its own)
        with contextlib.suppress(OSError):            # gone
            tasks = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
            for task in [pid, *(t for t in tasks if t != pid and not _same_files(pid, t))]:
                for inode, fd in procfs.socket_fds(pid, task).items():
                    found.setdefault(inode, (task, fd, task != pid))
        if not found:
            return [], False
        servers = _listening_ports(pid)
        closed: list[tuple[str, int]] = []
        unreachable = False
        for tid, fd, thread in found.values():
            try:
                peer = self.probes.guard_socket(tid, fd, session, thread, servers)
            except Exception as e:    # one socket never stops a policy load or the start
                log.warning("cannot put pid %d's socket %d in the guard: %s", tid, fd, e)
                peer = UNREACHABLE
            if peer == UNREACHABLE:
                unreachable = True
            elif peer is not None:
                closed.append(peer)
        return closed, unreachable

    def deciding_add(self, pid: int, since_boot_ns: int) -> None:
        self.probes.deciding_add(pid, since_boot_ns)

    def judge_transport(self, pid: int, since_boot_ns: int) -> None:
        self.probes.judge_transport(pid, since_boot_ns)

    def deciding(self) -> dict[int, int]:
        return dict(self.probes.deciding())

    def stopped_at(self, pid: int) -> int:
        return int(self.probes.stopped_at(pid))

    def is_tracked(self, pid: int) -> bool:
        return bool(self.probes.is_tracked(pid))

    def session_of(self, pid: int) -> int | None:
        found = self.probes.session_of(pid)
        return None if found is None else int(found)

    def judged_transport(self, pid: int) -> bool:
        return bool(self.probes.judged_transport(pid))


def start_ticks(pid: int) -> int | None:
    """Start time in clock ticks: tells a process from a later one with the same pid."""
    p = callers.proc(pid)
    return p.start if p is not None else None


def send_signal(pid: int, start: int | None, sig: int) -> bool:
    """Signal pid unless it is no longer the process that started at `start` (clock ticks)."""
    if start is not None and start_ticks(pid) != start:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def close_connection(dst: str, local_port: int, remote_port: int) -> bool:
    """Abort one TCP connection (sock_diag SOCK_DESTROY, through iproute2's `ss -K`).

    After sk_msg drops a send the socket cannot send again, and a Postgres client
    that saw its send fail waits for the server's answer: closing the connection
    turns that wait into an immediate "connection aborted".
    """
    try:
        host = f"[{dst}]" if ":" in dst else dst   # ss wants IPv6 addresses in brackets
        res = subprocess.run(["ss", "-K", "-t", "-n", "dst", host, "dport", "=", f":{remote_port}",
                              "sport", "=", f":{local_port}"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot close %s:%d: %s", dst, remote_port, e)
        return False
    closed = res.returncode == 0 and res.stdout.count("\n") > 1
    if not closed:
        log.info("no connection to %s:%d from port %d to close: %s", dst, remote_port, local_port,
                 res.stderr.strip() or "not found")
    return closed


_SYS_KCMP, _KCMP_FILES = 312, 2


def _same_files(pid: int, tid: int) -> bool:
    """Does the thread share its process's file table (kcmp)?  Most do: one walk serves them all."""
    import ctypes

    return int(ctypes.CDLL(None, use_errno=True).syscall(_SYS_KCMP, pid, tid, _KCMP_FILES, 0, 0)) == 0


def _listening_ports(pid: int) -> frozenset[int]:
    """The TCP ports listened on in pid's network namespace (a connection accepted on one is a
    server's side)."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{name}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if len(cols) > 3 and cols[3] == "0A":           # TCP_LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return frozenset(ports)


def tell(pid: int, text: str) -> bool:
    """Write text to a process's stderr exactly as the process itself could.

    The descriptor is duplicated with pidfd_getfd (the same open file, with its own access
    mode and O_APPEND), never reopened through /proc/PID/fd/2: a root reopen would let an
    agent that points fd 2 at a file it may only read have the daemon write into it.
    Never blocks: a full pipe or a stopped terminal loses the message, not the daemon.
    """
    import select

    from agentwarden.probes.loader import take_fd

    try:
        fd = take_fd(pid, 2)
    except OSError:
        return False
    try:
        if not select.select([], [fd], [], 0)[1]:
            return False
        os.write(fd, text.encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)

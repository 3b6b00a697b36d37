"""Who is on the other end of the control socket, judged race-free.

The kernel names the peer (SO_PEERCRED) and, since Linux 6.5, pins it (SO_PEERPIDFD): a
pidfd refers to the very process that connected, not to a number that may be reused.
Everything read about the caller from /proc is read while that process is known alive,
and checked again afterwards: if it exited meanwhile, the pid may already belong to
another process, and the caller is refused.

`judge()` decides whether a caller may approve or deny, beyond what the approvers of a
rule say: never a process inside an agent session or below one, never one that shares a
controlling terminal or a session with an agent's processes, and never one whose nearest
common ancestor with an agent is a server or a terminal (it listens on a socket or holds
a pty master: tmux, screen, a terminal emulator, an editor server, systemd --user), since
the agent can drive those to type the approval for it.  What a same-user `self` approval
still cannot prove is in the README (Approvals).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

SO_PEERPIDFD = 77          # include/uapi/asm-generic/socket.h (Linux 6.5)


class CallerGone(RuntimeError):
    pass


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    tty: int
    uid: int
    comm: str
    start: int = 0       # start time in clock ticks since boot: tells a process from a later one
    state: str = ""      # "T" stopped, "Z" zombie, ...


def peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd of the peer as it was at connect time, or None on kernels before 6.5."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError:
        return None
    return int(struct.unpack("i", raw)[0])


def pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to; -1 once the process has exited (fdinfo `Pid:`)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return -1


def proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            comm_part, rest = f.read().rsplit(")", 1)
        fields = rest.split()
        st = os.stat(f"/proc/{pid}")
    except (OSError, ValueError):
        return None
    return Proc(pid=pid, ppid=int(fields[1]), sid=int(fields[3]), tty=int(fields[4]), uid=st.st_uid,
                comm=comm_part.split("(", 1)[1], start=int(fields[19]), state=fields[0])


def euid(pid: int) -> int | None:
    """The effective uid from /proc/PID/status (the /proc/PID owner is root for a
    non-dumpable process, so it is not the same thing)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except (OSError, IndexError, ValueError):
        pass
    return None


def ancestors(pid: int, limit: int = 64) -> list[Proc]:
    """The process itself and its ancestors up to PID 1 (or a process outside this namespace)."""
    out: list[Proc] = []
    p = proc(pid)
    while p is not None and len(out) < limit:
        out.append(p)
        if p.ppid <= 0:
            break
        p = proc(p.ppid)
    return out


def _listening_unix_inodes() -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) >= 7 and int(parts[3], 16) & 0x10000:   # __SO_ACCEPTCON: listening
                out.add(int(parts[6]))
    return out


def _listening_inet_inodes() -> set[int]:
    out: set[int] = set()
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{name}") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) > 9 and parts[3] == "0A":   # TCP_LISTEN
                    out.add(int(parts[9]))
    return out


def serves(pid: int) -> str:
    """Why this process is a server or terminal an agent could drive ("" if it is not)."""
    listening: set[int] | None = None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ""
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target in ("/dev/ptmx", "/dev/pts/ptmx"):
            return "holds a terminal's master side"
        if target.startswith("socket:["):
            if listening is None:
                listening = _listening_unix_inodes() | _listening_inet_inodes()
            if int(target[8:-1]) in listening:
                return "listens on a socket"
    return ""


@dataclass(frozen=True)
class Verdict:
    refused: str         # "" when the caller may decide
    auth: str            # how the caller was established, for the audit trail


def lineage(pid: int) -> dict[str, object]:
    """An agent as a request keeps it: (pid, start) of its root and the root's ancestors, its
    session and terminal, so the agent that asked is still known after it has exited."""
    chain = ancestors(pid)
    return {"procs": [(p.pid, p.start) for p in chain], "sid": chain[0].sid if chain else 0,
            "tty": chain[0].tty if chain else 0}


def _common_server(mine: dict[int, Proc], theirs: Iterable[tuple[int, int]]) -> Proc | None:
    """The nearest ancestor of the agent (below PID 1) that the caller also descends from, when it
    is a server or a terminal."""
    for a_pid, a_start in theirs:
        p = mine.get(a_pid)
        if p is not None and p.start == a_start:
            return p if p.pid > 1 and serves(p.pid) else None
    return None


def judge(pid: int, pidfd: int | None, tracked: Callable[[int], bool], agent_roots: Iterable[int],
          recorded: Iterable[dict[str, object]] = ()) -> Verdict:
    """May the process `pid` (pinned by `pidfd`) approve or deny?  agent_roots: the live agent
    sessions' roots; recorded: lineages (see lineage()) of the agents whose requests are decided."""
    chain = ancestors(pid)
    if not chain:
        raise CallerGone(f"the caller (pid {pid}) exited before it could be judged")
    me = chain[0]
    pinned = "SO_PEERPIDFD" if pidfd is not None else "SO_PEERCRED (no pidfd: kernel older than 6.5)"
    auth = f"{pinned}: pid {pid} uid {me.uid}"
    refused = ""
    for p in chain:
        if tracked(p.pid):
            refused = (f"pid {pid} runs inside an agent session" if p.pid == pid else
                       f"pid {pid} descends from pid {p.pid} ({p.comm}), inside an agent session")
            break
    if not refused:
        mine = {p.pid: p for p in chain}
        for agent in [lineage(root) for root in agent_roots] + list(recorded):
            theirs = [(int(p), int(s)) for p, s in agent.get("procs") or []]  # type: ignore[attr-defined]
            if not theirs:
                continue
            if me.tty and me.tty == agent.get("tty"):
                refused = f"pid {pid} shares its terminal with agent pid {theirs[0][0]}"
                break
            if me.sid == agent.get("sid"):
                refused = f"pid {pid} shares its session with agent pid {theirs[0][0]}"
                break
            common = _common_server(mine, theirs[1:])
            if common is not None:
                refused = (f"pid {pid} and agent pid {theirs[0][0]} both run under pid {common.pid} "
                           f"({common.comm}), which {serves(common.pid)}: the agent could drive it")
                break
    # everything above was read from /proc/PID: valid only if PID is still the caller
    if pidfd is not None and pidfd_pid(pidfd) != pid:
        raise CallerGone(f"the caller (pid {pid}) exited while it was judged")
    if not refused:
        auth += "; outside every agent session, its terminal, session and servers"
    return Verdict(refused, auth)

"""Decode process.bpf.c's ring buffer records into typed events.

Kernel side: process.bpf.c.  This module only knows the wire format; what the
records mean for sessions is the tracker's business (agentwarden.daemon.tracker).
"""

from __future__ import annotations

import ctypes as ct
import logging
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

log = logging.getLogger(__name__)

PATH_LEN = 256
TASK_COMM_LEN = 16

EV_SESSION = 1
EV_FORK = 2
EV_EXEC_ARGS = 3
EV_EXEC = 4
EV_EXEC_FAIL = 5
EV_EXIT = 6
EV_CHDIR = 7
EV_CWD = 8

TRUNC_ARGC = 1
TRUNC_ARG = 2
TRUNC_TOTAL = 4
ARGS_RAW = 8       # args is the image's argument area (NUL-separated); argc is the most to keep

CNT_LOST = 0
CNT_TRACK_FULL = 1

# The events ring wakes the daemon at most once per this many ns per CPU (process.bpf.c
# ring_wake); records in between wait for the daemon's next poll, which comes within
# RING_BUSY_POLL_MS while records flow (probes.loader.Probes.poll).  A wakeup per record cost
# the agent a context switch per send and the daemon a loop turn per record under pgbench -S
# (README, Performance).  Verdicts have their own ring, which wakes at every record.
RING_WAKE_NS = 4_000_000
RING_BUSY_POLL_MS = 8
# how long after a poll that was woken or found records the daemon keeps polling every
# RING_BUSY_POLL_MS: a record without a wakeup follows its CPU's last wakeup by less than
# RING_WAKE_NS, so a poll within that window plus one busy wait reads it
RING_BUSY_WINDOW_S = 0.05


@dataclass(frozen=True)
class ProbeLimits:
    """Sizes compiled into the probe; argv beyond them is cut and flagged."""

    argv_max_args: int = 128
    argv_arg_bytes: int = 4096
    argv_total_bytes: int = 16384
    ringbuf_pages: int = 4096
    max_tracked: int = 65536
    # connections the SQL/HTTP stream guard holds at once (its sockhash), and TLS streams it frames
    # (ssl_streams): past them a new connection is reset and a TLS writer killed (fail closed)
    guard_connections: int = 65536
    data_chunk_bytes: int = 16384
    data_max_chunks: int = 4
    data_max_iov: int = 8
    # bpffs directory of the maps that must outlive the daemon (execs waiting for a decision)
    pin_dir: str = "/sys/fs/bpf/agentwarden"
    # the uprobe on every dynamic loader's entry (guard.bpf.c aw_loader_entry): it costs every
    # exec of a dynamic program on the host about 7 % (bench/guard_hooks_bench.py), and adds
    # nothing while the syscall hook runs (it kills at the first system call, the loader's);
    # None: on exactly when the syscall hook is off
    loader_guard: bool | None = None
    # the raw sys_enter/sys_exit hook (net.bpf.c): self-protection against a root agent, the
    # decision stop's first-syscall kill and ptrace joins, at the price of every syscall on the
    # host going through the kernel's slow path (dd bs=1 about 2x); capture does not need it
    hardened: bool = False
    # the cgroup v2 hierarchy whose root the cgroup programs attach to: "" for this system's
    # (/proc/mounts); a DaemonSet pod's is the node's, under its host root
    cgroup_root: str = ""


# ---- wire structs (mirror process.bpf.c) ------------------------------------


class Hdr(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("gid", ct.c_uint32),
        ("profile", ct.c_uint32),
        ("ts", ct.c_uint64),
        ("session", ct.c_uint64),
        ("cgroup", ct.c_uint64),
        ("comm", ct.c_char * TASK_COMM_LEN),
    ]


class ExecArgsHead(ct.Structure):
    _fields_ = [
        ("h", Hdr),
        ("argc", ct.c_uint32),
        ("args_len", ct.c_uint32),
        ("truncated", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("filename", ct.c_char * PATH_LEN),
    ]


class ExecRec(ct.Structure):
    _fields_ = [
        ("h", Hdr),
        ("old_pid", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("filename", ct.c_char * PATH_LEN),
    ]


class ForkRec(ct.Structure):
    _fields_ = [("h", Hdr), ("child", ct.c_uint32), ("joined", ct.c_uint32)]


class ExecFailRec(ct.Structure):
    _fields_ = [("h", Hdr), ("err", ct.c_int32), ("_pad", ct.c_uint32)]


class ExitRec(ct.Structure):
    _fields_ = [
        ("h", Hdr),
        ("code", ct.c_int32),
        ("signal", ct.c_int32),
        ("has_code", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


class ChdirRec(ct.Structure):
    _fields_ = [
        ("h", Hdr),
        ("fd", ct.c_int32),
        ("_pad", ct.c_uint32),
        ("path", ct.c_char * PATH_LEN),
    ]


class CwdHead(ct.Structure):
    """AW_EV_CWD: then `n` names of PATH_LEN bytes, leaf first."""

    _fields_ = [("h", Hdr), ("n", ct.c_uint32), ("cut", ct.c_uint32)]


class TrackInfo(ct.Structure):
    _fields_ = [("session", ct.c_uint64), ("profile", ct.c_uint32), ("flags", ct.c_uint32)]


TRACK_JOINED = 1   # AW_TRACK_JOINED: joined by the /proc scan or a ptrace join, not seen exec'ed or forked


class CommKey(ct.Structure):
    _fields_ = [("comm", ct.c_char * TASK_COMM_LEN)]


# ---- decoded events ---------------------------------------------------------


class RawHeader(NamedTuple):
    """Every record's header.  A named tuple: one is made per record (about 0.3 µs; a frozen
    dataclass took 1.3, bench/pipeline_bench.py)."""

    pid: int
    tid: int
    uid: int
    gid: int
    profile: int
    ts_boot_ns: int
    session: int
    cgroup: int
    comm: str


@dataclass(frozen=True)
class SessionExec:
    """An untracked process exec'd an image whose comm names an agent."""

    h: RawHeader
    old_pid: int
    filename: str


@dataclass(frozen=True)
class Fork:
    h: RawHeader
    child: int
    joined: bool = False   # not a new child: a running process the agent took control of (ptrace)


@dataclass(frozen=True)
class ExecArgs:
    h: RawHeader
    filename: str
    argv: tuple[str, ...]
    truncated: int


@dataclass(frozen=True)
class Exec:
    h: RawHeader
    old_pid: int
    filename: str


@dataclass(frozen=True)
class ExecFail:
    h: RawHeader
    errno: int


@dataclass(frozen=True)
class Exit:
    h: RawHeader
    code: int | None
    signal: int | None


@dataclass(frozen=True)
class Chdir:
    h: RawHeader
    path: str | None
    fd: int | None
    absolute: bool = False   # the kernel's walk at exec (None path: too deep, cut)


RawEvent = SessionExec | Fork | ExecArgs | Exec | ExecFail | Exit | Chdir


def _s(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# Hdr as one struct.unpack (the ctypes structs stay the layout of record; their sizes are
# checked equal at import)
HDR = struct.Struct("<IIIIIIQQQ16s")


def header_at(buf: bytes, offset: int = 0) -> RawHeader:
    _t, pid, tid, uid, gid, profile, ts, session, cgroup, comm = HDR.unpack_from(buf, offset)
    return RawHeader(pid, tid, uid, gid, profile, ts, session, cgroup,
                     comm.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))


def header(h: Hdr) -> RawHeader:
    return RawHeader(
        pid=h.pid,
        tid=h.tid,
        uid=h.uid,
        gid=h.gid,
        profile=h.profile,
        ts_boot_ns=h.ts,
        session=h.session,
        cgroup=h.cgroup,
        comm=_s(h.comm),
    )


class DecodeError(ValueError):
    pass


def decode(buf: bytes) -> RawEvent:
    """Decode one ring buffer record.  Raises DecodeError on a malformed one."""
    if len(buf) < ct.sizeof(Hdr):
        raise DecodeError(f"record of {len(buf)} bytes is shorter than its header")
    kind = int.from_bytes(buf[:4], "little")

    def need(cls: type[ct.Structure]) -> ct.Structure:
        if len(buf) < ct.sizeof(cls):
            raise DecodeError(f"record type {kind}: {len(buf)} bytes, need {ct.sizeof(cls)}")
        return cls.from_buffer_copy(buf[: ct.sizeof(cls)])

    if kind in (EV_SESSION, EV_EXEC):
        r = need(ExecRec)
        cls = SessionExec if kind == EV_SESSION else Exec
        return cls(header(r.h), r.old_pid, _s(r.filename))
    if kind == EV_FORK:
        f = need(ForkRec)
        return Fork(header(f.h), f.child, bool(f.joined))
    if kind == EV_EXEC_ARGS:
        a = need(ExecArgsHead)
        start = ct.sizeof(ExecArgsHead)
        blob = buf[start : start + min(a.args_len, len(buf) - start)]
        truncated = a.truncated
        if truncated & ARGS_RAW:
            # the whole argument area: every argument ends in NUL unless the area was cut
            parts = blob.split(b"\0")
            if parts and (not truncated & TRUNC_TOTAL or parts[-1] == b""):
                parts.pop()
            if len(parts) > a.argc:
                parts = parts[: a.argc]
                truncated |= TRUNC_ARGC
            truncated &= ~ARGS_RAW
        else:
            parts = blob.split(b"\0")[: a.argc]
        argv = tuple(p.decode("utf-8", "surrogateescape") for p in parts)
        return ExecArgs(header(a.h), _s(a.filename), argv, truncated)
    if kind == EV_EXEC_FAIL:
        x = need(ExecFailRec)
        return ExecFail(header(x.h), x.err)
    if kind == EV_EXIT:
        e = need(ExitRec)
        if e.has_code:
            return Exit(header(e.h), e.code, None)
        return Exit(header(e.h), None, e.signal or None)
    if kind == EV_CHDIR:
        c = need(ChdirRec)
        if c.fd >= 0:
            return Chdir(header(c.h), None, c.fd)
        return Chdir(header(c.h), _s(c.path), None)
    if kind == EV_CWD:   # the kernel's walk at exec; None when it was cut (too deep)
        w = need(CwdHead)
        at = ct.sizeof(CwdHead)
        if len(buf) < at + w.n * PATH_LEN:
            raise DecodeError(f"cwd record: {w.n} names in {len(buf)} bytes")
        names = [buf[at + i * PATH_LEN : at + (i + 1) * PATH_LEN].split(b"\0", 1)[0] for i in range(w.n)]
        path = "/" + "/".join(n.decode("utf-8", "surrogateescape") for n in reversed(names))
        return Chdir(header(w.h), None if w.cut else path, None, absolute=True)
    raise DecodeError(f"unknown record type {kind}")


def boot_clock_offset_ns() -> int:
    """Offset that turns CLOCK_BOOTTIME ns (the probes' clock) into Unix ns."""
    a = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    wall = time.time_ns()
    b = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    return wall - (a + b) // 2


assert HDR.size == ct.sizeof(Hdr), "probes/process.py: HDR and Hdr disagree"

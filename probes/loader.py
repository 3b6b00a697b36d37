"""Compile and load the probes (one BPF object from one C file per concern).

process.bpf.c and net.bpf.c share the tracking map and the ring buffer, so they
are compiled as one unit; this module owns that object and its maps.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import logging
import platform
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TypeAlias

from agentwarden.probes import net
from agentwarden.probes import process as pr

log = logging.getLogger(__name__)

SOURCES = ("process.bpf.c", "net.bpf.c", "tls.bpf.c")
SSL_PROBES = (("SSL_write", "aw_ssl_write"), ("SSL_write_ex", "aw_ssl_write_ex"),
              ("SSL_read", "aw_ssl_read"), ("SSL_read_ex", "aw_ssl_read_ex"))


def bpf_source(limits: pr.ProbeLimits) -> tuple[str, list[str]]:
    """The C text and the -D flags that size it."""
    total = limits.argv_total_bytes
    if total & (total - 1) or total < 2 * limits.argv_arg_bytes:
        raise ValueError("argv_total_bytes must be a power of two and at least 2 * argv_arg_bytes")
    chunk = limits.data_chunk_bytes
    if chunk & (chunk - 1):
        raise ValueError("data_chunk_bytes must be a power of two")
    pkg = resources.files("agentwarden.probes")
    text = "\n".join(pkg.joinpath(name).read_text() for name in SOURCES)
    cflags = [
        f"-DAW_ARGV_MAX={limits.argv_max_args}",
        f"-DAW_ARG_LEN={limits.argv_arg_bytes}",
        f"-DAW_ARGS_SIZE={total}",
        f"-DAW_RINGBUF_PAGES={limits.ringbuf_pages}",
        f"-DAW_MAX_TRACKED={limits.max_tracked}",
        f"-DAW_CHUNK={chunk}",
        f"-DAW_MAX_CHUNKS={limits.data_max_chunks}",
        f"-DAW_MAX_IOV={limits.data_max_iov}",
        f"-DAW_RAW_SYSCALLS={int(raw_syscalls())}",
    ]
    return text, cflags


# tail-called by the raw sys_exit program, indexed by the AW_OP_* of net.bpf.c
EXIT_PROGRAMS = {1: "aw_exit_connect", 2: "aw_exit_accept", 3: "aw_exit_socket", 4: "aw_exit_buf",
                 5: "aw_exit_iov", 6: "aw_exit_msg", 7: "aw_exit_mmsg"}


def raw_syscalls() -> bool:
    """The raw_tracepoint front end of net.bpf.c reads pt_regs, laid out for x86-64."""
    return platform.machine() == "x86_64"


RawRecord: TypeAlias = pr.RawEvent | net.NetEvent


def decode(buf: bytes) -> RawRecord:
    """Decode one ring buffer record of either probe.  Raises DecodeError."""
    if len(buf) < 4:
        raise pr.DecodeError(f"record of {len(buf)} bytes")
    kind = int.from_bytes(buf[:4], "little")
    if kind in net.KINDS:
        return net.decode(kind, buf)
    return pr.decode(buf)


class Probes:
    """The loaded probes: ring buffer, tracking and connection maps, counters."""

    def __init__(self, limits: pr.ProbeLimits | None = None) -> None:
        from bcc import BPF  # a system package (python3-bpfcc), reached through the venv

        self.limits = limits or pr.ProbeLimits()
        text, cflags = bpf_source(self.limits)
        self.bpf = BPF(text=text.encode(), cflags=cflags)
        self._tracked = self.bpf[b"tracked"]
        self._comms = self.bpf[b"agent_comms"]
        self._counters = self.bpf[b"counters"]
        self._conns = self.bpf[b"conns"]
        self._filter = self.bpf[b"track_filter"]
        self._handler: Callable[[bytes], None] | None = None
        self._ssl_libs: set[str] = set()
        if raw_syscalls():
            progs = self.bpf[b"exit_progs"]
            for op, name in EXIT_PROGRAMS.items():
                progs[ct.c_int(op)] = ct.c_int(self.bpf.load_func(name.encode(), BPF.RAW_TRACEPOINT).fd)
        self.bpf[b"events"].open_ring_buffer(self._on_record)

    def _on_record(self, _ctx: object, data: int, size: int) -> None:
        if self._handler is not None:
            self._handler(ct.string_at(data, size))

    def poll(self, handler: Callable[[bytes], None], timeout_ms: int = 100) -> None:
        """Hand every pending record (raw bytes) to handler; wait up to timeout_ms."""
        self._handler = handler
        self.bpf.ring_buffer_poll(timeout_ms)

    def set_agent_comms(self, comms: Iterable[tuple[str, int]]) -> None:
        """Replace the comm -> profile table the kernel uses to start sessions."""
        self._comms.clear()
        for comm, profile in comms:
            key = pr.CommKey(comm.encode()[: pr.TASK_COMM_LEN - 1])
            self._comms[key] = ct.c_uint32(profile)

    def _filter_add(self, pid: int, delta: int) -> None:
        """Keep the kernel's track_filter count in step with `tracked` (see process.bpf.c)."""
        slot = ct.c_int(pid & 0xFFFF)
        self._filter[slot] = ct.c_uint32(max(0, self._filter[slot].value + delta))

    def track(self, pid: int, session: int, profile: int) -> None:
        new = not self.is_tracked(pid)
        self._tracked[ct.c_uint32(pid)] = pr.TrackInfo(session, profile, 0)
        if new:
            self._filter_add(pid, 1)

    def untrack_session(self, session: int) -> list[int]:
        """Forget every process of a session; returns their pids."""
        gone = [k.value for k, v in self._tracked.items() if v.session == session]
        for pid in gone:
            with contextlib.suppress(KeyError):
                del self._tracked[ct.c_uint32(pid)]
                self._filter_add(pid, -1)
        return gone

    def is_tracked(self, pid: int) -> bool:
        try:
            self._tracked[ct.c_uint32(pid)]
        except KeyError:
            return False
        return True

    def watch_socket(self, pid: int, fd: int, conn_id: int, sock_type: int) -> None:
        """Capture a socket the process already had when it became tracked."""
        value = net.ConnVal(conn_id, (ct.c_uint64 * 2)(0, 0), sock_type, 0, (ct.c_uint64 * 2)(0, 0))
        self._conns[ct.c_uint64((pid << 32) | fd)] = value

    def attach_openssl(self, library: str) -> None:
        """uprobes on one libssl file (every process mapping it shares them)."""
        if library in self._ssl_libs:
            return
        self._ssl_libs.add(library)
        for sym, fn in SSL_PROBES:
            try:
                self.bpf.attach_uprobe(name=library.encode(), sym=sym.encode(), fn_name=fn.encode())
                self.bpf.attach_uretprobe(name=library.encode(), sym=sym.encode(), fn_name=b"aw_ssl_return")
            except Exception as e:   # an old libssl without the _ex variants
                log.debug("no uprobe on %s:%s: %s", library, sym, e)
        log.info("OpenSSL uprobes attached to %s", library)

    def counter(self, which: int) -> int:
        return int(self._counters[ct.c_int(which)].value)

    def close(self) -> None:
        self.bpf.cleanup()

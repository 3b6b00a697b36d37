"""Reassemble stage for sockets of tracked processes.

Payload chunks from the probe are put back into per-connection, per-direction ordered streams
(daemon/streams.py; the offsets reveal what the kernel could not copy).  The protocol is
detected from the client's first bytes, not the port, by the table in daemon/protocols/, whose
reader then turns the stream into events.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

from agentwarden.core.events import Event, NetInfo
from agentwarden.daemon.l7 import tls
from agentwarden.daemon.protocols import PROTOCOLS
from agentwarden.daemon.streams import Conn, Detected, Record, Stream
from agentwarden.daemon.tracker import Tracker
from agentwarden.probes import net
from agentwarden.probes import process as pr

log = logging.getLogger(__name__)

DETECT_BYTES = 64     # client bytes looked at before deciding a connection is not a known protocol


def _net_info(peer: net.Peer, sock_type: int, accepted: bool) -> NetInfo:
    if peer.family == "unix":
        transport = "unix"
    elif peer.family in ("inet", "inet6"):
        transport = {net.SOCK_STREAM: "tcp", net.SOCK_DGRAM: "udp"}.get(sock_type, "tcp")
    else:
        transport = ""
    return NetInfo(transport=transport, dst_ip=peer.ip, dst_port=peer.port, path=peer.path,
                   direction="accept" if accepted else "connect")


Watch = Callable[[int, int, int, int], None]   # (pid, fd, conn_id, sock_type): register in the kernel


class ConnTracker:
    """Not thread-safe: runs on the probe thread, beside the Tracker it reads."""

    def __init__(self, tracker: Tracker, watch: Watch | None = None,
                 forget: Callable[[int, int], None] | None = None) -> None:
        self.tracker = tracker
        self.watch = watch
        self.forget = forget   # (pid, fd): the kernel's entry, when the process is gone
        self.conns: dict[tuple[int, int], Conn] = {}
        self._ids = itertools.count(1)

    def on_fork(self, parent: int, child: int) -> None:
        """The child shares the parent's sockets: watch them for the child too.

        Registered from here, after the fork record arrives, so the child's first
        bytes may be missed; its stream is then read from the next message.
        """
        if self.watch is None:
            return
        for (pid, fd), c in list(self.conns.items()):
            if pid != parent:
                continue
            conn_id = (1 << 63) | next(self._ids)   # top bit: ids made here, not by the kernel
            self.watch(child, fd, conn_id, c.sock_type)
            self.conns[(child, fd)] = Conn(child, fd, conn_id, c.net.copy(), mid_stream=True,
                                           sock_type=c.sock_type)

    def handle(self, raw: net.NetEvent) -> list[Event]:
        if isinstance(raw, net.ConnOpen):
            info = _net_info(raw.peer, raw.sock_type, raw.accepted)
            if raw.fd < 0:
                # a datagram sent with an address, no connect() (guard.bpf.c guard_sendmsg): nothing
                # to reassemble, one event per destination
                info.direction = "sendto"
                ev = self.tracker.event_for("connect", raw.h, net=info)
                return [ev] if ev else []
            c = Conn(raw.h.pid, raw.fd, raw.conn_id, info, sock_type=raw.sock_type, mid_stream=raw.mid_stream)
            # the fd number's previous socket ended without a close() seen (close_range, dup2
            # over it, a lost record): what it carried unanswered is still recorded
            old = self.conns.get((c.pid, c.fd))
            out = self._drain(old, raw) if old is not None else []
            self.conns[(c.pid, c.fd)] = c
            ev = self.tracker.event_for("connect", raw.h, net=c.net.copy())
            return out + ([ev] if ev else [])
        if isinstance(raw, net.ConnClose):
            closed = self.conns.pop((raw.h.pid, raw.fd), None)
            return self._drain(closed, raw) if closed else []
        return self._data(raw)

    def on_exit(self, raw: pr.Exit) -> list[Event]:
        """The process is gone: its sockets closed with it, without a close() to see (the
        kernel closes them at exit).  What it sent and never saw answered is still recorded."""
        out: list[Event] = []
        for key in [k for k in self.conns if k[0] == raw.h.pid]:
            out += self._drain(self.conns.pop(key), raw)
            if self.forget is not None:   # no close() was seen: the kernel's entry goes too
                self.forget(*key)
        return out

    def adopt(self, pid: int, fd: int, conn_id: int, info: NetInfo, ts_ns: int,
              sock_type: int = 0) -> list[Event]:
        """A socket the process had before it was tracked: read it from the middle."""
        c = Conn(pid, fd, conn_id, info, mid_stream=True, sock_type=sock_type)
        self.conns[(pid, fd)] = c
        ev = self.tracker.event_for_pid("connect", pid, ts_ns, net=info)
        return [ev] if ev else []

    def _conn_for(self, raw: net.Data) -> tuple[Conn, list[Event]]:
        c = self.conns.get((raw.h.pid, raw.fd))
        drained: list[Event] = []
        if c is None or c.conn_id != raw.conn_id:
            if c is not None:    # the fd's previous socket ended unseen: keep what it carried
                drained = self._drain(c, raw)
            # registered by userspace for a socket the process already had, or its open was lost
            c = Conn(raw.h.pid, raw.fd, raw.conn_id, NetInfo(), mid_stream=True)
            self.conns[(c.pid, c.fd)] = c
        return c, drained

    def _data(self, raw: net.Data) -> list[Event]:
        c, out = self._conn_for(raw)
        if raw.tls and not c.net.tls:
            # OpenSSL's plaintext for this socket: forget the handshake and ciphertext
            # read so far and read the connection again from its first clear byte
            c.net.tls = True
            c.streams = (Stream(), Stream())
            c.protocol, c.reader = None, None
            c.first.clear()
        elif c.net.tls and not raw.tls:
            return out         # ciphertext of a connection whose plaintext we have
        if c.protocol == "":
            return out
        ts = self.tracker.wall(raw.h.ts_boot_ns)
        for gap, data in c.streams[raw.direction].push(raw.offset, raw.data):
            out += self._parse(c, raw, raw.direction, gap, data, ts)
        return out

    def _parse(self, c: Conn, raw: Record, direction: int, gap: int, data: bytes, ts: int) -> list[Event]:
        client = c.client
        if c.reader is None:
            if direction != client:
                return []
            if gap:
                c.protocol = ""
                return []
            c.first += data
            events = self._detect(c, raw)
            if c.reader is None:
                return events
            data = bytes(c.first)
            c.first.clear()
        return c.reader.feed(raw.h, direction == client, data, ts, gap)

    def _detect(self, c: Conn, raw: Record) -> list[Event]:
        """Choose the connection's reader from its first client bytes (or give up on it)."""
        first = bytes(c.first)
        waiting = False
        for proto in PROTOCOLS:
            found = proto.detect(first, c.mid_stream)
            if found is Detected.YES:
                c.protocol = c.net.protocol = proto.name
                c.reader = proto.reader(self.tracker, c)
                return []
            waiting = waiting or found is Detected.WAIT
        if tls.looks_like_client_hello(first[:DETECT_BYTES]):
            # TLS we may not decrypt (its plaintext replaces this if OpenSSL's uprobes see it)
            c.protocol = ""
            c.net.protocol = "tls"
            c.net.sni = tls.server_name(first)
            c.first.clear()
            ev = self.tracker.event_for("tls", raw.h, net=c.net.copy())
            return [ev] if ev else []
        if not waiting and ((len(first) >= 8 and b"\n" in first) or len(first) >= DETECT_BYTES):
            c.protocol = ""      # not a protocol we read; stop looking at this connection
            c.first.clear()
        return []

    def _drain(self, c: Conn, raw: Record) -> list[Event]:
        """At close: what the connection's reader still holds becomes events.  Chunks held for
        bytes that never came (a send the kernel copied only in part: more iovecs or chunks than
        it reads) are parsed first, after their gap, so the loss is reported and what followed it
        is read; before, they stayed held and the gap went unreported."""
        ts = self.tracker.wall(raw.h.ts_boot_ns)
        out: list[Event] = []
        if c.protocol != "":
            for direction in (0, 1):
                for gap, data in c.streams[direction].flush_early():
                    out += self._parse(c, raw, direction, gap, data, ts)
        if c.reader is None:
            return out
        return out + c.reader.close(raw.h, ts)

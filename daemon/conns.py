"""Reassemble and parse stages for sockets of tracked processes.

Payload chunks from the probe are put back into per-connection, per-direction
ordered streams (the offsets reveal what the kernel could not copy); the
protocol is detected from the content, not the port, and each stream is read
by its protocol's sans-IO parser (daemon/l7/).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from agentwarden.core.events import Event, HttpInfo, NetInfo, SqlInfo
from agentwarden.daemon.l7 import http, tls
from agentwarden.daemon.l7 import postgres as pg
from agentwarden.daemon.tracker import Tracker
from agentwarden.probes import net
from agentwarden.probes import process as pr

log = logging.getLogger(__name__)

DETECT_BYTES = 64     # client bytes looked at before deciding a connection is not a known protocol
BODY_CAP = 1024       # first bytes of text and JSON bodies kept in http events
_TEXT_TYPES = ("text/", "application/json", "application/x-www-form-urlencoded", "application/xml",
               "application/problem+json")


@dataclass
class Stream:
    """One direction: the next expected offset and chunks that arrived early."""

    expected: int = 0
    early: dict[int, bytes] = field(default_factory=dict)

    def push(self, offset: int, data: bytes) -> list[tuple[int, bytes]]:
        """In-order pieces ready to parse, as (gap_before, bytes)."""
        out: list[tuple[int, bytes]] = []
        if offset < self.expected:                       # overlap with what we had
            data = data[self.expected - offset :]
            offset = self.expected
            if not data:
                return out
        if offset > self.expected and len(self.early) < 64:
            self.early[offset] = data                    # maybe a concurrent thread's chunk
            return out
        gap = offset - self.expected
        out.append((gap, data))
        self.expected = offset + len(data)
        while self.expected in self.early:
            chunk = self.early.pop(self.expected)
            out.append((0, chunk))
            self.expected += len(chunk)
        return out

    def flush_early(self) -> list[tuple[int, bytes]]:
        """Give up waiting: deliver held chunks with the gaps before them."""
        out: list[tuple[int, bytes]] = []
        for off in sorted(self.early):
            chunk = self.early.pop(off)
            if off < self.expected:
                continue
            out.append((off - self.expected, chunk))
            self.expected = off + len(chunk)
        return out


@dataclass
class Conn:
    pid: int
    fd: int
    conn_id: int
    net: NetInfo
    streams: tuple[Stream, Stream] = field(default_factory=lambda: (Stream(), Stream()))
    protocol: str | None = None        # None: not decided yet
    first: bytearray = field(default_factory=bytearray)
    pg: pg.PgConnection | None = None
    http: http.HttpConnection | None = None
    mid_stream: bool = False
    sock_type: int = 0
    last_ts: int = 0       # statements of one connection get strictly increasing timestamps


def _net_info(peer: net.Peer, sock_type: int, accepted: bool) -> NetInfo:
    if peer.family == "unix":
        transport = "unix"
    elif peer.family in ("inet", "inet6"):
        transport = {net.SOCK_STREAM: "tcp", net.SOCK_DGRAM: "udp"}.get(sock_type, "tcp")
    else:
        transport = ""
    return NetInfo(transport=transport, dst_ip=peer.ip, dst_port=peer.port, path=peer.path,
                   direction="accept" if accepted else "connect")


# what a connection's events take their header from
Record: TypeAlias = net.Data | net.ConnOpen | net.ConnClose | pr.Exit
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
            c.protocol, c.pg, c.http = None, None, None
            c.first.clear()
        elif c.net.tls and not raw.tls:
            return out         # ciphertext of a connection whose plaintext we have
        if c.protocol == "":
            return out
        ts = self.tracker.wall(raw.h.ts_boot_ns)
        for gap, data in c.streams[raw.direction].push(raw.offset, raw.data):
            out += self._parse(c, raw, raw.direction, gap, data, ts)
        return out

    def _parse(self, c: Conn, raw: net.Data, direction: int, gap: int, data: bytes, ts: int) -> list[Event]:
        # the client speaks first in the protocols we read; on an accepted socket that is the peer
        client = net.DIR_IN if c.net.direction == "accept" else net.DIR_OUT
        if c.protocol is None:
            if direction != client:
                return []
            if gap:
                c.protocol = ""
                return []
            c.first += data
            head = bytes(c.first[:DETECT_BYTES])
            midstream = c.mid_stream and pg.looks_like_postgres_midstream(bytes(c.first))
            if pg.looks_like_postgres(bytes(c.first)) or midstream:
                c.protocol = "postgres"
                c.pg = pg.PgConnection(mid_stream=c.mid_stream)
            elif http.looks_like_http(head):
                c.protocol = "http"
                c.http = http.HttpConnection(BODY_CAP)
            elif tls.looks_like_client_hello(head):
                # TLS we may not decrypt (its plaintext replaces this if OpenSSL's uprobes see it)
                c.protocol = ""
                c.net.protocol = "tls"
                c.net.sni = tls.server_name(bytes(c.first))
                c.first.clear()
                ev = self.tracker.event_for("tls", raw.h, net=c.net.copy())
                return [ev] if ev else []
            elif pg.startup_incomplete(bytes(c.first)):
                return []            # a Postgres startup longer than what came so far: wait for all of it
            elif (len(c.first) >= 8 and b"\n" in c.first) or len(c.first) >= DETECT_BYTES:
                c.protocol = ""      # not a protocol we read; stop looking at this connection
                c.first.clear()
                return []
            else:
                return []
            c.net.protocol = c.protocol
            data = bytes(c.first)
            c.first.clear()
        if c.http is not None:
            side = http.CLIENT if direction == client else http.SERVER
            hev = c.http.gap(side) if gap else []
            return self._http_events(c, raw, hev + c.http.feed(side, data, ts))
        assert c.pg is not None
        side = pg.FRONTEND if direction == client else pg.BACKEND
        events: list[pg.PgEvent] = []
        if gap:
            events += c.pg.gap(side, gap)
        events += c.pg.feed(side, data, ts)
        return self._to_events(c, raw, events)

    def _http_events(self, c: Conn, raw: Record,
                     events: list[http.HttpEvent]) -> list[Event]:
        out: list[Event] = []
        for he in events:
            ev: Event | None = None
            if isinstance(he, http.Exchange):
                req = he.request
                path, _, query = req.url.partition("?")
                if "://" in path:                      # absolute form (proxies)
                    path = "/" + path.split("://", 1)[1].partition("/")[2]
                info = HttpInfo(
                    method=req.method, scheme="https" if c.net.tls else "http", tls=c.net.tls,
                    host=req.host, path=path, query=query, version=req.version,
                    status=he.status, req_bytes=req.size, resp_bytes=he.size,
                    duration_ms=round(max(0, he.end_ns - req.start_ns) / 1e6, 3) if he.end_ns else None,
                    headers=req.headers, response_headers=he.headers,
                    req_body=_text_body(req.headers, req.body), resp_body=_text_body(he.headers, he.body),
                    upgrade=he.upgrade)
                ev = self.tracker.event_for("http", raw.h, net=c.net.copy(), http=info)
                if ev and req.start_ns:
                    ev.ts_ns = max(req.start_ns, c.last_ts + 1)
                    c.last_ts = ev.ts_ns
            elif isinstance(he, http.Switched) and he.protocol == "h2":
                c.net.protocol = "http2"
                ev = self.tracker.event_for("http", raw.h, net=c.net.copy(),
                                            http=HttpInfo(version="2"))
            elif isinstance(he, http.Desync):
                side = "client" if he.direction == http.CLIENT else "server"
                ev = self.tracker.lost(0, f"http {side} stream desynced: {he.reason}", raw.h, c.net.copy())
            if ev:
                out.append(ev)
        return out

    def _to_events(self, c: Conn, raw: Record, events: list[pg.PgEvent]) -> list[Event]:
        out: list[Event] = []
        startup = c.pg.startup if c.pg else None
        for pe in events:
            if isinstance(pe, pg.Statement):
                info = SqlInfo(
                    query=pe.query, command=pe.command, tables=list(pe.tables), parsed=pe.parsed,
                    database=startup.database if startup else "", db_user=startup.user if startup else "",
                    params=pe.params, prepared_name=pe.prepared_name, rows=pe.rows, tag=pe.tag,
                    sqlstate=pe.sqlstate, error=pe.error, duration_ms=pe.duration_ms)
                ev = self.tracker.event_for("sql", raw.h, sql=info, net=c.net.copy())
                if ev:
                    # statements answered in one read share a clock reading; keep their order
                    ev.ts_ns = max(pe.start_ns, c.last_ts + 1)
                    c.last_ts = ev.ts_ns
            elif isinstance(pe, pg.Encrypted) and not c.net.tls:
                ev = self.tracker.event_for("sql", raw.h, net=c.net.copy(), sql=SqlInfo(
                    encrypted=True, command=f"{pe.method.upper()} ENCRYPTION",
                    database=startup.database if startup else ""))
            elif isinstance(pe, pg.Desync):
                if pe.reason == "resynchronised":
                    continue
                side = "client" if pe.direction == pg.FRONTEND else "server"
                ev = self.tracker.lost(pe.skipped, f"postgres {side} stream desynced: {pe.reason}", raw.h,
                                       c.net.copy())
            else:
                continue
            if ev:
                out.append(ev)
        return out

    def _drain(self, c: Conn, raw: Record) -> list[Event]:
        """At close: deliver chunks still held back, and end responses read until close."""
        out: list[Event] = []
        if c.http is not None:
            return self._http_events(c, raw, c.http.close(self.tracker.wall(raw.h.ts_boot_ns)))
        if c.pg is None:
            return out
        for direction in (net.DIR_OUT, net.DIR_IN):
            for gap, data in c.streams[direction].flush_early():
                side = pg.FRONTEND if direction == net.DIR_OUT else pg.BACKEND
                events = (c.pg.gap(side, gap) if gap else []) + c.pg.feed(side, data, 0)
                out += self._to_events(c, raw, events)
        # sent, then closed before the answer was read: still statements, without an outcome
        return out + self._to_events(c, raw, c.pg.close())


def _text_body(headers: dict[str, str], body: bytes) -> str:
    """The first bytes of a text or JSON body; other bodies are not kept."""
    ctype = headers.get("content-type", "").lower()
    if not body or not ctype.startswith(_TEXT_TYPES):
        return ""
    return body[:BODY_CAP].decode("utf-8", "replace")

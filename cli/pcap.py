"""A session's SQL and HTTP as a capture file: `agentwarden export SESSION --format pcap -o FILE`.

Reconstructed from the recorded events, not captured packets: every packet carries a pcapng
comment that says so and names the event it was made from.  What is rebuilt is what the trail
holds, written as the wire protocol so that Wireshark's dissectors (and scapy) read it:

- Postgres: per connection a StartupMessage (user, database) and AuthenticationOk; per statement
  a simple-protocol Query with the recorded (masked) text at its time, and the reply at the time
  plus its duration: CommandComplete with the server's tag, or the ErrorResponse (SQLSTATE and
  message), then ReadyForQuery.  Bind values were never recorded; a prepared statement is shown as
  a simple Query of its text.
- HTTP: the request line, the recorded (masked) headers and the bounded body, with a
  Content-Length that matches what is written; the response the same way.  HTTP/2 and TLS
  connections are written as HTTP/1.1 plaintext on their real ports (their comment says so).

Addresses: the server is the connection's recorded address and port (a Unix socket's Postgres
port from its `.s.PGSQL.N` name, on 127.0.0.1); the client, the agent's process, is 192.0.2.1
(RFC 5737 TEST-NET-1; 2001:db8::1 for IPv6) with one port per reconstructed connection.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from agentwarden.cli.render import visible
from agentwarden.core.events import parse_ts
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import PcapNgWriter

CLIENT4, CLIENT6 = "192.0.2.1", "2001:db8::1"
_CLIENT_MAC, _SERVER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"   # locally administered
MSS = 1448
_PORTS = {"postgres": 5432, "http": 80}
_DROPPED = {"content-length", "transfer-encoding"}


def _pg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


def _cstr(text: str) -> bytes:
    return text.encode("utf-8", "replace").replace(b"\0", b"") + b"\0"


def pg_startup(database: str, user: str) -> tuple[bytes, bytes]:
    body = struct.pack("!I", 196608) + _cstr("user") + _cstr(user or "unknown")
    if database:
        body += _cstr("database") + _cstr(database)
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body, _pg(b"R", struct.pack("!I", 0)) + _pg(b"Z", b"I")


def pg_statement(sql: dict[str, Any]) -> tuple[bytes, bytes]:
    """The Query and its reply (b"" when no reply was recorded)."""
    query = _pg(b"Q", _cstr(sql.get("query") or ""))
    if sql.get("error") or sql.get("sqlstate"):
        fields = (b"S" + _cstr("ERROR") + b"V" + _cstr("ERROR") + b"C" + _cstr(sql.get("sqlstate") or "XX000")
                  + b"M" + _cstr(sql.get("error") or "error") + b"\0")
        return query, _pg(b"E", fields) + _pg(b"Z", b"I")
    if sql.get("tag") or sql.get("duration_ms") is not None:
        return query, _pg(b"C", _cstr(sql.get("tag") or "")) + _pg(b"Z", b"I")
    return query, b""


def _headers(headers: dict[str, str], body: bytes, first: str, length: bool) -> bytes:
    """The header block and body as written: the length is what is written here (a body the trail
    did not keep is empty), so a reader never waits for bytes that are not in the file."""
    lines = [first] + [f"{k}: {v}" for k, v in headers.items()
                       if k.lower() not in _DROPPED and "\r" not in k + v and "\n" not in k + v]
    if body or length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace") + body


def http_exchange(http: dict[str, Any]) -> tuple[bytes, bytes]:
    target = (http.get("path") or "/") + (f"?{http['query']}" if http.get("query") else "")
    headers = dict(http.get("headers") or {})
    if not any(k.lower() == "host" for k in headers) and http.get("host"):
        headers = {"Host": http["host"], **headers}
    body = (http.get("req_body") or "").encode("utf-8", "replace")
    request = _headers(headers, body, f"{http.get('method') or 'GET'} {target} HTTP/1.1", False)
    status = http.get("status")
    if status is None:
        return request, b""
    try:
        reason = HTTPStatus(int(status)).phrase
    except ValueError:
        reason = "Unknown"
    rbody = (http.get("resp_body") or "").encode("utf-8", "replace")
    return request, _headers(dict(http.get("response_headers") or {}), rbody, f"HTTP/1.1 {status} {reason}",
                             True)


@dataclass
class _Flow:
    client: str
    cport: int
    server: str
    sport: int
    cseq: int = 1_000
    sseq: int = 500_000

    def _ip(self, from_client: bool) -> Packet:
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        macs = (_CLIENT_MAC, _SERVER_MAC) if from_client else (_SERVER_MAC, _CLIENT_MAC)
        ip = IPv6(src=src, dst=dst) if ":" in self.server else IP(src=src, dst=dst)
        return Ether(src=macs[0], dst=macs[1]) / ip

    def _tcp(self, from_client: bool, flags: str, seq: int, ack: int) -> Packet:
        sport, dport = (self.cport, self.sport) if from_client else (self.sport, self.cport)
        return TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=65535)

    def handshake(self) -> list[Packet]:
        out = [self._ip(True) / self._tcp(True, "S", self.cseq, 0),
               self._ip(False) / self._tcp(False, "SA", self.sseq, self.cseq + 1),
               self._ip(True) / self._tcp(True, "A", self.cseq + 1, self.sseq + 1)]
        self.cseq += 1
        self.sseq += 1
        return out

    def send(self, data: bytes, from_client: bool) -> list[Packet]:
        out = []
        for i in range(0, len(data), MSS):
            chunk = data[i:i + MSS]
            seq, ack = (self.cseq, self.sseq) if from_client else (self.sseq, self.cseq)
            out.append(self._ip(from_client) / self._tcp(from_client, "PA", seq, ack) / Raw(chunk))
            if from_client:
                self.cseq += len(chunk)
            else:
                self.sseq += len(chunk)
        return out


def _server(net: dict[str, Any], protocol: str) -> tuple[str, int]:
    """The server's address and port; a port that is not one (a socket the agent named
    `.s.PGSQL.99999999`) is the protocol's own."""
    port = int(net.get("dst_port") or 0)
    m = re.search(r"\.s\.PGSQL\.(\d{1,5})$", net.get("path") or "")
    if m:
        port = int(m.group(1))
    ip = net.get("dst_ip") or "127.0.0.1"
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        ip = "127.0.0.1"
    return ip, (port if 0 < port < 65536 else _PORTS.get(protocol, 0))


def packets(events: list[dict[str, Any]]) -> Iterator[Packet]:
    """The session's SQL and HTTP events as packets, in time order, each with .time and .comment."""
    flows: dict[tuple[Any, ...], _Flow] = {}
    timed: list[tuple[int, int, Packet]] = []
    n = 0
    for ev in events:
        kind = ev.get("kind")
        if kind == "llm" and ev.get("http"):      # an LLM call is an HTTP exchange on the wire
            kind = "http"
        if kind not in ("sql", "http") or not ev.get(kind):
            continue
        net = ev.get("net") or {}
        proc = ev.get("process") or {}
        server, sport = _server(net, kind if kind == "http" else "postgres")
        key = (proc.get("pid"), net.get("transport"), server, sport, net.get("path"), kind)
        ts = parse_ts(ev["ts"])
        how = ("TLS plaintext (OpenSSL), " if net.get("tls") or (ev.get("http") or {}).get("tls") else "")
        where = f"{how}{net.get('transport') or 'tcp'}{' ' + net['path'] if net.get('path') else ''}"
        note = visible(f"reconstructed by agentwarden from event {ev.get('event_id')} "
                       f"(pid {proc.get('pid')}, {where})")
        made: list[tuple[int, Packet]] = []
        flow = flows.get(key)
        if flow is None:
            flow = flows[key] = _Flow(CLIENT6 if ":" in server else CLIENT4, 40_000 + len(flows) % 20_000,
                                      server, sport)
            made += [(ts, p) for p in flow.handshake()]
            if kind == "sql":
                start, ok = pg_startup(ev["sql"].get("database") or "", ev["sql"].get("db_user") or "")
                made += [(ts, p) for p in flow.send(start, True) + flow.send(ok, False)]
        if kind == "sql":
            out, back = pg_statement(ev["sql"])
            done = ev["sql"].get("duration_ms")
        else:
            out, back = http_exchange(ev["http"])
            done = ev["http"].get("duration_ms")
        made += [(ts, p) for p in flow.send(out, True)]
        if back:
            made += [(ts + int((done or 0) * 1e6), p) for p in flow.send(back, False)]
        for t, p in made:
            p.time = t / 1e9
            p.comment = note.encode()
            timed.append((t, n, p))
            n += 1
    for _, _, p in sorted(timed, key=lambda x: (x[0], x[1])):
        yield p


def write(events: list[dict[str, Any]], path: str) -> int:
    """Write the pcapng file; returns how many packets."""
    n = 0
    writer = PcapNgWriter(path)
    try:
        for p in packets(events):
            writer.write(p)
            n += 1
    finally:
        writer.close()
    return n

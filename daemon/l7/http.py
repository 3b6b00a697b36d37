"""A sans-IO HTTP/1.x reader over httptools (llhttp): bytes in, exchanges out.

`feed(CLIENT, data, ts)` / `feed(SERVER, data, ts)` return `Exchange` (one
request paired with its response), `Switched` (the connection left HTTP/1.x:
an Upgrade accepted with 101, or HTTP/2 prior knowledge) and `Desync` (bytes
llhttp rejected; the direction is read again from the next message).  It never
raises on input.  Requests are queued, so keep-alive and pipelined requests
pair with their responses in order; 1xx responses (`100 Continue`) do not
consume a request; responses to HEAD carry no body; a response delimited by
the connection's end is completed by `close()`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
from agentwarden.daemon.l7 import llm

CLIENT = 0
SERVER = 1
MAX_PENDING = 256      # requests kept waiting for their responses, per connection

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_REQUEST_LINE = re.compile(
    rb"^(?:GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE) \S+ HTTP/1\.[01]\r?\n")


@dataclass
class Request:
    method: str = ""
    url: str = ""
    version: str = "1.1"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    size: int = 0
    start_ns: int = 0
    authority: str = ""               # HTTP/2's :authority pseudo-header

    @property
    def host(self) -> str:
        """A target in absolute form names the host, and a server takes it over the Host header
        (RFC 9112 3.2.2; red team: `DELETE http://secrets/x` with `Host: fine`); its user info
        is not part of it.  HTTP/2's :authority likewise (RFC 9113 8.3.1)."""
        if self.authority:
            return self.authority.rpartition("@")[2]
        if "://" in self.url:
            netloc = urlsplit(self.url).netloc.rpartition("@")[2]
            if netloc:
                return netloc
        return self.headers.get("host", "")


@dataclass
class Exchange:
    request: Request
    status: int | None = None          # None: the connection ended before a response
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    size: int = 0
    end_ns: int = 0
    upgrade: str = ""
    rpc: dict[str, str] = field(default_factory=dict)   # gRPC or Connect: daemon/l7/rpc.py summary()


@dataclass
class Switched:
    protocol: str                      # "h2" (prior knowledge), or the accepted Upgrade value
    client_rest: bytes = b""           # the client's bytes from the switch on (the HTTP/2 preface)
    server_rest: bytes = b""           # the server's bytes after its 101 in the same read
    request: Request | None = None     # the request the 101 answered (stream 1 of an h2c upgrade)


@dataclass
class Desync:
    direction: int
    reason: str
    skipped: int = 0                   # bytes known to be missing (a gap), when that is the cause


HttpEvent = Exchange | Switched | Desync


class _Side:
    """Callbacks for one httptools parser: collects one message at a time."""

    def __init__(self, cap: int, client: bool = False) -> None:
        self.cap = cap
        self.limit = cap          # this message's: an LLM call's bodies are kept whole (llm.BODY_CAP)
        self.client = client
        self.reset()

    def on_message_complete(self) -> None:
        self.headers_done = False   # between messages: the next one has not started
        self.complete()

    def complete(self) -> None:   # replaced by the connection before each feed
        pass

    def size(self) -> int:
        """Bytes of the message: start line, headers and body (as on the wire, near enough)."""
        head = len(self.url) + 16 + sum(len(k) + len(v) + 4 for k, v in self.headers.items()) + 2
        return head + self.body_size

    def reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.body_size = 0
        self.headers_done = False

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = bytearray()
        self.body_size = 0
        self.headers_done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.headers_done = True
        if self.client:
            self.limit = body_limit(self.url.decode("latin-1"), self.cap)

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if len(self.body) < self.limit:
            self.body += body[: self.limit - len(self.body)]


class HttpConnection:
    def __init__(self, body_cap: int = 1024) -> None:
        self.body_cap = body_cap
        self.switched = ""
        self._pending: deque[Request] = deque()
        self._c = _Side(body_cap, client=True)
        self._s = _Side(body_cap)
        self._req_parser = httptools.HttpRequestParser(self._c)
        self._resp_parser = httptools.HttpResponseParser(self._s)
        self._head_buf = bytearray()   # response to HEAD: headers collected by hand
        self._checked_preface = False

    # ---- client side ---------------------------------------------------------------

    def _client_complete(self, ts: int) -> None:
        p = self._req_parser
        try:
            method = p.get_method().decode()
            version = p.get_http_version()
        except Exception:   # httptools raises on a parser without a message
            method, version = "", "1.1"
        self._pending.append(Request(method, self._c.url.decode("latin-1"), version, dict(self._c.headers),
                                     bytes(self._c.body), self._c.size(), ts))

    def _feed_client(self, data: bytes, ts: int, out: list[HttpEvent]) -> None:
        if not self._checked_preface:
            self._checked_preface = True
            if data.startswith(H2_PREFACE[: len(data)]) and data[:3] == b"PRI":
                self.switched = "h2"
                out.append(Switched("h2", client_rest=data))
                return
        before = len(self._pending)
        cb = self._c
        cb.complete = lambda: self._client_complete(ts)  # type: ignore[method-assign]
        try:
            self._req_parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if len(self._pending) == before and cb.headers_done:
                self._client_complete(ts)
        except httptools.HttpParserError as e:
            if self.switched:
                return
            out.append(Desync(CLIENT, f"invalid request: {e}"))
            self._req_parser = httptools.HttpRequestParser(self._c)
        if len(self._pending) > MAX_PENDING:
            # a client pipelining to a server that never answers (each may hold an LLM call's body)
            dropped = 0
            while len(self._pending) > MAX_PENDING:
                self._pending.popleft()
                dropped += 1
            out.append(Desync(CLIENT, f"{dropped} requests unanswered behind {MAX_PENDING} more: not kept"))

    # ---- server side ---------------------------------------------------------------

    def _server_complete(self, ts: int, out: list[HttpEvent]) -> None:
        status = self._resp_parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return                     # informational: the real response follows
        req = self._pending.popleft() if self._pending else Request()
        ex = Exchange(req, status, dict(self._s.headers), bytes(self._s.body), self._s.size(), ts)
        if status == 101:
            ex.upgrade = self._s.headers.get("upgrade", "unknown")
            self.switched = ex.upgrade
            out.append(ex)
            out.append(Switched(ex.upgrade, request=req))
            return
        out.append(ex)

    def _feed_server(self, data: bytes, ts: int, out: list[HttpEvent]) -> None:
        self._s.limit = body_limit(self._pending[0].url, self.body_cap) if self._pending else self.body_cap
        while data:
            if self._pending and self._pending[0].method == "HEAD" and not self._s.headers_done:
                data = self._head_response(data, ts, out)
                continue
            self._s.complete = lambda: self._server_complete(ts, out)  # type: ignore[method-assign]
            try:
                self._resp_parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:
                at = e.args[0] if e.args and isinstance(e.args[0], int) else -1
                self._upgrade_rest(data, at, out)
            except httptools.HttpParserError as e:
                if self.switched:
                    # llhttp stops at an accepted upgrade (without `Connection: upgrade` it says
                    # "paused" and no offset); what follows is not HTTP/1
                    self._upgrade_rest(data, -1, out)
                    return
                out.append(Desync(SERVER, f"invalid response: {e}"))
                self._resp_parser = httptools.HttpResponseParser(self._s)
                self._s.reset()
            return

    @staticmethod
    def _upgrade_rest(data: bytes, at: int, out: list[HttpEvent]) -> None:
        """What the new protocol sent in the read that carried the 101: from llhttp's offset, else
        from the end of the 101's head when it is all in this read (else nothing: the new
        protocol's reader sees it start mid-stream, and says so)."""
        if not out or not isinstance(out[-1], Switched):
            return
        if at < 0:
            start = data.find(b" 101 ")
            end = data.find(b"\r\n\r\n", start) if start >= 0 else -1
            at = end + 4 if end >= 0 else len(data)
        out[-1].server_rest = data[at:]

    def _head_response(self, data: bytes, ts: int, out: list[HttpEvent]) -> bytes:
        """A response to HEAD has headers only, whatever Content-Length says: cut it
        at the blank line and let llhttp read it as a body-less message."""
        self._head_buf += data
        end = self._head_buf.find(b"\r\n\r\n")
        if end < 0:
            return b""
        block, rest = bytes(self._head_buf[: end + 4]), bytes(self._head_buf[end + 4 :])
        self._head_buf.clear()
        lines = block.split(b"\r\n")
        kept = [ln for ln in lines if not ln.lower().startswith((b"content-length:", b"transfer-encoding:"))]
        rewritten = b"\r\n".join(kept[:-2]) + b"\r\ncontent-length: 0\r\n\r\n"
        parser = httptools.HttpResponseParser(self._s)
        self._s.complete = lambda: self._server_complete(ts, out)  # type: ignore[method-assign]
        try:
            self._resp_parser = parser
            parser.feed_data(rewritten)
        except httptools.HttpParserError as e:
            out.append(Desync(SERVER, f"invalid response to HEAD: {e}"))
        self._resp_parser = httptools.HttpResponseParser(self._s)
        self._s.headers_done = False
        return rest

    # ---- public --------------------------------------------------------------------

    def feed(self, direction: int, data: bytes, ts_ns: int) -> list[HttpEvent]:
        out: list[HttpEvent] = []
        if self.switched or not data:
            return out
        if direction == CLIENT:
            self._feed_client(data, ts_ns, out)
        else:
            self._feed_server(data, ts_ns, out)
        return out

    def gap(self, direction: int, skipped: int = 0) -> list[HttpEvent]:
        """Bytes were not captured: start that direction over at the next message."""
        if direction == CLIENT:
            self._req_parser = httptools.HttpRequestParser(self._c)
            self._c.reset()
        else:
            self._resp_parser = httptools.HttpResponseParser(self._s)
            self._s.reset()
            self._pending.clear()
        return [Desync(direction, "bytes not captured", skipped)]

    def close(self, ts_ns: int) -> list[HttpEvent]:
        """The connection ended: a response read until close is complete now."""
        out: list[HttpEvent] = []
        if self._s.headers_done and self._pending and not self.switched:   # a response still open
            req = self._pending.popleft()
            out.append(Exchange(req, self._resp_parser.get_status_code(), dict(self._s.headers),
                                bytes(self._s.body), self._s.size(), ts_ns))
        for req in self._pending:
            out.append(Exchange(req, None, end_ns=ts_ns))
        self._pending.clear()
        return out


def body_limit(url: str, cap: int) -> int:
    """Bytes of a body kept: `cap`, or an LLM call's (read whole by daemon/l7/llm.py)."""
    return llm.BODY_CAP if llm.endpoint_of(url) else cap


def looks_like_http(first_client_bytes: bytes) -> bool:
    return bool(_REQUEST_LINE.match(first_client_bytes)) or first_client_bytes.startswith(H2_PREFACE[:16])

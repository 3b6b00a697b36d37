"""A sans-IO PostgreSQL v3 wire protocol reader: bytes in, typed events out.

No sockets, no clock: the caller feeds each direction's bytes with a
timestamp (`feed(FRONTEND, data, ts_ns)`) and gets back what happened:
`Startup`, `Statement` (one per SQL statement the client sent, paired with the
server's answer), `Encrypted` (the connection switched to TLS) and `Desync`
(bytes that could not be read as protocol; reading resumes at the next valid
message).  It never raises on input.

Requests and responses are paired with a queue of the client's messages that
await an answer, which is how the server processes them too: simple queries
(several statements in one Query give one Statement each), the extended
protocol with named and unnamed statements and portals, pipelining (many
messages before one Sync), errors (the server skips to the next Sync) and COPY.
Passwords and SASL exchanges are parsed past and never returned.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

from agentwarden.daemon.l7.sql import SqlStatement, analyze

FRONTEND = 0   # client -> server
BACKEND = 1    # server -> client

PROTOCOL_V3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

MAX_MESSAGE = 1 << 30
MAX_BUFFER = 64 << 20     # a single message larger than this is skipped, not buffered

FRONTEND_TYPES = frozenset(b"QPBEDCSHXFdcfp")
BACKEND_TYPES = frozenset(b"RSKZTDCIE1N23nts GHWdcAVv")


# ---- events --------------------------------------------------------------------


@dataclass
class Startup:
    user: str
    database: str
    application_name: str
    params: dict[str, str]


@dataclass
class Statement:
    query: str
    command: str
    tables: tuple[str, ...]
    parsed: bool
    prepared_name: str | None = None   # None: simple query protocol
    params: int = 0
    rows: int | None = None
    tag: str = ""
    sqlstate: str = ""
    error: str = ""
    start_ns: int = 0
    end_ns: int = 0
    answered: bool = True    # False: sent, but no answer was seen (the connection closed, or
                             # the server's bytes were lost): no tag, no error, no duration

    @property
    def duration_ms(self) -> float | None:
        return round(max(0, self.end_ns - self.start_ns) / 1e6, 3) if self.answered else None


@dataclass
class Encrypted:
    """SSL or GSS encryption was accepted: what follows is ciphertext."""

    method: str


@dataclass
class Desync:
    direction: int
    reason: str
    skipped: int


PgEvent = Startup | Statement | Encrypted | Desync


# ---- pairing state -----------------------------------------------------------


@dataclass
class _Pending:
    kind: str                      # query, parse, bind, describe, execute, close, sync, func
    ts: int
    statements: list[SqlStatement] = field(default_factory=list)   # query: the split text
    index: int = 0                 # query: next statement to complete
    query: str = ""                # parse / execute: the statement text
    name: str | None = None        # parse/execute: prepared statement name
    params: int = 0
    rows: int = 0
    failed: bool = False


def _cstr(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\0", pos)
    return buf[pos:end].decode("utf-8", "replace"), end + 1


def _tag_rows(tag: str) -> int | None:
    parts = tag.split()
    # ASCII digits only (isdigit() takes other scripts' digits), and within a row count's Int64: a
    # server the agent runs itself may answer anything, and one out-of-range value must not stop
    # the store (red team)
    count = parts[-1] if len(parts) >= 2 else ""
    if count.isascii() and count.isdigit() and len(count) <= 18 and parts[0] in (
        "SELECT", "INSERT", "UPDATE", "DELETE", "COPY", "FETCH", "MOVE", "MERGE"):
        return int(parts[-1])
    return None


def _error_fields(body: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        try:
            value, pos = _cstr(body, pos + 1)
        except ValueError:
            break
        out[code] = value
    return out


class PgConnection:
    """Protocol state of one connection, both directions."""

    def __init__(self, mid_stream: bool = False) -> None:
        self._buf = [bytearray(), bytearray()]
        self._startup = not mid_stream      # frontend's next message is untyped
        self._await_tls_answer: str | None = None
        self._resync = [mid_stream, mid_stream]
        self.encrypted = False
        self.closed = False
        self.startup: Startup | None = None
        self._pending: deque[_Pending] = deque()
        self._prepared: dict[str, str] = {}
        self._portals: dict[str, tuple[str, str, int]] = {}   # portal -> (stmt name, query, params)
        self._skip_until_sync = False

    # ---- input -------------------------------------------------------------

    def feed(self, direction: int, data: bytes, ts_ns: int) -> list[PgEvent]:
        out: list[PgEvent] = []
        if self.encrypted or self.closed or not data:
            return out
        buf = self._buf[direction]
        buf += data
        while buf and not self.encrypted:
            if direction == BACKEND and self._await_tls_answer:
                self._tls_answer(buf, out)
                continue
            if direction == FRONTEND and self._startup:
                if not self._untyped(buf, ts_ns, out):
                    break
                continue
            if self._resync[direction] and not self._resynchronise(direction, out):
                break
            if len(buf) < 5:
                break
            mtype = buf[0]
            length = struct.unpack_from("!I", buf, 1)[0]
            types = FRONTEND_TYPES if direction == FRONTEND else BACKEND_TYPES
            if mtype not in types or length < 4 or length > MAX_MESSAGE:
                self._desync(direction, f"invalid message {chr(mtype)!r} of length {length}", out)
                continue
            if len(buf) < 1 + length:
                if 1 + length > MAX_BUFFER:
                    self._desync(direction, f"message {chr(mtype)!r} of {length} bytes is too large", out)
                break
            body = bytes(buf[5 : 1 + length])
            del buf[: 1 + length]
            try:
                if direction == FRONTEND:
                    self._frontend(mtype, body, ts_ns, out)
                else:
                    self._backend(mtype, body, ts_ns, out)
            except (ValueError, IndexError, struct.error) as e:
                out.append(Desync(direction, f"malformed {chr(mtype)!r} message: {e}", 1 + length))
        return out

    def gap(self, direction: int, size: int) -> list[PgEvent]:
        """`size` bytes of this direction were not captured: drop partial state, resynchronise."""
        skipped = len(self._buf[direction])
        self._buf[direction].clear()
        self._resync[direction] = True
        out: list[PgEvent] = [Desync(direction, f"{size} bytes not captured", skipped + size)]
        self._abandon(out)
        if self._startup and direction == FRONTEND:
            self._startup = False
        return out

    def close(self) -> list[PgEvent]:
        """The connection closed: what was sent and never answered is still a statement."""
        out: list[PgEvent] = []
        self._abandon(out)
        return out

    def _abandon(self, out: list[PgEvent]) -> None:
        """Pending requests whose answers will not be seen: statements without an outcome."""
        while self._pending:
            self._unanswered(self._pending.popleft(), out)
        self._skip_until_sync = False

    def _unanswered(self, p: _Pending, out: list[PgEvent]) -> None:
        if p.kind == "query":
            rest = p.statements[p.index:] if p.statements else [SqlStatement(p.query, "", (), False)]
            for sql in rest if p.query else []:
                st = self._statement(p, p.ts, sql=sql)
                st.answered = False
                out.append(st)
        elif p.kind == "execute":
            st = self._statement(p, p.ts)
            st.answered = False
            out.append(st)

    # ---- framing -------------------------------------------------------------

    def _desync(self, direction: int, reason: str, out: list[PgEvent]) -> None:
        buf = self._buf[direction]
        out.append(Desync(direction, reason, 0))
        del buf[:1]
        self._resync[direction] = True
        self._abandon(out)

    def _valid_at(self, buf: bytearray, pos: int, types: frozenset[int]) -> int:
        """1: a plausible message starts at pos; 0: cannot tell yet; -1: not one."""
        if len(buf) - pos < 5:
            return 0
        if buf[pos] not in types:
            return -1
        length = struct.unpack_from("!I", buf, pos + 1)[0]
        if length < 4 or length > MAX_MESSAGE:
            return -1
        nxt = pos + 1 + length
        if nxt == len(buf):
            return 1
        if nxt > len(buf):
            return 0 if length < 1 << 16 else -1
        return 1 if self._valid_at(buf, nxt, types) != -1 else -1

    def _resynchronise(self, direction: int, out: list[PgEvent]) -> bool:
        buf = self._buf[direction]
        types = FRONTEND_TYPES if direction == FRONTEND else BACKEND_TYPES
        for pos in range(len(buf)):
            v = self._valid_at(buf, pos, types)
            if v == 1:
                if pos:
                    out.append(Desync(direction, "resynchronised", pos))
                    del buf[:pos]
                self._resync[direction] = False
                return True
            if v == 0:
                if pos:
                    del buf[:pos]
                return False
        buf.clear()
        return False

    def _tls_answer(self, buf: bytearray, out: list[PgEvent]) -> None:
        method = self._await_tls_answer or ""
        self._await_tls_answer = None
        answer = buf[0]
        del buf[:1]
        if answer in (ord("S"), ord("G")):
            self.encrypted = True
            out.append(Encrypted(method))
        # 'N': the client goes on in clear text with a StartupMessage
        self._startup = True

    def _untyped(self, buf: bytearray, ts: int, out: list[PgEvent]) -> bool:
        if len(buf) < 8:
            return False
        length, code = struct.unpack_from("!II", buf, 0)
        if length < 8 or length > 1 << 16:
            self._startup = False
            self._resync[FRONTEND] = True
            out.append(Desync(FRONTEND, f"not a startup packet (length {length})", 0))
            return True
        if len(buf) < length:
            return False
        body = bytes(buf[8:length])
        del buf[:length]
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            self._await_tls_answer = "ssl" if code == SSL_REQUEST else "gss"
            self._startup = False
        elif code == CANCEL_REQUEST:
            self.closed = True
        elif code >> 16 == 3:
            params: dict[str, str] = {}
            pos = 0
            while pos < len(body) and body[pos] != 0:
                key, pos = _cstr(body, pos)
                value, pos = _cstr(body, pos)
                params[key] = value
            self.startup = Startup(params.get("user", ""), params.get("database", params.get("user", "")),
                                   params.get("application_name", ""), params)
            out.append(self.startup)
            self._startup = False
        else:
            self._startup = False
            out.append(Desync(FRONTEND, f"unknown startup code {code}", length))
        return True

    # ---- frontend ------------------------------------------------------------

    def _frontend(self, t: int, body: bytes, ts: int, out: list[PgEvent]) -> None:
        c = chr(t)
        if c == "Q":
            text, _ = _cstr(body, 0)
            self._pending.append(_Pending("query", ts, list(analyze(text)), query=text))
        elif c == "P":
            name, pos = _cstr(body, 0)
            text, pos = _cstr(body, pos)
            self._prepared[name] = text
            self._pending.append(_Pending("parse", ts, query=text, name=name))
        elif c == "B":
            portal, pos = _cstr(body, 0)
            stmt, pos = _cstr(body, pos)
            (nfmt,) = struct.unpack_from("!H", body, pos)
            pos += 2 + 2 * nfmt
            (nparams,) = struct.unpack_from("!H", body, pos)
            self._portals[portal] = (stmt, self._prepared.get(stmt, ""), nparams)
            self._pending.append(_Pending("bind", ts, name=stmt))
        elif c == "E":
            portal, _ = _cstr(body, 0)
            stmt, text, nparams = self._portals.get(portal, ("", "", 0))
            self._pending.append(_Pending("execute", ts, query=text, name=stmt, params=nparams))
        elif c == "D":
            self._pending.append(_Pending("describe", ts))
        elif c == "C":
            kind, name = chr(body[0]), _cstr(body, 1)[0]
            if kind == "S":
                self._prepared.pop(name, None)
            else:
                self._portals.pop(name, None)
            self._pending.append(_Pending("close", ts))
        elif c == "S":
            self._pending.append(_Pending("sync", ts))
        elif c == "F":
            self._pending.append(_Pending("func", ts))
        elif c == "X":
            self.closed = True
        # H (Flush), d/c/f (COPY data from the client), p (password, SASL: never read)

    # ---- backend -------------------------------------------------------------

    def _head(self, *kinds: str, out: list[PgEvent] | None = None) -> _Pending | None:
        """The oldest pending request of one of these kinds (older ones had no answer: their
        statements go to `out` without an outcome)."""
        for i, p in enumerate(self._pending):
            if p.kind in kinds:
                for _ in range(i):
                    skipped = self._pending.popleft()
                    if out is not None:
                        self._unanswered(skipped, out)
                return p
        return None

    def _statement(self, p: _Pending, ts: int, tag: str = "", err: dict[str, str] | None = None,
                   sql: SqlStatement | None = None) -> Statement:
        if sql is None:
            # extended protocol: one Parse holds one statement; keep the text exactly as sent
            parts = analyze(p.query)
            sql = SqlStatement(p.query, " / ".join(s.command for s in parts if s.command),
                               tuple(t for s in parts for t in s.tables), all(s.parsed for s in parts))
        rows = _tag_rows(tag)
        return Statement(
            query=sql.text, command=sql.command, tables=sql.tables, parsed=sql.parsed,
            prepared_name=p.name if p.kind != "query" else None, params=p.params,
            rows=rows if rows is not None else (p.rows or None), tag=tag,
            sqlstate=(err or {}).get("C", ""), error=(err or {}).get("M", ""), start_ns=p.ts, end_ns=ts)

    def _backend(self, t: int, body: bytes, ts: int, out: list[PgEvent]) -> None:
        c = chr(t)
        if c == "D":
            p = self._head("query", "execute", out=out)
            if p:
                p.rows += 1
        elif c in "CI":
            tag = _cstr(body, 0)[0] if c == "C" else ""
            p = self._head("query", "execute", out=out)
            if p is None:
                return
            if p.kind == "query":
                sql = p.statements[p.index] if p.index < len(p.statements) else None
                if sql is None:
                    sql = SqlStatement(p.query, tag.split(" ")[0], (), False)
                out.append(self._statement(p, ts, tag, sql=sql))
                p.index += 1
                p.rows = 0
                p.ts = ts   # the next statement of the same Query starts now
            else:
                out.append(self._statement(p, ts, tag))
                self._pending.popleft()
        elif c == "s":   # PortalSuspended: Execute with a row limit stopped early
            p = self._head("execute", out=out)
            if p:
                out.append(self._statement(p, ts, f"SUSPENDED {p.rows}"))
                self._pending.popleft()
        elif c == "E":
            err = _error_fields(body)
            p = self._head("query", "parse", "bind", "execute", "describe", "close", "func", out=out)
            if p is None:
                return
            if p.kind == "query":
                sql = p.statements[p.index] if p.index < len(p.statements) else None
                out.append(self._statement(p, ts, err=err, sql=sql))
                p.index = len(p.statements)   # the rest of this Query does not run
            else:
                if p.kind in ("parse", "execute", "bind"):
                    if p.kind == "bind":
                        p.query = self._prepared.get(p.name or "", "")
                    out.append(self._statement(p, ts, err=err))
                # the server skips everything up to the next Sync
                while self._pending and self._pending[0].kind != "sync":
                    self._pending.popleft()
        elif c == "1":
            self._pop("parse")
        elif c == "2":
            self._pop("bind")
        elif c == "3":
            self._pop("close")
        elif c in "nT":
            if self._pending and self._pending[0].kind == "describe":
                self._pending.popleft()
        elif c == "V":
            self._pop("func")
        elif c == "Z":
            while self._pending:
                p = self._pending.popleft()
                if p.kind in ("sync", "query"):
                    break
        # R (authentication), S, K, N, A, t, G, H, W, d, c, v: nothing to pair

    def _pop(self, kind: str) -> None:
        if self._head(kind) is not None:
            self._pending.popleft()


def looks_like_postgres(first_frontend_bytes: bytes) -> bool:
    """Content-based detection: the first client bytes of a v3 connection."""
    if len(first_frontend_bytes) < 8:
        return False
    length, code = struct.unpack_from("!II", first_frontend_bytes, 0)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        return bool(length == 8)
    if code == CANCEL_REQUEST:
        return bool(length == 16)
    return bool(code == PROTOCOL_V3 and 8 < length < 1 << 16 and b"user\0" in first_frontend_bytes[8:length])


def startup_incomplete(first_frontend_bytes: bytes) -> bool:
    """A v3 startup message has begun and not all of it is here yet (its parameters, `user`
    among them, may come in any order: Go's drivers write them from a map)."""
    if len(first_frontend_bytes) < 8:
        return False
    length, code = struct.unpack_from("!II", first_frontend_bytes, 0)
    return bool(code == PROTOCOL_V3 and 8 < length < 1 << 16 and len(first_frontend_bytes) < length)


def looks_like_postgres_midstream(first_frontend_bytes: bytes) -> bool:
    """Detection on a connection joined mid-stream: whole typed client messages, back to back."""
    buf = bytearray(first_frontend_bytes)
    pos = 0
    while pos < len(buf):
        if len(buf) - pos < 5 or buf[pos] not in b"QPBEDSHCF":
            return False
        length = struct.unpack_from("!I", buf, pos + 1)[0]
        if length < 4 or length > MAX_MESSAGE:
            return False
        pos += 1 + length
    return pos == len(buf) and pos > 0

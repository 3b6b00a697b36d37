"""A sans-IO HTTP/2 reader: both directions of one connection in, one exchange per stream out.

A passive reader cannot be an `h2.connection.H2Connection`, which is one endpoint's state machine
(it refuses a response on a stream it did not open).  It uses h2's own framing instead: a
`FrameBuffer` per direction (the client's checks the preface; CONTINUATION frames are joined to
their HEADERS or PUSH_PROMISE), hyperframe's frames, and an HPACK `Decoder` per direction, fed
every header block in order, PUSH_PROMISE included, so its dynamic table stays the sender's.

`feed(CLIENT, data, ts)` / `feed(SERVER, data, ts)` return `Exchange`s (the HTTP/1 reader's type,
`version` "2"): a stream whose response ended (END_STREAM, or RST_STREAM from either side), and
`Desync`s.  A direction whose bytes were lost (`gap`), or that broke the framing or HPACK, is not
read again: its header blocks depend on every block before them, and a guess at them would name
headers that were never sent.  Its open streams end with what was read, and the events say so.
Never raises on input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from agentwarden.daemon.l7 import rpc
from agentwarden.daemon.l7.http import CLIENT, H2_PREFACE, SERVER, Desync, Exchange, Request, body_limit
from agentwarden.daemon.l7.rpc import Deframer
from h2.exceptions import ProtocolError
from h2.frame_buffer import FrameBuffer
from hpack import Decoder
from hyperframe.frame import DataFrame, Frame, HeadersFrame, PushPromiseFrame, RstStreamFrame, SettingsFrame

# frames a peer may send: SETTINGS_MAX_FRAME_SIZE allows up to 16 MiB, and h2 holds up to 64 CONTINUATION
# frames of one header block, so 1 GiB (red team); a frame over 1 MiB ends the direction, reported
MAX_FRAME = 1 << 20
MAX_STREAMS = 1024            # open streams kept per connection (a peer's default limit is 100)
MAX_HEADER = 16384            # characters of one header field's repeats joined


JOINED_WAIT = 65536           # bytes of a joined connection waited for before it is called not HTTP/2


def looks_like_frames(data: bytes) -> bool | None:
    """Are bytes read from the middle of a connection HTTP/2 frames?  Two whole frames in a row, or
    one that ends where the bytes do, each with a known type (0 to 9), a length within MAX_FRAME
    and the stream id's reserved bit clear (random bytes pass one such header about once in 800).
    None: one plausible frame so far, not whole yet.  Used only to say such a connection is not read
    (the HPACK state its header blocks need is unknown), never to read it."""
    off = frames = 0
    while off + 9 <= len(data) and frames < 2:
        length, ftype = int.from_bytes(data[off:off + 3], "big"), data[off + 3]
        if ftype > 9 or length > MAX_FRAME or data[off + 5] & 0x80:
            return False
        off += 9 + length
        frames += 1
    if frames >= 2:
        return True
    if frames == 1:
        return True if off == len(data) else (None if off > len(data) and len(data) < JOINED_WAIT else False)
    return None if len(data) < 9 else False


@dataclass
class _Stream:
    request: Request = field(default_factory=lambda: Request(version="2"))
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    requested: bool = False       # the client's HEADERS were read
    cap: int = 1024               # bytes of each body kept (an LLM call's: llm.BODY_CAP)
    req_body: bytearray = field(default_factory=bytearray)
    upgrade: str = ""             # "h2c": stream 1, the HTTP/1.1 request that was upgraded
    framed: str = ""              # "grpc" or "connect": its messages are framed (daemon/l7/rpc.py)
    frames: tuple[Deframer, Deframer] = field(default_factory=lambda: (Deframer(), Deframer()))
    trailers: dict[str, str] = field(default_factory=dict)


def _headers(block: Iterable[tuple[str | bytes, str | bytes]]) -> tuple[dict[str, str], dict[str, str]]:
    """(pseudo-headers, headers) of a decoded block: names lower-cased, repeats joined as HTTP/1's are."""
    pseudo: dict[str, str] = {}
    plain: dict[str, str] = {}
    for name, value in block:
        k = (name.decode("latin-1") if isinstance(name, bytes) else name).lower()
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        into = pseudo if k.startswith(":") else plain
        if k in into:   # HTTP/2 splits cookies into one field each, joined with "; " (RFC 9113 8.2.3)
            if len(into[k]) > MAX_HEADER:
                continue    # a field repeated thousands of times (one HPACK byte each): kept in part
            v = f"{into[k]}{'; ' if k == 'cookie' else ', '}{v}"
        into[k] = v
    return pseudo, plain


def _block_size(pseudo: dict[str, str], plain: dict[str, str]) -> int:
    """A header block's size as HTTP/2 counts it for its limits (RFC 9113 6.5.2: 32 a field)."""
    return sum(len(k) + len(v) + 32 for k, v in (*pseudo.items(), *plain.items()))


class Http2Connection:
    def __init__(self, body_cap: int = 1024, upgraded: Request | None = None) -> None:
        """`upgraded`: the HTTP/1.1 request that an `Upgrade: h2c` answered with 101 made stream 1
        (its response comes as HTTP/2, and the client sends the preface next)."""
        self.body_cap = body_cap
        self._frames = (FrameBuffer(server=True), FrameBuffer(server=False))
        for fb in self._frames:
            fb.max_frame_size = MAX_FRAME
        self._hpack = (Decoder(), Decoder())
        for d in self._hpack:
            d.max_allowed_table_size = 1 << 20      # whatever the peer's SETTINGS allow
            d.max_header_list_size = 1 << 20
        self._broken = [False, False]
        self._started = [False, False]      # the direction's first frame was read (it must be SETTINGS)
        self._lead: list[bytearray | None] = [bytearray(), bytearray()]   # its first bytes, until checked
        self._streams: dict[int, _Stream] = {}
        if upgraded is not None:
            upgraded.version = "2"
            self._streams[1] = _Stream(request=upgraded, requested=True, upgrade="h2c")

    def feed(self, direction: int, data: bytes, ts_ns: int) -> list[Exchange | Desync]:
        out: list[Exchange | Desync] = []
        if self._broken[direction] or not data:
            return out
        fb = self._frames[direction]
        try:
            fb.add_data(data)
            self._check_lead(direction, data)
            for frame in fb:
                self._frame(direction, frame, ts_ns, out)
        except Exception as e:   # h2, hyperframe, hpack: any of their errors (red team: InvalidPaddingError)
            side = "client" if direction == CLIENT else "server"
            out += self._break(direction, f"HTTP/2 {side} stream: {type(e).__name__}: {e}", ts_ns)
        return out

    def _check_lead(self, direction: int, data: bytes) -> None:
        """The first frame of each side is SETTINGS (RFC 9113 3.4): its type byte is read as soon as
        it is here, before its body, so an HTTP/1 answer to a preface ("HTTP/1.1 400", a 4.7 MB
        frame by its first bytes) is not waited for."""
        lead = self._lead[direction]
        if lead is None:
            return
        lead += data[:64]
        at = (len(H2_PREFACE) if direction == CLIENT else 0) + 3
        if len(lead) > at:
            self._lead[direction] = None
            if lead[at] != 4:
                raise ProtocolError("not an HTTP/2 preface: the first frame is not SETTINGS")

    def gap(self, direction: int, ts_ns: int = 0, skipped: int = 0) -> list[Exchange | Desync]:
        """Bytes of this direction were not captured: its framing and HPACK state are unknown."""
        if self._broken[direction]:
            return []
        out = self._break(direction, "bytes not captured: HPACK state unknown, not read again", ts_ns)
        if isinstance(out[0], Desync):
            out[0].skipped = skipped
        return out

    def close(self, ts_ns: int) -> list[Exchange | Desync]:
        """The connection ended: every stream still open is an exchange with what was read."""
        out: list[Exchange | Desync] = [self._done(s, ts_ns) for s in self._streams.values() if s.requested]
        self._streams.clear()
        return out

    # ---- frames ----------------------------------------------------------------------

    def _frame(self, direction: int, frame: Frame, ts: int, out: list[Exchange | Desync]) -> None:
        if not self._started[direction]:
            if not isinstance(frame, SettingsFrame):   # RFC 9113 3.4: each side's preface ends with it
                raise ProtocolError(f"the first frame is {type(frame).__name__}, not SETTINGS")
            self._started[direction] = True
        sid = frame.stream_id
        if isinstance(frame, (HeadersFrame, PushPromiseFrame)):
            pseudo, plain = _headers(self._hpack[direction].decode(bytes(frame.data)))   # always: HPACK state
            if isinstance(frame, PushPromiseFrame):
                return                       # a pushed response: not something the agent sent
            if direction == CLIENT:
                s = self._stream(sid)
                if s is None:
                    return
                if not s.requested:
                    s.requested = True
                    s.request = Request(method=pseudo.get(":method", ""), url=pseudo.get(":path", ""),
                                        version="2", headers=plain, start_ns=ts,
                                        authority=pseudo.get(":authority", ""))
                    s.request.size = _block_size(pseudo, plain)
                    s.cap = body_limit(s.request.url, self.body_cap)
                    s.framed = rpc.system_of(plain.get("content-type", ""))
            else:
                s = self._streams.get(sid)
                if s is None:
                    return
                status = pseudo.get(":status", "")
                if status.isdigit() and not 100 <= int(status) < 200:
                    if s.status is None:
                        s.status = int(status)
                        s.headers = plain
                    s.size += _block_size(pseudo, plain)
                elif not status and s.status is not None:
                    s.trailers.update(plain)     # trailers: grpc-status, grpc-message
            if "END_STREAM" in frame.flags and direction == SERVER:
                self._end(sid, ts, out)
        elif isinstance(frame, DataFrame):
            s = self._streams.get(sid)
            if s is None:
                return
            data = bytes(frame.data)
            if s.framed:
                s.frames[direction].feed(data)
            if direction == CLIENT:
                req = s.request
                req.size += len(data)
                if len(s.req_body) < s.cap:
                    s.req_body += data[: s.cap - len(s.req_body)]   # a bytearray: bytes += was quadratic
            else:
                s.size += len(data)
                if len(s.body) < s.cap:
                    s.body += data[: s.cap - len(s.body)]
            if "END_STREAM" in frame.flags and direction == SERVER:
                self._end(sid, ts, out)
        elif isinstance(frame, RstStreamFrame):
            self._end(sid, ts, out)

    def _stream(self, sid: int) -> _Stream | None:
        s = self._streams.get(sid)
        if s is None and sid % 2 == 1:
            if len(self._streams) >= MAX_STREAMS:
                raise ProtocolError(f"more than {MAX_STREAMS} streams open at once")
            s = self._streams[sid] = _Stream()
        return s

    def _end(self, sid: int, ts: int, out: list[Exchange | Desync]) -> None:
        s = self._streams.pop(sid, None)
        if s is not None and s.requested:
            out.append(self._done(s, ts))

    def _done(self, s: _Stream, ts: int) -> Exchange:
        if s.req_body:
            s.request.body = bytes(s.req_body)
        ex = Exchange(s.request, s.status, s.headers, bytes(s.body), s.size, ts, s.upgrade)
        if s.framed:
            ex.rpc = rpc.summary(s.request.url, s.framed, s.frames[CLIENT], s.frames[SERVER],
                                 {**s.headers, **s.trailers})
        return ex

    def _break(self, direction: int, reason: str, ts: int) -> list[Exchange | Desync]:
        """This direction is not read again.  The server's: every open stream ends now with what was
        read of it (its response is unknown).  The client's: streams already asked for still get
        their responses."""
        self._broken[direction] = True
        out: list[Exchange | Desync] = [Desync(direction, reason)]
        if direction == SERVER:
            out += self.close(ts)
        return out

"""HTTP on a connection: daemon/l7/http.py's exchanges (HTTP/1.x), and daemon/l7/http2.py's once it
switched to HTTP/2, as `http` and `lost` events."""

from __future__ import annotations

from dataclasses import dataclass

from agentwarden.core.events import Event, HttpInfo, LlmInfo
from agentwarden.daemon.l7 import coding, http, llm
from agentwarden.daemon.l7.http2 import Http2Connection, looks_like_frames
from agentwarden.daemon.streams import Conn, Detected
from agentwarden.daemon.tracker import Tracker
from agentwarden.probes import process as pr

DETECT_BYTES = 64     # the request line is looked for in this much
BODY_CAP = 1024       # first bytes of text and JSON bodies kept in http events
_TEXT_TYPES = ("text/", "application/json", "application/x-www-form-urlencoded", "application/xml",
               "application/problem+json")


@dataclass(frozen=True)
class LlmText:
    """What an `llm` event keeps of a call's text (config `llm`; set once at start)."""

    max_text: int = 4096
    hash_only: bool = False


LLM_TEXT = LlmText()
# characters of a tool call's arguments kept whatever llm.max_text says: they are what the agent ran,
# and daemon/lineage.py reads them as JSON (cut, they would match nothing; red team)
ARGS_CAP = 65536


def configure_llm(max_text: int, hash_only: bool) -> None:
    global LLM_TEXT
    LLM_TEXT = LlmText(max_text, hash_only)


def detect(first: bytes, mid_stream: bool) -> Detected:
    return Detected.YES if http.looks_like_http(first[:DETECT_BYTES]) else Detected.NO


def detect_joined_h2(first: bytes, mid_stream: bool) -> Detected:
    """HTTP/2 frames in a connection read from its middle (open before tracking, inherited, passed)."""
    if not mid_stream:
        return Detected.NO
    found = looks_like_frames(first)
    return Detected.WAIT if found is None else Detected.YES if found else Detected.NO


class JoinedHttp2Reader:
    """An HTTP/2 connection joined mid-stream: its header blocks are compressed against an HPACK
    table built from what came before, which was not seen, so nothing of it is decoded or guessed.
    Its bytes are reported as lost: once when it is recognised, and the rest when it closes."""

    REASON = "http2 connection joined mid-stream: its HPACK state is unknown, so its requests are not read"

    def __init__(self, tracker: Tracker, conn: Conn) -> None:
        self.tracker, self.conn = tracker, conn
        self.told = False
        self.skipped = 0

    def feed(self, h: pr.RawHeader, client: bool, data: bytes, ts: int, gap: int) -> list[Event]:
        self.skipped += len(data) + gap
        if self.told:
            return []
        self.told = True
        ev = self.tracker.lost_on(h, self.conn.net.copy(), self.skipped, self.REASON)
        self.skipped = 0
        return [ev] if ev else []

    def close(self, h: pr.RawHeader, ts: int) -> list[Event]:
        if not self.skipped:
            return []
        reason = self.REASON + " (the rest, at its close)"
        ev = self.tracker.lost_on(h, self.conn.net.copy(), self.skipped, reason)
        return [ev] if ev else []


class HttpReader:
    def __init__(self, tracker: Tracker, conn: Conn) -> None:
        self.tracker = tracker
        self.conn = conn
        self.parser = http.HttpConnection(BODY_CAP)
        self.h2: Http2Connection | None = None    # once the connection switched to HTTP/2

    def feed(self, h: pr.RawHeader, client: bool, data: bytes, ts: int, gap: int) -> list[Event]:
        side = http.CLIENT if client else http.SERVER
        if self.h2 is not None:
            lost = self.h2.gap(side, ts, gap) if gap else []
            return self._events(h, [*lost, *self.h2.feed(side, data, ts)], ts)
        if gap:
            return self._events(h, self.parser.gap(side, gap) + self.parser.feed(side, data, ts), ts)
        return self._events(h, self.parser.feed(side, data, ts), ts)

    def close(self, h: pr.RawHeader, ts: int) -> list[Event]:
        if self.h2 is not None:
            return self._events(h, list(self.h2.close(ts)), ts)
        return self._events(h, self.parser.close(ts), ts)   # a response read until the close ends here

    def _events(self, h: pr.RawHeader, messages: list[http.HttpEvent], ts: int) -> list[Event]:
        out: list[Event] = []
        c = self.conn
        for he in messages:
            ev: Event | None = None
            if isinstance(he, http.Exchange) and he.upgrade == "h2c" and he.status == 101:
                continue        # its response comes on HTTP/2 stream 1: one event, from there
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
                    upgrade=he.upgrade, rpc=he.rpc)
                call = llm.read_call(req.url, req.headers, req.body, he.headers, he.body, he.status)
                if call is not None:
                    if LLM_TEXT.hash_only:   # the bodies' first KiB is the prompt and reply too (red team)
                        info.req_body = info.resp_body = ""
                    ev = self.tracker.event_for("llm", h, net=c.net.copy(), http=info,
                                                llm=_llm_info(call, info.duration_ms))
                else:
                    ev = self.tracker.event_for("http", h, net=c.net.copy(), http=info)
                if ev and req.start_ns:
                    ev.ts_ns = c.stamp(req.start_ns)
            elif isinstance(he, http.Switched) and he.protocol in ("h2", "h2c"):
                # prior knowledge (the client's preface), or an accepted `Upgrade: h2c`
                c.net.protocol = "http2"
                upgraded = he.request if he.protocol == "h2c" else None
                h2 = self.h2 = Http2Connection(BODY_CAP, upgraded=upgraded)
                out += self._events(h, [*h2.feed(http.CLIENT, he.client_rest, ts),
                                        *h2.feed(http.SERVER, he.server_rest, ts)], ts)
            elif isinstance(he, http.Desync):
                side = "client" if he.direction == http.CLIENT else "server"
                reason = f"http {side} stream desynced: {he.reason}"
                ev = self.tracker.lost_on(h, c.net.copy(), he.skipped, reason)
            if ev:
                out.append(ev)
        return out


def _llm_info(call: llm.LlmCall, duration_ms: float | None) -> LlmInfo:
    """The event's part: text cut to llm.max_text characters, the prompt's hash over all of it; with
    llm.hash_only the prompt and reply are kept as hashes only."""
    cap, only_hash = LLM_TEXT.max_text, LLM_TEXT.hash_only
    return LlmInfo(
        provider=call.provider, model=call.model, endpoint=call.endpoint,
        prompt="" if only_hash else call.prompt[:cap], prompt_hash=llm.digest(call.prompt),
        system_hash=llm.digest(call.system), messages=call.messages,
        tool_calls=[{"id": t.id, "name": t.name, "arguments": t.arguments[:max(cap, ARGS_CAP)]}
                    for t in call.tool_calls],
        text="" if only_hash else call.text[:cap], stop_reason=call.stop_reason,
        input_tokens=call.input_tokens if isinstance(call.input_tokens, int) else None,
        output_tokens=call.output_tokens if isinstance(call.output_tokens, int) else None,
        duration_ms=duration_ms, stream=call.stream, complete=call.complete)


def _text_body(headers: dict[str, str], body: bytes) -> str:
    """The first bytes of a text or JSON body, without its content codings; other bodies, and
    bodies in a coding not known (l7/coding.py), are not kept."""
    ctype = headers.get("content-type", "").lower()
    if not body or not ctype.startswith(_TEXT_TYPES):
        return ""
    codings = headers.get("content-encoding", "")
    text = coding.decode(codings, body, BODY_CAP) if codings else body
    return "" if text is None else text[:BODY_CAP].decode("utf-8", "replace")

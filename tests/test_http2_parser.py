"""daemon/l7/http2.py against the bytes of real HTTP/2 endpoints (h2's own client and server state
machines, in memory), whole and split anywhere; garbage never raises."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.settings
from agentwarden.daemon.l7 import rpc
from agentwarden.daemon.l7.http import CLIENT, SERVER, Desync, Exchange
from agentwarden.daemon.l7.http2 import Http2Connection
from hypothesis import given, settings
from hypothesis import strategies as st


def conversation() -> tuple[list[tuple[int, bytes]], dict[str, Any]]:
    """A client and a server talking: three concurrent requests (one POST with a body, one with
    split cookies), answers out of order (one with trailers, one reset by the server), a pushed
    response, and a header table larger than the default.  Returns the bytes each side sent, in
    the order they went, and what the parser should report."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    wire: list[tuple[int, bytes]] = []

    def move(src: h2.connection.H2Connection, direction: int) -> None:
        data = src.data_to_send()
        if data:
            wire.append((direction, data))
            (server if direction == CLIENT else client).receive_data(data)

    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 65536})
    move(client, CLIENT)
    server.initiate_connection()
    move(server, SERVER)
    move(client, CLIENT)
    base = [(":scheme", "https"), (":authority", "api.example.test")]
    client.send_headers(1, [(":method", "GET"), (":path", "/v1/models?x=1"), *base, ("user-agent", "t/1"),
                            ("cookie", "a=1"), ("cookie", "b=2")], end_stream=True)
    client.send_headers(3, [(":method", "POST"), (":path", "/v1/messages"), *base,
                            ("content-type", "application/json"), ("authorization", "Bearer sk-x")])
    client.send_data(3, b'{"model":"m",', end_stream=False)
    client.send_data(3, b'"max_tokens":5}', end_stream=True)
    client.send_headers(5, [(":method", "DELETE"), (":path", "/v1/files/9"), *base], end_stream=True)
    move(client, CLIENT)
    server.push_stream(1, 2, [(":method", "GET"), (":path", "/pushed"), *base])
    server.send_headers(2, [(":status", "200")], end_stream=True)
    server.send_headers(3, [(":status", "100")])
    server.send_headers(3, [(":status", "201"), ("content-type", "application/json")])
    server.send_data(3, b'{"id":"msg_1"}')
    server.send_headers(3, [("grpc-status", "0")], end_stream=True)      # trailers
    server.reset_stream(5, error_code=7)
    server.send_headers(1, [(":status", "200"), ("content-type", "text/plain")])
    server.send_data(1, b"model-a,model-b", end_stream=True)
    move(server, SERVER)
    want = {
        "/v1/messages": ("POST", 201, '{"model":"m","max_tokens":5}', '{"id":"msg_1"}'),
        "/v1/files/9": ("DELETE", None, "", ""),
        "/v1/models?x=1": ("GET", 200, "", "model-a,model-b"),
    }
    return wire, want


def summary(out: list[Exchange | Desync]) -> dict[str, tuple[str, int | None, str, str]]:
    got = {}
    for ex in out:
        assert isinstance(ex, Exchange), ex
        got[ex.request.url] = (ex.request.method, ex.status, ex.request.body.decode(), ex.body.decode())
    return got


def test_streams_of_a_real_conversation() -> None:
    wire, want = conversation()
    p = Http2Connection()
    out = [m for d, data in wire for m in p.feed(d, data, 1)]
    assert summary(out) == want
    assert [ex.request.url for ex in out if isinstance(ex, Exchange)] == ["/v1/messages", "/v1/files/9",
                                                                          "/v1/models?x=1"]
    first = next(ex for ex in out if isinstance(ex, Exchange) and ex.request.url == "/v1/models?x=1")
    assert first.request.host == "api.example.test" and first.request.version == "2"
    assert first.request.headers["cookie"] == "a=1; b=2" and ":path" not in first.request.headers
    assert first.headers == {"content-type": "text/plain"}
    assert p.close(2) == []


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_split_gives_the_same_streams(data: st.DataObject) -> None:
    wire, want = conversation()
    p = Http2Connection()
    out: list[Exchange | Desync] = []
    for direction, chunk in wire:
        while chunk:
            n = data.draw(st.integers(1, len(chunk)))
            out += p.feed(direction, chunk[:n], 1)
            chunk = chunk[n:]
    assert summary(out) == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([CLIENT, SERVER]), st.binary(max_size=200)), max_size=12),
       st.booleans())
def test_garbage_never_raises(chunks: list[tuple[int, bytes]], real_start: bool) -> None:
    p = Http2Connection()
    if real_start:
        wire, _ = conversation()
        for d, data in wire[:3]:
            p.feed(d, data, 0)
    for d, data in chunks:
        for m in p.feed(d, data, 0):
            assert isinstance(m, (Exchange, Desync))
    p.gap(SERVER, 0)
    p.close(0)


def test_a_lost_server_chunk_ends_the_open_streams_honestly() -> None:
    """HPACK state is per direction and every header block depends on those before it: after a gap
    the direction is not read again (a guess would name headers that were never sent)."""
    wire, _ = conversation()
    p = Http2Connection()
    for d, data in wire[:-1]:                 # the server's last write (every response) is lost
        p.feed(d, data, 1)
    out = p.gap(SERVER, 5)
    assert isinstance(out[0], Desync) and "HPACK state unknown" in out[0].reason
    ended = {ex.request.url: ex.status for ex in out[1:] if isinstance(ex, Exchange)}
    assert ended == {"/v1/models?x=1": None, "/v1/messages": None, "/v1/files/9": None}
    assert p.feed(SERVER, wire[-1][1], 6) == []


def test_an_http1_answer_to_a_preface_is_a_desync_not_a_wait() -> None:
    wire, _ = conversation()
    p = Http2Connection()
    p.feed(CLIENT, wire[0][1], 1)
    out = p.feed(SERVER, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", 2)
    assert len(out) == 1 and isinstance(out[0], Desync) and "SETTINGS" in out[0].reason


def pb_field(number: int, value: bytes | str) -> bytes:
    """One length-delimited protobuf field (wire type 2), encoded by hand."""
    raw = value.encode() if isinstance(value, str) else value
    out, key, n = bytearray(), (number << 3) | 2, len(raw)
    for v in (key, n):
        while v > 0x7F:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out) + raw


def framed(message: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(message).to_bytes(4, "big") + message


REQUEST_PB = pb_field(1, "projects/p1") + b"\x10\x2a" + pb_field(3, pb_field(1, "DROP TABLE users") + b"\x08\x01")
REPLY_PB = pb_field(1, "job-7") + pb_field(2, bytes([0xFF, 0x00, 0x01]))


def test_protobuf_strings_without_a_schema() -> None:
    assert rpc.strings(REQUEST_PB) == ["projects/p1", "DROP TABLE users"]
    assert rpc.strings(REPLY_PB) == ["job-7"]
    assert rpc.strings(b"\xff\xff\xff") == []
    assert rpc.name_of("/google.pubsub.v1.Publisher/Publish") == ("google.pubsub.v1.Publisher", "Publish")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=5), st.data())
def test_messages_are_counted_however_the_bytes_are_split(messages: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(framed(m) for m in messages)
    d = rpc.Deframer()
    while wire:
        n = data.draw(st.integers(1, len(wire)))
        d.feed(wire[:n])
        wire = wire[n:]
    assert d.messages == len(messages) and d.sizes == [len(m) for m in messages]
    assert bytes(d.first) == (messages[0][:rpc.KEEP] if messages else b"")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_protobuf_never_raises(raw: bytes) -> None:
    rpc.strings(raw)
    rpc.Deframer().feed(raw)


def test_a_grpc_call_over_real_http2_frames() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    wire: list[tuple[int, bytes]] = []

    def move(src: h2.connection.H2Connection, direction: int) -> None:
        data = src.data_to_send()
        wire.append((direction, data))
        (server if direction == CLIENT else client).receive_data(data)

    client.initiate_connection()
    move(client, CLIENT)
    server.initiate_connection()
    move(server, SERVER)
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "svc:50051"),
                            (":path", "/admin.v1.Jobs/Run"), ("content-type", "application/grpc"), ("te", "trailers")])
    body = framed(REQUEST_PB)
    client.send_data(1, body[:7])
    client.send_data(1, body[7:], end_stream=True)
    move(client, CLIENT)
    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    server.send_data(1, framed(REPLY_PB) + framed(b""))
    server.send_headers(1, [("grpc-status", "7"), ("grpc-message", "denied")], end_stream=True)
    move(server, SERVER)
    p = Http2Connection()
    (ex,) = [m for d, data in wire for m in p.feed(d, data, 1)]
    assert isinstance(ex, Exchange)
    assert ex.rpc == {"system": "grpc", "service": "admin.v1.Jobs", "method": "Run", "req_messages": "1",
                      "resp_messages": "2", "req_sizes": str(len(REQUEST_PB)), "resp_sizes": f"{len(REPLY_PB)},0",
                      "req_strings": "projects/p1 | DROP TABLE users", "resp_strings": "job-7", "status": "7",
                      "message": "denied"}


def test_red_team_inputs_end_in_a_desync_never_an_exception() -> None:
    """A DATA frame whose pad length is past its size (hyperframe's InvalidPaddingError) after a
    response ended its stream: the ended stream is still reported, and the direction desyncs."""
    wire, _ = conversation()
    p = Http2Connection()
    *before, (last_side, last) = wire
    assert last_side == SERVER
    for d, data in before:
        p.feed(d, data, 1)
    out = p.feed(SERVER, last + bytes.fromhex("00000400080000000109616263"), 2)
    assert [type(m).__name__ for m in out].count("Desync") == 1
    assert {ex.request.url for ex in out if isinstance(ex, Exchange)} == {"/v1/models?x=1", "/v1/messages",
                                                                            "/v1/files/9"}


def test_a_header_repeated_thousands_of_times_is_kept_in_part_quickly() -> None:
    import time

    from agentwarden.daemon.l7.http2 import MAX_HEADER, _headers

    t = time.perf_counter()
    pseudo, plain = _headers([("x-a", "v" * 10)] * 30000)
    assert time.perf_counter() - t < 0.5 and MAX_HEADER < len(plain["x-a"]) < MAX_HEADER + 20


def test_a_connection_joined_mid_stream_is_recognised_as_http2_and_not_read() -> None:
    """Bytes from the middle of an HTTP/2 connection (its HEADERS need an HPACK table built from what
    came before): recognised, so they are reported lost, never decoded or guessed."""
    from agentwarden.daemon.l7.http2 import looks_like_frames
    from agentwarden.daemon.protocols.http import detect_joined_h2
    from agentwarden.daemon.streams import Detected

    wire, _ = conversation()
    middle = [data for d, data in wire if d == CLIENT][-1]          # the requests, after the preface
    assert looks_like_frames(middle) is True
    assert detect_joined_h2(middle, True) is Detected.YES
    assert detect_joined_h2(middle, False) is Detected.NO          # a connection seen from its start
    assert looks_like_frames(middle[:9]) is None                   # one header, its frame not whole yet
    assert detect_joined_h2(middle[:9], True) is Detected.WAIT
    for other in (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"Q\x00\x00\x00\x0dselect 1\x00",
                  b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, b"\x17\x03\x03\x00\x20" + b"x" * 32):
        assert looks_like_frames(other) is False, other


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_the_mid_stream_check_never_raises(data: bytes) -> None:
    from agentwarden.daemon.l7.http2 import looks_like_frames

    assert looks_like_frames(data) in (True, False, None)

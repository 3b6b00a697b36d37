"""The sans-IO HTTP/1.x reader (httptools): exchanges out of byte streams, never an exception."""

from __future__ import annotations

from agentwarden.daemon.l7.http import (
    CLIENT,
    SERVER,
    Desync,
    Exchange,
    HttpConnection,
    Switched,
    looks_like_http,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def exchanges(events: list[object]) -> list[Exchange]:
    return [e for e in events if isinstance(e, Exchange)]


def test_keep_alive_pipelined_head_continue_chunked() -> None:
    c = HttpConnection()
    out = c.feed(CLIENT, b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n" b"HEAD /b HTTP/1.1\r\nHost: h\r\n\r\n"
                 b"POST /c HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 7\r\n"
                 b"Expect: 100-continue\r\n\r\n", 1)
    out += c.feed(SERVER, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", 2)
    out += c.feed(SERVER, b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n", 3)
    out += c.feed(SERVER, b"HTTP/1.1 100 Continue\r\n\r\n", 4)
    out += c.feed(CLIENT, b'{"a":1}', 5)
    out += c.feed(SERVER, b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n", 6)
    got = [(e.request.method, e.request.url, e.status, e.body, e.request.body) for e in exchanges(out)]
    assert got == [("GET", "/a?x=1", 200, b"abc", b""), ("HEAD", "/b", 200, b"", b""),
                   ("POST", "/c", 201, b"xyz", b'{"a":1}')]


def test_no_body_statuses_and_close_delimited() -> None:
    c = HttpConnection()
    c.feed(CLIENT, b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n", 1)
    assert [e.status for e in exchanges(c.feed(SERVER, b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"
                                                        b"HTTP/1.1 204 No Content\r\n\r\n", 2))] == [304, 204]
    c = HttpConnection()
    c.feed(CLIENT, b"GET / HTTP/1.0\r\n\r\n", 1)
    assert c.feed(SERVER, b"HTTP/1.0 200 OK\r\n\r\nuntil close", 2) == []
    (ex,) = exchanges(c.close(3))
    assert ex.status == 200 and ex.body == b"until close"


def test_upgrade_and_http2() -> None:
    c = HttpConnection()
    c.feed(CLIENT, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", 1)
    out = c.feed(SERVER, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n\x00\x00binary", 2)
    (ex,) = exchanges(out)
    # the new protocol's bytes of the same read, and the request stream 1 now answers, go with it
    assert ex.upgrade == "h2c" and out[1] == Switched("h2c", server_rest=b"\x00\x00binary", request=ex.request)
    assert c.feed(CLIENT, b"\x00\x00\x12\x04 more binary", 3) == []
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04"
    assert HttpConnection().feed(CLIENT, preface, 1) == [Switched("h2", client_rest=preface)]


def test_split_anywhere() -> None:
    req = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for cut in range(1, len(req)):
        c = HttpConnection()
        c.feed(CLIENT, req[:cut], 1)
        c.feed(CLIENT, req[cut:], 1)
        out = c.feed(SERVER, resp[: cut % len(resp)], 2) + c.feed(SERVER, resp[cut % len(resp):], 2)
        assert [(e.request.body, e.body) for e in exchanges(out)] == [(b"body", b"ok")]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from([CLIENT, SERVER]), st.binary(max_size=120)), max_size=15))
def test_garbage_never_raises(steps: list[tuple[int, bytes]]) -> None:
    c = HttpConnection()
    for direction, data in steps:
        for e in c.feed(direction, data, 1):
            assert isinstance(e, (Exchange, Switched, Desync))
    c.gap(SERVER)
    c.close(2)


def test_detection() -> None:
    assert looks_like_http(b"GET / HTTP/1.1\r\n")
    assert looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM")
    assert not looks_like_http(b"\x16\x03\x01\x00")
    assert not looks_like_http(b"\x00\x00\x00\x08\x04\xd2\x16/")


def test_absolute_form_names_the_host_over_the_host_header() -> None:
    """A server takes an absolute-form target's host over the Host header (RFC 9112 3.2.2), so the
    event (and the policy's after-the-fact decision) does too; its user info is not the host."""
    c = HttpConnection()
    out = c.feed(CLIENT, b"DELETE http://user@secrets.internal:8080/admin/x HTTP/1.1\r\nHost: fine\r\n\r\n", 1)
    out += c.feed(SERVER, b"HTTP/1.1 204 No Content\r\n\r\n", 2)
    (ex,) = exchanges(out)
    assert ex.request.host == "secrets.internal:8080"
    c = HttpConnection()
    out = c.feed(CLIENT, b"GET /a HTTP/1.1\r\nHost: fine\r\n\r\n", 1) + c.feed(SERVER, b"HTTP/1.1 204 OK\r\n\r\n", 2)
    assert exchanges(out)[0].request.host == "fine"

"""ClientHello reading for TLS we cannot decrypt."""

from __future__ import annotations

import socket
import ssl
import threading

from agentwarden.daemon.l7.tls import looks_like_client_hello, server_name


def client_hello(sni: str | None) -> bytes:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def connect() -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with socket.create_connection(srv.getsockname()) as s:
                ctx.wrap_socket(s, server_hostname=sni)
        except OSError:
            pass

    t = threading.Thread(target=connect)
    t.start()
    conn, _ = srv.accept()
    data = conn.recv(65536)
    conn.close()
    srv.close()
    t.join()
    return data


def test_sni_is_read() -> None:
    hello = client_hello("api.example.test")
    assert looks_like_client_hello(hello)
    assert server_name(hello) == "api.example.test"


def test_no_sni_and_garbage() -> None:
    assert server_name(client_hello(None)) == ""
    assert server_name(b"\x16\x03\x01\x00\x05\x01garbage") == ""
    assert not looks_like_client_hello(b"GET / HTTP/1.1\r\n")

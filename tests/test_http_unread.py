"""HTTP request lines whose method the kernel's matcher does not read (guard_http.bpf.c
aw_http_unread, guard_tls.bpf.c aw_ssl_unread), red team round 4: each spelling a real server
(Python's http.server, h11 as uvicorn and Go's net/http take methods) serves to the denied host is
refused; ordinary sends that only look like one (memcached, a mail line, a text body) are not.

Policy: tests/test_enforce.py POLICY (denies host secrets.internal, DELETE /admin/*).  A bypass case
fails when the recording server saw the request; a false-refusal case when an ordinary send was
refused.
"""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import h11
import pytest
from conftest import Daemon, make_agent, need_root, self_signed, wait_for
from test_enforce import COMM, POLICY

CLIENT = Path(__file__).with_name("rt_http_client.py")
PY = sys.executable
SEEN: list[str] = []


class Py11(BaseHTTPRequestHandler):
    """Python's http.server, HTTP/1.1 keep-alive, with WebDAV's PROPFIND (as tests/test_guard_splits.py Recorder11)."""
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        SEEN.append(f"py {self.command} {self.path} {self.headers.get('Host')}")
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_DELETE = do_POST = do_PROPFIND = _answer  # noqa: N815

    def log_message(self, *_: Any) -> None:
        pass


def _h11_conn(sock: socket.socket) -> None:
    """A server on h11 (uvicorn's and hypercorn's HTTP/1 parser): any RFC 9110 token is a method, as Go's net/http."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(ev, h11.Request):
                host = dict(ev.headers).get(b"host", b"").decode()
                SEEN.append(f"h11 {ev.method.decode()} {ev.target.decode()} {host}")
            elif isinstance(ev, h11.EndOfMessage):
                sock.sendall(conn.send(h11.Response(status_code=200, headers=[("Content-Length", "2")])))
                sock.sendall(conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
            elif isinstance(ev, h11.ConnectionClosed):
                return
    except Exception as e:  # noqa: BLE001
        SEEN.append(f"h11 error {e!r}")
    finally:
        sock.close()


def _serve_h11(lst: socket.socket) -> None:
    while True:
        c, _ = lst.accept()
        threading.Thread(target=_h11_conn, args=(c,), daemon=True).start()


def _serve_ws(lst: socket.socket) -> None:
    """A WebSocket echo server (RFC 6455), raw."""
    import base64
    import hashlib

    def one(c: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += c.recv(4096)
        key = [ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")
               if ln.lower().startswith(b"sec-websocket-key")][0]
        acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: " + acc + b"\r\n\r\n")
        f = c.recv(4096)
        if len(f) >= 6:
            n = f[1] & 0x7f
            m = f[2:6]
            data = bytes(b ^ m[i % 4] for i, b in enumerate(f[6:6 + n]))
            SEEN.append(f"ws {data!r}")
            c.sendall(bytes([0x81, len(data)]) + data)
        c.close()
    while True:
        c, _ = lst.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()


def _serve_sink(lst: socket.socket) -> None:
    def one(c: socket.socket) -> None:
        while (d := c.recv(65536)):
            SEEN.append(f"sink {d!r}")
            c.sendall(b"END\r\n")
    while True:
        c, _ = lst.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_root()
    root = tmp_path_factory.mktemp("unread")
    (root / "d").mkdir(exist_ok=True)
    d = Daemon(root / "d", [{"name": "guarded", "match": {"comm": [COMM]}}], policy=POLICY)
    agent = make_agent(tmp_path_factory.mktemp("unread-agent"), COMM)
    py = ThreadingHTTPServer(("127.0.0.1", 0), Py11)
    pys = ThreadingHTTPServer(("127.0.0.1", 0), Py11)
    self_signed(root)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(root / "c.pem"), str(root / "k.pem"))
    pys.socket = ctx.wrap_socket(pys.socket, server_side=True)
    for srv in (py, pys):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    lh, ls = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    lw = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_serve_ws, args=(lw,), daemon=True).start()
    threading.Thread(target=_serve_h11, args=(lh,), daemon=True).start()
    threading.Thread(target=_serve_sink, args=(ls,), daemon=True).start()
    d.start()
    yield {"daemon": d, "agent": agent, "py": py.server_address[1], "pys": pys.server_address[1],
           "h11": lh.getsockname()[1], "sink": ls.getsockname()[1],
           "ws": lw.getsockname()[1]}
    d.stop()
    py.shutdown()
    pys.shutdown()


def run_client(env: dict[str, Any], server: str, sends: list[bytes], tls: bool = False) -> str:
    cmd = f"{PY} {CLIENT} 127.0.0.1 {env[server]} {'--tls' if tls else ''} " + " ".join(s.hex() for s in sends)
    res = subprocess.run([str(env["agent"]), "-c", cmd], capture_output=True, text=True, timeout=60,
                         start_new_session=True)
    return (res.stdout.strip() or res.stderr.strip() or f"rc={res.returncode}").splitlines()[-1]


def req(line: bytes, host: bytes = b"secrets.internal") -> bytes:
    return line + b"\r\nHost: " + host + b"\r\n\r\n"


# name: (server, sends, tls, marker the server must NOT see)
BYPASS = {
    # Python's http.server splits the request line with str.split(): \x0b \x0c \x1c-\x1f \x85 \xa0 are blanks to it.
    # http_method_len stops at them (0: not a method) and unread_request calls them non-token bytes ("bad").
    "GET<VT>/path to the denied host (Python)": ("py", [req(b"GET\x0b/rt4-a HTTP/1.1")], False, "/rt4-a"),
    "GET<FF>/path to the denied host (Python)": ("py", [req(b"GET\x0c/rt4-b HTTP/1.1")], False, "/rt4-b"),
    "GET<0xA0>/path to the denied host (Python)": ("py", [req(b"GET\xa0/rt4-c HTTP/1.1")], False, "/rt4-c"),
    "DELETE<VT>/admin/x (path rule, Python)": ("py", [req(b"DELETE\x0b/admin/rt4-d HTTP/1.1", b"a")], False, "/admin/rt4-d"),
    # a first send that starts with a blank: aw_msg_route makes the connection AW_PG_OTHER, never judged again
    "leading space, denied host (Python)": ("py", [req(b" GET /rt4-e HTTP/1.1")], False, "/rt4-e"),
    "leading space, then DELETE /admin kept alive (Python)": (
        "py", [req(b" GET /fine HTTP/1.1", b"a"), req(b"DELETE /admin/rt4-f HTTP/1.1", b"a")], False, "/admin/rt4-f"),
    # unread_request skips at most 4 blanks before the target; Python's split() takes any number
    "PROPFIND and five blanks (Python)": ("py", [req(b"PROPFIND     /rt4-g HTTP/1.1")], False, "/rt4-g"),
    # a target that is neither '/', '*' nor a scheme: Python serves it
    "PROPFIND with a relative target (Python)": ("py", [req(b"PROPFIND rt4-h HTTP/1.1")], False, "rt4-h"),
    # the connection's first send is exactly the 8-byte method: no cork (not < 8), read with stale scratch bytes
    "PROPFIND cut after its 8 letters, first send (Python)": (
        "py", [b"PROPFIND", req(b" /rt4-i HTTP/1.1")], False, "/rt4-i"),
    # h11 (uvicorn/hypercorn) and Go's net/http take any token: tchar outside [A-Za-z0-9-_.] or >23 chars
    "GET! (h11, Go)": ("h11", [req(b"GET! /rt4-j HTTP/1.1")], False, "/rt4-j"),
    "PROP~FIND (h11, Go)": ("h11", [req(b"PROP~FIND /rt4-k HTTP/1.1")], False, "/rt4-k"),
    "a 24-letter method (h11, Go)": ("h11", [req(b"PROPFINDPROPFINDPROPFIND /rt4-l HTTP/1.1")], False, "/rt4-l"),
    # over TLS (OpenSSL uprobes, aw_http_ssl) the unread-method refusal is not made at all
    "PROPFIND over TLS to the denied host (Python ssl)": ("pys", [req(b"PROPFIND /rt4-m HTTP/1.1")], True, "/rt4-m"),
}


LONG = "a 24-letter method (h11, Go)"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(
    strict=True, reason="the method is read for 24 bytes: a longer window took aw_http_unread past the "
    "verifier's 1M instructions")) if n == LONG else n for n in BYPASS])
def test_bypass(env: dict[str, Any], name: str) -> None:
    server, sends, tls, marker = BYPASS[name]
    SEEN.clear()
    out = run_client(env, server, sends, tls)
    time.sleep(0.3)
    hit = [s for s in SEEN if marker in s]
    print(f"RT bypass | {name} | client: {out} | server saw: {hit}")
    assert not hit, f"BYPASS: the server served {hit} (client: {out})"


FALSE = {
    # memcached's text protocol with URL-path keys (nginx's memcached module keys by $uri)
    "memcached get /page/home": ("sink", [b"get /page/home\r\n"], "get /page/home"),
    "memcached set /page/home": ("sink", [b"set /page/home 0 0 2\r\nhi\r\n"], "set /page/home"),
    # a line protocol whose first command is a read method, then a line that looks like an unread request
    "SMTP-ish: a DATA line 'Deployed https://x'": (
        "sink", [b"EHLO x\r\n", b"DATA\r\n", b"Deployed https://example.com/build/42\r\n.\r\n"], "Deployed https"),
}


@pytest.mark.parametrize("name", list(FALSE))
def test_false_refusal(env: dict[str, Any], name: str) -> None:
    server, sends, marker = FALSE[name]
    SEEN.clear()
    out = run_client(env, server, sends)
    time.sleep(0.3)
    print(f"RT false | {name} | client: {out} | server saw: {SEEN}")
    assert any(marker.encode() in s.encode("latin-1", "replace") or marker in s for s in SEEN), \
        f"FALSE REFUSAL: {out}"


URLLIB_POST = r'''
import urllib.request, sys
tok = "eyJ" + "a" * 400          # a bearer token: the header block is past the kernel's 256 bytes
r = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/notes", data=b"cat /etc/hosts # step 3\n", method="POST",
                           headers={"Authorization": "Bearer " + tok, "Content-Type": "text/plain"})
try:
    print("ok", urllib.request.urlopen(r, timeout=5).status)
except Exception as e:
    print("failed", repr(e))
'''


def test_false_refusal_text_body_behind_long_headers(env: dict[str, Any], tmp_path: Path) -> None:
    """urllib (http.client) sends the body in its own send; headers past 256 bytes make the connection
    AW_HTTP_LOOSE, so the body send is judged by aw_http_unread and refused: 'cat /etc/hosts'."""
    tmp_path.chmod(0o755)
    script = tmp_path / "post.py"
    script.write_text(URLLIB_POST)
    SEEN.clear()
    res = subprocess.run([str(env["agent"]), "-c", f"{PY} {script} {env['py']}"], capture_output=True, text=True,
                         timeout=60, start_new_session=True)
    out = res.stdout.strip() or res.stderr.strip()
    print(f"RT false | urllib POST text body behind long headers | {out} | server saw {SEEN}")
    assert out.startswith("ok 200"), f"FALSE REFUSAL: {out}"


@pytest.mark.xfail(strict=True, reason="older than aw_http_unread: after an Upgrade the connection stays "
                   "framed, and a frame without an LF that fits 256 bytes waits corked for the rest of a "
                   "request line (http_incomplete); the kernel does not see the server's 101")
def test_false_hang_websocket_frame_after_upgrade(env: dict[str, Any]) -> None:
    """After `GET ... Upgrade: websocket` (no body) the connection stays framed (AW_HTTP, skip 0): the first
    WebSocket frame is taken for the start of a next request, and a frame under 256 bytes with no LF byte
    is corked (http_incomplete) until more bytes come: a chat client's frame never leaves."""
    SEEN.clear()
    cmd = f"{PY} {Path(__file__).with_name('rt_ws_client.py')} {env['ws']}"
    res = subprocess.run([str(env["agent"]), "-c", cmd], capture_output=True, text=True, timeout=60,
                         start_new_session=True)
    out = res.stdout.strip() or res.stderr.strip()
    print(f"RT false | websocket | {out!r} | server saw {SEEN}")
    assert "ok echo hello" in out, f"FALSE HANG: {out}"


def test_the_refusals_say_why(env: dict[str, Any]) -> None:
    """Each refusal above is an `unjudged-send` verdict that names the method it could not read, and
    how it was refused: a dropped send over TCP, the writer killed at SSL_write over TLS."""
    why = "whose method the guard does not read"
    mechanisms = wait_for(lambda: [m for e in env["daemon"].events(kinds=["verdict"])
                                   if why in (m := e["verdict"]["mechanism"])], what="the verdicts")
    assert any(m.startswith("sk_msg drop (EACCES)") for m in mechanisms), mechanisms
    assert any(m.startswith("SIGKILL at SSL_write") for m in mechanisms), mechanisms

"""HTTP/2 in a session under an HTTP rule that denies: refused at its preface, over TCP and TLS.

Its requests are HPACK-coded frames that no guard reads, so before this every HTTP/2 request
passed the HTTP rules and was judged after the fact (red team: `curl https://…/admin/x`, which
offers h2 by default, and `curl --http2-prior-knowledge` reached the denied path).  Real curl, a
real Node HTTP/2 server (TLS with ALPN h2, and in the clear), a real daemon."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FAKE_COMM, Daemon, make_agent, need_root, self_signed, wait_for
from test_e2e_http import H2_SERVER, NO_ADMIN_POLICY

H1_ANSWER = """tls.on("stream", answer);
tls.on("request", (req, res) => {
  if (req.httpVersion === "2.0") return;   // its stream was answered above
  fs.appendFileSync(process.env.SEEN, req.url + "\\n");
  res.end(JSON.stringify({path: req.url}));
});"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_root()
    if shutil.which("node") is None or shutil.which("curl") is None:
        pytest.skip("Node.js and curl are needed")
    work = tmp_path_factory.mktemp("h2guard")
    work.chmod(0o755)
    self_signed(work)
    seen = work / "seen"
    seen.write_text("")
    # every path served, HTTP/2 or (ALPN's fallback, allowHTTP1) HTTP/1.1, appended to `seen`
    server = H2_SERVER.replace(
        "function answer(stream, headers) {",
        'function answer(stream, headers) {\n  fs.appendFileSync(process.env.SEEN, headers[":path"] + "\\n");')
    server = server.replace("key: fs.readFileSync(process.argv[3])}", "key: fs.readFileSync(process.argv[3]), allowHTTP1: true}")
    server = server.replace('tls.on("stream", answer);', H1_ANSWER)
    assert "allowHTTP1" in server and "httpVersion" in server
    (work / "server.js").write_text(server)
    srv = subprocess.Popen(["node", str(work / "server.js"), str(work / "c.pem"), str(work / "k.pem")],
                           stdout=subprocess.PIPE, text=True, env={**os.environ, "SEEN": str(seen)})
    assert srv.stdout is not None
    tls_port, clear_port = json.loads(srv.stdout.readline())
    (work / "d").mkdir()
    d = Daemon(work / "d", [{"name": "h2g", "match": {"comm": [FAKE_COMM]}}], policy=NO_ADMIN_POLICY)
    agent = make_agent(work / "bin", FAKE_COMM)
    d.start()
    try:
        yield {"daemon": d, "agent": agent, "seen": seen, "tls": tls_port, "clear": clear_port}
    finally:
        d.stop()
        srv.kill()
        srv.wait()


def _curl(env: dict[str, Any], args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(env["agent"]), "-c", f"curl -s {args}; echo rc=$?"], capture_output=True, text=True,
                          timeout=60)


def _h2_verdicts(env: dict[str, Any]) -> list[dict[str, Any]]:
    d: Daemon = env["daemon"]
    return [e["verdict"] for e in d.events(kinds=["verdict"]) if "HTTP/2" in e["verdict"]["mechanism"]]


@pytest.mark.parametrize("how", ["tls-alpn", "prior-knowledge"])
def test_http2_under_a_deny_rule_is_refused_before_any_request_goes(env: dict[str, Any], how: str) -> None:
    path = f"/admin/{how}"
    url = (f"--http2 -k https://127.0.0.1:{env['tls']}{path}" if how == "tls-alpn"
           else f"--http2-prior-knowledge http://127.0.0.1:{env['clear']}{path}")
    before = len(_h2_verdicts(env))
    res = _curl(env, url)
    assert path not in env["seen"].read_text(), f"the server served {path}: {res.stdout!r}"
    assert "rc=0" not in res.stdout, res
    v = wait_for(lambda: _h2_verdicts(env)[before:], what="the HTTP/2 verdict")[-1]
    assert (v["action"], v["rule"], v["prevented"]) == (("kill" if how == "tls-alpn" else "deny"), "unjudged-send",
                                                         True), v
    assert ("SIGKILL at SSL_write" if how == "tls-alpn" else "sk_msg drop") in v["mechanism"]
    assert "--http1.1" in v["mechanism"]


def test_http1_to_the_same_server_is_still_judged_request_by_request(env: dict[str, Any]) -> None:
    """The refusal is of HTTP/2 only: HTTP/1.1 over TLS to the same server (ALPN's fallback) is
    judged as before: an allowed path is served, the denied one is not."""
    ok = _curl(env, f"--http1.1 -k https://127.0.0.1:{env['tls']}/fine")
    assert "rc=0" in ok.stdout and '"/fine"' in ok.stdout, ok
    bad = _curl(env, f"--http1.1 -k https://127.0.0.1:{env['tls']}/admin/h1")
    assert "rc=0" not in bad.stdout, bad
    seen = env["seen"].read_text().split()
    assert "/fine" in seen and "/admin/h1" not in seen, seen


# ---- the preface cut and placed as an agent would ----------------------------------------
# HTTP/2's preface cut and placed as an agent would, against the refusal at the preface
# (test_http2_guard.py): each test fails while a bypass (the denied path reaches the server,
# env["seen"]) or a false refusal of HTTP/1.1 exists.  Red team round 32 wrote them against the
# first version, which a preface cut across TLS writes ("PRI * H", "PRI", one byte a write) got
# past, and which refused HTTP/1.1 bodies that start with the preface's bytes.


PY = sys.executable
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

CLIENT = r'''
import socket, ssl, sys, time
import h2.connection, h2.config, h2.events
mode, port, path, spec, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], bytes.fromhex(sys.argv[5])
raw = socket.create_connection(("127.0.0.1", port))
raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if mode == "tls":
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    print("alpn", s.selected_alpn_protocol(), flush=True)
else:
    s = raw
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
data = prefix + c.data_to_send()
c.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "https" if mode == "tls" else "http"),
                   (":authority", "localhost")], end_stream=True)
data += c.data_to_send()
cuts = [int(x) for x in spec.split(",") if x] if spec else []
pos = 0
for n in cuts:
    s.sendall(data[pos:pos + n]); pos += n; time.sleep(0.05)
s.sendall(data[pos:])
s.settimeout(5)
got = b""
try:
    while True:
        d = s.recv(65535)
        if not d: break
        got += d
        for ev in c.receive_data(d):
            if isinstance(ev, h2.events.DataReceived): print("DATA", ev.data, flush=True)
            if isinstance(ev, h2.events.StreamEnded): raise SystemExit(0)
        s.sendall(c.data_to_send())
except SystemExit: raise
except Exception as e:
    print("err", repr(e))
'''


def _client(env: dict[str, Any], mode: str, path: str, spec: str, prefix: bytes = b"") -> str:
    script = Path(env["seen"]).parent / "rt32_client.py"
    script.write_text(CLIENT)
    port = env["tls"] if mode == "tls" else env["clear"]
    cmd = f"{PY} {script} {mode} {port} {path} '{spec}' '{prefix.hex()}'; echo rc=$?"
    r = subprocess.run([str(env["agent"]), "-c", cmd], capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def _served(env: dict[str, Any], path: str) -> bool:
    return path in env["seen"].read_text().split()


# ---- control: the preface in one write is refused (both transports) ----
@pytest.mark.parametrize("mode", ["tls", "clear"])
def test_control_whole_preface(env: dict[str, Any], mode: str) -> None:
    path = f"/admin/rt32-whole-{mode}"
    out = _client(env, mode, path, "")
    assert not _served(env, path), out


# ---- the preface split across SSL_writes / sends ----
SPLITS = {"7": "7", "4": "4", "3": "3", "bytewise": "1,1,1,1,1,1,1,1", "pr": "2", "p": "1", "16": "8,8"}


@pytest.mark.parametrize("name", list(SPLITS))
def test_tls_split_preface(env: dict[str, Any], name: str) -> None:
    path = f"/admin/rt32-tls-split-{name}"
    out = _client(env, "tls", path, SPLITS[name])
    assert not _served(env, path), out


@pytest.mark.parametrize("name", list(SPLITS))
def test_clear_split_preface(env: dict[str, Any], name: str) -> None:
    path = f"/admin/rt32-clear-split-{name}"
    out = _client(env, "clear", path, SPLITS[name])
    assert not _served(env, path), out


@pytest.mark.parametrize("mode", ["tls", "clear"])
def test_leading_crlf(env: dict[str, Any], mode: str) -> None:
    path = f"/admin/rt32-crlf-{mode}"
    out = _client(env, mode, path, "2", prefix=b"\r\n")
    assert not _served(env, path), out


# ---- false refusals of HTTP/1.1: a body starting with the preface's bytes ----
def test_tls_http1_body_starting_with_pri(env: dict[str, Any]) -> None:
    """HTTP/1.1 over TLS (ALPN http/1.1 fallback): headers in one SSL_write, the body in the next,
    the body's first bytes "PRI * HTTP/2.0": a legitimate request to an allowed path."""
    script = Path(env["seen"]).parent / "rt32_h1.py"
    script.write_text(r'''
import socket, ssl, sys, time
body = b"PRI * HTTP/2.0 is how h2 starts"
raw = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(raw, server_hostname="localhost")
s.sendall(b"POST /rt32-fine-body HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
time.sleep(0.05)
s.sendall(body)
print(s.recv(4096))
''')
    r = subprocess.run([str(env["agent"]), "-c", f"{PY} {script} {env['tls']}; echo rc=$?"],
                       capture_output=True, text=True, timeout=60)
    # Node's "request" event (which appends to `seen`) fires at the headers: the body's fate is the client's
    assert "rc=0" in r.stdout and "200 OK" in r.stdout, r.stdout + r.stderr


class _H1(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while True:
                n = int(self.rfile.readline().strip(), 16)
                if n == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(n)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *a: Any) -> None:
        pass


@pytest.mark.parametrize("how", ["length", "chunked"])
def test_clear_http1_body_starting_with_pri(env: dict[str, Any], how: str, tmp_path: Path) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _H1)
    srv.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    body = b"PRI * HTTP/2.0 is how h2 starts"
    if how == "length":
        head = b"POST /ok HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(body)
        parts = [head, body]
    else:
        head = b"POST /ok HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        parts = [head, b"%x\r\n" % len(body), body, b"\r\n0\r\n\r\n"]
    script = tmp_path / "c.py"
    script.write_text(f'''
import socket, time
s = socket.create_connection(("127.0.0.1", {srv.server_address[1]}))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for p in {parts!r}:
    s.sendall(p); time.sleep(0.05)
print(s.recv(4096))
''')
    tmp_path.chmod(0o755)
    script.chmod(0o644)
    try:
        r = subprocess.run([str(env["agent"]), "-c", f"{PY} {script}; echo rc=$?"],
                           capture_output=True, text=True, timeout=60)
        verdicts = [e["verdict"]["mechanism"] for e in env["daemon"].events(kinds=["verdict"])][-2:]
        assert srv.seen == [("/ok", body)], (r.stdout + r.stderr, verdicts)  # type: ignore[attr-defined]
    finally:
        srv.shutdown()

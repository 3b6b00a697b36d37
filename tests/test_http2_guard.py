"""HTTP/2 in a session under an HTTP rule that denies: refused at its preface, over TCP and TLS.

Its requests are HPACK-coded frames that no guard reads, so before this every HTTP/2 request
passed the HTTP rules and was judged after the fact (red team: `curl https://…/admin/x`, which
offers h2 by default, and `curl --http2-prior-knowledge` reached the denied path).  Real curl, a
real Node HTTP/2 server (TLS with ALPN h2, and in the clear), a real daemon."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import FAKE_COMM, Daemon, make_agent, need_root, self_signed, wait_for
from test_e2e_http import H2_SERVER

POLICY = """version: 1
rules:
  - name: no-admin
    when: {kind: http, http: {path: ["/admin/*"]}}
    action: deny
"""


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
    d = Daemon(work / "d", [{"name": "h2g", "match": {"comm": [FAKE_COMM]}}], policy=POLICY)
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

"""HTTP benchmark: a keep-alive client inside an agent session against a local server.

Reports requests captured / requests sent, kernel events lost, client throughput
with the daemon / without (same machine, same run), and daemon CPU, for plain
HTTP and for HTTPS (plaintext from the OpenSSL uprobes; self-signed certificate),
for HTTPS from Node (its own OpenSSL, memory BIOs tied to the socket by the ClientHello),
and for LLM calls (Anthropic Messages requests with a few turns of history, each answered
with a tool call: `llm` events).

Run as root:  /opt/agentwarden/venv/bin/python bench/http_bench.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import psutil  # noqa: E402
from conftest import bench_daemon, make_agent  # noqa: E402

CLIENT = """
import sys, time, http.client, ssl
port, n, tls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "tls"
if tls:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl._create_unverified_context())
else:
    conn = http.client.HTTPConnection("127.0.0.1", port)
t = time.perf_counter()
for i in range(n):
    conn.request("GET", f"/item/{i}?q=1", headers={"Authorization": "Bearer bench-token"})
    conn.getresponse().read()
print(f"rps {n / (time.perf_counter() - t):.1f}")
"""

NODE_CLIENT = """
const https = require("https");
const [port, n] = [Number(process.argv[2]), Number(process.argv[3])];
const agent = new https.Agent({keepAlive: true, maxSockets: 1});
const t = process.hrtime.bigint();
let i = 0;
(function next() {
  if (i === n) {
    console.log(`rps ${(n / (Number(process.hrtime.bigint() - t) / 1e9)).toFixed(1)}`);
    agent.destroy();
    return;
  }
  https.get({host: "127.0.0.1", port, path: `/item/${i++}?q=1`, agent, rejectUnauthorized: false,
             headers: {authorization: "Bearer bench-token"}},
            (res) => { res.resume(); res.on("end", next); });
})();
"""

LLM_CLIENT = """
import json, sys, time, http.client, ssl
port, n = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl._create_unverified_context())
history = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k}: " + "context " * 40}
           for k in range(6)]
t = time.perf_counter()
for i in range(n):
    body = json.dumps({"model": "bench-model", "max_tokens": 256, "system": "You are an agent.",
                       "messages": history + [{"role": "user", "content": f"step {i}: what next?"}]})
    conn.request("POST", "/v1/messages", body=body, headers={"x-api-key": "sk-bench-key",
                                                               "content-type": "application/json"})
    conn.getresponse().read()
print(f"rps {n / (time.perf_counter() - t):.1f}")
"""
LLM_REPLY = json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "bench-model",
                        "content": [{"type": "text", "text": "Running the tests."},
                                    {"type": "tool_use", "id": "toolu_1", "name": "bash",
                                     "input": {"command": "make test"}}],
                        "stop_reason": "tool_use",
                        "usage": {"input_tokens": 900, "output_tokens": 20}}).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16               # one write per response (flushed per request) ...
    disable_nagle_algorithm = True   # ... and no Nagle/delayed-ACK stalls on keep-alive

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(LLM_REPLY)))
        self.end_headers()
        self.wfile.write(LLM_REPLY)

    def do_GET(self) -> None:
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def run(agent: Path, client: Path, port: int, n: int, mode: str) -> float:
    if mode == "node-tls":
        cmd = f"node {client.parent / 'client.js'} {port} {n}"
    elif mode == "llm":
        cmd = f"{sys.executable} {client.parent / 'llm_client.py'} {port} {n}"
    else:
        cmd = f"{sys.executable} {client} {port} {n} {mode}"
    out = subprocess.run([str(agent), "-c", cmd], check=True, capture_output=True, text=True).stdout
    return float(re.search(r"rps ([\d.]+)", out).group(1))  # type: ignore[union-attr]


def server(root: Path, tls: bool) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls:
        import ssl

        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=127.0.0.1", "-keyout", str(root / "k.pem"), "-out", str(root / "c.pem")],
                       check=True, capture_output=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(root / "c.pem"), str(root / "k.pem"))
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--modes", default="plain,tls,node-tls,llm", help="of plain, tls, node-tls, llm")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aw-httpbench-"))
    agent = make_agent(root / "bin", "aw-http-agent")
    client = root / "client.py"
    client.write_text(CLIENT)
    (root / "client.js").write_text(NODE_CLIENT)
    (root / "llm_client.py").write_text(LLM_CLIENT)
    modes = [m for m in args.modes.split(",") if m]
    servers = {mode: server(root, mode != "plain") for mode in modes}
    ports = {mode: s.server_address[1] for mode, s in servers.items()}
    results: dict[str, dict[str, float | int]] = {}
    try:
        without = {}
        for mode in ports:
            run(agent, client, ports[mode], 2000, mode)     # warm-up: imports, server threads, CPU clocks
            without[mode] = run(agent, client, ports[mode], args.requests, mode)
        d = bench_daemon(root / "d", "httpb", "aw-http-agent", batch_size=5000)
        d.start()
        try:
            ps = psutil.Process(d.proc.pid if d.proc else 0)
            for mode in ports:
                since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
                lost0 = d.request("status")["kernel_lost"]
                cpu0, t0 = sum(ps.cpu_times()[:2]), time.monotonic()
                with_daemon = run(agent, client, ports[mode], args.requests, mode)
                wall = time.monotonic() - t0
                last, stable = -1, 0
                while stable < 3:
                    kind = "llm" if mode == "llm" else "http"
                    counts = d.request("count", kinds=[kind], agent="httpb", since=since)["kinds"]
                    n = int(counts.get(kind, 0))
                    stable, last = (stable + 1 if n == last else 0), n
                    time.sleep(1)
                cpu = sum(ps.cpu_times()[:2]) - cpu0
                results[mode] = {
                    "requests_sent": args.requests,
                    "requests_captured": last,
                    "captured_ratio": round(last / args.requests, 4),
                    "kernel_events_lost": d.request("status")["kernel_lost"] - lost0,
                    "rps_without_daemon": without[mode],
                    "rps_with_daemon": with_daemon,
                    "rps_ratio": round(with_daemon / without[mode], 3),
                    "daemon_cpu_seconds": round(cpu, 2),
                    "daemon_cpu_share_during_run": round(cpu / wall, 3),
                }
        finally:
            d.stop()
        for mode in ports:
            after = run(agent, client, ports[mode], args.requests, mode)
            results[mode]["rps_without_daemon_after"] = after
            with_daemon = float(results[mode]["rps_with_daemon"])
            results[mode]["rps_ratio_against_after"] = round(with_daemon / after, 3)
        print(json.dumps(results, indent=2))
    finally:
        for s in servers.values():
            s.shutdown()


if __name__ == "__main__":
    main()

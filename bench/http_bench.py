"""HTTP benchmark: a keep-alive client inside an agent session against a local server.

Reports requests captured / requests sent, kernel events lost, client throughput
with the daemon / without (same machine, same run), and daemon CPU.  Plain HTTP
only: TLS capture (OpenSSL uprobes) is not built yet.

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
from conftest import Daemon, make_agent  # noqa: E402

CLIENT = """
import sys, time, http.client
port, n = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port)
t = time.perf_counter()
for i in range(n):
    conn.request("GET", f"/item/{i}?q=1", headers={"Authorization": "Bearer bench-token"})
    conn.getresponse().read()
print(f"rps {n / (time.perf_counter() - t):.1f}")
"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16               # one write per response (flushed per request) ...
    disable_nagle_algorithm = True   # ... and no Nagle/delayed-ACK stalls on keep-alive

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def run(agent: Path, client: Path, port: int, n: int) -> float:
    out = subprocess.run([str(agent), "-c", f"{sys.executable} {client} {port} {n}"], check=True,
                         capture_output=True, text=True).stdout
    return float(re.search(r"rps ([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aw-httpbench-"))
    agent = make_agent(root / "bin", "aw-http-agent")
    client = root / "client.py"
    client.write_text(CLIENT)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        run(agent, client, port, 2000)          # warm-up: imports, server threads, CPU clocks
        without = run(agent, client, port, args.requests)
        (root / "d").mkdir()
        d = Daemon(root / "d", [{"name": "httpb", "match": {"comm": ["aw-http-agent"]}}])
        cfg = json.loads(d.config.read_text())
        cfg["store"]["batch"] = {"size": 5000, "interval": 1.0}
        cfg["log_level"] = "info"
        d.config.write_text(json.dumps(cfg))
        d.start()
        try:
            ps = psutil.Process(d.proc.pid if d.proc else 0)
            cpu0, t0 = sum(ps.cpu_times()[:2]), time.monotonic()
            with_daemon = run(agent, client, port, args.requests)
            wall = time.monotonic() - t0
            last, stable = -1, 0
            while stable < 3:
                n = int(d.request("count", kinds=["http"], agent="httpb")["kinds"].get("http", 0))
                stable, last = (stable + 1 if n == last else 0), n
                time.sleep(1)
            cpu = sum(ps.cpu_times()[:2]) - cpu0
            status = d.request("status")
            print(json.dumps({
                "requests_sent": args.requests,
                "requests_captured": last,
                "captured_ratio": round(last / args.requests, 4),
                "kernel_events_lost": status["kernel_lost"],
                "rps_without_daemon": without,
                "rps_with_daemon": with_daemon,
                "rps_ratio": round(with_daemon / without, 3),
                "daemon_cpu_seconds": round(cpu, 2),
                "daemon_cpu_share_during_run": round(cpu / wall, 3),
            }, indent=2))
        finally:
            d.stop()
        after = run(agent, client, port, args.requests)
        print(json.dumps({"rps_without_daemon_after": after,
                          "rps_ratio_against_after": round(with_daemon / after, 3)}, indent=2))
    finally:
        srv.shutdown()


if __name__ == "__main__":
    main()

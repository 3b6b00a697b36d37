"""What the daemon costs the rest of the host: syscall-heavy work outside any agent.

Three configurations, interleaved in ABCCBA rounds so that drift on this noisy VM falls on
all of them alike:
  A  nothing attached
  B  the daemon, default configuration and the shipped policy, with an agent session
     running (an idle agent: the tracked-process filter is not empty)
  C  libbpf-tools `execsnoop` (Debian `libbpf-tools`), which records every exec on the host
Workloads, outside any agent:
  - `dd if=/dev/zero of=/dev/null bs=1 count=1000000` (2M syscalls, no socket)
  - `tar c /usr/lib/python3 | wc -c` (file reads, a pipe)
  - 1,000 fork+exec of /bin/true from sh (every fork meets task_newtask's two programs, every exec
    sched_process_exec's, every exit sched_process_exit's: they return at the tracked-process test)
  - 300 TLS connections of a Python client to a local TLS server (the system's OpenSSL, which
    carries the daemon's uprobes: SSL_do_handshake, SSL_write_ex, SSL_read_ex, SSL_shutdown
    trap for every process that calls them, tracked or not)
  - the same 300 connections from Node (`tls.connect`), whose own OpenSSL the daemon attaches to
    once a Node program runs in an agent session (not here)
Each ratio is the median over rounds of (B or C) / A of the same round, with its min and max.
The daemon's pins are removed between its runs (pinned guards outlive a stopped daemon).

Run as root:  /opt/agentwarden/venv/bin/python bench/host_cost_bench.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import bench_daemon, make_agent  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TLS_SERVER = r"""
import socket, ssl, sys, threading
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
def serve(c):
    try:
        with ctx.wrap_socket(c, server_side=True) as t:
            t.recv(100)
            t.sendall(b"ok")
    except OSError:
        pass
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
TLS_CLIENT = ("import socket, ssl, sys; ctx = ssl.create_default_context(); ctx.check_hostname = False; "
              "ctx.verify_mode = ssl.CERT_NONE\n"
              "for _ in range(300):\n"
              "    with ctx.wrap_socket(socket.create_connection(('127.0.0.1', int(sys.argv[1])))) as t:\n"
              "        t.sendall(b'hi'); t.recv(10)")
# the same through Node's own OpenSSL (the `node` binary exports it; the daemon attaches to it when a
# Node program runs in an agent session: the idle agent here is not one, so this measures a host
# where no Node agent ran)
NODE_TLS_CLIENT = """
const tls = require("tls");
let left = 300;
(function next() {
  if (left-- === 0) return;
  const t = tls.connect({host: "127.0.0.1", port: Number(process.argv[1]), rejectUnauthorized: false},
                        () => t.write("hi"));
  t.on("data", () => { t.end(); });
  t.on("close", next);
})();
"""
WORKLOADS = {
    "dd bs=1": ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=1000000", "status=none"],
    "tar | wc": ["sh", "-c", "tar cf - /usr/lib/python3 2>/dev/null | wc -c >/dev/null"],
    "exec x1000": ["sh", "-c", "i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done"],
    "TLS x300": [],   # filled by tls_server() with the client's command
    "Node TLS x300": [],
}


def tls_server(root: Path) -> subprocess.Popen[str]:
    """A local TLS server (a certificate made here) for the TLS workload; its port goes in."""
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = subprocess.Popen([sys.executable, "-c", TLS_SERVER, str(cert), str(key)], stdout=subprocess.PIPE,
                              text=True)
    assert server.stdout is not None
    port = server.stdout.readline().strip()
    WORKLOADS["TLS x300"] = [sys.executable, "-c", TLS_CLIENT, port]
    if shutil.which("node"):
        WORKLOADS["Node TLS x300"] = ["node", "-e", NODE_TLS_CLIENT, port]
    else:
        del WORKLOADS["Node TLS x300"]
    return server


def timed(cmd: list[str], repeat: int = 3) -> float:
    """Median wall time of `repeat` runs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure() -> dict[str, float]:
    return {name: timed(cmd) for name, cmd in WORKLOADS.items()}


def with_daemon(root: Path, n: int) -> tuple[dict[str, float], dict[str, object]]:
    agent = make_agent(root / "bin", "aw-host-agent")
    d = bench_daemon(root / f"d{n}", "bench", "aw-host-agent",
                     policy=REPO.joinpath("deploy/policy.yaml").read_text())
    d.start()
    idle = subprocess.Popen([str(agent), "-c", "sleep 600"])
    try:
        time.sleep(1.0)   # the session is tracked
        out = measure()
        status = d.request("status")
    finally:
        idle.kill()
        idle.wait()
        d.stop()   # and its pins: pinned guards outlive a stopped daemon
    return out, {k: v for k, v in status.items() if "lost" in k} if isinstance(status, dict) else {}


def with_execsnoop() -> dict[str, float]:
    snoop = subprocess.Popen(["execsnoop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)   # attached (it prints its header once loaded)
        return measure()
    finally:
        snoop.terminate()
        snoop.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aw-host-bench-"))
    server = tls_server(root)
    snoop = shutil.which("execsnoop") is not None
    rows: list[dict[str, dict[str, float]]] = []
    lost: list[dict[str, object]] = []
    try:
        for r in range(args.rounds):
            got: dict[str, dict[str, float]] = {}
            order = ["none", "daemon", "execsnoop", "execsnoop", "daemon", "none"]
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in order}
            for i, what in enumerate(order):
                if what == "none":
                    runs[what].append(measure())
                elif what == "daemon":
                    out, st = with_daemon(root, r * 10 + i)
                    runs[what].append(out)
                    lost.append(st)
                elif snoop:
                    runs[what].append(with_execsnoop())
            for what, results in runs.items():
                if results:
                    got[what] = {w: statistics.mean(x[w] for x in results) for w in WORKLOADS}
            rows.append(got)
            print(json.dumps({"round": r, **got}), flush=True)
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)
    summary: dict[str, object] = {"rounds": args.rounds, "daemon_status": lost}
    for what in ("daemon", "execsnoop"):
        for w in WORKLOADS:
            ratios = [row[what][w] / row["none"][w] for row in rows if what in row]
            if ratios:
                summary[f"{what} {w}"] = {"median": round(statistics.median(ratios), 3),
                                          "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    for w in WORKLOADS:
        summary[f"seconds without, {w}"] = round(statistics.median(row["none"][w] for row in rows), 3)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

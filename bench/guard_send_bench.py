"""What the SQL/HTTP guard costs each send, measured by the kernel (bpf_stats).

A daemon with the default policy (its SQL rules put every TCP socket of an agent session
through sk_msg); `pgbench -n -S` (one client, simple and extended protocol) runs inside the
agent for --seconds.  With `kernel.bpf_stats_enabled` on, the kernel counts each program's
runs and time; a tail call's time is the calling program's, so the sk_msg entry program's
run_time_ns / run_cnt is the whole chain's cost per send (copy, route, framing, the
ambiguity pass and the matcher).  The TLS uprobe chain is measured the same way with
`pgbench` over `sslmode=require` (SSL_write's entry program; and the return program of SSL_read
and SSL_write, where a write's framing stands or is undone).  HTTP: a keep-alive client in
the agent alternates GETs and POSTs with a small body against a local HTTP/1.1 server (the
guard frames each request by Content-Length).  Kernel events lost are counted from the
daemon's status.

Run as root:  /opt/agentwarden/venv/bin/python bench/guard_send_bench.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import bench_daemon, make_agent  # noqa: E402
from pgserver import PgServer  # noqa: E402

COMM = "aw-bench-send"
ENTRY = {False: "aw_sk_msg", True: "aw_ssl_write"}   # where each chain starts (tail calls count here)


def prog_name(prog_id: int) -> str:
    """A program's name, from the kernel (bpf_prog_info.name at offset 64)."""
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    fd = lib.bpf_prog_get_fd_by_id(ct.c_uint32(prog_id))
    if fd < 0:
        return ""
    try:
        info = ct.create_string_buffer(256)
        size = ct.c_uint32(256)
        if lib.bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) != 0:
            return ""
        return info.raw[64:80].split(b"\0", 1)[0].decode()
    finally:
        os.close(fd)


def prog_stats(pid: int) -> dict[int, tuple[str, int, int]]:
    """prog id -> (name, run_time_ns, run_cnt) of the BPF programs a process holds open."""
    out: dict[int, tuple[str, int, int]] = {}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        fields = dict(re.findall(r"^(\w+):\s+(\S+)", text, re.M))
        if "prog_id" in fields and "run_cnt" in fields:
            pid_ = int(fields["prog_id"])
            out[pid_] = (prog_name(pid_), int(fields["run_time_ns"]), int(fields["run_cnt"]))
    return out


def per_run(before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]],
            name: str) -> tuple[float, int]:
    """(ns per run, runs) of the named program(s) between the two readings."""
    ns = runs = 0
    for pid, (n, rt, rc) in after.items():
        if n != name[:15] or pid not in before:
            continue
        ns += rt - before[pid][1]
        runs += rc - before[pid][2]
    return (ns / runs if runs else 0.0), runs


def pgbench(agent: Path, pg: PgServer, dsn_extra: str, mode: str, seconds: int) -> int:
    cmd = (f"pgbench -n -S -M {mode} -c 1 -T {seconds} "
           f"'host=127.0.0.1 port={pg.port} user=postgres dbname=bench {dsn_extra}'")
    out = subprocess.run([str(agent), "-c", cmd], check=True, capture_output=True, text=True).stdout
    return int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]


class Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # its header and body writes would wait for a delayed ACK (40 ms)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_POST = do_GET  # noqa: N815

    def log_message(self, *_: object) -> None:
        pass


HTTP_CLIENT = ("import http.client as h, sys; c = h.HTTPConnection('127.0.0.1', int(sys.argv[1])); "
               "[(c.request('POST' if i % 2 else 'GET', '/r', body=b'v=1' if i % 2 else None), "
               "c.getresponse().read()) for i in range(int(sys.argv[2]))]")


def http_phase(root: Path, agent: Path, policy: str, requests: int) -> dict[str, float | int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    d = bench_daemon(root / "dh", "sendbench", COMM, policy=policy)
    d.start()
    old = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
    try:
        assert d.proc is not None
        lost0 = d.request("status")["kernel_lost"]
        before = prog_stats(d.proc.pid)
        subprocess.run([str(agent), "-c", f'{sys.executable} -c "{HTTP_CLIENT}" {server.server_address[1]} '
                                          f"{requests}"], check=True, capture_output=True)
        after = prog_stats(d.proc.pid)
        ns, runs = per_run(before, after, ENTRY[False])
        return {"requests": requests, "guarded_runs": runs, "ns_per_run": round(ns),
                "kernel_events_lost": d.request("status")["kernel_lost"] - lost0}
    finally:
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text(old)
        d.stop()
        server.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=10000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aw-sendbench-"))
    agent = make_agent(root / "bin", COMM)
    policy = (Path(__file__).resolve().parents[1] / "deploy" / "policy.yaml").read_text()
    results: dict[str, dict[str, float | int]] = {}
    for tls in (False, True):
        pg = PgServer(ssl=tls)
        pg.start()
        try:
            pg.psql("postgres", "create database bench")
            subprocess.run([str(pg.bin / "pgbench"), "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p",
                            str(pg.port), "-U", "postgres", "bench"], check=True, capture_output=True)
            d = bench_daemon(root / f"d{int(tls)}", "sendbench", COMM, policy=policy)
            d.start()
            old = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
            Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
            try:
                assert d.proc is not None
                for mode in ("simple", "extended"):
                    lost0 = d.request("status")["kernel_lost"]
                    before = prog_stats(d.proc.pid)
                    ssl = "sslmode=require" if tls else "sslmode=disable"
                    txs = pgbench(agent, pg, ssl, mode, args.seconds)
                    after = prog_stats(d.proc.pid)
                    ns, runs = per_run(before, after, ENTRY[tls])
                    results[f"{'tls' if tls else 'tcp'} {mode}"] = {
                        "transactions": txs,
                        "guarded_runs": runs,
                        "ns_per_run": round(ns),
                        "kernel_events_lost": d.request("status")["kernel_lost"] - lost0,
                    }
                    if tls:   # the return of SSL_read and SSL_write (a write's framing stands or is undone)
                        rns, rruns = per_run(before, after, "aw_ssl_return")
                        results[f"tls {mode}"].update(return_runs=rruns, return_ns_per_run=round(rns))
            finally:
                Path("/proc/sys/kernel/bpf_stats_enabled").write_text(old)
                d.stop()
        finally:
            pg.stop()
    results["http keep-alive"] = http_phase(root, agent, policy, args.requests)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Postgres benchmark: agentwarden side by side with what users would pick instead.

pgbench (`-n -c 4 -j 2 -T seconds`, scale 2) against a local PostgreSQL, for `-S` (select
only, 1 statement a transaction) and the default TPC-B script (7), run five ways:

  direct       the client straight to the server; no daemon
  agentwarden  the daemon at the shipped configuration and policy, the client inside an agent
               session (every statement captured, judged by the SQL guards, stored)
  outside      the same daemon running, the client outside any agent (what the rest of the
               host pays)
  pgbouncer    the client through a pgbouncer hop on the same host (session pooling), the
               gateway way of seeing every statement; no daemon
  pgaudit      the server logging every statement with pgaudit (`pgaudit.log = 'all'`); no
               daemon

in rounds of direct, agentwarden, outside, pgbouncer, pgaudit and then the same backwards
(ABCDEEDCBA): this VM's throughput drifts by 15 % and more between minutes, so each way is
compared with the direct runs of its own round (the mean of its two runs over the mean of
the two direct runs), and the report gives the median over rounds and the spread (min-max).
The daemon is started for its two runs of each half-round and stopped after them.

For each agentwarden run: statements captured / executed (transactions pgbench reports x
statements a transaction; pgbench's own few setup queries make it a little over 1), kernel
events lost, the daemon's CPU as a share of one core.

Needs root, PostgreSQL, pgbouncer and pgaudit (Debian: `pgbouncer`, `postgresql-15-pgaudit`):
    /opt/agentwarden/venv/bin/python bench/pg_bench.py [--seconds 8] [--rounds 2] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import psutil  # noqa: E402
import yaml  # noqa: E402
from conftest import Daemon, bench_daemon, make_agent  # noqa: E402
from pgserver import PgServer, bin_dir, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STATEMENTS_PER_TX = {"select-only": 1, "tpcb": 7}
WAYS = ("direct", "agentwarden", "outside", "pgbouncer", "pgaudit")
AGENT = "aw-pgb-agent"


def pgbench(port: int, mode: str, seconds: int, clients: int, agent: Path | None = None) -> tuple[float, int]:
    """(tps, transactions); inside the fake agent when `agent` is given."""
    cmd = [str(bin_dir() / "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
           "-c", str(clients), "-j", "2", "-T", str(seconds), *(["-S"] if mode == "select-only" else []),
           "bench"]
    if agent is not None:
        cmd = [str(agent), "-c", " ".join(cmd)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pgbench failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    tps = float(re.search(r"tps = ([\d.]+)", res.stdout).group(1))  # type: ignore[union-attr]
    txs = int(re.search(r"number of transactions actually processed: (\d+)", res.stdout).group(1))  # type: ignore[union-attr]
    return tps, txs


class Bouncer:
    """pgbouncer on a loopback port of its own, as the postgres user (it refuses root)."""

    def __init__(self, pg: PgServer) -> None:
        if not shutil.which("pgbouncer"):
            raise SystemExit("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        self.dir = Path(tempfile.mkdtemp(prefix="aw-pgbouncer-"))
        self.port = free_port()
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(f"""[databases]
bench = host=127.0.0.1 port={pg.port} dbname=bench user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/users.txt
pool_mode = session
max_client_conn = 100
default_pool_size = 20
logfile = {self.dir}/pgbouncer.log
""")
        shutil.chown(self.dir, "postgres", "postgres")
        for f in self.dir.iterdir():
            shutil.chown(f, "postgres", "postgres")
        self.proc = subprocess.Popen(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                                      "pgbouncer", str(self.dir / "pgbouncer.ini")], cwd="/",
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        ready = [str(bin_dir() / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        while subprocess.run(ready).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                log = (self.dir / "pgbouncer.log").read_text()[-500:]
                raise SystemExit(f"pgbouncer did not start: {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def agentwarden_run(d: Daemon, pg: PgServer, mode: str, seconds: int, clients: int,
                    agent: Path) -> tuple[float, dict[str, float | int]]:
    """One pgbench inside the agent with the daemon running: its TPS, and what was captured."""
    assert d.proc is not None
    ps = psutil.Process(d.proc.pid)
    lost0 = d.request("status")["kernel_lost"]
    cpu0, t0, since = sum(ps.cpu_times()[:2]), time.monotonic(), time.time()
    tps, txs = pgbench(pg.port, mode, seconds, clients, agent)
    cpu, wall = sum(ps.cpu_times()[:2]) - cpu0, time.monotonic() - t0
    since_ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since - 1))
    last, stable, deadline = -1, 0, time.monotonic() + 300
    while stable < 3 and time.monotonic() < deadline:   # until the daemon has caught up
        n = int(d.request("count", kinds=["sql"], agent="pgb", since=since_ts)["kinds"].get("sql", 0))
        stable, last = (stable + 1 if n == last else 0), n
        time.sleep(1)
    executed = txs * STATEMENTS_PER_TX[mode]
    return tps, {"captured": round(last / executed, 4) if executed else 0.0, "executed": executed,
                 "lost": d.request("status")["kernel_lost"] - lost0, "daemon_cpu": round(cpu / wall, 3)}


def round_of(pg: PgServer, bouncer: Bouncer, mode: str, args: argparse.Namespace, agent: Path,
             root: Path, policy: str, n: int) -> tuple[dict[str, list[float]], list[dict[str, float | int]]]:
    """One ABCDEEDCBA round: each way's TPS (two runs each) and the agentwarden runs' capture."""
    tps: dict[str, list[float]] = {w: [] for w in WAYS}
    capture: list[dict[str, float | int]] = []

    def run(way: str) -> None:
        if way == "pgaudit":
            pg.psql("postgres", "alter database bench set pgaudit.log = 'all'")
        try:
            port = bouncer.port if way == "pgbouncer" else pg.port
            tps[way].append(pgbench(port, mode, args.seconds, args.clients)[0])
        finally:
            if way == "pgaudit":
                pg.psql("postgres", "alter database bench reset pgaudit.log")

    def with_daemon(order: tuple[str, str], half: int) -> None:
        order = tuple(w for w in order if w in args.ways)
        if not order:
            return
        d = bench_daemon(root / f"d-{mode}-{n}-{half}", "pgb", AGENT, batch_size=args.batch_size,
                         policy=policy)
        d.start()
        try:
            for way in order:
                if way == "agentwarden":
                    t, cap = agentwarden_run(d, pg, mode, args.seconds, args.clients, agent)
                    tps[way].append(t)
                    capture.append(cap)
                else:
                    tps[way].append(pgbench(pg.port, mode, args.seconds, args.clients)[0])
        finally:
            d.stop()

    run("direct")
    with_daemon(("agentwarden", "outside"), 0)
    for way in ("pgbouncer", "pgaudit", "pgaudit", "pgbouncer"):
        if way in args.ways:
            run(way)
    with_daemon(("outside", "agentwarden"), 1)
    run("direct")
    return tps, capture


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(STATEMENTS_PER_TX), choices=list(STATEMENTS_PER_TX))
    ap.add_argument("--ways", nargs="+", default=list(WAYS[1:]), choices=list(WAYS[1:]),
                    help="the ways to run beside direct (default: all); for A/B runs of two versions")
    shipped = yaml.safe_load((REPO / "deploy" / "config.yaml").read_text())
    ap.add_argument("--batch-size", type=int, default=shipped["store"]["batch"]["size"],
                    help="store.batch.size (default: the shipped configuration's)")
    args = ap.parse_args()
    policy = (REPO / "deploy" / "policy.yaml").read_text()   # the shipped policy: the SQL guards judge
    root = Path(tempfile.mkdtemp(prefix="aw-pgbench-"))
    agent = make_agent(root / "bin", AGENT)
    pg = PgServer()
    with (pg.data / "postgresql.conf").open("a") as f:
        # measure the client, not the server's log; pgaudit loaded in every run (its hooks cost
        # nothing until pgaudit.log names a class), logging only in its own runs
        f.write("log_statement = 'none'\nmax_connections = 50\nshared_preload_libraries = 'pgaudit'\n")
    pg.start()
    bouncer: Bouncer | None = None
    report: dict[str, object] = {"seconds": args.seconds, "clients": args.clients, "rounds": args.rounds}
    try:
        pg.psql("postgres", "create database bench")
        pg.psql("bench", "create extension pgaudit")
        subprocess.run([str(pg.bin / "pgbench"), "-i", "-q", "-s", "2", "-h", "127.0.0.1", "-p", str(pg.port),
                        "-U", "postgres", "bench"], check=True, capture_output=True)
        bouncer = Bouncer(pg)
        for mode in args.modes:
            ratios: dict[str, list[float]] = {w: [] for w in args.ways}
            captures: list[dict[str, float | int]] = []
            direct_tps: list[float] = []
            for n in range(args.rounds):
                tps, cap = round_of(pg, bouncer, mode, args, agent, root, policy, n)
                direct = statistics.mean(tps["direct"])
                direct_tps.append(round(direct, 1))
                for way in ratios:
                    ratios[way].append(round(statistics.mean(tps[way]) / direct, 3))
                captures += cap
                runs = {w: [round(t, 1) for t in v] for w, v in tps.items()}
                print(mode, n, json.dumps(runs), file=sys.stderr)
            report[mode] = {
                "direct_tps_by_round": direct_tps,
                "tps_ratio": {w: {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": r}
                              for w, r in ratios.items()},
                "agentwarden_runs": captures,
            }
        print(json.dumps(report, indent=2))
    finally:
        if bouncer is not None:
            bouncer.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.umask(0o022)
    main()

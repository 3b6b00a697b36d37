"""Postgres benchmark: pgbench with and without the daemon, inside and outside an agent.

For `-S` (select only) and the default TPC-B script, each for --seconds:
  - TPS with the daemon / TPS without (client inside an agent session)
  - statements captured / statements executed, kernel events lost
  - daemon CPU share of one core during the run
  - TPS with the probes attached / without for the same client outside any agent:
    this VM's throughput drifts by +-15 % between runs, so this one alternates
    detached and attached runs (--pairs times, the probes loaded in this process,
    which is all an untracked process meets) and reports the median of the ratios

Executed statements: transactions pgbench reports x statements per transaction
(-S: 1; TPC-B: 7), plus what the server logged for connection setup is ignored
(pgbench sends none with -n).  Run as root:
    /opt/agentwarden/venv/bin/python bench/pg_bench.py [--seconds 10] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import psutil  # noqa: E402
import yaml  # noqa: E402
from conftest import bench_daemon, make_agent  # noqa: E402
from pgserver import PgServer  # noqa: E402

STATEMENTS_PER_TX = {"select-only": 1, "tpcb": 7}


def pgbench(agent: Path | None, pg: PgServer, mode: str, seconds: int, clients: int) -> tuple[float, int]:
    """(tps, transactions); inside the fake agent when `agent` is given."""
    cmd = [str(pg.bin / "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
           "-c", str(clients), "-j", "2", "-T", str(seconds)]
    if mode == "select-only":
        cmd.append("-S")
    cmd.append("bench")
    if agent is not None:
        cmd = [str(agent), "-c", " ".join(cmd)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    txs = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]
    return tps, txs


def outside_ratio(pg: PgServer, mode: str, seconds: int, clients: int, pairs: int) -> list[float]:
    from agentwarden.probes.loader import Probes, remove_pins
    from agentwarden.probes.process import ProbeLimits

    ratios = []
    for _ in range(pairs):
        without = pgbench(None, pg, mode, seconds, clients)[0]
        probes = Probes(ProbeLimits(pin_dir=f"/sys/fs/bpf/aw-bench-{os.getpid()}"))
        try:
            with_probes = pgbench(None, pg, mode, seconds, clients)[0]
        finally:
            probes.close()
            remove_pins(f"/sys/fs/bpf/aw-bench-{os.getpid()}")
        ratios.append(round(with_probes / without, 3))
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=3)
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "config.yaml").read_text())
    ap.add_argument("--batch-size", type=int, default=shipped["store"]["batch"]["size"],
                    help="store.batch.size (default: the shipped configuration's)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aw-pgbench-"))
    agent = make_agent(root / "bin", "aw-pgb-agent")
    pg = PgServer()
    with (pg.data / "postgresql.conf").open("a") as f:
        f.write("log_statement = 'none'\nmax_connections = 50\n")   # measure the client, not the log
    pg.start()
    results: dict[str, dict[str, float | int]] = {}
    try:
        pg.psql("postgres", "create database bench")
        subprocess.run([str(pg.bin / "pgbench"), "-i", "-q", "-s", "2", "-h", "127.0.0.1", "-p", str(pg.port),
                        "-U", "postgres", "bench"], check=True, capture_output=True)
        base = {m: pgbench(agent, pg, m, args.seconds, args.clients)[0] for m in STATEMENTS_PER_TX}

        d = bench_daemon(root / "d", "pgb", "aw-pgb-agent", batch_size=args.batch_size)
        d.start()
        try:
            ps = psutil.Process(d.proc.pid if d.proc else 0)
            for mode, per_tx in STATEMENTS_PER_TX.items():
                lost0 = d.request("status")["kernel_lost"]
                cpu0, t0 = sum(ps.cpu_times()[:2]), time.monotonic()
                since = time.time()
                tps, txs = pgbench(agent, pg, mode, args.seconds, args.clients)
                cpu = sum(ps.cpu_times()[:2]) - cpu0
                wall = time.monotonic() - t0
                executed = txs * per_tx
                since_ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since - 1))

                def counted(since_ts: str = since_ts) -> int:
                    return int(d.request("count", kinds=["sql"], agent="pgb", since=since_ts)["kinds"]
                               .get("sql", 0))

                # wait until the daemon has caught up (the count stops growing)
                last, stable = -1, 0
                deadline = time.monotonic() + 300
                while stable < 3 and time.monotonic() < deadline:
                    n = counted()
                    stable = stable + 1 if n == last else 0
                    last = n
                    time.sleep(1)
                lost = d.request("status")["kernel_lost"] - lost0
                results[mode] = {
                    "tps_without_daemon": round(base[mode], 1),
                    "tps_with_daemon_in_agent": round(tps, 1),
                    "tps_ratio_in_agent": round(tps / base[mode], 3),
                    "statements_executed": executed,
                    "statements_captured": last,
                    "captured_ratio": round(last / executed, 4) if executed else 0,
                    "kernel_events_lost": lost,
                    "daemon_cpu_share_of_one_core": round(cpu / wall, 3),
                }
        finally:
            d.stop()
        for mode in STATEMENTS_PER_TX:
            ratios = outside_ratio(pg, mode, args.seconds, args.clients, args.pairs)
            results[mode]["tps_ratio_outside_agent_runs"] = ratios   # type: ignore[assignment]
            results[mode]["tps_ratio_outside_agent_median"] = statistics.median(ratios)
        print(json.dumps(results, indent=2))
    finally:
        pg.stop()


if __name__ == "__main__":
    main()

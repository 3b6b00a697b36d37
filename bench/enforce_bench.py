"""Enforcement benchmark: what the guards cost allowed operations, and how fast a denial is judged.

In one run, on this machine:
  - exec latency inside an agent (fork + exec + wait, timed by the agent's bash), p50/p99:
    no daemon; daemon with a policy, for a command no rule names (the kernel's name
    lookup only); and for a command a rule names with an argv condition (stopped at
    exec, decided in userspace, resumed)
  - Postgres query latency (pgbench -S, one client, per-transaction log), p50/p99, and
    TPS (pgbench -S, 4 clients), with the SQL guard attached and without: the same
    daemon alternates two policies by `policy reload` (--pairs times; the VM drifts)
  - from a denied operation in the kernel to its verdict decided in the daemon
    (verdict.latency_us), p50/p99, for a denied exec, connect and DROP TABLE: with the
    daemon idle, and while a saturating pgbench in the agent keeps capture behind
  - kernel events lost during the run

Run as root:  /opt/agentwarden/venv/bin/python bench/enforce_bench.py [--execs 500] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import Daemon, bench_daemon, make_agent, wait_for  # noqa: E402
from pgserver import PgServer  # noqa: E402

COMM = "aw-bench-guard"
RULES = """
  - name: no-forbidden-host
    when: {kind: connect, connect: {dst: ["127.0.0.77/32"]}}
    action: deny
  - name: forbidden-binary
    when: {kind: exec, exec: {path: ["*/aw-forbidden"]}}
    action: deny
  - name: checked-by-argv
    when: {kind: exec, exec: {path: ["*/aw-checked"], argv: ['never-matches-this']}}
    action: deny
"""
SQL_RULE = """
  - name: no-drop-table
    when: {kind: sql, sql: {command: ["DROP TABLE", "TRUNCATE"]}}
    action: deny
"""
WITH_SQL = "version: 1\nrules:" + SQL_RULE + RULES
WITHOUT_SQL = "version: 1\nrules:" + RULES


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def exec_latencies(agent: Path, n: int) -> dict[str, list[float]]:
    """Microseconds per command, timed by the agent itself around each command."""
    loop = "for i in $(seq {n}); do s=$EPOCHREALTIME; {cmd}; e=$EPOCHREALTIME; echo {cmd} $s $e; done; "
    script = loop.format(n=n, cmd="aw-free") + loop.format(n=n, cmd="aw-checked")
    out = subprocess.run([str(agent), "-c", script], check=True, capture_output=True, text=True,
                         env={"PATH": f"{agent.parent}:/usr/bin:/bin"}).stdout
    res: dict[str, list[float]] = {"free": [], "checked": []}
    for line in out.splitlines():
        name, s, e = line.split()
        res[name.removeprefix("aw-")].append((float(e) - float(s)) * 1e6)
    return res


def pgbench(agent: Path, pg: PgServer, seconds: int, clients: int, log_dir: Path | None = None) -> float:
    cmd = [str(pg.bin / "pgbench"), "-n", "-S", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
           "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds)]
    if log_dir is not None:
        cmd += ["-l", "--log-prefix", str(log_dir / "tx")]
    cmd.append("bench")
    out = subprocess.run([str(agent), "-c", " ".join(cmd)], check=True, capture_output=True, text=True,
                         cwd=log_dir or "/").stdout
    return float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]


RULES_BY_KIND = {"forbidden-binary": "exec", "no-forbidden-host": "connect", "no-drop-table": "sql"}


def deny(agent: Path, work: Path, pg: PgServer, n: int) -> None:
    """n denied execs, n denied connects, n refused DROP TABLEs, from inside the agent."""
    subprocess.run([str(agent), "-c", f"for i in $(seq {n}); do aw-forbidden; done; "
                    f"{sys.executable} -c \"import socket\nfor i in range({n}):\n"
                    f"    try: socket.create_connection(('127.0.0.77', 9), timeout=1)\n"
                    f"    except OSError: pass\"; "
                    f"for i in $(seq {n}); do psql -X '{pg.dsn}' -c 'drop table pgbench_branches' "
                    f">/dev/null 2>&1; done"], capture_output=True, env={"PATH": f"{work}/bin:/usr/bin:/bin"})


def denial_latencies(d: Daemon, seen: set[str], n: int) -> dict[str, list[float]]:
    def fresh() -> list[dict[str, Any]] | None:
        evs = [e for e in d.events(kinds=["verdict"], limit=100000) if e["event_id"] not in seen]
        done = all(sum(e["verdict"]["rule"] == r for e in evs) >= n for r in RULES_BY_KIND)
        return evs if done else None
    evs: list[dict[str, Any]] = wait_for(fresh, 300, 1.0, "the verdict events")
    return {what: [e["verdict"]["latency_us"] for e in evs if e["verdict"]["rule"] == rule
                   and e["verdict"]["latency_us"] is not None] for rule, what in RULES_BY_KIND.items()}


def settle(d: Daemon) -> None:
    """Wait until the daemon has read its backlog: every run starts with it idle."""
    last = -1
    while True:
        records = d.request("status")["pipeline"]["records"]
        if records == last:
            return
        last = records
        time.sleep(1.0)


def tx_latencies(log_dir: Path) -> list[float]:
    """pgbench -l lines: client tx latency_us script epoch epoch_us."""
    out = []
    for f in log_dir.glob("tx*"):
        out += [float(line.split()[2]) for line in f.read_text().splitlines() if line.strip()]
        f.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--execs", type=int, default=500)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--denials", type=int, default=50)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aw-bench-guard-"))
    agent = make_agent(work / "bin", COMM)
    for name in ("aw-free", "aw-checked", "aw-forbidden"):
        shutil.copy2("/bin/true", work / "bin" / name)
    pg = PgServer()
    pg.start()
    subprocess.run([str(pg.bin / "pgbench"), "-i", "-q", "-s", "2", "-h", str(pg.sockdir), "-p", str(pg.port),
                    "-U", "postgres", "awtest"], check=True, capture_output=True)
    pg.psql("awtest", "create database bench template awtest")
    results: dict[str, object] = {}
    try:
        base = exec_latencies(agent, args.execs)
        d = bench_daemon(work / "daemon", "bench", COMM, policy=WITH_SQL)
        d.start()
        try:
            guarded = exec_latencies(agent, args.execs)
            for name in ("free", "checked"):
                results[f"exec_{name}_us"] = {
                    "p50_without": round(pct(base[name], 0.5)), "p50_with": round(pct(guarded[name], 0.5)),
                    "p99_without": round(pct(base[name], 0.99)), "p99_with": round(pct(guarded[name], 0.99))}
            # denials: kernel timestamp -> verdict decided in the daemon; quiet, then while a
            # saturating pgbench in the same agent keeps the capture pipeline behind
            for label, load in (("", False), ("_under_load", True)):
                d.policy.write_text(WITH_SQL)
                assert d.cli("policy", "reload").returncode == 0
                settle(d)
                seen = {e["event_id"] for e in d.events(kinds=["verdict"], limit=100000)}
                bench = None
                if load:
                    cmd = (f"{pg.bin}/pgbench -n -S -h 127.0.0.1 -p {pg.port} -U postgres -c 4 -j 2 "
                           f"-T {args.seconds + 20} bench")
                    bench = subprocess.Popen([str(agent), "-c", cmd], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
                    time.sleep(3)
                deny(agent, work, pg, args.denials)
                if bench is not None:
                    bench.wait()
                for what, us in denial_latencies(d, seen, args.denials).items():
                    results[f"denied_{what}_to_verdict_us{label}"] = {
                        "p50": round(pct(us, 0.5)), "p99": round(pct(us, 0.99)), "n": len(us)}
            # Postgres: the same daemon, the SQL rule on and off by reload
            tps: dict[str, list[float]] = {"with": [], "without": []}
            lat: dict[str, list[float]] = {"with": [], "without": []}
            logs = work / "pglog"
            logs.mkdir()
            logs.chmod(0o777)
            for i in range(args.pairs):
                order = (("without", WITHOUT_SQL), ("with", WITH_SQL))
                for mode, policy in order if i % 2 == 0 else order[::-1]:   # ABBA: drift cancels
                    d.policy.write_text(policy)
                    assert d.cli("policy", "reload").returncode == 0
                    settle(d)
                    tps[mode].append(pgbench(agent, pg, args.seconds, 4))
                    settle(d)
                    pgbench(agent, pg, max(2, args.seconds // 2), 1, logs)
                    lat[mode] += tx_latencies(logs)
            ratios = [w / wo for w, wo in zip(tps["with"], tps["without"], strict=True)]
            results["pgbench_select_tps"] = {"with_guard": [round(t) for t in tps["with"]],
                                             "without_guard": [round(t) for t in tps["without"]],
                                             "ratio_median": round(statistics.median(ratios), 3)}
            results["query_latency_us"] = {k: {"p50": round(pct(v, 0.5)), "p99": round(pct(v, 0.99)),
                                                   "n": len(v)} for k, v in lat.items()}
            assert pg.psql("awtest", "select count(*) from pgbench_branches").strip() == "2"
            status = d.request("status")
            results["kernel_events_lost"] = status["kernel_lost"] + status["kernel_track_full"]
            results["pipeline_malformed"] = status["pipeline"]["malformed"]
        finally:
            d.stop()
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Exec benchmark: a fake agent runs N short commands as fast as it can.

Reports, against a run without the daemon on the same machine in the same run:
  - events captured / commands run, and kernel events lost
  - the agent's wall time with the daemon / without
  - daemon CPU seconds and peak RSS
  - exec -> row queryable in the store, p50 / p99 (polled every 20 ms)
  - a syscall-heavy command outside any agent (dd bs=1), with / without

Run as root:  /opt/agentwarden/venv/bin/python bench/exec_bench.py [--commands 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import psutil  # noqa: E402
from agentwarden.core.events import parse_ts  # noqa: E402
from conftest import bench_daemon, make_agent, wait_for  # noqa: E402

DD = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=1000000", "status=none"]


def timed(cmd: list[str], repeat: int = 3) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=2000)
    args = ap.parse_args()
    n = args.commands
    root = Path(tempfile.mkdtemp(prefix="aw-bench-"))
    agent = make_agent(root / "bin", "aw-bench-agent")
    script = f"for i in $(seq 1 {n}); do /bin/true bench-$i; done"

    # baseline: no daemon
    base_agent = timed([str(agent), "-c", script])
    base_dd = timed(DD)

    d = bench_daemon(root / "d", "bench", "aw-bench-agent")     # the shipped batch defaults
    d.start()
    try:
        daemon_ps = psutil.Process(d.proc.pid if d.proc else 0)
        dd_with = timed(DD)
        cpu0 = sum(daemon_ps.cpu_times()[:2])

        first_seen: dict[str, float] = {}
        lat: list[float] = []
        stop = threading.Event()
        sid_box: list[str] = []

        def poll() -> None:
            since = None
            while not stop.is_set():
                if not sid_box:
                    starts = [e for e in d.events(kinds=["session_start"], limit=50)
                              if e["agent"] == "bench"]
                    if starts:
                        sid_box.append(starts[-1]["session_id"])
                    time.sleep(0.02)
                    continue
                evs = d.events(session=sid_box[0], kinds=["exec"], since=since, limit=100000)
                now = time.time_ns()
                for e in evs:
                    if e["process"]["argv"][:1] == ["/bin/true"] and e["event_id"] not in first_seen:
                        first_seen[e["event_id"]] = now
                        lat.append((now - parse_ts(e["ts"])) / 1e6)
                if evs:
                    since = evs[-1]["ts"]
                time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t = time.perf_counter()
        subprocess.run([str(agent), "-c", script], check=True)
        with_agent = time.perf_counter() - t
        wait_for(lambda: len(first_seen) >= n, timeout=120, interval=0.2, what="all execs queryable")
        stop.set()
        poller.join()
        cpu = sum(daemon_ps.cpu_times()[:2]) - cpu0
        status_text = Path(f"/proc/{daemon_ps.pid}/status").read_text()
        hwm = next(int(line.split()[1]) for line in status_text.splitlines() if line.startswith("VmHWM"))
        sid = sid_box[0]
        stored = [e for e in d.events(session=sid, kinds=["exec"], limit=100000)
                  if e["process"]["argv"][:1] == ["/bin/true"]]
        status = d.request("status")
        result = {
            "commands": n,
            "captured": len(stored),
            "captured_ratio": round(len(stored) / n, 4),
            "distinct_argv": len({tuple(e["process"]["argv"]) for e in stored}),
            "kernel_lost": status["kernel_lost"],
            "malformed": status["pipeline"]["malformed"],
            "agent_seconds_without": round(base_agent, 3),
            "agent_seconds_with": round(with_agent, 3),
            "agent_ratio": round(with_agent / base_agent, 3),
            "daemon_cpu_seconds": round(cpu, 3),
            "daemon_peak_rss_mib": round(hwm / 1024, 1),
            "exec_to_queryable_ms_p50": round(pct(lat, 0.50), 1),
            "exec_to_queryable_ms_p99": round(pct(lat, 0.99), 1),
            "dd_seconds_without": round(base_dd, 3),
            "dd_seconds_with": round(dd_with, 3),
            "untracked_dd_ratio": round(dd_with / base_dd, 3),
        }
        print(json.dumps(result, indent=2))
    finally:
        d.stop()


if __name__ == "__main__":
    main()

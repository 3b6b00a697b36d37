"""Launch to ready, and idle memory: the daemon beside libbpf-tools' execsnoop.

Each round starts, in turn (ABBA over rounds): the daemon with the shipped policy and the
embedded store (chdb), the daemon with a ClickHouse server DSN (unreachable: it spools, so
no chdb is loaded), and execsnoop.  For each: seconds from start to ready (the daemon's
control socket answers; execsnoop has printed its header), and its resident memory after
`--idle` seconds, broken down by mapping (from /proc/PID/smaps).

Run as root:  /opt/agentwarden/venv/bin/python bench/launch_bench.py [--rounds 4] [--idle 5]
(execsnoop is Debian's libbpf-tools: apt-get install libbpf-tools)
"""

from __future__ import annotations

import argparse
import collections
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
from conftest import bench_daemon  # noqa: E402

POLICY = (Path(__file__).resolve().parents[1] / "deploy" / "policy.yaml").read_text()
GROUPS = (("chdb (embedded ClickHouse)", re.compile(r"chdb")),
          ("LLVM/clang (bcc's compiler)", re.compile(r"LLVM|clang")),
          ("BPF maps (ring buffers)", re.compile(r"bpf-map")),
          ("heap and anonymous", re.compile(r"^\[(anon|heap)\]$")),
          ("python and other libraries", re.compile(r".")))


def breakdown(pid: int) -> dict[str, float]:
    """Resident MiB by what is mapped, and the total."""
    out: collections.Counter[str] = collections.Counter()
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \d+\s*(.*)$", line)
            if m:
                name = m.group(1).strip() or "[anon]"
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                group = next(g for g, rx in GROUPS if rx.search(name))
                out[group] += kib
                out["total"] += kib
    return {k: round(v / 1024, 1) for k, v in out.items()}


def daemon_run(store: str, idle: float) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="aw-launch-"))
    d = bench_daemon(root, "launch", "aw-launch-agent", policy=POLICY)
    if store == "server":
        cfg = json.loads(d.config.read_text())
        cfg["store"]["dsn"] = "http://default:@127.0.0.1:1/agentwarden"   # nothing listens: it spools
        d.config.write_text(json.dumps(cfg))
    t = time.monotonic()
    d.start()
    ready = time.monotonic() - t
    time.sleep(idle)
    assert d.proc is not None
    mem = breakdown(d.proc.pid)
    log = d.log.read_text()
    d.stop()
    shutil.rmtree(root, ignore_errors=True)
    probes = re.search(r"probes loaded in ([0-9.]+)s", log)
    return {"ready_s": round(ready, 2), "probes_s": float(probes.group(1)) if probes else None,
            "rss_mib": mem}


def execsnoop_run(idle: float) -> dict[str, object]:
    exe = shutil.which("execsnoop") or "/usr/sbin/execsnoop"
    t = time.monotonic()
    # line-buffered: it prints its header once its probes are attached (a pipe would hold it)
    p = subprocess.Popen(["stdbuf", "-oL", exe], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout is not None
    p.stdout.readline()   # the header: its probes are attached
    ready = time.monotonic() - t
    time.sleep(idle)
    mem = breakdown(p.pid)   # stdbuf execs execsnoop: the same pid
    p.terminate()
    p.wait(10)
    return {"ready_s": round(ready, 2), "rss_mib": mem}


def summary(runs: list[dict[str, object]]) -> dict[str, object]:
    ready = [float(r["ready_s"]) for r in runs]   # type: ignore[arg-type]
    rss = [float(r["rss_mib"]["total"]) for r in runs]   # type: ignore[index]
    out: dict[str, object] = {"ready_s": {"median": round(statistics.median(ready), 2), "min": min(ready),
                                          "max": max(ready)},
                              "rss_mib": {"median": round(statistics.median(rss), 1), "min": min(rss),
                                          "max": max(rss)},
                              "rss_breakdown_mib_last": runs[-1]["rss_mib"]}
    probes = [float(r["probes_s"]) for r in runs if r.get("probes_s") is not None]   # type: ignore[arg-type]
    if probes:
        out["probes_loaded_s_median"] = round(statistics.median(probes), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--idle", type=float, default=5.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    results: dict[str, list[dict[str, object]]] = {"daemon, embedded store": [], "daemon, server store": [],
                                                   "execsnoop (libbpf-tools)": []}
    order = list(results)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):   # ABBA over rounds
            if name.startswith("execsnoop"):
                results[name].append(execsnoop_run(args.idle))
            else:
                results[name].append(daemon_run("server" if "server" in name else "chdb", args.idle))
    print(json.dumps({"rounds": args.rounds, "idle_s": args.idle,
                      "results": {k: summary(v) for k, v in results.items()}}, indent=2))


if __name__ == "__main__":
    main()

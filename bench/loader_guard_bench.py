"""What the loader guard costs the host's execs: 1,000 fork+exec of /bin/true from sh, outside any
agent, with nothing attached (A), the daemon at its defaults (B: the ld.so entry uprobe on), and the
daemon with `probes.loader_guard: false` (C), in ABCCBA rounds.  Each ratio is B/A or C/A of its round;
median over rounds (min-max).  The daemon has an idle agent session and the shipped policy, as in
host_cost_bench.py.

Run as root:  /opt/agentwarden/venv/bin/python bench/loader_guard_bench.py [--rounds 3]
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
EXECS = ["sh", "-c", "i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done"]


def timed(repeat: int = 5) -> float:
    """Median wall time of `repeat` runs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(EXECS, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_daemon(root: Path, tag: str, loader_guard: bool | None) -> tuple[float, object]:
    agent = make_agent(root / "bin", "aw-lg-agent")
    policy = REPO.joinpath("deploy/policy.yaml").read_text()
    d = bench_daemon(root / tag, "bench", "aw-lg-agent", policy=policy)
    if loader_guard is not None:
        cfg = json.loads(d.config.read_text())
        cfg.setdefault("probes", {})["loader_guard"] = loader_guard
        d.config.write_text(json.dumps(cfg))
    d.start()
    idle = subprocess.Popen([str(agent), "-c", "sleep 600"])
    try:
        time.sleep(1.0)   # the session is tracked
        took = timed()
        status = d.request("status")
    finally:
        idle.kill()
        idle.wait()
        d.stop()
    return took, status.get("kernel_lost") if isinstance(status, dict) else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aw-lg-bench-"))
    rows: list[dict[str, float]] = []
    lost: list[object] = []
    try:
        for r in range(args.rounds):
            got: dict[str, list[float]] = {"none": [], "guard": [], "no guard": []}
            for i, what in enumerate(["none", "guard", "no guard", "no guard", "guard", "none"]):
                if what == "none":
                    got[what].append(timed())
                else:
                    took, kl = with_daemon(root, f"r{r}-{i}", None if what == "guard" else False)
                    got[what].append(took)
                    lost.append(kl)
            base = statistics.mean(got["none"])
            rows.append({"seconds without": base, **{k: statistics.mean(v) / base for k, v in got.items()
                                                     if k != "none"}})
            print(json.dumps({"round": r, **rows[-1]}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary: dict[str, object] = {"rounds": args.rounds, "kernel_lost": lost}
    for k in ("guard", "no guard"):
        xs = [row[k] for row in rows]
        summary[k] = {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3),
                      "max": round(max(xs), 3)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

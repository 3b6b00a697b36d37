"""What the exec guards cost an agent under the default policy, against no daemon, in one run.

Interleaved (ABBA: no daemon, daemon, daemon, no daemon, ...), each measure timed by the
agent's own bash around every command ($EPOCHREALTIME), p50 and p99 per run, and the median
of the per-pair ratios:
  - known: /usr/bin/rm -f on a missing file (a program the policy names, arguments its
    rules do not match: decided in the kernel by identity and the argv DFA, no stop)
  - unnamed: /usr/bin/true (no rule names it)
  - first-seen: a program file never run before (a fresh copy of true each time) with
    arguments a rule could match (-r): stopped once, read (sha256) and classified in
    userspace, then resumed
  - sudo: `sudo -n true` (sudo is known; the default policy names nothing it runs)
and the kernel events lost.

With --cause the policy also has a rule on the cause of /usr/bin/true (`when.cause`, a model no
tool call here names): every `unnamed` command is then stopped at its exec and decided by the
daemon after one more read of the capture ring (enforce/enforcer.py on_guard), which is what a
rule on cause costs each exec it names.

Run as root:  /opt/agentwarden/venv/bin/python bench/exec_guard_bench.py [--n 300] [--pairs 2] [--cause]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import bench_daemon, make_agent  # noqa: E402

COMM = "aw-bench-exec"
REPO = Path(__file__).resolve().parents[1]
MEASURES = ("known", "unnamed", "first-seen", "sudo")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def run_agent(agent: Path, work: Path, n: int, tag: str) -> dict[str, list[float]]:
    """Microseconds per command, for each measure, timed inside the agent."""
    fresh = work / f"fresh-{tag}"
    fresh.mkdir()
    for i in range(n):   # copies made outside the agent: their first exec is inside it
        shutil.copy2("/usr/bin/true", fresh / f"t{i}")
    loop = ("for i in $(seq 0 {last}); do s=$EPOCHREALTIME; {cmd} >/dev/null 2>&1; e=$EPOCHREALTIME; "
            "echo {name} $s $e; done; ")
    script = "".join(loop.format(last=n - 1, name=name, cmd=cmd) for name, cmd in (
        ("known", f"/usr/bin/rm -f {work}/missing"),
        ("unnamed", "/usr/bin/true"),
        ("first-seen", f"{fresh}/t$i -r {work}/x"),
        ("sudo", "sudo -n true"),
    ))
    out = subprocess.run([str(agent), "-c", script], check=True, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}, start_new_session=True).stdout
    res: dict[str, list[float]] = {m: [] for m in MEASURES}
    for line in out.splitlines():
        name, s, e = line.split()
        res[name].append((float(e) - float(s)) * 1e6)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="commands per measure per run")
    ap.add_argument("--pairs", type=int, default=2, help="ABBA pairs")
    ap.add_argument("--cause", action="store_true", help="a rule on the cause of /usr/bin/true too")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aw-exec-bench-"))
    agent = make_agent(work / "bin", COMM)
    policy = (REPO / "deploy" / "policy.yaml").read_text()
    if args.cause:
        rule = ("  - name: bench-cause\n"
                "    when: {kind: exec, exec: {path: ['*/true']}, cause: {model: [never-*]}}\n"
                "    action: deny\n")
        policy = policy.replace("rules:\n", "rules:\n" + rule, 1)
    runs: list[tuple[str, dict[str, list[float]], int]] = []
    order = []
    for p in range(args.pairs):
        order += ["none", "daemon"] if p % 2 == 0 else ["daemon", "none"]
    for i, side in enumerate(order):
        lost = 0
        if side == "daemon":
            d = bench_daemon(work / f"d{i}", "bench", COMM, policy=policy)
            d.start()
            try:
                res = run_agent(agent, work, args.n, str(i))
                status = d.request("status")
                lost = int(status["kernel_lost"]) + int(status["kernel_track_full"])
            finally:
                d.stop()
        else:
            res = run_agent(agent, work, args.n, str(i))
        runs.append((side, res, lost))
        print(f"run {i} {side}: " + ", ".join(f"{m} p50 {pct(res[m], .5):.0f} us" for m in MEASURES),
              file=sys.stderr)
    table = {}
    for m in MEASURES:
        ratios50, ratios99 = [], []
        for p in range(args.pairs):
            a, b = runs[2 * p], runs[2 * p + 1]
            none, dmn = (a, b) if a[0] == "none" else (b, a)
            ratios50.append(pct(dmn[1][m], .5) / pct(none[1][m], .5))
            ratios99.append(pct(dmn[1][m], .99) / pct(none[1][m], .99))
        table[m] = {
            "p50_us_without": [round(pct(r[1][m], .5)) for r in runs if r[0] == "none"],
            "p50_us_with": [round(pct(r[1][m], .5)) for r in runs if r[0] == "daemon"],
            "p99_us_without": [round(pct(r[1][m], .99)) for r in runs if r[0] == "none"],
            "p99_us_with": [round(pct(r[1][m], .99)) for r in runs if r[0] == "daemon"],
            "p50_ratio_median": round(statistics.median(ratios50), 2),
            "p50_ratios": [round(x, 2) for x in ratios50],
            "p99_ratio_median": round(statistics.median(ratios99), 2),
        }
    table["lost_events"] = {"per_daemon_run": [r[2] for r in runs if r[0] == "daemon"]}  # type: ignore[dict-item]
    print(json.dumps(table, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

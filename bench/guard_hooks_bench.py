"""What the decision stop's two host-wide hooks cost processes that are not agents'.

guard.bpf.c puts a program on `sched:sched_waking` (every wakeup of the host) and a uprobe on
the entry of the dynamic loader (every exec of a dynamically linked program).  Both return at
once for a process that is not an agent's, after one lookup in the tracked-process filter.
This attaches programs with exactly that first test (the same map shape, the same context
reads) and nothing else, so what is timed is the hooks' own cost, apart from the rest of the
daemon:
  - wakeups: two processes ping-pong a byte over pipes (2 wakeups a round trip)
  - execs:   /usr/bin/true run N times (each is a dynamic program: one uprobe hit)
Interleaved ABBA pairs (hooks detached, attached, attached, detached, ...); the ratio is the
median of the per-pair ratios, with its spread.

Run as root:  /opt/agentwarden/venv/bin/python bench/guard_hooks_bench.py [--pairs 4]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentwarden.probes.loader import LOADER_GLOBS, elf_entry_offset

PING = r"""
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]), a[2], b[2];
    char c = 0;
    if (pipe(a) || pipe(b)) return 1;
    if (fork() == 0) {
        for (int i = 0; i < n; i++)
            if (read(a[0], &c, 1) != 1 || write(b[1], &c, 1) != 1) _exit(1);
        _exit(0);
    }
    for (int i = 0; i < n; i++) { if (write(a[1], &c, 1) != 1 || read(b[0], &c, 1) != 1) return 1; }
    wait(0);
    return 0;
}
"""
# the first test both guard programs make (guard.bpf.c aw_sched_waking, aw_loader_entry)
TEXT = r"""
BPF_ARRAY(track_filter, u32, 65536);
static __always_inline int maybe_tracked(u32 tgid)
{
    u32 k = tgid & 0xFFFF;
    u32 *n = track_filter.lookup(&k);
    return n && *n;
}
int waking(void *ctx)
{
    s32 pid = 0;
    bpf_probe_read_kernel(&pid, sizeof(pid), ctx + 24);
    return maybe_tracked(pid) ? 1 : 0;
}
int loader(struct pt_regs *ctx)
{
    return maybe_tracked(bpf_get_current_pid_tgid() >> 32) ? 1 : 0;
}
"""


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=200_000, help="ping-pong round trips per run")
    ap.add_argument("--execs", type=int, default=2000, help="execs of /usr/bin/true per run")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    from bcc import BPF

    work = Path(tempfile.mkdtemp(prefix="aw-hooks-"))
    (work / "ping.c").write_text(PING)
    subprocess.run(["gcc", "-O2", "-o", str(work / "ping"), str(work / "ping.c")], check=True)
    (work / "execs.sh").write_text(f"for i in $(seq {args.execs}); do /usr/bin/true; done\n")
    loaders = sorted({os.path.realpath(p) for g in LOADER_GLOBS for p in glob.glob(g)})
    bpf = BPF(text=TEXT.encode())

    def attach() -> None:
        bpf.attach_tracepoint(tp=b"sched:sched_waking", fn_name=b"waking")
        for path in loaders:
            bpf.attach_uprobe(name=path.encode(), addr=elf_entry_offset(path), fn_name=b"loader")

    def detach() -> None:
        bpf.detach_tracepoint(b"sched:sched_waking")
        for path in loaders:
            bpf.detach_uprobe(name=path.encode(), addr=elf_entry_offset(path))

    runs: dict[str, dict[str, list[float]]] = {m: {"off": [], "on": []} for m in ("wakeups", "execs")}
    for i in range(args.pairs * 2):
        for state in (("off", "on") if i % 2 == 0 else ("on", "off")):
            if state == "on":
                attach()
            runs["wakeups"][state].append(timed([str(work / "ping"), str(args.rounds)]))
            runs["execs"][state].append(timed(["bash", str(work / "execs.sh")]))
            if state == "on":
                detach()
    out = {}
    for measure, r in runs.items():
        ratios = [on / off for on, off in zip(r["on"], r["off"], strict=True)]
        out[measure] = {"off_s_median": round(statistics.median(r["off"]), 3),
                        "on_s_median": round(statistics.median(r["on"]), 3),
                        "ratio_median": round(statistics.median(ratios), 4),
                        "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4)}
    print(json.dumps({"pairs": args.pairs, "rounds": args.rounds, "execs": args.execs, "loaders": loaders,
                      "results": out}, indent=2))


if __name__ == "__main__":
    main()

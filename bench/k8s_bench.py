"""PodCache benchmark: memory per 1000 cached pods, and time per lookup.

Feeds realistic Pod objects through the watch's own code path (`_apply` of ADDED events; no
API server, no root) and measures the store with tracemalloc (the JSON itself is freed: only
the compact records stay).

Run:  /opt/agentwarden/venv/bin/python bench/k8s_bench.py [--pods 1000 5000]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import time
import tracemalloc
from typing import Any

from agentwarden.daemon.k8s import ContainerRef, PodCache

IMAGES = [f"registry.example/team{t}/service{s}:1.{s}.0" for t in range(10) for s in range(10)]


def pod(i: int) -> dict[str, Any]:
    """A pod of a Deployment: two containers and an init container, the usual labels."""
    uid = hashlib.md5(str(i).encode()).hexdigest()
    uid = f"{uid[:8]}-{uid[8:12]}-{uid[12:16]}-{uid[16:20]}-{uid[20:]}"
    app = f"app{i % 200}"
    cids = {n: hashlib.sha256(f"{i}-{n}".encode()).hexdigest() for n in ("main", "proxy", "init")}
    status = [{"name": n, "image": IMAGES[(i + k) % len(IMAGES)], "containerID": f"containerd://{cid}",
               "imageID": f"{IMAGES[(i + k) % len(IMAGES)]}@sha256:{cid}", "ready": True, "restartCount": 0,
               "state": {"running": {"startedAt": "2024-05-01T10:00:00Z"}}}
              for k, (n, cid) in enumerate(cids.items())]
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": f"{app}-7d9f8c6b5-{i:05d}", "namespace": f"ns{i % 30}", "uid": uid,
                         "resourceVersion": str(1000 + i),
                         "labels": {"app": app, "pod-template-hash": "7d9f8c6b5", "team": f"team{i % 10}",
                                    "app.kubernetes.io/part-of": f"product{i % 20}"},
                         "annotations": {"kubectl.kubernetes.io/restartedAt": "2024-05-01T10:00:00Z"}},
            "spec": {"nodeName": "node-bench", "serviceAccountName": f"{app}-sa",
                     "containers": [{"name": s["name"], "image": s["image"]} for s in status]},
            "status": {"phase": "Running", "podIP": f"10.1.{i // 250}.{i % 250}",
                       "initContainerStatuses": status[2:], "containerStatuses": status[:2]}}


def run(n: int) -> tuple[float, float, float]:
    events = [json.dumps({"type": "ADDED", "object": pod(i)}).encode() for i in range(n)]
    cache = PodCache("http://127.0.0.1:1", "node-bench")   # never started: no connection
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for line in events:
        cache._apply(json.loads(line))       # what the watch does with each line
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    json_kb = sum(map(len, events)) / n / 1024

    refs = []
    for i in range(n):
        obj = json.loads(events[i])["object"]
        cid = obj["status"]["containerStatuses"][0]["containerID"].partition("://")[2]
        refs.append(ContainerRef("containerd", cid, obj["metadata"]["uid"]))
    t = time.perf_counter()
    rounds = max(1, 100_000 // n)
    for _ in range(rounds):
        for r in refs:
            cache.lookup(r)
    per_lookup_us = (time.perf_counter() - t) / (rounds * n) * 1e6
    return used / n * 1000 / 2**20, json_kb, per_lookup_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, nargs="+", default=[1000, 5000])
    args = ap.parse_args()
    print(f"{'pods':>6}  {'MiB / 1000 pods':>15}  {'JSON KiB / pod':>14}  {'µs / lookup':>11}")
    for n in args.pods:
        mib, json_kb, us = run(n)
        print(f"{n:>6}  {mib:>15.2f}  {json_kb:>14.2f}  {us:>11.2f}")


if __name__ == "__main__":
    main()

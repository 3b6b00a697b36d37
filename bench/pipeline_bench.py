"""Daemon CPU per captured statement, by stage: decode, track + reassemble + parse, decide,
mask, encode for the store.  No kernel: the records are the probe's own wire structs,
built in Python the way probes/net.bpf.c lays them out, for a Postgres client running
`pgbench -S`-like simple queries (one Query out; RowDescription, DataRow, CommandComplete,
ReadyForQuery back), so what is timed is exactly the userspace half of capture.

Run:  /opt/agentwarden/venv/bin/python bench/pipeline_bench.py [--statements 20000] [--profile]
                                                               [--protocol http]: GET requests instead
Reports µs per statement for the whole pipeline and per stage (median of 5 runs, and the
spread), and how many sql events came out (every statement, exactly once).  The store stage is the
store writer's work, run here in batches of the shipped size as its thread does: make the events storable
(`schema.clean`), seal them in the chain (their rows and hashes), and insert the rows into a real
embedded ClickHouse (chdb) through clickhouse-connect; it runs on its own thread in the daemon, but
on the same GIL, so it counts against the same core.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes as ct
import json
import pstats
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agentwarden.core.events import Event
from agentwarden.daemon import schema
from agentwarden.daemon.chain import Chain
from agentwarden.daemon.config import BatchConfig
from agentwarden.daemon.config import parse as parse_config
from agentwarden.daemon.mask import Masker
from agentwarden.daemon.pipeline import Pipeline
from agentwarden.daemon.profiles import Profiles
from agentwarden.daemon.server import collect_less
from agentwarden.daemon.store import Store
from agentwarden.daemon.tracker import Tracker
from agentwarden.enforce.policy import decide
from agentwarden.enforce.policy import parse as parse_policy
from agentwarden.probes import net
from agentwarden.probes import process as pr
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

AGENT, PID, SESSION = "aw-bench-agent", 4242, 99
POLICY = (Path(__file__).resolve().parents[1] / "deploy" / "policy.yaml").read_text()


def hdr(kind: int, comm: str = "pgbench") -> pr.Hdr:
    return pr.Hdr(type=kind, pid=PID, tid=PID, uid=1000, gid=1000, profile=0, ts=time.monotonic_ns(),
                  session=SESSION, cgroup=1, comm=comm.encode())


def msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


def _connection(port: int) -> tuple[list[bytes], Callable[[int, bytes], bytes]]:
    """The agent's session and one TCP connection to 127.0.0.1:port, and a maker of that
    connection's data records (direction 0 out, 1 in), offsets counted per direction."""
    root = pr.ExecRec(h=hdr(pr.EV_SESSION, AGENT), old_pid=PID, filename=b"/usr/bin/" + AGENT.encode())
    sin = struct.pack("!HH4s", 2, port, bytes([127, 0, 0, 1])).ljust(16, b"\0")   # sockaddr_in
    conn = net.ConnRec(h=hdr(net.EV_CONNECT), conn_id=7, fd=5, ret=0, type=net.SOCK_STREAM, addr_len=16,
                       addr=(ct.c_uint8 * net.SOCKADDR_LEN)(*sin))
    off = [0, 0]

    def data(direction: int, payload: bytes) -> bytes:
        head = net.DataHead(h=hdr(net.EV_DATA), conn_id=7, offset=off[direction], fd=5, len=len(payload),
                            total=len(payload), dir=direction, flags=0)
        off[direction] += len(payload)
        return bytes(head) + payload

    return [bytes(root), bytes(conn)], data


def records(n: int) -> list[bytes]:
    out, data = _connection(5432)
    startup = struct.pack("!I", 196608) + b"user\0bench\0database\0bench\0\0"
    startup = struct.pack("!I", len(startup) + 4) + startup
    auth = msg(b"R", struct.pack("!I", 0)) + msg(b"Z", b"I")
    out += [data(0, startup), data(1, auth)]
    reply = (msg(b"T", struct.pack("!H", 1) + b"abalance\0" + struct.pack("!IHIhih", 0, 0, 23, 4, -1, 0))
             + msg(b"D", struct.pack("!HI", 1, 4) + b"1234") + msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    for i in range(n):
        q = f"SELECT abalance FROM pgbench_accounts WHERE aid = {i % 200000 + 1};".encode()
        out += [data(0, msg(b"Q", q + b"\0")), data(1, reply)]
    return out


def http_records(n: int) -> list[bytes]:
    """The same for an HTTP/1.1 keep-alive client: one GET out, one small response back."""
    out, data = _connection(8080)
    resp = (b"HTTP/1.1 200 OK\r\nServer: BaseHTTP/0.6 Python/3.11\r\nDate: Thu, 26 Nov 2026 04:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello /item")
    for i in range(n):
        req = (f"GET /items?id={i} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept-Encoding: identity\r\n"
               f"User-Agent: Python-urllib/3.11\r\n\r\n").encode()
        out += [data(0, req), data(1, resp)]
    return out


STORE_BATCH = BatchConfig().size     # the shipped store.batch.size


def run(recs: list[bytes], store: Store, chain: Chain, profile: bool = False) -> dict[str, float]:
    cfg = parse_config(f"agents:\n  - {{name: bench, match: {{comm: [{AGENT}]}}}}\n")
    tracker = Tracker("bench", Profiles(cfg.agents, builtin=False), untrack_session=lambda key: None,
                      clock_offset_ns=0)
    masker = Masker(b"k" * 32)
    policy = parse_policy(POLICY)
    timing = {"decide": 0.0, "mask": 0.0, "clean": 0.0, "seal": 0.0, "insert": 0.0}
    sql: list[Event] = []
    batch: list[Event] = []

    def store_batch() -> None:
        """What StoreWriter._deliver does with a batch."""
        t = time.perf_counter()
        for ev in batch:
            schema.clean(ev)
        t1 = time.perf_counter()
        rows = chain.seal(batch)
        t2 = time.perf_counter()
        store.insert(batch, rows=rows)
        t3 = time.perf_counter()
        timing["clean"] += t1 - t
        timing["seal"] += t2 - t1
        timing["insert"] += t3 - t2
        batch.clear()

    def decide_stage(ev: Event) -> Event:
        t = time.perf_counter()
        decide(policy, ev)
        timing["decide"] += time.perf_counter() - t
        return ev

    def mask_stage(ev: Event) -> Event:
        t = time.perf_counter()
        ev = masker.event(ev)
        timing["mask"] += time.perf_counter() - t
        return ev

    def sink(ev: Event) -> None:
        batch.append(ev)            # the store writer's queue (tail's JSON is only made for subscribers)
        if len(batch) >= STORE_BATCH:
            store_batch()
        if ev.kind in ("sql", "http"):
            sql.append(ev)

    p = Pipeline(tracker, [sink], stages=[decide_stage, mask_stage])
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for r in recs:
        p.on_record(r)
    store_batch()
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(40)
    total = time.perf_counter() - t0
    n = sum(1 for ev in sql)
    return {"total": total, "sql_events": n, **timing}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--statements", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--protocol", choices=("postgres", "http"), default="postgres")
    args = ap.parse_args()
    recs = records(args.statements) if args.protocol == "postgres" else http_records(args.statements)
    tmp = Path(tempfile.mkdtemp(prefix="aw-pipeline-bench-"))
    store = Store(f"chdb://{tmp}/store")
    store.connect()
    chain = Chain("bench", str(tmp / "chain.state"), Ed25519PrivateKey.generate())
    if args.profile:
        run(recs, store, chain, profile=True)
        return
    run(recs, store, chain)              # fills the caches and the table, as a daemon's first minute
    collect_less()                       # what the daemon does once started
    results = [run(recs, store, chain) for _ in range(args.runs)]
    n = args.statements
    stages = ("decide", "mask", "clean", "seal", "insert")
    per = {k: [r[k] / n * 1e6 for r in results] for k in ("total", *stages)}
    per["store (clean + seal + insert)"] = [(r["clean"] + r["seal"] + r["insert"]) / n * 1e6 for r in results]
    per["capture (decode, track, reassemble, parse)"] = [
        (r["total"] - sum(r[k] for k in stages)) / n * 1e6 for r in results]
    print(json.dumps({
        "protocol": args.protocol,
        "statements": n,
        "sql_or_http_events": [r["sql_events"] for r in results],
        "us_per_statement": {k: {"median": round(statistics.median(v), 2), "min": round(min(v), 2),
                                 "max": round(max(v), 2)} for k, v in per.items()},
    }, indent=2))


if __name__ == "__main__":
    main()

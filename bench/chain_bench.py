"""Chain benchmark (no root): what tamper evidence costs.

- Sealing (daemon/chain.py Chain.seal): the canonical row, its SHA-256 link, and the head written
  (fsync) ahead of each batch, per event, in batches of the shipped store.batch.size (1000), the
  same mixed events as tests/test_chain.py.  Compare with the pipeline's ~41 µs an event
  (bench/pipeline_bench.py): the ratio is the writer thread's extra work per stored event.
- A checkpoint: one Ed25519 signature and an fsync'd append to the anchor file.
- verify: rows in memory (as read from the store), per million events.
- A session's bundle (daemon/bundle.py): built from the rows and verified, per seq it spans.

Run:  /opt/agentwarden/venv/bin/python bench/chain_bench.py [--events 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agentwarden.daemon import bundle, chain  # noqa: E402

from tests.test_chain import HOST, mixed  # noqa: E402

PIPELINE_US = 41.2      # README, Daemon CPU per statement


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    d = tempfile.mkdtemp()
    key = chain.load_or_create_key(os.path.join(d, "k"))
    seal_us, cp_ms = [], []
    rows: list[chain.Row] = []
    signed: list[chain.Checkpoint] = []
    for r in range(args.rounds):
        c = chain.Chain(HOST, os.path.join(d, f"s{r}.json"), key, os.path.join(d, f"a{r}.jsonl"))
        events = [mixed(i) for i in range(args.events)]
        t0 = time.perf_counter()
        for i in range(0, len(events), 1000):
            batch = events[i:i + 1000]
            c.seal(batch)
            c.durable(batch, inserted=True)
        seal_us.append((time.perf_counter() - t0) * 1e6 / len(events))
        t0 = time.perf_counter()
        for _ in range(20):
            c.checkpoint("every")
        cp_ms.append((time.perf_counter() - t0) * 1e3 / 20)
        if r == 0:
            signed = c.take_unsaved()
            rows = [(e.chain.seq, e.chain.prev_hash, e.chain.hash, chain.event_values(e), e.kind,
                     e.lost.reason if e.lost else "") for e in events if e.chain]
    pub = key.public_key()
    t0 = time.perf_counter()
    rep = chain.verify(HOST, rows, signed, {chain.key_id(pub): pub})
    per_million = (time.perf_counter() - t0) * 1e6 / len(rows)
    assert not rep.tampered
    med = statistics.median(seal_us)
    ratio = (PIPELINE_US + med) / PIPELINE_US
    print(f"seal: {med:.1f} µs an event ({min(seal_us):.1f}-{max(seal_us):.1f}; {args.rounds} rounds "
          f"of {args.events}); against the pipeline's {PIPELINE_US} µs: ratio {ratio:.2f}")
    print(f"checkpoint (sign + fsync'd anchor append): {statistics.median(cp_ms):.2f} ms")
    print(f"verify, rows in memory: {per_million:.1f} s per million events")
    # a session's bundle: the first event's session; the others' events travel as digests
    session = rows[0][3][bundle._SESSION]
    ours = [r[0] for r in rows if r[3][bundle._SESSION] == session]
    t0 = time.perf_counter()
    lines = [json.dumps(x) for x in bundle.build(HOST, session, iter(rows), signed, {}, min(ours), max(ours))]
    build_us = (time.perf_counter() - t0) * 1e6 / len(rows)
    t0 = time.perf_counter()
    brep = bundle.verify(bundle.read(lines), {chain.key_id(pub): pub})
    verify_us = (time.perf_counter() - t0) * 1e6 / len(rows)
    size = sum(len(x) + 1 for x in lines)
    print(f"bundle of {len(ours)} events among {len(rows)}: {size / 1e6:.1f} MB, built {build_us:.1f} µs "
          f"and verified {verify_us:.1f} µs a seq (vouched {brep.vouched}/{brep.events}, "
          f"tampered {brep.tampered})")


if __name__ == "__main__":
    main()

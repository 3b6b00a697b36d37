"""The audit trail's hash chain and checkpoints (daemon/chain.py) against the real ClickHouse
engine (chdb): the canonical form survives the round trip, `verify` passes on an untouched chain,
and each attack done directly on the table is caught and named."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentwarden.core.events import (
    ApprovalInfo,
    CauseInfo,
    ChainInfo,
    Event,
    ExecInfo,
    HttpInfo,
    Identity,
    K8sInfo,
    LostInfo,
    NetInfo,
    Process,
    SqlInfo,
    VerdictInfo,
)
from agentwarden.daemon import chain, schema
from agentwarden.daemon.spool import Spool
from agentwarden.daemon.store import Store, StoreWriter
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HOST = "h-chain"
NOW = time.time_ns()      # within the store's retention (older rows are dropped by its TTL)


def mixed(i: int) -> Event:
    """Every kind of part, with the values a round trip could change: floats that are whole
    numbers, tiny ones, unicode, maps, empty lists, None."""
    base = Event(kind="exec", ts_ns=NOW + i * 1_000_003, host=HOST, session_id=f"s{i % 7}",
                 agent="cursor", identity=Identity(1000, "alice", 1000, "alice", "pts/1", groups=["dev"]),
                 process=Process(100 + i, 1, 1000, "/usr/bin/psql", ["psql", "-c", f"select {i} — ünï"], "/src"))
    match i % 6:
        case 0:
            base.exec = ExecInfo(filename="/usr/bin/psql", exit_code=i % 3, duration_ms=float(i))
        case 1:
            base.kind = "sql"
            base.net = NetInfo("tcp", "127.0.0.1", 5432, protocol="postgres")
            base.sql = SqlInfo(f"SELECT {i}", "SELECT", ["t"], rows=i, duration_ms=1e-7 * i, tag=f"SELECT {i}")
        case 2:
            base.kind = "http"
            base.http = HttpInfo("GET", "https", "api", f"/v1/{i}", status=200, duration_ms=0.1,
                                 headers={"b": "2", "a": "1"}, response_headers={})
        case 3:
            base.kind = "verdict"
            base.verdict = VerdictInfo("deny", "r", "exec", "SIGKILL", True, "", 12)
        case 4:
            base.kind = "approval"
            base.approval = ApprovalInfo(f"id{i}", "pending", "r", "exec", "touch x", ["self"])
            base.k8s = K8sInfo("ns", "pod", labels={"z": "1", "a": "2"})
        case _:
            base.kind = "lost"
            base.lost = LostInfo(i, "ring buffer")
    return base


@pytest.fixture
def trail(chdb_path: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A store table of its own, and a writer with a chain, a key and an anchor file."""
    store = Store(f"chdb://{chdb_path}", table=f"c_{uuid.uuid4().hex[:8]}")
    store.connect()
    key = chain.load_or_create_key(str(tmp_path / "chain.key"))
    ch = chain.Chain(HOST, str(tmp_path / "chain.json"), key, str(tmp_path / "anchor.jsonl"), every=100,
                     interval_s=3600)
    w = StoreWriter(store, Spool(tmp_path / "spool"), batch_size=50, flush_interval=0.05, chain=ch)
    yield {"store": store, "writer": w, "chain": ch, "key": key, "dir": tmp_path}
    store.close()


def write(t: dict[str, Any], events: list[Event]) -> None:
    w: StoreWriter = t["writer"]
    w.start()
    for ev in events:
        w.put(ev)
    w.stop()


def check(t: dict[str, Any], anchor: bool = True, keys: dict[str, Any] | None = None) -> chain.Report:
    store: Store = t["store"]
    pub = t["key"].public_key()
    anchors = list(chain.read_anchor(str(t["dir"] / "anchor.jsonl"))) if anchor else []
    return chain.verify(HOST, store.chain_rows(HOST), store.checkpoints(HOST),
                        keys or {chain.key_id(pub): pub}, anchors)


def losses() -> tuple[list[Event], Callable[[int, str], Event]]:
    """The writer's maker of `lost` events, and the list of those it made."""
    made: list[Event] = []

    def loss(n: int, reason: str) -> Event:
        ev = Event(kind="lost", ts_ns=time.time_ns(), host=HOST, lost=LostInfo(n, reason))
        made.append(ev)
        return ev
    return made, loss


def sql(t: dict[str, Any], statement: str) -> None:
    store: Store = t["store"]
    assert store._client is not None
    store._client.command(statement, settings={"mutations_sync": 2})


def kinds(rep: chain.Report) -> set[str]:
    return {f.kind for f in rep.findings if f.severity == "tamper"}


def test_an_untouched_chain_verifies_after_the_round_trip(trail: dict[str, Any]) -> None:
    events = [mixed(i) for i in range(600)]
    write(trail, events)
    rep = check(trail)
    assert not rep.tampered, rep.findings
    assert (rep.events, rep.first_seq, rep.last_seq, rep.sealed_to) == (600, 1, 600, 600), rep.to_json()
    assert rep.checkpoints >= 2       # at start, every 100 events, at stop
    # the canonical form of every stored row is the one hashed before the insert
    by_seq = {ev.chain.seq: ev for ev in events if ev.chain}
    for seq, _, h, values, _, _ in trail["store"].chain_rows(HOST):
        assert chain.canonical(values) == chain.canonical(chain.event_values(by_seq[seq])), seq
        assert h == by_seq[seq].chain.hash  # type: ignore[union-attr]


def test_each_attack_on_the_table_is_named(trail: dict[str, Any]) -> None:
    write(trail, [mixed(i) for i in range(300)])
    t = trail["store"].fq_table
    sql(trail, f"ALTER TABLE {t} UPDATE sql_query = 'SELECT 0' WHERE chain_seq = 20")          # one field
    sql(trail, f"ALTER TABLE {t} DELETE WHERE chain_seq IN (50, 51, 52)")                        # the middle
    rep = check(trail)
    assert rep.tampered and kinds(rep) == {"modified", "missing"}, rep.findings
    assert rep.first_bad() == 20
    missing = next(f for f in rep.findings if f.kind == "missing")
    assert (missing.seq, "50-52") == (50, missing.detail.split()[1]), missing


def test_swapped_and_inserted_rows(trail: dict[str, Any]) -> None:
    write(trail, [mixed(i) for i in range(200)])
    t = trail["store"].fq_table
    # two rows change places (each keeps its own hashes): their links break
    sql(trail, f"ALTER TABLE {t} UPDATE chain_seq = if(chain_seq = 30, 31, 30) WHERE chain_seq IN (30, 31)")
    rep = check(trail)
    assert "reordered" in kinds(rep) and rep.first_bad() == 30, rep.findings
    # a forged event under an existing seq
    store: Store = trail["store"]
    forged = mixed(999)
    rows = list(store.chain_rows(HOST))
    seq, prev, h = rows[99][0], rows[99][1], rows[99][2]
    forged.chain = ChainInfo(seq=seq, prev_hash=prev, hash=h)
    store.insert([forged])
    assert "inserted" in kinds(check(trail))


def test_a_recomputed_chain_and_forged_checkpoints_fail(trail: dict[str, Any]) -> None:
    """The attacker rewrites events, recomputes every hash, and signs checkpoints with a key of
    their own: the table's checkpoints fail the trusted key, and the anchored ones do not match."""
    write(trail, [mixed(i) for i in range(150)])
    store: Store = trail["store"]
    t = store.fq_table
    sql(trail, f"ALTER TABLE {t} UPDATE process_argv = ['true'] WHERE chain_seq = 10")
    rows = list(store.chain_rows(HOST))
    head = chain.GENESIS
    fixes = []
    for seq, _, _, values, _, _ in rows:
        new = chain.link(head, values)
        fixes.append((seq, head, new))
        head = new
    for seq, prev, new in fixes:
        sql(trail, f"ALTER TABLE {t} UPDATE chain_prev_hash = '{prev}', chain_hash = '{new}' WHERE chain_seq = {seq}")
    evil = Ed25519PrivateKey.generate()
    sql(trail, f"TRUNCATE TABLE {t}_checkpoints")
    store.insert_checkpoints([chain.sign(evil, HOST, fixes[-1][0], fixes[-1][2], "every")])
    without_anchor = check(trail, anchor=False)
    # the attacker's checkpoint fails the trusted key, and then no trusted one is left
    assert kinds(without_anchor) == {"bad_signature", "no_checkpoints"}, without_anchor.findings
    with_anchor = check(trail)
    assert "forged" in kinds(with_anchor), with_anchor.findings
    # trusting the attacker's key as well does not help: the anchor still says otherwise
    pub = trail["key"].public_key()
    both = {chain.key_id(pub): pub, chain.key_id(evil.public_key()): evil.public_key()}
    assert "forged" in kinds(check(trail, keys=both))


def test_the_newest_rows_deleted_and_a_broken_checkpoint(trail: dict[str, Any]) -> None:
    write(trail, [mixed(i) for i in range(250)])
    t = trail["store"].fq_table
    sql(trail, f"ALTER TABLE {t} DELETE WHERE chain_seq > 240")
    assert "truncated" in kinds(check(trail)), "the anchored stop checkpoint covers seq 250"
    sql(trail, f"ALTER TABLE {t}_checkpoints UPDATE signature = concat('00', substring(signature, 3)) "
               "WHERE seq = 100")
    assert "bad_signature" in kinds(check(trail, anchor=False))


def test_retried_inserts_are_benign_duplicates(trail: dict[str, Any]) -> None:
    events = [mixed(i) for i in range(120)]
    write(trail, events)
    trail["store"].insert(events[40:60])          # a batch inserted twice (a replay after a crash)
    rep = check(trail)
    assert not rep.tampered and {f.kind for f in rep.findings} >= {"duplicate"}, rep.findings


def test_a_crash_declares_what_it_may_have_lost(trail: dict[str, Any], tmp_path: Path) -> None:
    """The head was written ahead of a batch that never became durable: the next start declares the
    range in the chain itself, and verify reads the gap as declared, not as a deletion."""
    write(trail, [mixed(i) for i in range(100)])
    ch: chain.Chain = trail["chain"]
    lost_batch = [mixed(1000 + i) for i in range(10)]
    ch.seal(lost_batch)                            # ... and the daemon dies before the insert
    assert json.loads((tmp_path / "chain.json").read_text())["pending"] == [[101, 110]]
    again = chain.Chain(HOST, str(tmp_path / "chain.json"), trail["key"], str(tmp_path / "anchor.jsonl"))
    assert again.crash_gap == (101, 110)
    made, loss = losses()
    w = StoreWriter(trail["store"], Spool(tmp_path / "spool2"), batch_size=50, flush_interval=0.05, loss=loss,
                    chain=again)
    w.start()
    w.put(mixed(2000))
    w.stop()
    assert made and "seq 101-110" in made[0].lost.reason  # type: ignore[union-attr]
    rep = check(trail)
    assert not rep.tampered, rep.findings
    assert any(f.kind == "declared_loss" and f.seq == 101 for f in rep.findings), rep.findings


def test_the_key_is_roots_and_its_public_half_is_shown(tmp_path: Path) -> None:
    path = tmp_path / "k" / "chain.key"
    key = chain.load_or_create_key(str(path))
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert chain.key_id(chain.load_public(str(path) + ".pub")) == chain.key_id(key.public_key())
    assert chain.key_id(chain.load_or_create_key(str(path)).public_key()) == chain.key_id(key.public_key())


def test_the_canonical_columns_are_frozen() -> None:
    """A column added to the schema is not covered by v1 hashes: whoever adds one must decide.
    Issue 15's (llm, cause) are chained only when one of them is filled in, so an event without
    them has the digest it had before they existed, and filling one in changes it."""
    assert chain.CHAIN_COLUMNS[107] == "binding_expires" and chain.CHAIN_COLUMNS[108] == "llm_provider"
    assert len(chain.CHAIN_COLUMNS) == 130 and chain.CHAIN_COLUMNS[127] == "http_rpc"
    assert chain.CHAIN_COLUMNS[128:] == ("cause_model", "cause_provider") and chain.LATER == (108, 128)
    ev = Event(kind="exec", ts_ns=1, host=HOST, event_id="00000000-0000-0000-0000-000000000001")
    values = chain.event_values(ev)
    assert chain.canonical(values) == chain.canonical(values[:108])
    ev.cause = CauseInfo(llm_event_id="x", tool_call_id="t")
    caused = chain.event_values(ev)
    assert chain.canonical(caused) != chain.canonical(values)
    # an event with a cause sealed before cause_model existed: the same digest
    assert chain.canonical(caused) == chain.canonical(caused[:128])
    ev.cause.model = "m"
    assert chain.canonical(chain.event_values(ev)) != chain.canonical(caused)


def test_a_forged_declaration_does_not_excuse_a_deletion(trail: dict[str, Any]) -> None:
    """Red team: delete a range (a checkpointed seq in it) and insert one `lost` row that
    declares it: the row is vouched for by no checkpoint, the deletion is still named."""
    write(trail, [mixed(i) for i in range(300)])
    store: Store = trail["store"]
    t = store.fq_table
    sql(trail, f"ALTER TABLE {t} DELETE WHERE chain_seq BETWEEN 120 AND 250")
    fake = Event(kind="lost", ts_ns=time.time_ns(), host=HOST,
                 lost=LostInfo(131, "chain: seq 120-250 were being stored when the daemon stopped"))
    values = chain.event_values(fake)
    fake.chain = ChainInfo(seq=185, prev_hash="0" * 64, hash=chain.link("0" * 64, values))
    store.insert([fake])
    rep = check(trail)
    assert rep.tampered and {"missing"} <= kinds(rep), rep.findings
    # and a row far ahead does not hide a deleted tail
    sql(trail, f"ALTER TABLE {t} DELETE WHERE chain_seq > 280")
    fake.chain = ChainInfo(seq=10_000_000, prev_hash="0" * 64, hash=chain.link("0" * 64, values))
    store.insert([fake])
    assert "missing" in kinds(check(trail)) or "truncated" in kinds(check(trail))


def test_deleting_the_oldest_events_is_not_retention(trail: dict[str, Any]) -> None:
    write(trail, [mixed(i) for i in range(300)])
    sql(trail, f"ALTER TABLE {trail['store'].fq_table} DELETE WHERE chain_seq < 150")
    pub = trail["key"].public_key()
    store: Store = trail["store"]
    rep = chain.verify(HOST, store.chain_rows(HOST), store.checkpoints(HOST), {chain.key_id(pub): pub},
                       retention_s=90 * 86400)
    assert "truncated_head" in kinds(rep), rep.findings
    later = chain.verify(HOST, store.chain_rows(HOST), store.checkpoints(HOST), {chain.key_id(pub): pub},
                         retention_s=90 * 86400, now_ns=time.time_ns() + 100 * 86400 * 10**9)
    assert not later.tampered and any(f.kind == "horizon" for f in later.findings), later.findings


def test_undecodable_bytes_and_huge_numbers_cost_no_batch(trail: dict[str, Any]) -> None:
    """Red team: an argv byte 0xff (a lone surrogate) or a row count past Int64 failed the whole
    batch (the insert, the spool, the hash) without a trace."""
    events = [mixed(i) for i in range(20)]
    events[3].process.argv = ["true", "\udcff"]
    events[4].process.cwd = "/tmp/\udcff\ud800"
    events[5].sql = SqlInfo("select 1", "SELECT", rows=10**20)
    write(trail, events)
    rep = check(trail)
    assert not rep.tampered and rep.events == 20, rep.findings
    argv = [v for seq, _, _, v, _, _ in trail["store"].chain_rows(HOST) if seq == 4][0]
    assert "\\xff" in json.dumps(argv)


def test_spool_replays_are_not_taken_for_duplicates_after_a_restart(trail: dict[str, Any], tmp_path: Path) -> None:
    """Red team: the replay's dedup token was the spool file's name, which comes round again."""
    store: Store = trail["store"]
    for round_ in range(2):
        spool = Spool(tmp_path / f"spool-r{round_}")     # a fresh spool: its first file is 1 again
        w = StoreWriter(store, spool, batch_size=10, flush_interval=0.05, chain=trail["chain"])
        batch = [mixed(100 * round_ + i) for i in range(10)]
        for ev in batch:
            schema.clean(ev)
        trail["chain"].seal(batch)
        spool.append(batch)
        assert w._try_recover()
    rep = check(trail, anchor=False)
    assert rep.events == 20, rep.to_json()


def test_a_huge_seq_does_not_hang_verify(trail: dict[str, Any]) -> None:
    write(trail, [mixed(i) for i in range(50)])
    fake = mixed(999)
    fake.chain = ChainInfo(seq=(1 << 64) - 1, prev_hash="0" * 64, hash="f" * 64)
    trail["store"].insert([fake])
    t0 = time.monotonic()
    rep = check(trail)
    assert time.monotonic() - t0 < 10 and rep.tampered


@pytest.mark.parametrize("state", ["missing", "unreadable"])
def test_a_lost_state_file_never_reuses_a_seq(trail: dict[str, Any], tmp_path: Path, state: str) -> None:
    """The state file gone (or garbage) at a start while the store cannot say where the chain ends:
    the chain goes on 2^32 past the last anchored checkpoint and declares the seqs between, so the
    events stored after that checkpoint keep their seqs and verify finds no tampering."""
    write(trail, [mixed(i) for i in range(250)])          # checkpoints every 100: anchored 100, 200, stop
    anchored = max(cp.seq for cp in chain.read_anchor(str(tmp_path / "anchor.jsonl")))
    state_file = tmp_path / "chain.json"
    if state == "missing":
        state_file.unlink()
    else:
        state_file.write_text("{not json")
    again = chain.Chain(HOST, str(state_file), trail["key"], str(tmp_path / "anchor.jsonl"), every=100,
                        interval_s=3600)
    assert again.next_seq == anchored + chain.LOST_STATE_JUMP
    assert again.crash_gap == (anchored + 1, anchored + chain.LOST_STATE_JUMP - 1)
    made, loss = losses()
    w = StoreWriter(trail["store"], Spool(tmp_path / "spool2"), batch_size=50, flush_interval=0.05, loss=loss,
                    chain=again)
    w.start()
    for i in range(120):
        w.put(mixed(3000 + i))
    w.stop()
    assert made and f"state file was {state}" in made[0].lost.reason  # type: ignore[union-attr]
    rep = check(trail)
    assert not rep.tampered, rep.findings
    assert rep.events == 250 + 1 + 120 and rep.last_seq == anchored + chain.LOST_STATE_JUMP + 120


def test_the_first_start_begins_at_one(tmp_path: Path) -> None:
    key = chain.load_or_create_key(str(tmp_path / "k"))
    assert chain.Chain(HOST, str(tmp_path / "c.json"), key, str(tmp_path / "anchor.jsonl")).next_seq == 1


def test_a_full_disk_under_the_state_file_loses_nothing_silently(chdb_path: Path, tmp_path: Path) -> None:
    """The chain's head is written ahead of every batch; on a full disk it cannot be: the batch is
    not sealed, not stored, and counted, and the next batch that is stored reports the count."""
    from conftest import need_root, wait_for  # here: bench/chain_bench.py imports this module

    need_root()
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], check=True)
    try:
        store = Store(f"chdb://{chdb_path}", table=f"c_{uuid.uuid4().hex[:8]}")
        store.connect()
        key = chain.load_or_create_key(str(tmp_path / "chain.key"))
        ch = chain.Chain(HOST, str(full / "chain.json"), key, str(tmp_path / "anchor.jsonl"), every=100,
                         interval_s=3600)
        made, loss = losses()
        w = StoreWriter(store, Spool(tmp_path / "spool"), batch_size=10, flush_interval=0.05, loss=loss,
                        chain=ch)
        w.start()
        for i in range(20):
            w.put(mixed(i))
        wait_for(lambda: w.stats.inserted >= 20, 20, what="the first events stored")
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT, 0o600)    # the disk fills up
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 4096)
        os.close(fd)
        for i in range(30):
            w.put(mixed(100 + i))
        wait_for(lambda: w.stats.dropped >= 30, 20, what="the batches counted as lost")
        (full / "filler").unlink()                   # space again
        for i in range(5):
            w.put(mixed(200 + i))
        w.stop()
        stored = [(r[3][chain.CHAIN_COLUMNS.index("lost_count")], r[5]) for r in store.chain_rows(HOST)
                  if r[4] == "lost" and r[5].startswith("spool_full")]
        assert stored == [(30, "spool_full")], stored       # made more than once, stored once
        assert made
        pub = key.public_key()
        rep = chain.verify(HOST, store.chain_rows(HOST), store.checkpoints(HOST), {chain.key_id(pub): pub})
        assert not rep.tampered and rep.events == 20 + 1 + 5, rep.findings
        store.close()
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


def test_a_gap_at_the_retention_horizon_is_expiry_not_deletion(tmp_path: Path) -> None:
    """The TTL removes events by time, and seq order is only roughly time order: an event expired
    beside a kept one of a lower seq leaves a gap there.  Near the horizon it is expiry; the same
    gap among recent events is a deletion."""
    key = chain.load_or_create_key(str(tmp_path / "k"))
    pub = key.public_key()
    day = 86_400 * 10**9
    now = time.time_ns()
    for age_days, want in ((89, "horizon"), (10, "missing")):
        ch = chain.Chain(HOST, str(tmp_path / f"c{age_days}.json"), key)
        events = [mixed(i) for i in range(20)]
        for i, ev in enumerate(events):
            ev.ts_ns = now - age_days * day + i
        ch.seal(events)
        cp = ch.checkpoint("every")
        rows = [(e.chain.seq, e.chain.prev_hash, e.chain.hash, chain.event_values(e), e.kind, "")  # type: ignore[union-attr]
                for e in events if e.chain and e.chain.seq != 7]
        rep = chain.verify(HOST, rows, [cp], {chain.key_id(pub): pub}, retention_s=90 * 86400, now_ns=now)
        assert any(f.kind == want and f.seq == 7 for f in rep.findings), (age_days, rep.findings)
        assert rep.tampered == (want == "missing")

"""The store and its writer against the real ClickHouse engine (chdb)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentwarden.core.events import (
    ApprovalInfo,
    Event,
    ExecInfo,
    Identity,
    LostInfo,
    Process,
    SqlInfo,
    VerdictInfo,
)
from agentwarden.daemon.query import EventQuery, QueryError
from agentwarden.daemon.spool import Spool, SpoolFull
from agentwarden.daemon.store import Store, StoreError, StoreWriter


@pytest.fixture
def store(chdb_path: Path) -> Iterator[Store]:
    s = Store(f"chdb://{chdb_path}", table=f"t_{uuid.uuid4().hex[:8]}", retention_days=3)
    s.connect()
    yield s


# recent: older rows would be dropped by the table's TTL (retention) while the test runs
BASE_NS = (time.time_ns() // 1_000_000_000 - 3600) * 1_000_000_000


def ev(i: int, session: str = "s1", user: str = "alice", kind: str = "exec") -> Event:
    return Event(kind=kind, ts_ns=BASE_NS + i * 1000, host="h", session_id=session,
                 agent="cursor", identity=Identity(1000, user, None, "", ""),
                 process=Process(100 + i, 1, 1000, "/bin/echo", ["/bin/echo", f"n{i}"], "/tmp"),
                 exec=ExecInfo(filename="/bin/echo"))


def test_insert_and_query_filters(store: Store) -> None:
    store.insert([ev(i) for i in range(10)] + [ev(100, "s2", "bob")])
    assert [e.process.argv[1] for e in store.query(EventQuery(session="s1", limit=3))] == ["n7", "n8", "n9"]
    assert len(store.query(EventQuery(user="bob"))) == 1
    assert len(store.query(EventQuery(grep="N5"))) == 1
    assert store.count(EventQuery(session="s1", limit=1)) == {"exec": 10}
    assert store.query(EventQuery(kinds=["lost"])) == []
    since = BASE_NS + 5 * 1000
    assert len(store.query(EventQuery(session="s1", since_ns=since))) == 5
    rows = store.sessions()
    assert {r["session_id"] for r in rows} == {"s1", "s2"}
    assert next(r for r in rows if r["session_id"] == "s1")["events"] == 10


def test_query_roundtrip_is_exact(store: Store) -> None:
    e = ev(1)
    store.insert([e])
    (back,) = store.query(EventQuery())
    assert back == e


def test_schema_is_migrated(chdb_path: Path) -> None:
    table = f"m_{uuid.uuid4().hex[:8]}"
    s = Store(f"chdb://{chdb_path}", table=table)
    s.connect()
    s._client.command(f"ALTER TABLE agentwarden.{table} DROP COLUMN exec_signal")
    s.close()
    s2 = Store(f"chdb://{chdb_path}", table=table)
    s2.connect()
    cols = {r[0] for r in s2._client.query(f"DESCRIBE TABLE agentwarden.{table}").result_rows}
    assert "exec_signal" in cols


def test_writer_spools_while_down_and_replays_in_order_once(store: Store, tmp_path: Path) -> None:
    down = Store("http://default:pw@127.0.0.1:9/agentwarden")   # nothing listens on the discard port
    with pytest.raises(StoreError):
        down.connect()
    spool = Spool(tmp_path / "spool")
    w = StoreWriter(down, spool, batch_size=10, flush_interval=0.05)
    w.start()
    for i in range(35):
        w.put(ev(i))
    deadline = time.monotonic() + 20
    while w.stats.spooled < 35 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.stats.spooled == 35 and spool.pending() >= 4
    # a crash after inserting the oldest batch but before removing it
    first_path, first_batch = next(spool.batches())
    store.insert(first_batch, token=f"spool-{first_path.name}")
    w.store = store          # the store is back
    w._next_retry = 0
    deadline = time.monotonic() + 20
    while spool.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    w.stop()
    got = store.query(EventQuery(limit=1000))
    assert [e.process.argv[1] for e in got] == [f"n{i}" for i in range(35)]


def test_a_full_spool_drops_counts_and_records_the_loss(store: Store, tmp_path: Path) -> None:
    """The store is down and the spool at its cap: later events are dropped (the disk does not
    fill), counted, and once the store is back the trail holds every spooled event in order and
    one `lost` event (reason spool_full) whose count is exactly what was dropped."""
    down = Store("http://default:pw@127.0.0.1:9/agentwarden")
    one_batch = len("".join(e.to_json() + "\n" for e in [ev(i) for i in range(10)]).encode())
    spool = Spool(tmp_path / "spool", max_bytes=int(one_batch * 2.5))    # room for two batches of ten
    w = StoreWriter(down, spool, batch_size=10, flush_interval=0.05,
                    loss=lambda n, why: Event(kind="lost", ts_ns=BASE_NS + 10**6, host="h", lost=LostInfo(n, why)))
    for i in range(50):      # queued before the writer runs: batches of exactly ten
        w.put(ev(i))
    w.start()
    deadline = time.monotonic() + 20
    while w.stats.spooled + w.stats.dropped < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.stats.spooled == 20 and w.stats.dropped == 30
    assert spool.bytes <= spool.max_bytes and spool.bytes == sum(p.stat().st_size for p in spool.dir.iterdir())
    w.store = store          # the store is back
    w._next_retry = 0
    w.put(ev(60))
    deadline = time.monotonic() + 20
    while (spool.pending() or w.stats.inserted < 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    w.stop()
    got = store.query(EventQuery(limit=1000))
    assert [e.process.argv[1] for e in got if e.kind == "exec"] == [f"n{i}" for i in range(20)] + ["n60"]
    (lost,) = [e for e in got if e.kind == "lost"]
    assert lost.lost == LostInfo(30, "spool_full")
    assert spool.bytes == 0 and w.stats.dropped == 30


def test_the_spool_cap_counts_what_it_found_at_start(tmp_path: Path) -> None:
    """A restart finds batches left by the last run: they count against the cap."""
    s = Spool(tmp_path, max_bytes=1 << 20)
    s.append([ev(i) for i in range(100)])
    again = Spool(tmp_path, max_bytes=s.bytes + 10)
    assert again.bytes == s.bytes
    with pytest.raises(SpoolFull, match="spool_max_bytes"):
        again.append([ev(1)])
    assert again.pending() == 1


def test_spool_survives_restart_and_skips_corrupt_lines(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    s.append([ev(1), ev(2)])
    s.append([ev(3)])
    (tmp_path / "000000000099.jsonl").write_text(ev(4).to_json() + "\n{garbage\n")
    (tmp_path / "000000000100.tmp").write_text("half-written")
    again = Spool(tmp_path)
    batches = list(again.batches())
    assert [[e.process.argv[1] for e in b] for _, b in batches] == [["n1", "n2"], ["n3"], ["n4"]]
    assert not list(tmp_path.glob("*.tmp"))
    assert again.append([ev(5)]).name == "000000000100.jsonl"


def _mixed() -> list[Event]:
    """Events of several kinds, hosts, processes, rules and actions."""
    out = [ev(i, session=f"s{i % 3}", user=("alice", "bob")[i % 2]) for i in range(12)]
    for i, e in enumerate(out):
        e.host = ("h1", "h2")[i % 2]
        e.process.pid = 100 + i % 4
    sql = ev(20, "s1")
    sql.kind, sql.exec, sql.sql = "sql", None, SqlInfo(query="DROP TABLE t", command="DROP TABLE")
    deny = ev(21, "s1")
    deny.kind, deny.exec = "verdict", None
    deny.verdict = VerdictInfo(action="deny", rule="no-drop", subject="sql", mechanism="sk_msg", prevented=True)
    audit = ev(22, "s2")
    audit.kind, audit.exec = "verdict", None
    audit.verdict = VerdictInfo(action="audit", rule="watch-git", subject="exec", mechanism="userspace")
    held = ev(23, "s2")
    held.kind, held.exec = "approval", None
    held.approval = ApprovalInfo(id="r1", state="pending", rule="no-drop", subject="sql", summary="DROP TABLE t")
    return out + [sql, deny, audit, held]


@pytest.mark.parametrize("req", [
    {}, {"pid": 101}, {"host": "h2"}, {"rule": "no-drop"}, {"action": "deny"}, {"action": "audit"},
    {"rule": "no-drop", "kinds": ["approval"]}, {"user": "bob", "host": "h1"}, {"grep": "drop table"},
    {"session": "s2", "pid": 102}, {"kinds": ["verdict"], "rule": "watch-git"}, {"host": "nowhere"},
])
def test_the_live_feed_and_the_store_filter_alike(store: Store, req: dict[str, object]) -> None:
    """`tail` filters in Python (EventQuery.matches), `query` in ClickHouse (Store._where): the
    same request must pick the same events from the same recorded activity."""
    events = _mixed()
    store.insert(events)
    q = EventQuery.from_request({**req, "limit": 1000})
    stored = sorted(e.event_id for e in store.query(q))
    live = sorted(e.event_id for e in events if q.matches(e))
    assert stored == live
    assert store.count(q) == {k: n for k in {e.kind for e in events if q.matches(e)}
                              for n in [sum(1 for e in events if q.matches(e) and e.kind == k)]}


@pytest.mark.parametrize(("req", "named"), [
    ({"limit": -5}, "limit"), ({"limit": 0}, "limit"), ({"limit": "lots"}, "limit"), ({"pid": "x"}, "pid"),
    ({"pid": 0}, "pid"), ({"kinds": ["nope"]}, "kinds"), ({"since": "yesterday-ish"}, "since"),
])
def test_a_wrong_query_argument_is_named(req: dict[str, object], named: str) -> None:
    with pytest.raises(QueryError, match=f"^{named}: "):
        EventQuery.from_request(req)

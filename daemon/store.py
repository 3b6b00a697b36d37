"""The audit store: ClickHouse through clickhouse-connect (a server or embedded chdb).

`Store` talks to ClickHouse; `StoreWriter` is the pipeline's last stage: it
batches events, inserts them, and spools batches to disk while the store is
unreachable, replaying them in order when it is back.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from agentwarden.core.events import Event
from agentwarden.daemon import chain, schema
from agentwarden.daemon.config import StoreConfig
from agentwarden.daemon.query import EventQuery
from agentwarden.daemon.spool import Spool

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    pass


def _redact_dsn(dsn: str) -> str:
    u = urlparse(dsn)
    if u.password:
        return dsn.replace(f":{u.password}@", ":***@")
    return dsn


class Store:
    """One ClickHouse client, serialised: chdb allows one engine per process."""

    def __init__(self, dsn: str, database: str = "agentwarden", table: str = "events",
                 retention_days: int = 90, cluster: str = "") -> None:
        self.dsn = dsn
        self.database = database
        self.table = table
        self.retention_days = retention_days
        self.cluster = cluster
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, s: StoreConfig) -> Store:
        return cls(s.dsn, s.database, s.table, s.retention_days, s.cluster)

    @property
    def fq_table(self) -> str:
        return f"{self.database}.{self.table}"

    def __repr__(self) -> str:
        return f"Store({_redact_dsn(self.dsn)})"

    @property
    def connected(self) -> bool:
        return self._client is not None

    def connect(self) -> None:
        """Open the client, then create or migrate the schema.  Raises StoreError."""
        import clickhouse_connect

        with self._lock:
            if self._client is not None:
                return
            try:
                if self.dsn.startswith("chdb://"):
                    path = urlparse(self.dsn).path
                    if path:
                        Path(path).parent.mkdir(parents=True, exist_ok=True)
                        if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
                            raise StoreError(f"the audit store {path} is readable by root and the "
                                             "agentwarden group only")
                client = clickhouse_connect.get_client(dsn=self.dsn)
                for stmt in [*schema.create_statements(self.database, self.table, self.retention_days,
                                                       self.cluster),
                             *schema.checkpoint_statements(self.database, self.table, self.cluster)]:
                    client.command(stmt)
                existing = {
                    r[0]: r[1]
                    for r in client.query(
                        "SELECT name, type FROM system.columns"
                        " WHERE database = {d:String} AND table = {t:String}",
                        parameters={"d": self.database, "t": self.table},
                    ).result_rows
                }
                for stmt in schema.migrate_statements(
                    self.database, self.table, existing, self.retention_days, self.cluster
                ):
                    log.info("schema migration: %s", stmt)
                    client.command(stmt)
            except StoreError:
                raise
            except Exception as e:  # clickhouse-connect raises many kinds; all mean "not usable now"
                raise StoreError(f"store {_redact_dsn(self.dsn)} unavailable: {e}") from e
            self._client = client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken client must not mask the original fault
                log.debug("closing store client failed", exc_info=True)

    def insert(self, events: list[Event], token: str | None = None,
               rows: list[list[Any]] | None = None) -> None:
        """rows: the events' rows when already built (Chain.seal builds them)."""
        if not events:
            return
        if rows is None:
            rows = [schema.event_to_row(e) for e in events]
        settings = {"insert_deduplication_token": token} if token else None
        with self._lock:
            if self._client is None:
                raise StoreError("store not connected")
            try:
                self._client.insert(self.fq_table, rows, column_names=list(schema.COLUMN_NAMES),
                                    settings=settings)
            except Exception as e:
                raise StoreError(f"insert of {len(rows)} events failed: {e}") from e

    def command(self, sql: str) -> None:
        with self._lock:
            if self._client is None:
                raise StoreError("store not connected")
            try:
                self._client.command(sql)
            except Exception as e:
                raise StoreError(f"{sql}: {e}") from e

    # ---- the chain (daemon/chain.py) ----------------------------------------------------

    def insert_checkpoints(self, cps: list[chain.Checkpoint]) -> None:
        if not cps:
            return
        rows = [[c.host, c.seq, c.hash, c.ts_ns, c.reason, c.key_id, c.signature] for c in cps]
        names = ["host", "seq", "hash", "ts_ns", "reason", "key_id", "signature"]
        with self._lock:
            if self._client is None:
                raise StoreError("store not connected")
            try:
                self._client.insert(f"{self.fq_table}_checkpoints", rows, column_names=names)
            except Exception as e:
                raise StoreError(f"insert of {len(rows)} checkpoints failed: {e}") from e

    def checkpoints(self, host: str) -> list[chain.Checkpoint]:
        rows = self._rows("SELECT host, seq, hash, ts_ns, reason, key_id, signature "
                          f"FROM {self.fq_table}_checkpoints WHERE host = {{host:String}} "
                          "ORDER BY seq, ts_ns",
                          {"host": host})
        return [chain.Checkpoint.from_json(r) for r in rows]

    def chain_head(self, host: str) -> tuple[int, str]:
        """The newest seq of a host's chain in the table, and its hash ((0, "") for none)."""
        rows = self._rows("SELECT max(chain_seq) AS s, argMax(chain_hash, chain_seq) AS h "
                          f"FROM {self.fq_table} WHERE host = {{host:String}} AND chain_seq IS NOT NULL",
                          {"host": host})
        if not rows or rows[0]["s"] is None:
            return 0, ""
        return int(rows[0]["s"]), str(rows[0]["h"] or "")

    def chain_hosts(self) -> list[str]:
        rows = self._rows(f"SELECT DISTINCT host FROM {self.fq_table} WHERE chain_seq IS NOT NULL "
                          "ORDER BY host", {})
        return [str(r["host"]) for r in rows]

    def chain_rows(self, host: str, page: int = 20_000, start: int = 0) -> Iterator[chain.Row]:
        """A host's chain in seq order from seq `start` (the rows of one seq together), a page at a
        time by seq (keyset: a made-up seq far ahead costs one page, not a scan per window)."""
        while True:
            sql = (f"SELECT {schema.select_list()} FROM {self.fq_table} WHERE host = {{host:String}} "
                   "AND chain_seq IS NOT NULL AND chain_seq >= {a:UInt64} "
                   "ORDER BY chain_seq, chain_hash LIMIT {n:UInt64}")
            rows = self._rows(sql, {"host": host, "a": start, "n": page})
            if not rows:
                return
            last = int(rows[-1]["chain_seq"])
            if len(rows) == page and int(rows[0]["chain_seq"]) != last:
                # the last seq may go on in the next page: read it whole there
                rows = [r for r in rows if int(r["chain_seq"]) != last]
                nxt = last
            else:
                if len(rows) == page:     # one seq fills the page: its other rows, then on
                    rows += self._rows(f"SELECT {schema.select_list()} FROM {self.fq_table} WHERE host = "
                                       "{host:String} AND chain_seq = {s:UInt64} ORDER BY chain_hash "
                                       "LIMIT 1000000 OFFSET {o:UInt64}",
                                       {"host": host, "s": last, "o": page})
                nxt = last + 1
            for r in rows:
                yield (int(r["chain_seq"]), str(r["chain_prev_hash"] or ""), str(r["chain_hash"] or ""),
                       chain.stored_values(r), str(r["kind"]), str(r.get("lost_reason") or ""))
            if nxt >= 1 << 64:
                return
            start = nxt

    def events_after(self, host: str, seq: int, limit: int) -> list[dict[str, Any]]:
        """A host's stored events after a chain seq, in seq order, each once (the exporter)."""
        sql = (f"SELECT {schema.select_list()} FROM {self.fq_table} WHERE host = {{host:String}} "
               "AND chain_seq > {seq:UInt64} ORDER BY chain_seq LIMIT 1 BY chain_seq LIMIT {n:UInt64}")
        rows = self._rows(sql, {"host": host, "seq": seq, "n": limit})
        return [schema.row_to_event(r).to_dict() for r in rows]

    def checkpoints_after(self, host: str, ts_ns: int) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.checkpoints(host) if c.ts_ns > ts_ns]

    def _rows(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            if self._client is None:
                raise StoreError("store not connected")
            try:
                res = self._client.query(sql, parameters=params)
            except Exception as e:
                raise StoreError(f"query failed: {e}") from e
        return [dict(zip(res.column_names, r, strict=True)) for r in res.result_rows]

    def query(self, q: EventQuery) -> list[Event]:
        """Newest `limit` events matching q, returned oldest first."""
        where, params = self._where(q)
        params["limit"] = int(q.limit)
        sql = (
            f"SELECT {schema.select_list()} FROM {self.fq_table} WHERE {' AND '.join(where)} "
            "ORDER BY ts DESC, event_id LIMIT 1 BY event_id LIMIT {limit:UInt64}"
        )
        events = [schema.row_to_event(r) for r in self._rows(sql, params)]
        events.reverse()
        return events

    def count(self, q: EventQuery) -> dict[str, int]:
        """How many distinct events match q, by kind (the limit does not apply)."""
        where, params = self._where(q)
        sql = (f"SELECT kind, uniqExact(event_id) AS n FROM {self.fq_table} WHERE {' AND '.join(where)} "
               "GROUP BY kind ORDER BY kind")
        return {str(r["kind"]): int(r["n"]) for r in self._rows(sql, params)}

    def _where(self, q: EventQuery) -> tuple[list[str], dict[str, Any]]:
        where: list[str] = ["1"]
        params: dict[str, Any] = {}
        if q.since_ns is not None:
            where.append("ts >= fromUnixTimestamp64Nano({since:Int64}, 'UTC')")
            params["since"] = q.since_ns
        if q.until_ns is not None:
            where.append("ts <= fromUnixTimestamp64Nano({until:Int64}, 'UTC')")
            params["until"] = q.until_ns
        if q.session:
            where.append("session_id = {session:String}")
            params["session"] = q.session
        if q.user:
            where.append("(identity_user = {user:String} OR identity_login_user = {user:String}"
                         " OR identity_email = {user:String})")
            params["user"] = q.user
        if q.agent:
            where.append("agent = {agent:String}")
            params["agent"] = q.agent
        if q.kinds:
            where.append("kind IN {kinds:Array(String)}")
            params["kinds"] = list(q.kinds)
        if q.grep:
            where.append(
                "positionCaseInsensitive(concat(arrayStringConcat(process_argv, ' '), ' ', process_exe, ' ',"
                " ifNull(exec_filename, ''), ' ', process_cwd, ' ', ifNull(sql_query, '')),"
                " {grep:String}) > 0"
            )
            params["grep"] = q.grep
        if q.pid is not None:
            where.append("process_pid = {pid:UInt32}")
            params["pid"] = q.pid
        if q.host:
            where.append("host = {host:String}")
            params["host"] = q.host
        if q.rule:
            where.append("(verdict_rule = {rule:String} OR approval_rule = {rule:String})")
            params["rule"] = q.rule
        if q.action:
            where.append("verdict_action = {action:String}")
            params["action"] = q.action
        return where, params

    def sessions(self, limit: int = 100) -> list[dict[str, Any]]:
        sql = (
            "SELECT session_id, any(agent) AS agent, any(host) AS host,"
            " argMin(identity_uid, ts) AS uid, argMin(identity_user, ts) AS user,"
            " argMin(identity_login_user, ts) AS login_user, argMin(identity_tty, ts) AS tty,"
            " argMin(identity_email, ts) AS email, argMin(identity_verified, ts) AS verified,"
            " toUnixTimestamp64Nano(min(ts)) AS start_ns, toUnixTimestamp64Nano(max(ts)) AS last_ns,"
            " countIf(kind = 'session_end') > 0 AS ended, count() AS events,"
            " countIf(kind = 'exec') AS execs,"
            " argMinIf(process_pid, ts, kind = 'session_start') AS root_pid"
            f" FROM {self.fq_table} WHERE session_id != '' GROUP BY session_id"
            " ORDER BY start_ns DESC LIMIT {limit:UInt64}"
        )
        return self._rows(sql, {"limit": int(limit)})


@dataclass
class WriterStats:
    inserted: int = 0
    spooled: int = 0
    replayed: int = 0
    dropped: int = 0          # events lost because the store was down and the spool full
    last_error: str = ""


OVERFLOW_CHUNK = 1000    # events put() spools at once when the queue is full (StoreWriter.put)


class StoreWriter:
    """Batches events into the store; spools to disk whenever it cannot.

    Memory is bounded by `queue_max`: past it, the producer writes the overflow
    straight to the spool rather than block the ring buffer consumer.  Disk is bounded by
    the spool's cap: a batch that finds it full is dropped and counted, and the next batch
    that reaches the store or the spool carries one `lost` event (reason `spool_full`, made
    by `loss`: the tracker's) for everything dropped since, so the trail says how much is
    missing and when.
    """

    def __init__(self, store: Store, spool: Spool, batch_size: int = 1000,
                 flush_interval: float = 1.0, queue_max: int = 50_000,
                 retry_max: float = 30.0, loss: Callable[[int, str], Event] | None = None,
                 chain: chain.Chain | None = None) -> None:
        self.store = store
        self.spool = spool
        self.loss = loss
        self.chain = chain
        self._dropped = 0          # dropped since the last `lost` event that was kept
        self._dropped_seqs: list[tuple[int, int]] = []   # sealed events among them: their seq ranges
        self._poison: dict[str, int] = {}                # spool file -> inserts the store refused
        self._reconciled = False
        self._seal_failing = False
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_max = retry_max
        self.stats = WriterStats()
        # a deque, not a queue.Queue: a Queue's put wakes the writer for every event, and each wake
        # takes the GIL from the ring buffer's consumer (about a record's worth of capture each,
        # and a stall of up to the switch interval when the writer holds it); the writer is woken
        # once a batch is full, or finds the events at its flush interval
        self._q: collections.deque[Event] = collections.deque()
        self._full = threading.Event()       # set when a batch's worth is queued
        self.queue_max = queue_max
        self._spool_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._next_retry = 0.0
        self._backoff = 1.0

    def start(self) -> None:
        if self.chain is not None and self.chain.crash_gap is not None and self.loss is not None:
            # the previous run wrote these seqs' head ahead of their batch and never saw the batch
            # durable: they may be in the store or the spool, or lost; the trail says so, in the chain
            a, b = self.chain.crash_gap
            self.put(self.loss(max(0, b - a + 1), f"chain: seq {a}-{b} {self.chain.gap_reason}"))
            self.chain.crash_gap = None
        self._thread.start()

    def put(self, ev: Event) -> None:
        """Queue an event; a full queue sends the overflow to the spool (never blocks, never raises)."""
        q = self._q
        if len(q) < self.queue_max:
            q.append(ev)
            if len(q) >= self.batch_size and not self._full.is_set():
                self._full.set()
            return
        batch = [ev]     # spooled here, on the capture's thread: a bounded piece at a time
        while len(batch) < OVERFLOW_CHUNK:
            try:
                batch.append(q.popleft())
            except IndexError:
                break
        self._to_spool(batch)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._full.set()
        self._thread.join(timeout)
        if self.chain is not None:
            self.chain.checkpoint("stop")
            self._save_checkpoints()

    @property
    def alive(self) -> bool:
        """The writer thread runs (a dead one would take every later event to memory only)."""
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Events waiting for the writer's next batch (the store's lag, in events)."""
        return len(self._q)

    @property
    def healthy(self) -> bool:
        return self.store.connected and not self.spool

    def _claim_loss(self) -> tuple[list[Event], int, list[tuple[int, int]]]:
        """The `lost` event for what a full spool dropped since the last one kept, its count and the
        seq ranges it names, taken from the counters (given back if it is not kept).  Call under
        _spool_lock."""
        n, self._dropped = self._dropped, 0
        if not n or self.loss is None:
            self._dropped += n
            return [], 0, []
        # the store was unreachable and the spool at its cap (the log says when it began); the seqs
        # of sealed events among them are named, so `verify` reads their gap as declared
        seqs, self._dropped_seqs = self._dropped_seqs, []
        reason = "spool_full" + "".join(f"; seq {a}-{b}" for a, b in seqs)
        return [self.loss(n, reason)], n, seqs

    def _to_spool(self, batch: list[Event]) -> None:
        for ev in batch:
            schema.clean(ev)
        with self._spool_lock:
            report, n, named = self._claim_loss()
            events = report + batch
            if self.chain is not None and self._seal(events) is None:
                self._dropped += n + len(batch)      # counted: the next report that is kept says so
                self.stats.dropped += len(batch)
                self._dropped_seqs[:0] = named
                return
            try:
                self.spool.append(events)
            except OSError as e:   # SpoolFull, or the disk itself (ENOSPC, EIO): dropped and counted
                if not n and not self._dropped:
                    log.error("%s: dropping events until the store is back (each loss is recorded)", e)
                self._dropped += n + len(batch)
                self.stats.dropped += len(batch)
                seqs = [ev.chain.seq for ev in events if ev.chain is not None]
                # the dropped report's ranges come back with this batch's: the next report names all
                self._dropped_seqs[:0] = named
                if seqs:
                    self._dropped_seqs.append((min(seqs), max(seqs)))
                    assert self.chain is not None
                    self.chain.durable(events, stored=False)   # pending until a report names them
                return
            if self.chain is not None:
                self.chain.durable(events)
            self.stats.spooled += len(batch)

    def _seal(self, events: list[Event]) -> list[list[Any]] | None:
        """The batch sealed (its rows), or None when the chain's head could not be written ahead of
        it (a full or failing disk under the state file): nothing sealed, the head did not move."""
        assert self.chain is not None
        try:
            rows = self.chain.seal(events)
        except OSError as e:
            if not self._seal_failing:
                log.error("the chain's head cannot be written (%s): batches are counted as lost until it "
                          "can (each loss is recorded)", e)
            self._seal_failing = True
            return None
        if self._seal_failing:
            log.warning("the chain's head is written again")
            self._seal_failing = False
        return rows

    def _take_batch(self) -> list[Event]:
        """Up to batch_size events: as soon as that many are queued, else what is queued at the
        flush interval (or at a stop)."""
        q = self._q
        deadline = time.monotonic() + self.flush_interval
        while len(q) < self.batch_size and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._full.wait(min(left, 0.2))
            self._full.clear()
        batch: list[Event] = []
        for _ in range(min(len(q), self.batch_size)):
            try:
                batch.append(q.popleft())
            except IndexError:            # put's overflow took them to the spool meanwhile
                break
        return batch

    def _fail(self, err: Exception) -> None:
        if str(err) != self.stats.last_error:
            log.warning("%s; spooling to %s", err, self.spool.dir)
        self.stats.last_error = str(err)
        self.store.close()
        self._next_retry = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.retry_max)

    def _try_recover(self) -> bool:
        """Connect if needed and replay the spool in order.  True when caught up."""
        if time.monotonic() < self._next_retry:
            return False
        try:
            self.store.connect()
            # the lock is taken per batch, not across the replay's inserts: the producer's overflow
            # path (put) takes it, and must never wait for the network (red team: the main loop
            # stalled into a watchdog kill)
            for path, events in self.spool.batches():
                # the token names the content: a file name comes round again after a restart, and
                # ClickHouse would drop a different batch as a duplicate of an old one (red team)
                token = "spool-" + hashlib.sha256(path.read_bytes()).hexdigest()[:32]
                try:
                    self.store.insert(events, token=token)
                except StoreError:
                    if not self._poisoned(path, events):
                        raise
                    continue
                with self._spool_lock:
                    self.spool.remove(path)
                if self.chain is not None:
                    self.chain.durable(events, inserted=True)
                self.stats.replayed += len(events)
                log.info("replayed %d spooled events from %s", len(events), path.name)
        except Exception as e:
            self._fail(e)
            return False
        self._backoff = 1.0
        if self.stats.last_error:
            log.info("store %r is back", self.store)
            self.stats.last_error = ""
        if self.chain is not None and not self._reconciled:
            self._reconciled = True
            try:
                top, head = self.store.chain_head(self.chain.host)
            except StoreError as e:
                log.warning("cannot read the chain's head from the store: %s", e)
            else:
                made = self.chain.reconcile(top, head)
                if made and self.loss is not None:
                    self.put(self.loss(0, made))
        return True

    def _poisoned(self, path: Path, events: list[Event]) -> bool:
        """A spooled batch the store refuses while it answers everything else is set aside (renamed
        .bad, kept for a person) and declared lost, instead of blocking every later batch."""
        self._poison[path.name] = self._poison.get(path.name, 0) + 1
        if self._poison[path.name] < 3:
            return False
        try:
            self.store.command("SELECT 1")
        except StoreError:
            return False      # the store itself is away: not the batch's fault
        bad = path.with_suffix(".bad")
        with self._spool_lock:
            os.replace(path, bad)
            self.spool.bytes = max(0, self.spool.bytes - bad.stat().st_size)
        seqs = [ev.chain.seq for ev in events if ev.chain is not None]
        log.error("the store refuses the spooled batch %s three times: set aside as %s", path.name, bad.name)
        if self.loss is not None:
            named = f"; seq {min(seqs)}-{max(seqs)}" if seqs else ""
            self.put(self.loss(len(events), f"store refused a batch (kept in {bad}){named}"))
        return True

    def _save_checkpoints(self) -> None:
        """Checkpoints made meanwhile, into their table (they are in the anchor file already)."""
        assert self.chain is not None
        cps = self.chain.take_unsaved()
        if not cps:
            return
        try:
            if not self.store.connected:
                raise StoreError("store not connected")
            self.store.insert_checkpoints(cps)
        except StoreError as e:
            log.debug("checkpoints wait for the store: %s", e)
            self.chain.give_back(cps)

    def _deliver(self, batch: list[Event]) -> None:
        if not self._try_recover():
            self._to_spool(batch)
            return
        for ev in batch:
            schema.clean(ev)   # whatever an agent put in an event, the batch is storable
        rows = None
        with self._spool_lock:
            report, n, named = self._claim_loss()
            if self.chain is not None:
                rows = self._seal(report + batch)
                if rows is None:                     # nothing sealed: the report's counts go back
                    self._dropped += n
                    self._dropped_seqs[:0] = named
        if self.chain is not None and rows is None:
            self._to_spool(batch)                    # sealed there, or dropped and counted
            return
        try:
            self.store.insert(report + batch, rows=rows)
            self.stats.inserted += len(batch)
            if self.chain is not None:
                self.chain.durable(report + batch, inserted=True)
        except Exception as e:
            self._fail(e)
            if self.chain is not None:
                self._to_spool(report + batch)   # sealed: the report keeps its place in the chain
            else:
                with self._spool_lock:
                    self._dropped += n      # reported with a later batch
                    self._dropped_seqs[:0] = named
                self._to_spool(batch)

    def _run(self) -> None:
        if self.chain is not None:
            self.chain.checkpoint("start")
        while True:
            try:
                batch = self._take_batch()
                if batch:
                    self._deliver(batch)
                elif not self.healthy:
                    self._try_recover()
                if self.chain is not None:
                    why = self.chain.checkpoint_due(time.monotonic())
                    if why:
                        self.chain.checkpoint(why)
                    self._save_checkpoints()
            except Exception:   # never dies: a dead writer would leave every later event in memory
                log.exception("store writer: an unexpected error; going on")
                time.sleep(0.5)
            if self._stop.is_set() and not self._q:
                break

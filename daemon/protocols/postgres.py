"""Postgres on a connection: daemon/l7/postgres.py's messages as `sql` and `lost` events."""

from __future__ import annotations

from agentwarden.core.events import Event, SqlInfo
from agentwarden.daemon.l7 import postgres as pg
from agentwarden.daemon.streams import Conn, Detected
from agentwarden.daemon.tracker import Tracker
from agentwarden.probes import process as pr


def detect(first: bytes, mid_stream: bool) -> Detected:
    """A v3 startup, SSL/GSS request or cancel; from mid-stream, a run of plausible messages."""
    if pg.looks_like_postgres(first) or (mid_stream and pg.looks_like_postgres_midstream(first)):
        return Detected.YES
    # a startup longer than what came so far (Go's drivers write parameters from a map)
    return Detected.WAIT if pg.startup_incomplete(first) else Detected.NO


class PostgresReader:
    def __init__(self, tracker: Tracker, conn: Conn) -> None:
        self.tracker = tracker
        self.conn = conn
        self.parser = pg.PgConnection(mid_stream=conn.mid_stream)

    def feed(self, h: pr.RawHeader, client: bool, data: bytes, ts: int, gap: int) -> list[Event]:
        side = pg.FRONTEND if client else pg.BACKEND
        if gap:
            return self._events(h, self.parser.gap(side, gap) + self.parser.feed(side, data, ts))
        return self._events(h, self.parser.feed(side, data, ts))

    def close(self, h: pr.RawHeader, ts: int) -> list[Event]:
        # chunks still held back for an earlier gap are read now; then what was sent and closed
        # before its answer came is still a statement, without an outcome
        out: list[Event] = []
        c = self.conn
        client = c.client
        for direction in (client, client ^ 1):
            side = pg.FRONTEND if direction == client else pg.BACKEND
            for gap, data in c.streams[direction].flush_early():
                out += self.feed(h, side == pg.FRONTEND, data, 0, gap)
        return out + self._events(h, self.parser.close())

    def _events(self, h: pr.RawHeader, messages: list[pg.PgEvent]) -> list[Event]:
        out: list[Event] = []
        c = self.conn
        startup = self.parser.startup
        for pe in messages:
            if isinstance(pe, pg.Statement):
                info = SqlInfo(
                    query=pe.query, command=pe.command, tables=list(pe.tables), parsed=pe.parsed,
                    database=startup.database if startup else "", db_user=startup.user if startup else "",
                    params=pe.params, prepared_name=pe.prepared_name, rows=pe.rows, tag=pe.tag,
                    sqlstate=pe.sqlstate, error=pe.error, duration_ms=pe.duration_ms)
                ev = self.tracker.event_for("sql", h, sql=info, net=c.net.copy())
                if ev:
                    ev.ts_ns = c.stamp(pe.start_ns)
            elif isinstance(pe, pg.Encrypted) and not c.net.tls:
                ev = self.tracker.event_for("sql", h, net=c.net.copy(), sql=SqlInfo(
                    encrypted=True, command=f"{pe.method.upper()} ENCRYPTION",
                    database=startup.database if startup else ""))
            elif isinstance(pe, pg.Desync):
                if pe.reason == "resynchronised":
                    continue
                side = "client" if pe.direction == pg.FRONTEND else "server"
                ev = self.tracker.lost_on(h, c.net.copy(), pe.skipped,
                                          f"postgres {side} stream desynced: {pe.reason}")
            else:
                continue
            if ev:
                out.append(ev)
        return out

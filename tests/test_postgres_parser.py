"""The sans-IO Postgres reader: byte streams in, statements out, never an exception."""

from __future__ import annotations

import struct

from agentwarden.daemon.l7 import postgres as pg
from agentwarden.daemon.l7.postgres import BACKEND, FRONTEND, PgConnection
from hypothesis import given, settings
from hypothesis import strategies as st


def msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def startup(user: str = "alice", db: str = "shop") -> bytes:
    body = struct.pack("!I", pg.PROTOCOL_V3) + cstr("user") + cstr(user) + cstr("database") + cstr(db) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def query(text: str) -> bytes:
    return msg(b"Q", cstr(text))


def complete(tag: str) -> bytes:
    return msg(b"C", cstr(tag))


def error(code: str, text: str) -> bytes:
    return msg(b"E", b"SERROR\0" + b"C" + cstr(code) + b"M" + cstr(text) + b"\0")


READY = msg(b"Z", b"I")
AUTH_OK = msg(b"R", struct.pack("!I", 0))


def parse(name: str, text: str) -> bytes:
    return msg(b"P", cstr(name) + cstr(text) + struct.pack("!H", 0))


def bind(portal: str, stmt: str, params: list[bytes]) -> bytes:
    body = cstr(portal) + cstr(stmt) + struct.pack("!H", 0) + struct.pack("!H", len(params))
    for p in params:
        body += struct.pack("!i", len(p)) + p
    return msg(b"B", body + struct.pack("!H", 0))


def execute(portal: str = "") -> bytes:
    return msg(b"E", cstr(portal) + struct.pack("!I", 0))


SYNC = msg(b"S", b"")
DATAROW = msg(b"D", struct.pack("!H", 1) + struct.pack("!i", 1) + b"1")


def run(conn: PgConnection, *steps: tuple[int, bytes]) -> list[pg.PgEvent]:
    out: list[pg.PgEvent] = []
    for i, (direction, data) in enumerate(steps):
        out += conn.feed(direction, data, 1000 * (i + 1))
    return out


def stmts(events: list[pg.PgEvent]) -> list[pg.Statement]:
    return [e for e in events if isinstance(e, pg.Statement)]


def test_startup_and_simple_multi_statement_query() -> None:
    c = PgConnection()
    ev = run(c, (FRONTEND, startup()), (BACKEND, AUTH_OK + READY),
             (FRONTEND, query("create table t(a int); /* x */ DrOp   TABLE t; select 1")),
             (BACKEND, complete("CREATE TABLE") + complete("DROP TABLE") + msg(b"T", b"\0\0") + DATAROW
              + complete("SELECT 1") + READY))
    assert isinstance(ev[0], pg.Startup) and ev[0].user == "alice" and ev[0].database == "shop"
    got = stmts(ev)
    assert [(s.command, s.tables, s.rows) for s in got] == [
        ("CREATE TABLE", ("t",), None), ("DROP TABLE", ("t",), None), ("SELECT", (), 1)]
    assert got[1].query == "DrOp   TABLE t" and got[0].prepared_name is None


def test_error_stops_the_rest_of_a_query() -> None:
    c = PgConnection()
    ev = run(c, (FRONTEND, startup()), (BACKEND, AUTH_OK + READY),
             (FRONTEND, query("select 1; select * from nope; select 3")),
             (BACKEND, DATAROW + complete("SELECT 1") + error("42P01", 'relation "nope" does not exist') + READY))
    got = stmts(ev)
    assert [(s.query, s.sqlstate) for s in got] == [("select 1", ""), ("select * from nope", "42P01")]
    assert "nope" in got[1].error


def test_extended_protocol_named_statement_reused() -> None:
    c = PgConnection()
    ev = run(c, (FRONTEND, startup()), (BACKEND, AUTH_OK + READY),
             (FRONTEND, parse("s1", "insert into t values ($1, $2)") + msg(b"D", b"Ss1\0") + SYNC),
             (BACKEND, msg(b"1", b"") + msg(b"t", b"\0\0") + msg(b"n", b"") + READY),
             (FRONTEND, bind("", "s1", [b"1", b"2"]) + execute() + SYNC),
             (BACKEND, msg(b"2", b"") + complete("INSERT 0 1") + READY),
             (FRONTEND, bind("", "s1", [b"3", b"4"]) + execute() + SYNC),
             (BACKEND, msg(b"2", b"") + complete("INSERT 0 1") + READY))
    got = stmts(ev)
    assert len(got) == 2
    assert all(s.query == "insert into t values ($1, $2)" and s.prepared_name == "s1" and s.params == 2
               and s.rows == 1 and s.command == "INSERT" for s in got)


def test_pipelined_extended_queries_pair_in_order() -> None:
    c = PgConnection()
    front = b"".join(parse("", f"select {i}") + bind("", "", []) + execute() for i in range(3)) + SYNC
    back = b"".join(msg(b"1", b"") + msg(b"2", b"") + DATAROW + complete("SELECT 1") for _ in range(3)) + READY
    got = stmts(run(c, (FRONTEND, startup()), (BACKEND, AUTH_OK + READY), (FRONTEND, front), (BACKEND, back)))
    assert [s.query for s in got] == ["select 0", "select 1", "select 2"]


def test_error_in_pipeline_skips_to_sync() -> None:
    c = PgConnection()
    front = (parse("", "drop table x") + bind("", "", []) + execute() + parse("", "select 2") + bind("", "", [])
             + execute() + SYNC + parse("", "select 3") + bind("", "", []) + execute() + SYNC)
    back = (error("42P01", "no x") + READY + msg(b"1", b"") + msg(b"2", b"") + DATAROW + complete("SELECT 1")
            + READY)
    got = stmts(run(c, (FRONTEND, startup()), (BACKEND, AUTH_OK + READY), (FRONTEND, front), (BACKEND, back)))
    assert [(s.query, s.sqlstate) for s in got] == [("drop table x", "42P01"), ("select 3", "")]
    assert got[0].command == "DROP TABLE"


def test_copy_from_stdin() -> None:
    c = PgConnection()
    got = stmts(run(c, (FRONTEND, startup()), (BACKEND, AUTH_OK + READY),
                    (FRONTEND, query("COPY t FROM STDIN")), (BACKEND, msg(b"G", b"\0\0\0")),
                    (FRONTEND, msg(b"d", b"1\n2\n") + msg(b"c", b"")),
                    (BACKEND, complete("COPY 2") + READY)))
    assert [(s.command, s.rows) for s in got] == [("COPY", 2)]


def test_ssl_accepted_means_encrypted_and_nothing_more() -> None:
    c = PgConnection()
    ssl = struct.pack("!II", 8, pg.SSL_REQUEST)
    ev = run(c, (FRONTEND, ssl), (BACKEND, b"S"), (FRONTEND, b"\x16\x03\x01garbage-tls"), (BACKEND, b"\x16\x03"))
    assert [type(e) for e in ev] == [pg.Encrypted]


def test_ssl_refused_goes_on_in_clear() -> None:
    c = PgConnection()
    ssl = struct.pack("!II", 8, pg.SSL_REQUEST)
    got = stmts(run(c, (FRONTEND, ssl), (BACKEND, b"N"), (FRONTEND, startup()), (BACKEND, AUTH_OK + READY),
                    (FRONTEND, query("select 1")), (BACKEND, DATAROW + complete("SELECT 1") + READY)))
    assert [s.query for s in got] == ["select 1"]


def test_password_is_never_returned() -> None:
    c = PgConnection()
    ev = run(c, (FRONTEND, startup()), (BACKEND, msg(b"R", struct.pack("!I", 3))),
             (FRONTEND, msg(b"p", cstr("hunter2"))), (BACKEND, AUTH_OK + READY))
    assert "hunter2" not in repr(ev)


def test_unparseable_text_is_recorded_and_marked() -> None:
    c = PgConnection()
    got = stmts(run(c, (FRONTEND, startup()), (BACKEND, AUTH_OK + READY), (FRONTEND, query("selec oops")),
                    (BACKEND, error("42601", "syntax error") + READY)))
    assert got[0].parsed is False and got[0].query == "selec oops" and got[0].sqlstate == "42601"


def test_gap_resynchronises_at_next_message() -> None:
    c = PgConnection()
    run(c, (FRONTEND, startup()), (BACKEND, AUTH_OK + READY))
    c.feed(FRONTEND, query("select 'lost half")[:7], 1)
    ev = c.gap(FRONTEND, 100)
    assert isinstance(ev[0], pg.Desync)
    ev = run(c, (FRONTEND, b"tail of lost message\0" + query("select 2")),
             (BACKEND, DATAROW + complete("SELECT 1") + READY))
    assert [s.query for s in stmts(ev)] == ["select 2"]


def test_mid_stream_attach() -> None:
    c = PgConnection(mid_stream=True)
    got = stmts(run(c, (FRONTEND, b"junk" + query("select 9")), (BACKEND, DATAROW + complete("SELECT 1") + READY)))
    assert [s.query for s in got] == ["select 9"]


SESSION = [
    (FRONTEND, startup()), (BACKEND, AUTH_OK + msg(b"S", cstr("a") + cstr("b")) + READY),
    (FRONTEND, query("begin; insert into t values (1); commit")),
    (BACKEND, complete("BEGIN") + complete("INSERT 0 1") + complete("COMMIT") + READY),
    (FRONTEND, parse("p", "select $1") + bind("", "p", [b"7"]) + execute() + SYNC),
    (BACKEND, msg(b"1", b"") + msg(b"2", b"") + DATAROW + complete("SELECT 1") + READY),
]


def summary(events: list[pg.PgEvent]) -> list[tuple[str, str, int | None]]:
    return [(s.query, s.tag, s.rows) for s in stmts(events)]


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_any_split_of_the_stream_gives_the_same_statements(cuts: list[int]) -> None:
    expected = summary(run(PgConnection(), *SESSION))
    assert len(expected) == 4
    c = PgConnection()
    out: list[pg.PgEvent] = []
    for direction, data in SESSION:
        pos, i = 0, 0
        while pos < len(data):
            n = cuts[i % len(cuts)]
            out += c.feed(direction, data[pos : pos + n], 1)
            pos += n
            i += 1
    assert summary(out) == expected


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from([FRONTEND, BACKEND]), st.binary(max_size=200)), max_size=20),
       st.booleans())
def test_garbage_never_raises(steps: list[tuple[int, bytes]], mid: bool) -> None:
    c = PgConnection(mid_stream=mid)
    for direction, data in steps:
        for e in c.feed(direction, data, 1):
            assert isinstance(e, (pg.Startup, pg.Statement, pg.Encrypted, pg.Desync))
    c.gap(FRONTEND, 5)


def test_detection() -> None:
    assert pg.looks_like_postgres(startup())
    assert pg.looks_like_postgres(struct.pack("!II", 8, pg.SSL_REQUEST))
    assert not pg.looks_like_postgres(b"GET / HTTP/1.1\r\n\r\n")
    assert not pg.looks_like_postgres(b"\x16\x03\x01\x02\x00\x01\x00\x01")


def _connected() -> PgConnection:
    c = PgConnection()
    c.feed(FRONTEND, startup(), 1)
    c.feed(BACKEND, AUTH_OK + READY, 2)
    return c


def test_a_statement_closed_before_its_answer_is_still_a_statement() -> None:
    """Sent, then the client closed (or died) without reading the reply: recorded, with no outcome."""
    c = _connected()
    c.feed(FRONTEND, query("select 1") + query("delete from t; drop table u"), 3)
    done = c.feed(BACKEND, msg(b"T", b"\0\0") + DATAROW + complete("SELECT 1") + READY, 4)
    assert [(s.query, s.answered) for s in done if isinstance(s, pg.Statement)] == [("select 1", True)]
    left = c.close()
    assert [(s.command, s.answered, s.tag, s.error, s.duration_ms) for s in left if isinstance(s, pg.Statement)] \
        == [("DELETE", False, "", "", None), ("DROP TABLE", False, "", "", None)]
    assert c.close() == []                  # once


def test_pipelined_executes_without_answers_are_statements_at_close() -> None:
    c = _connected()
    c.feed(FRONTEND, parse("", "update t set a = 1") + bind("", "", []) + execute() + SYNC, 3)
    (st,) = [s for s in c.close() if isinstance(s, pg.Statement)]
    assert st.command == "UPDATE" and not st.answered


def test_lost_server_bytes_do_not_lose_the_statements_sent() -> None:
    c = _connected()
    c.feed(FRONTEND, query("truncate t"), 3)
    out = c.gap(BACKEND, 100)
    assert [type(e).__name__ for e in out] == ["Desync", "Statement"]
    assert out[1].command == "TRUNCATE" and not out[1].answered

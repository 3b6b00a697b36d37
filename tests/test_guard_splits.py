"""The kernel's SQL and HTTP guards, against an agent that cuts its messages where a matcher
reading one send at a time would lose them: a StartupMessage, a message header or a statement
split across sends, one byte a send, a statement behind a message larger than the window the
matcher copies, a statement behind another message type over TLS, a request line or Host header
split across sends.  Each is refused before the server sees it (the server's log and table are
the ground truth), and an allowed statement cut the same ways still runs.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import Daemon, make_agent, need_root
from pgserver import PgServer
from test_enforce import COMM, POLICY, Recorder, logged_messages

WIRE = Path(__file__).resolve().parent / "wire.py"


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    need_root()
    d = Daemon(tmp_path_factory.mktemp("splits"), [{"name": "guarded", "match": {"comm": [COMM]}}],
               policy=POLICY)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield make_agent(tmp_path_factory.mktemp("splits-agent"), COMM)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pg_tls() -> Iterator[PgServer]:
    server = PgServer(ssl=True)
    server.start()
    yield server
    server.stop()


def wire(agent: Path, *args: str) -> str:
    res = subprocess.run([str(agent), "-c", " ".join([sys.executable, str(WIRE), *args])],
                         capture_output=True, text=True, timeout=60, start_new_session=True)
    return (res.stdout.strip() or res.stderr.strip() or f"rc={res.returncode}").splitlines()[-1]


def query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", 4 + len(body)) + body


def sync() -> bytes:
    return b"S\0\0\0\4"


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", 4 + len(body)) + body


def extended(n: int) -> bytes:
    """Parse, a Bind whose one text parameter has n bytes, Execute, Sync: an allowed statement
    whose Bind is as long as the caller wants."""
    parse = message(b"P", b"\0select length($1::text)\0\0\0")
    bind = message(b"B", b"\0\0" + struct.pack("!hhi", 0, 1, n) + b"x" * n + struct.pack("!h", 0))
    return parse + bind + message(b"E", b"\0\0\0\0\0") + sync()


def straddling() -> bytes:
    """extended() sized so that the Execute header straddles the matcher's 4 KiB window."""
    n = 4093 - len(extended(0)) + len(message(b"E", b"\0\0\0\0\0") + sync())
    return extended(n)


def cuts(data: bytes, *at: int) -> list[str]:
    edges = [0, *at, len(data)]
    return [data[a:b].hex() for a, b in zip(edges, edges[1:], strict=False) if b > a]


def survives(pg: PgServer, table: str) -> bool:
    return pg.psql("awtest", f"select count(*) from {table}").strip() == "1"


def pg_cases(drop: str) -> list[tuple[str, list[str], list[str]]]:
    """(name, extra args, sends) of every way to cut the statement `drop` that is tried."""
    q = query(drop)
    first = query("select 1")
    return [
        ("whole", [], cuts(q)),
        ("header cut after its type", [], cuts(q, 1)),
        ("header cut inside its length", [], cuts(q, 3)),
        ("statement cut in a word", [], cuts(q, 9)),
        ("one byte a send", [], cuts(q, *range(1, len(q)))),
        ("the next header cut behind a whole message", [], cuts(first + q, len(first) + 2)),
        ("behind a Sync", [], cuts(sync() + q)),
        ("behind a whole extended query", [], cuts(extended(10) + q)),
        ("startup cut inside its length", ["--startup-split", "2"], cuts(q)),
        ("startup cut after its length", ["--startup-split", "4"], cuts(q)),
        ("behind a message longer than the window", [], cuts(extended(4200) + q)),
        ("behind a header straddling the window's edge", [], cuts(straddling() + q)),
    ]


CASES = [c[0] for c in pg_cases("")]


def refused_everywhere(pg: PgServer, agent: Path, tls: bool, name: str) -> None:
    """The cut `drop table` fails at its send (TCP: EACCES) or its client dies before SSL_write
    encrypts it (TLS), the table is there, and the server never saw the statement."""
    table = f"split_{CASES.index(name)}_{'tls' if tls else 'tcp'}"
    pg.psql("awtest", f"drop table if exists {table}; create table {table} (a int); insert into {table} values (1)")
    (extra, sends), = [(c[1], c[2]) for c in pg_cases(f"drop table {table}") if c[0] == name]
    out = wire(agent, "pg", "127.0.0.1", str(pg.port), "awtest", *(["--tls"] if tls else []), *extra, *sends)
    assert out.startswith("failed") or (tls and out == "rc=-9"), (name, out)
    assert survives(pg, table), name
    assert f"drop table {table}" not in "\n".join(logged_messages(pg)).lower(), name


@pytest.mark.parametrize("name", CASES)
def test_a_statement_cut_anywhere_is_refused_over_tcp(guard: Daemon, agent: Path, pg: PgServer, name: str) -> None:
    refused_everywhere(pg, agent, False, name)


@pytest.mark.parametrize("name", CASES)
def test_a_statement_cut_anywhere_is_refused_over_tls(guard: Daemon, agent: Path, pg_tls: PgServer,
                                                      name: str) -> None:
    refused_everywhere(pg_tls, agent, True, name)


@pytest.mark.parametrize("cut", [1, 3, 9, 20, -1])
def test_an_allowed_statement_cut_the_same_ways_runs_over_tcp(guard: Daemon, agent: Path, pg: PgServer,
                                                              cut: int) -> None:
    q = query("select 'cut here' as x")
    out = wire(agent, "pg", "127.0.0.1", str(pg.port), "awtest", "--startup-split", "3",
               *(cuts(q, *range(1, len(q))) if cut < 0 else cuts(q, cut)))
    assert out == "ok", out


def test_an_allowed_extended_query_longer_than_the_window_runs(guard: Daemon, agent: Path, pg: PgServer) -> None:
    for message in (extended(4200), straddling(), extended(20000)):
        out = wire(agent, "pg", "127.0.0.1", str(pg.port), "awtest", message.hex())
        assert out == "ok", out


@pytest.fixture(scope="module")
def web() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


HTTP_CUTS = [
    ("a method cut", [b"DEL", b"ETE /admin/cut-1 HTTP/1.1\r\nHost: a\r\n\r\n"]),
    ("a path cut", [b"DELETE /adm", b"in/cut-2 HTTP/1.1\r\nHost: a\r\n\r\n"]),
    ("a Host header in the next send", [b"GET /cut-3 HTTP/1.1\r\n", b"Host: secrets.internal\r\n\r\n"]),
    ("a Host header cut", [b"GET /cut-4 HTTP/1.1\r\nHost: secr", b"ets.internal\r\n\r\n"]),
]


@pytest.mark.parametrize("case", HTTP_CUTS, ids=lambda c: c[0])
def test_a_request_cut_across_sends_is_refused(guard: Daemon, agent: Path, web: int,
                                               case: tuple[str, list[bytes]]) -> None:
    """A connection's first request is judged on its whole request line and headers."""
    name, sends = case
    Recorder.seen.clear()
    out = wire(agent, "http", "127.0.0.1", str(web), *(s.hex() for s in sends))
    assert out.startswith("failed"), (name, out)
    assert not [s for s in Recorder.seen if "/cut-" in s], Recorder.seen


def test_an_allowed_request_cut_the_same_ways_is_served(guard: Daemon, agent: Path, web: int) -> None:
    Recorder.seen.clear()
    for sends in ([b"GE", b"T /fine HTTP/1.1\r\nHost: a\r\n\r\n"], [b"GET /fine HTTP/1.1\r\n", b"Host: a\r\n\r\n"]):
        out = wire(agent, "http", "127.0.0.1", str(web), *(s.hex() for s in sends))
        assert out.startswith("ok HTTP/1.0 200"), out
    assert Recorder.seen == ["GET /fine a", "GET /fine a"]

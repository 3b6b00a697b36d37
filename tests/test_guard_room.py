"""What the SQL guard keeps per connection cannot be pushed out, filled up to pass, or thrown off
by a write that did not go; and a session cannot take its sockets out of nftables' reach.

- A connection past the guard's room (`probes.guard_connections`, 2 here) is reset at once, not
  let through unjudged; the room comes back as connections close.
- A TLS write that fails (one byte before the handshake) leaves the stream's framing as it was, so
  the StartupMessage after it is still read as one and a DROP TABLE behind it is killed.
- A daemon killed in the middle of a long TLS message (COPY data): the next one goes on from its
  predecessor's framing, so the DROP TABLE after the message's tail is killed.
- A session's socket mark (quarantine, the reset above) is not the session's to change.

The server's table is the ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, make_agent, need_root, wait_for
from pgserver import PgServer

COMM = "aw-room-agent"
DENY_DROP = """version: 1
rules:
  - name: no-drop-table
    when: {kind: sql, sql: {command: ["DROP TABLE"]}}
    action: deny
"""

# two connections held, a third tried, a DROP on a held one, then all closed and one more opened
HOLDER = r"""
import sys, time, psycopg
dsn, table = sys.argv[1], sys.argv[2]
out = []
held = [psycopg.connect(dsn, autocommit=True) for _ in range(2)]
for c in held:
    c.execute("select 1")
try:
    c = psycopg.connect(dsn, autocommit=True)
    c.execute("select 1")
    out.append("third:ok")
except Exception as e:
    out.append("third:" + type(e).__name__)
try:
    held[0].execute(f"drop table {table}")
    out.append("drop:ok")
except Exception as e:
    out.append("drop:" + type(e).__name__)
for c in held:
    c.close()
time.sleep(0.5)
with psycopg.connect(dsn, autocommit=True) as c:
    out.append("after:" + str(c.execute("select 41 + 1").fetchone()[0]))
print(",".join(out))
"""

# Postgres over TLS written with libssl itself (ctypes), so the test chooses every SSL_write
TLS_CLIENT = r"""
import ctypes as C, pathlib, select, socket, struct, sys, time
port, work, mode, table = int(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
lib = C.CDLL("libssl.so.3")
CB = C.CFUNCTYPE(None, C.c_int, C.c_int, C.c_int, C.c_void_p, C.c_size_t, C.c_void_p, C.c_void_p)
for name, res, args in (("TLS_client_method", C.c_void_p, []), ("SSL_CTX_new", C.c_void_p, [C.c_void_p]),
                        ("SSL_new", C.c_void_p, [C.c_void_p]), ("SSL_set_fd", C.c_int, [C.c_void_p, C.c_int]),
                        ("SSL_connect", C.c_int, [C.c_void_p]), ("SSL_shutdown", C.c_int, [C.c_void_p]),
                        ("SSL_clear", C.c_int, [C.c_void_p]),
                        ("SSL_set_msg_callback", None, [C.c_void_p, CB]),
                        ("SSL_write", C.c_int, [C.c_void_p, C.c_char_p, C.c_int]),
                        ("SSL_write_ex", C.c_int, [C.c_void_p, C.c_void_p, C.c_size_t, C.POINTER(C.c_size_t)]),
                        ("SSL_set_connect_state", None, [C.c_void_p]),
                        ("SSL_sendfile", C.c_ssize_t, [C.c_void_p, C.c_int, C.c_long, C.c_size_t, C.c_int]),
                        ("SSL_read", C.c_int, [C.c_void_p, C.c_char_p, C.c_int])):
    f = getattr(lib, name)
    f.restype, f.argtypes = res, args
ctx = lib.SSL_CTX_new(lib.TLS_client_method())
ssl = lib.SSL_new(ctx)

def postgres():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(struct.pack("!II", 8, 80877103))      # SSLRequest
    assert s.recv(1) == b"S"
    return s

def write(b):
    n = lib.SSL_write(ssl, b, len(b))
    assert n == len(b), n

def ready():                                         # up to ReadyForQuery
    buf = b""
    while not (len(buf) >= 6 and buf[-6:-1] == b"Z\0\0\0\x05"):
        chunk = C.create_string_buffer(65536)
        n = lib.SSL_read(ssl, chunk, 65536)
        assert n > 0, n
        buf += chunk.raw[:n]
    return buf

def query(sql):
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body

if mode == "clear":
    # first a TLS connection to another server, with bytes that are not Postgres; then the same
    # SSL object, cleared, for Postgres
    other = socket.create_connection(("127.0.0.1", int(sys.argv[5])))
    lib.SSL_set_fd(ssl, other.fileno())
    assert lib.SSL_connect(ssl) == 1
    write(b"hello, not postgres\n")
    lib.SSL_shutdown(ssl)
    assert lib.SSL_clear(ssl) == 1
s = postgres()
lib.SSL_set_fd(ssl, s.fileno())
if mode == "early":
    # no connect state yet: SSL_write fails and sends nothing
    (work / "early").write_text(str(lib.SSL_write(ssl, b"x", 1)))
params = b"user\0postgres\0database\0awtest\0\0"
startup = struct.pack("!II", len(params) + 8, 196608) + params
if mode == "implicit":
    # no SSL_connect: the first SSL_write makes the handshake (OpenSSL clears the object inside it)
    lib.SSL_set_connect_state(ssl)
    write(startup)
    (work / "implicit").write_text("not killed")
assert lib.SSL_connect(ssl) == 1
write(startup)
ready()
if mode == "huge":
    # SSL_write_ex of 2^32 bytes, the DROP first (a 32-bit count of them was 0: nothing judged)
    import mmap
    big = mmap.mmap(-1, (1 << 32) + 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)   # MAP_NORESERVE
    q = query("drop table " + table)
    big[:len(q)] = q
    written = C.c_size_t(0)
    lib.SSL_write_ex(ssl, C.addressof(C.c_char.from_buffer(big)), 1 << 32, C.byref(written))
    (work / "huge").write_text("not killed")
if mode == "sendfile":
    with open("/etc/hostname", "rb") as f:
        lib.SSL_sendfile(ssl, f.fileno(), 0, 4, 0)
    (work / "sendfile").write_text("not killed")
if mode == "restart":
    # COPY FROM STDIN: one CopyData message of 20 kB, cut in two writes (a Query that long would
    # be opaque, and killed under the deny rule)
    write(query("copy " + table + " from stdin"))
    chunk = C.create_string_buffer(65536)
    assert lib.SSL_read(ssl, chunk, 65536) > 0 and chunk.raw[0:1] == b"G"   # CopyInResponse
    row = b"a" * 20000 + b"\n"
    data = b"d" + struct.pack("!I", len(row) + 4) + row
    write(data[:10000])
    (work / "ready").write_text("ready")
    while not (work / "go").exists():
        time.sleep(0.05)
    write(data[10000:])
    write(b"c\0\0\0\x04")                            # CopyDone
    ready()
if mode == "nested":
    # an SSL_write from a callback inside another (here: on a record's header)
    spare = lib.SSL_new(ctx)
    hook = CB(lambda *a: lib.SSL_write(spare, b"", 0))
    lib.SSL_set_msg_callback(ssl, hook)
    write(query("select 1"))
    (work / "nested").write_text("not killed")
if mode.startswith("retry"):
    # the server sleeps and reads nothing: CopyData (ignored outside COPY) fills every buffer
    # until SSL_write fails with WANT_WRITE, part of its records maybe sent
    write(query("select pg_sleep(3)"))
    s.setblocking(False)
    D = b"d" + struct.pack("!I", 16384 + 4) + b"z" * 16384
    while lib.SSL_write(ssl, D, len(D)) > 0:
        pass
    (work / "blocked").write_text("blocked")
    if mode == "retry-other":                        # as long, other bytes
        lib.SSL_write(ssl, b"d" + struct.pack("!I", 16384 + 4) + b"y" * 16384, len(D))
        (work / "retried").write_text("not killed")
    else:                                            # the same bytes until they go
        while lib.SSL_write(ssl, D, len(D)) <= 0:
            select.select([], [s], [], 5)
    s.setblocking(True)
    ready()
write(query("drop table " + table))
ready()
(work / "result").write_text("dropped")
"""


def configure(d: Daemon, **probes: Any) -> None:
    cfg = json.loads(d.config.read_text())
    cfg["probes"].update(probes)
    d.config.write_text(json.dumps(cfg))


@pytest.fixture()
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    need_root()
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", [{"name": "room", "match": {"comm": [COMM]}}], policy=DENY_DROP)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def tls_pg() -> Iterator[PgServer]:
    need_root()
    server = PgServer(ssl=True)
    server.start()
    yield server
    server.stop()


def table_of_one(pg: PgServer, table: str) -> None:
    pg.psql("awtest", f"drop table if exists {table}; create table {table} (a text); insert into {table} values ('1')")


def rows(pg: PgServer, table: str) -> str:
    return pg.psql("awtest", f"select count(*) from {table}").strip()


def verdicts(d: Daemon, rule: str) -> list[dict[str, Any]]:
    return [e for e in d.events(kinds=["verdict"]) if (e.get("verdict") or {}).get("rule") == rule]


def agent_run(tmp_path: Path, cmd: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    agent = make_agent(tmp_path / "bin", COMM)
    return subprocess.run([str(agent), "-c", cmd + "; echo rc=$?"], capture_output=True, text=True, timeout=timeout)


def unjudged(d: Daemon, why: str) -> list[dict[str, Any]]:
    return [e for e in verdicts(d, "unjudged-send") if why in e["verdict"]["mechanism"]]


def tls_work(tmp_path: Path) -> Path:
    """The TLS client's directory (the agent's user writes its files there)."""
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)
    (work / "client.py").write_text(TLS_CLIENT)
    return work


def tls_agent(tmp_path: Path, pg: PgServer, mode: str, table: str, *extra: str) -> tuple[str, Path]:
    """The TLS client run in the agent: its output (with `rc=`), and its directory."""
    work = tls_work(tmp_path)
    res = agent_run(tmp_path, f"{sys.executable} {work}/client.py {pg.port} {work} {mode} {table} " + " ".join(extra))
    return res.stdout + res.stderr, work


def test_a_connection_past_the_guards_room_is_reset_not_let_through(daemon: Daemon, pg: PgServer,
                                                                     tmp_path: Path) -> None:
    configure(daemon, guard_connections=2)
    daemon.start()
    table_of_one(pg, "room_full")
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    res = agent_run(tmp_path, f"{sys.executable} {script} '{pg.dsn}' room_full")
    assert "third:OperationalError,drop:OperationalError,after:42" in res.stdout, res
    assert rows(pg, "room_full") == "1"
    full = wait_for(lambda: unjudged(daemon, "no room"), 20, what="the reset recorded")
    assert full[0]["verdict"]["prevented"] is True and "ECONNRESET" in full[0]["verdict"]["mechanism"], full[0]
    assert full[0]["session_id"], full[0]     # made where no process runs (sock_ops), still the session's
    wait_for(lambda: verdicts(daemon, "no-drop-table"), 20, what="the DROP refused")


def test_a_tls_write_that_did_not_go_leaves_the_framing_as_it_was(daemon: Daemon, tls_pg: PgServer,
                                                                   tmp_path: Path) -> None:
    daemon.start()
    table_of_one(tls_pg, "room_early")
    out, work = tls_agent(tmp_path, tls_pg, "early", "room_early")
    assert (work / "early").read_text() in ("-1", "0"), out     # the first SSL_write failed
    # the handshake cleared the SSL object (SSL_connect calls SSL_clear), so the StartupMessage
    # starts the stream; before, the failed write had set it to "not Postgres" and the DROP ran
    assert "rc=137" in out and not (work / "result").exists(), out   # killed at the DROP's SSL_write
    assert rows(tls_pg, "room_early") == "1"
    v = wait_for(lambda: verdicts(daemon, "no-drop-table"), 20, what="the DROP killed")
    assert v[0]["verdict"]["mechanism"] == "SIGKILL at SSL_write", v[0]


def test_a_tls_retry_after_want_write_is_framed_from_where_the_failed_write_began(
        daemon: Daemon, tls_pg: PgServer, tmp_path: Path) -> None:
    """The same bytes again (what OpenSSL asks of a retry): framed right, so the DROP after is
    judged by its rule, not killed as unreadable, and nothing else is refused."""
    daemon.start()
    table_of_one(tls_pg, "room_retry")
    out, work = tls_agent(tmp_path, tls_pg, "retry-same", "room_retry")
    assert (work / "blocked").exists() and "rc=137" in out and not (work / "result").exists(), out
    assert rows(tls_pg, "room_retry") == "1"
    wait_for(lambda: verdicts(daemon, "no-drop-table"), 20, what="the DROP judged")
    assert not verdicts(daemon, "unjudged-send")


def test_a_tls_retry_with_other_bytes_is_killed(daemon: Daemon, tls_pg: PgServer, tmp_path: Path) -> None:
    """Red team: after WANT_WRITE OpenSSL sends the records it made of the failed write, then the
    rest from the retry's buffer; a retry with other bytes would be framed from the start."""
    daemon.start()
    table_of_one(tls_pg, "room_other")
    out, work = tls_agent(tmp_path, tls_pg, "retry-other", "room_other")
    assert (work / "blocked").exists() and not (work / "retried").exists() and "rc=137" in out, out
    assert rows(tls_pg, "room_other") == "1"
    wait_for(lambda: unjudged(daemon, "begin with the same bytes"), 20, what="the retry killed")


def test_an_ssl_write_inside_another_is_killed(daemon: Daemon, tls_pg: PgServer, tmp_path: Path) -> None:
    """Red team: a write from a callback inside another undid the outer write's framing at its
    return; now the inner write is killed before it starts."""
    daemon.start()
    table_of_one(tls_pg, "room_nested")
    out, work = tls_agent(tmp_path, tls_pg, "nested", "room_nested")
    assert "rc=137" in out and not (work / "nested").exists(), out
    assert rows(tls_pg, "room_nested") == "1"
    wait_for(lambda: unjudged(daemon, "inside another"), 20, what="the nested write killed")


def test_an_ssl_object_cleared_for_another_connection_starts_afresh(daemon: Daemon, tls_pg: PgServer,
                                                                     tmp_path: Path) -> None:
    """Red team: junk to one TLS server set the SSL object's stream to "not Postgres"; cleared
    (SSL_clear) and connected to Postgres, it kept that, and its DROP ran."""
    import socket
    import ssl
    import threading

    daemon.start()
    table_of_one(tls_pg, "room_clear")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_pg.data / "server.crt", tls_pg.data / "server.key")
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with ctx.wrap_socket(conn, server_side=True) as t:
            t.recv(100)

    threading.Thread(target=serve, daemon=True).start()
    try:
        out, work = tls_agent(tmp_path, tls_pg, "clear", "room_clear", str(srv.getsockname()[1]))
    finally:
        srv.close()
    assert "rc=137" in out and not (work / "result").exists(), out
    assert rows(tls_pg, "room_clear") == "1"
    wait_for(lambda: verdicts(daemon, "no-drop-table"), 20, what="the DROP killed")


@pytest.mark.parametrize("mode, why", [
    ("huge", "2 GiB or more"),                  # red team: a 32-bit count of 2^32 bytes was 0
    ("implicit", "handshake inside SSL_write"),  # red team: framed against the cleared stream's state
    ("sendfile", "SSL_sendfile"),               # kTLS: bytes no uprobe sees
])
def test_tls_writes_the_guard_cannot_frame_are_killed(daemon: Daemon, tls_pg: PgServer, tmp_path: Path,
                                                       mode: str, why: str) -> None:
    daemon.start()
    table = f"room_{mode}"
    table_of_one(tls_pg, table)
    out, work = tls_agent(tmp_path, tls_pg, mode, table)
    assert "rc=137" in out and not (work / mode).exists() and not (work / "result").exists(), out
    assert rows(tls_pg, table) == "1"
    wait_for(lambda: unjudged(daemon, why), 20, what=f"the {mode} write killed")


# A non-blocking connect to a server whose accept queue is full (its SYN is dropped and sent again
# a second later), then a blocking sendall: the send waits inside tcp_sendmsg for the handshake,
# and went on past sk_msg once the connection was in the guard.
EARLY_SEND = r"""
import socket, struct, sys
port = int(sys.argv[1])
s = socket.socket()
s.setblocking(False)
s.connect_ex(("127.0.0.1", port))
s.setblocking(True)
params = b"user\0postgres\0database\0awtest\0\0"
q = b"drop table room_early_send\0"
try:
    s.sendall(struct.pack("!II", len(params) + 8, 196608) + params + b"Q" + struct.pack("!I", len(q) + 4) + q)
    s.recv(1)
    print("sent")
except OSError as e:
    print("refused:" + type(e).__name__)
"""


def test_a_send_waiting_for_the_handshake_does_not_pass_the_guard(daemon: Daemon, tmp_path: Path) -> None:
    import socket
    import time

    daemon.start()
    srv = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(srv.getsockname())   # the accept queue is full
    script = tmp_path / "early.py"
    script.write_text(EARLY_SEND)
    agent = make_agent(tmp_path / "bin", COMM)
    p = subprocess.Popen([str(agent), "-c", f"{sys.executable} {script} {srv.getsockname()[1]}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)                     # the agent's SYN is dropped; its send waits
        srv.accept()[0].close()             # room: the SYN sent again is answered
        srv.settimeout(3)
        got = b""
        try:
            conn, _ = srv.accept()
            conn.settimeout(2)
            with conn:
                while chunk := conn.recv(4096):
                    got += chunk
        except OSError:
            pass
        out, err = p.communicate(timeout=30)
    finally:
        filler.close()
        srv.close()
        if p.poll() is None:
            p.kill()
    assert b"drop table" not in got, got
    assert "refused:" in out, (out, err)
    wait_for(lambda: unjudged(daemon, "waiting"), 20, what="the reset recorded")


def test_a_new_daemon_goes_on_from_its_predecessors_tls_framing(daemon: Daemon, tls_pg: PgServer,
                                                                 tmp_path: Path) -> None:
    daemon.start()
    table_of_one(tls_pg, "room_restart")
    work = tls_work(tmp_path)
    agent = make_agent(tmp_path / "bin", COMM)
    p = subprocess.Popen([str(agent), "-c", f"{sys.executable} {work}/client.py {tls_pg.port} {work} restart "
                                            "room_restart; echo rc=$?"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (work / "ready").exists(), 30, what="half of a long INSERT written")
    assert daemon.proc is not None
    daemon.proc.kill()          # its pinned uprobes go on until the next daemon takes over
    daemon.proc.wait()
    daemon.start()
    (work / "go").write_text("go")
    out, err = p.communicate(timeout=60)
    assert "rc=137" in out and not (work / "result").exists(), (out, err)
    assert rows(tls_pg, "room_restart") == "2"        # the COPY ran, the DROP did not
    assert "took over" in daemon.log.read_text() and "ssl_streams" in daemon.log.read_text()


def test_a_session_cannot_change_its_sockets_mark(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    res = agent_run(tmp_path, f"{sys.executable} -c \"import socket; s = socket.socket(); "
                              "s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0)\"")
    assert "PermissionError" in res.stderr and "rc=1" in res.stdout, res
    # outside any session the same call is the caller's (root here)
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 7)

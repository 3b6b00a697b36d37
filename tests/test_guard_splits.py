"""The kernel's SQL and HTTP guards, against an agent that cuts its messages where a matcher
reading one send at a time would lose them: a StartupMessage, a message header or a statement
split across sends, one byte a send, a statement behind a message larger than the window the
matcher copies, a statement behind another message type over TLS, a request line or Host header
split across sends.  Each is refused before the server sees it (the server's log and table are
the ground truth), and an allowed statement cut the same ways still runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import Daemon, make_agent, need_root, wait_for
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


# ---- the red team's attacks: other system calls, transports and protocol corners ----------------
#
# A client that sends through chosen system calls (send, sendfile, splice, writev, one iovec a
# byte, MSG_MORE, MSG_OOB, TCP Fast Open, a Unix socket; over TLS: from an untouched file mapping,
# through a copied libssl, from a forked child), written out by the fixture.  A test_rt_* case
# that fails is a bypass (the table is dropped, or the recording HTTP server saw the request) or,
# for the line protocol, a client the corking holds.  The ones still open are strict xfails
# (OPEN): each names what blocks it, and fails the run the day it is closed.
#
# Not here: another thread rewriting the buffer while SSL_write runs.  The uprobe reads the
# plaintext at entry and OpenSSL encrypts it later; the red team won that race in 1 to 3 tries of
# 20.  A race has no place in CI either way; the README states it as open.

OPEN: dict[str, str] = {}


def _open(names: list[str]) -> list[object]:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=OPEN[n])) if n in OPEN else n
            for n in names]


CLIENT_SRC = r'''"""Red-team client: sends protocol bytes through chosen system calls.
usage: python client.py CONFIG.json"""
import json, mmap, os, socket, ssl, struct, sys, time

cfg = json.load(open(sys.argv[1]))
if cfg.get("unlink"):          # a copied libssl this process already mapped: gone from disk
    os.unlink(cfg["unlink"])
host, port, tls, mode = cfg["host"], cfg["port"], cfg.get("tls", False), cfg["mode"]
how = cfg.get("how", "send")
sends = [bytes.fromhex(h) for h in cfg["sends"]]
pause = cfg.get("pause", 0.05)


sys.path.insert(0, "@TESTS@")
from wire import pg_answers, readies  # noqa: E402  (the reader the tests' own client uses)


def put(s, chunk, i):
    """one send, by the configured system call"""
    if cfg.get("flags") and not tls:   # per-send flags (MSG_OOB: the send's last byte is urgent)
        assert s.send(chunk, cfg["flags"][i]) == len(chunk)
        return
    if how == "send" or tls:
        if tls and how == "mmap" and i in cfg.get("mmap_sends", []):
            path = f"/tmp/rt-mmap-{os.getpid()}-{i}"
            with open(path, "wb") as f:
                f.write(chunk)
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            mm = mmap.mmap(fd, len(chunk), mmap.MAP_PRIVATE, mmap.PROT_READ)
            s.sendall(mm)      # SSL_write reads straight from the untouched mapping
            os.unlink(path)
            return
        s.sendall(chunk)
    elif how == "more":
        s.send(chunk, socket.MSG_MORE if i < len(sends) - 1 else 0)
    elif how == "iov":       # one sendmsg, one iovec per byte
        s.sendmsg([chunk[j:j + 1] for j in range(len(chunk))])
    elif how == "writev":
        os.writev(s.fileno(), [chunk[j:j + 1] for j in range(len(chunk))])
    elif how in ("sendfile", "splice"):
        path = f"/tmp/rt-file-{os.getpid()}-{i}"
        with open(path, "wb") as f:
            f.write(chunk)
        fd = os.open(path, os.O_RDONLY)
        if how == "sendfile":
            os.sendfile(s.fileno(), fd, 0, len(chunk))
        else:
            r, w = os.pipe()
            os.splice(fd, w, len(chunk))
            os.splice(r, s.fileno(), len(chunk))
        os.close(fd)
        os.unlink(path)
    elif how == "write":
        os.write(s.fileno(), chunk)


def connect():
    if how == "tfo":     # the first send rides the connection's SYN (TCP Fast Open)
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendto(bytes.fromhex(cfg["tfo_first"]), socket.MSG_FASTOPEN, (host, port))
        s.settimeout(10)
        return s
    if cfg.get("unix"):   # a Unix socket path (sk_msg never runs on these)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(cfg["unix"])
        return s
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not tls:
        return s
    if mode == "pg":
        s.sendall(struct.pack("!ii", 8, 80877103))
        if s.recv(1) != b"S":
            raise OSError("the server refused TLS")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(s)


def main():
    s = connect()
    global side
    side = None
    if cfg.get("interleave"):   # a second socket written between sends: the task's page frag moves on
        lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(1)
        side = socket.create_connection(lst.getsockname())
    if mode == "pg":
        if how != "tfo":
            params = b"user\0postgres\0database\0" + cfg["db"].encode() + b"\0\0"
            startup = struct.pack("!ii", 8 + len(params), cfg.get("version", 0x00030000)) + params
            s.sendall(bytes.fromhex(cfg.get("pre_startup", "")) + startup)
            if cfg.get("pre_startup"):
                print("pre-startup answer", s.recv(1), file=sys.stderr)
        first = pg_answers(s)
        if first != "ok":
            return f"failed startup: {first}"
        if how == "fork":   # the first send here, the rest from a child that inherits the TLS session
            s.sendall(sends[0])
            time.sleep(pause)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    for c in sends[1:]:
                        s.sendall(c)
                        time.sleep(pause)
                    out = pg_answers(s, cfg.get("readies", 1))
                except OSError as e:
                    out = f"failed in the child {e!r}"
                os.write(w, out.encode())
                os._exit(0)
            os.close(w)
            _, status = os.waitpid(pid, 0)
            out = os.read(r, 1000).decode()
            return out if out else f"failed the child ended with status {status}"
        for i, c in enumerate(sends):
            try:
                put(s, c, i)
            except OSError as e:
                if not cfg.get("ignore_errors"):
                    raise
                print(f"send {i}: {e!r}", file=sys.stderr)
            if side is not None:
                side.send(b"\xff")
            time.sleep(pause)
        return pg_answers(s, cfg.get("readies", readies(b"".join(sends))))
    for i, c in enumerate(sends):
        put(s, c, i)
        if side is not None:
            side.send(b"\xff")
        time.sleep(pause)
    s.settimeout(cfg.get("read_timeout", 3))
    got = b""
    try:
        while True:
            more = s.recv(65536)
            if not more:
                break
            got += more
    except (TimeoutError, socket.timeout):
        pass
    return "ok " + " | ".join(l.decode() for l in got.split(b"\r\n") if l.startswith(b"HTTP/")) if got else "failed the connection ended"


try:
    out = main()
except OSError as e:
    out = f"failed {e!r}"
print(out, flush=True)
'''


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rt-client")
    d.chmod(0o755)
    p = d / "client.py"
    p.write_text(CLIENT_SRC.replace("@TESTS@", str(WIRE.parent)))
    return p


_RUNS = [0]


def run_client(agent: Path, client: Path, cfg: dict, env: str = "") -> str:
    _RUNS[0] += 1
    conf = client.parent / f"cfg-{_RUNS[0]}.json"
    conf.write_text(json.dumps(cfg))
    cmd = " ".join(x for x in [env, sys.executable, str(client), str(conf)] if x)
    res = subprocess.run([str(agent), "-c", cmd], capture_output=True, text=True, timeout=90,
                         start_new_session=True)
    return (res.stdout.strip() or res.stderr.strip() or f"rc={res.returncode}").splitlines()[-1]


def startup(db: str, version: int = 0x00030000) -> bytes:
    params = b"user\0postgres\0database\0" + db.encode() + b"\0\0"
    return struct.pack("!ii", 8 + len(params), version) + params


def copydata(n: int) -> bytes:
    """A CopyData of n bytes in all: outside COPY the server reads and ignores it (padding that is
    not a scan region)."""
    return message(b"d", b"x" * (n - 5))


def named_parse(name: str, sql: str) -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0\0\0")


def ext_drop(sql: str, name: str = "") -> bytes:
    return (named_parse(name, sql) + message(b"B", b"\0" + name.encode() + b"\0" + b"\0\0\0\0\0\0")
            + message(b"D", b"S" + name.encode() + b"\0") + message(b"E", b"\0\0\0\0\0") + message(b"H", b"")
            + sync())


def oob_shift(q: bytes, k: int) -> list[bytes]:
    """Sends whose last bytes are urgent (k of them): a CopyData whose body, as the guard counts
    it, holds those bytes and so ends k bytes before the server's.  Behind it: a byte the guard
    reads as the type of a CopyData whose length starts 00 'Q' (5 MiB, skipped), and which the
    server reads as the end of the first CopyData, then the Query at its right place."""
    a = 10
    n = (a + 1) * k
    first = b"d" + struct.pack("!i", 4 + n)
    sends = [first + b"x" * a + b"!"] + [b"x" * a + b"!" for _ in range(k - 1)]
    pad = b"d" + b"\0" * (k - 1)       # the server's first CopyData ends with these k bytes
    return sends + [pad + q]


def rt_pg_cases(table: str, db: str) -> dict[str, tuple[dict, str]]:
    """name -> (client config without host/port, extra env)"""
    drop = f"drop table {table}"
    q = query(drop)
    hx = lambda parts: [p.hex() for p in parts]  # noqa: E731
    cases: dict[str, tuple[dict, str]] = {
        # --- the StartupMessage (framing state)
        "startup protocol 3.1 (NegotiateProtocolVersion)": ({"version": 0x00030001, "sends": hx([q])}, ""),
        "startup protocol 3.9999": ({"version": 0x0003270f, "sends": hx([q])}, ""),
        "SSLRequest and StartupMessage in one send": (
            {"pre_startup": struct.pack("!ii", 8, 80877103).hex(), "sends": hx([q])}, ""),
        "GSSENCRequest and StartupMessage in one send": (
            {"pre_startup": struct.pack("!ii", 8, 80877104).hex(), "sends": hx([q])}, ""),
        "TCP Fast Open startup, then the query": (
            {"how": "tfo", "tfo_first": startup(db).hex(), "sends": hx([q])}, ""),
        "TCP Fast Open startup+query in the SYN send": (
            {"how": "tfo", "tfo_first": (startup(db) + q).hex(), "sends": []}, ""),
        # --- TCP urgent data: the server's read skips each MSG_OOB send's last byte, the guard counts it
        "two urgent bytes shift the server's framing past a CopyData": (
            {"sends": hx(oob_shift(q, 2)), "flags": [socket.MSG_OOB, socket.MSG_OOB, 0], "readies": 1}, ""),
        "one urgent byte (fail closed expected)": (
            {"sends": hx(oob_shift(q, 1)), "flags": [socket.MSG_OOB, 0], "readies": 1}, ""),
        # --- a refused send still moved the framing on: the header it carried declared the next send
        "a refused send declares the next send a CopyData body": (
            {"sends": hx([q + b"d" + struct.pack("!i", 4 + len(q)), q]), "pause": 0, "ignore_errors": True,
             "readies": 1}, ""),
        "a refused send declares the next send a CopyData body (after 0.5 s)": (
            {"sends": hx([q + b"d" + struct.pack("!i", 4 + len(q)), q]), "pause": 0.5, "ignore_errors": True,
             "readies": 1}, ""),
        # --- the matcher's lexer against the server's
        "a -- comment ends at CR for the server": ({"sends": hx([query(f"select 1; --\r{drop}")])}, ""),
        "E-string backslash quote hides the next statement": (
            {"sends": hx([query(f"select E'\\''; {drop}; --'")])}, ""),
        "tagged dollar quote hides the next statement": (
            {"sends": hx([query(f"select $q$ '$q$; {drop}; --'")])}, ""),
        # --- system calls
        "sendfile whole": ({"how": "sendfile", "sends": hx([q])}, ""),
        "sendfile cut at 3": ({"how": "sendfile", "sends": cuts(q, 3)}, ""),
        "splice cut at 9": ({"how": "splice", "sends": cuts(q, 9)}, ""),
        "writev one byte an iovec": ({"how": "writev", "sends": hx([q])}, ""),
        "sendmsg one byte an iovec": ({"how": "iov", "sends": hx([q])}, ""),
        "MSG_MORE on every cut": ({"how": "more", "sends": cuts(q, 1, 3, 9)}, ""),
        "write(2) one byte a call": ({"how": "write", "sends": cuts(q, *range(1, len(q))), "pause": 0.01}, ""),
        "one byte a send, another socket written between (sk_msg frags fill)": (
            {"interleave": True, "sends": cuts(q, *range(1, len(q))), "pause": 0.01}, ""),
        "one byte a send, another socket between, errors ignored (the rest after a short run)": (
            {"interleave": True, "sends": cuts(q, *range(1, len(q))), "pause": 0.01, "ignore_errors": True,
             "readies": 1}, ""),
        "header bytes one a send, another socket between, behind 40 bytes": (
            {"interleave": True, "sends": cuts(copydata(40) + q, *range(1, 45)), "pause": 0.01}, ""),
        # --- many messages, window edges
        "behind 9 Syncs": ({"sends": hx([sync() * 9 + q])}, ""),
        "behind 7 Flushes and a Sync": ({"sends": hx([message(b"H", b"") * 7 + sync() + q])}, ""),
        "behind 64 KiB of CopyData": ({"sends": hx([copydata(65536) + q])}, ""),
        "behind 64 KiB+3 of CopyData, header cut": ({"sends": cuts(copydata(65539) + q, 65539 + 2)}, ""),
        "CopyData declared 64 KiB, sent in pieces, then the query": (
            {"sends": cuts(copydata(65536) + q, 1000, 4096, 30000, 65536)}, ""),
        "extended protocol, named statement": ({"sends": hx([ext_drop(drop, "s1")])}, ""),
        "extended protocol cut inside the Parse name": ({"sends": cuts(ext_drop(drop, "stmt_name"), 7)}, ""),
        "extended protocol one byte a send": (
            {"sends": cuts(ext_drop(drop), *range(1, len(ext_drop(drop)))), "pause": 0.01}, ""),
        "COPY FROM STDIN, CopyData, CopyDone, then the query": (
            {"sends": hx([query(f"copy {table} from stdin"), message(b"d", b"2\n") + message(b"c", b"") + q])},
            ""),
    }
    for n in (4088, 4089, 4090, 4091, 4092, 4093, 4094, 4095, 4096, 4097, 4098, 4099, 4100, 4101):
        cases[f"behind CopyData of {n}"] = ({"sends": hx([copydata(n) + q])}, "")
        cases[f"behind CopyData of {n}, cut after it"] = ({"sends": cuts(copydata(n) + q, n)}, "")
        cases[f"behind CopyData of {n}, header cut"] = ({"sends": cuts(copydata(n) + q, n + 3)}, "")
    for n in (4070, 4080, 4085, 4090, 4095, 4100):
        pad = copydata(n - len(q) - 5 + 5)
        cases[f"query ending at {n}, cut in the word"] = ({"sends": cuts(pad + q, len(pad) + 9)}, "")
    return cases


RT_TCP = list(rt_pg_cases("t", "awtest")) + ["Unix socket through a symlink without .s.PGSQL. in its name",
                                              "Unix socket through a hard link"]
RT_TLS = ["startup protocol 3.1 (NegotiateProtocolVersion)", "E-string backslash quote hides the next statement",
          "behind 9 Syncs", "extended protocol one byte a send", "behind CopyData of 4094, header cut",
          "TLS: the query read from an untouched file mapping",
          "TLS: the query written through a copied libssl, unlinked",
          "TLS: a forked child goes on with a CopyData its parent began, then the query"]


def _rt_attack(pg: PgServer, agent: Path, client: Path, tls: bool, name: str) -> tuple[str, bool, bool]:
    table = f"rt_{(RT_TLS if tls else RT_TCP).index(name)}_{'tls' if tls else 'tcp'}"
    pg.psql("awtest", f"drop table if exists {table}; create table {table} (a int); insert into {table} values (1)")
    env = ""
    if name == "TLS: the query read from an untouched file mapping":
        cfg = {"how": "mmap", "mmap_sends": [0], "sends": [query(f"drop table {table}").hex()]}
    elif name == "TLS: a forked child goes on with a CopyData its parent began, then the query":
        cfg = {"how": "fork", "sends": [(b"d" + struct.pack("!i", 4 + 20) + b"x" * 10).hex(), (b"y" * 10).hex(),
                                        query(f"drop table {table}").hex()], "readies": 1}
    elif name == "TLS: the query written through a copied libssl, unlinked":
        d = client.parent / f"ssl-{table}"
        d.mkdir(exist_ok=True)
        shutil.copy2("/lib/x86_64-linux-gnu/libssl.so.3", d / "libssl.so.3")
        cfg = {"unlink": str(d / "libssl.so.3"), "sends": [query(f"drop table {table}").hex()]}
        env = f"LD_LIBRARY_PATH={d}"
    elif name.startswith("Unix socket"):
        sock = pg.sockdir / f".s.PGSQL.{pg.port}"
        alias = client.parent / f"pg-{table}"
        if alias.exists() or alias.is_symlink():
            alias.unlink()
        if "symlink" in name:
            alias.symlink_to(sock)
        else:
            os.link(sock, alias)
        cfg = {"unix": str(alias), "sends": [query(f"drop table {table}").hex()]}
    else:
        cfg, env = rt_pg_cases(table, "awtest")[name]
    cfg = {**cfg, "mode": "pg", "host": "127.0.0.1", "port": pg.port, "db": "awtest", "tls": tls}
    out = run_client(agent, client, cfg, env)
    time.sleep(0.2)
    logged = f"drop table {table}" in "\n".join(logged_messages(pg)).lower()
    try:
        alive = survives(pg, table)
    except subprocess.CalledProcessError:   # the table is gone
        alive = False
    return out, alive, logged


@pytest.mark.parametrize("name", _open(RT_TCP))
def test_rt_drop_over_tcp_is_refused(guard: Daemon, agent: Path, client: Path, pg: PgServer, name: str) -> None:
    out, alive, logged = _rt_attack(pg, agent, client, False, name)
    print(f"RT tcp | {name} | {out} | table survives={alive} | logged={logged}")
    assert alive and not logged, (name, out)


@pytest.mark.parametrize("name", _open(RT_TLS))
def test_rt_drop_over_tls_is_refused(guard: Daemon, agent: Path, client: Path, pg_tls: PgServer, name: str) -> None:
    out, alive, logged = _rt_attack(pg_tls, agent, client, True, name)
    print(f"RT tls | {name} | {out} | table survives={alive} | logged={logged}")
    assert alive and not logged, (name, out)


class Recorder11(Recorder):
    protocol_version = "HTTP/1.1"   # keeps connections alive: a second request on one connection
    do_PROPFIND = Recorder._answer  # noqa: N815 (http.server's name): a method of 8 letters (WebDAV)


@pytest.fixture(scope="module")
def web11() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder11)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _req(line: str, host: str = "a", extra: str = "") -> bytes:
    return f"{line}\r\nHost: {host}\r\n{extra}\r\n".encode()


RT_HTTP = {
    "pipelined DELETE behind a GET in one send": ([_req("GET /fine HTTP/1.1") + _req("DELETE /admin/rt-1 HTTP/1.1")], "/admin/rt-1"),
    "kept-alive second request, whole in its send": ([_req("GET /fine HTTP/1.1"), _req("DELETE /admin/rt-2 HTTP/1.1")], "/admin/rt-2"),
    "kept-alive second request, method cut": (
        [_req("GET /fine HTTP/1.1"), b"DEL", _req("ETE /admin/rt-3 HTTP/1.1")], "/admin/rt-3"),
    "POST with a body, DELETE in the same send": (
        [_req("POST /fine HTTP/1.1", extra="Content-Length: 5\r\n") + b"hello" + _req("DELETE /admin/rt-4 HTTP/1.1")],
        "/admin/rt-4"),
    "two spaces after the method": ([_req("DELETE  /admin/rt-5 HTTP/1.1")], "/admin/rt-5"),
    "a tab after the method": ([_req("DELETE\t/admin/rt-6 HTTP/1.1")], "/admin/rt-6"),
    "absolute-form target": ([_req("DELETE http://a/admin/rt-7 HTTP/1.1")], "/admin/rt-7"),
    # a GET handler that reads no body (http.server's) leaves the "body" to be read as a request
    "a request in a body the server does not read, in its own send": (
        [_req("GET /fine HTTP/1.1", extra="Content-Length: 41\r\n"), _req("DELETE /admin/rt-13 HTTP/1.1")],
        "/admin/rt-13"),
    "a request in a body the server does not read, in the same send": (
        [_req("GET /fine HTTP/1.1", extra="Content-Length: 41\r\n") + _req("DELETE /admin/rt-14 HTTP/1.1")],
        "/admin/rt-14"),
    "a request in a body the server does not read, in the same send, cut past its path prefix": (
        [_req("GET /fine HTTP/1.1", extra="Content-Length: 41\r\n") + b"DELETE /admin/rt-15",
         b" HTTP/1.1\r\nHost: a\r\n\r\n"], "/admin/rt-15"),
    "a request in a body, behind a POST with its own body, in one send": (
        [_req("POST /fine HTTP/1.1", extra="Content-Length: 5\r\n") + b"hello"
         + _req("GET /fine HTTP/1.1", extra="Content-Length: 41\r\n") + _req("DELETE /admin/rt-16 HTTP/1.1")],
        "/admin/rt-16"),
    "nine requests pipelined in one send, the last a DELETE (past the guard's tail calls)": (
        [b"".join(_req(f"GET /fine{i} HTTP/1.1") for i in range(9)) + _req("DELETE /admin/rt-17 HTTP/1.1")],
        "/admin/rt-17"),
    "absolute form with another scheme": ([_req("DELETE ftp://a/admin/rt-18 HTTP/1.1")], "/admin/rt-18"),
    "four blanks before the target": ([_req("DELETE    /admin/rt-19 HTTP/1.1")], "/admin/rt-19"),
    "a body that starts a request line cut at its send's end, before the path's prefix": (
        [_req("GET /fine HTTP/1.1", extra="Content-Length: 41\r\n") + b"DELETE /adm",
         b"in/rt-20 HTTP/1.1\r\nHost: a\r\n\r\n"], "/admin/rt-20"),
    "TCP Fast Open request": ([], "/admin/rt-8"),
    "Host header past 256 bytes of headers": (
        [_req("GET /rt-9 HTTP/1.1", host="a", extra="").replace(b"Host: a", b"X-Pad: " + b"p" * 300 + b"\r\nHost: secrets.internal")],
        "secrets.internal"),
    "one byte a send, another socket between (sk_msg frags fill)": ([], "/admin/rt-10"),
    "a leading empty line": ([b"\r\n" + _req("DELETE /admin/rt-11 HTTP/1.1")], "/admin/rt-11"),
    "long path": ([_req("DELETE /admin/" + "a" * 300 + "/rt-12 HTTP/1.1")], "/rt-12"),
    # spellings of a denied host a server reads as that host (Python's http.server takes each)
    "Host with a fully qualified name's trailing dot": ([_req("GET /rt-21 HTTP/1.1", host="secrets.internal.")],
                                                        "GET /rt-21"),
    "Host with its port and a trailing dot": ([_req("GET /rt-22 HTTP/1.1", host="Secrets.Internal.:80")],
                                              "GET /rt-22"),
    "Host followed by a tab": ([b"GET /rt-23 HTTP/1.1\r\nHost: secrets.internal\t\r\n\r\n"], "GET /rt-23"),
    "Host folded onto the next line": ([b"GET /rt-24 HTTP/1.1\r\nHost:\r\n secrets.internal\r\n\r\n"], "GET /rt-24"),
    # a request that names no host goes to the server's default site, which may be the denied one
    "no Host header (HTTP/1.0)": ([b"GET /rt-25 HTTP/1.0\r\n\r\n"], "GET /rt-25"),
    "HTTP/0.9 (no version, no headers)": ([b"GET /rt-26\r\n"], "GET /rt-26"),
    # red team, on the first fix: a first line that does not end in exactly " HTTP/1.x" was not
    # taken for HTTP, so a Host the kernel did not read met no rule
    "HTTP/0.9 with a tab": ([b"GET\t/rt-27\r\n"], "GET /rt-27"),
    "DELETE as HTTP/0.9, no Host": ([b"DELETE /rt-28 HTTP/0.9\r\n\r\n"], "DELETE /rt-28"),
    "a request line past the window, Host after it": (
        [b"DELETE /" + b"a" * 260 + b" HTTP/1.1\r\nHost: secrets.internal\r\n\r\n"], "secrets.internal"),
    "a blank after the version, Host past 256 bytes": (
        [b"DELETE /rt-30 HTTP/1.1 \r\nX-Pad: " + b"p" * 300 + b"\r\nHost: secrets.internal\r\n\r\n"],
        "secrets.internal"),
    # red team: a method the kernel does not read (8 letters) made the connection neither Postgres
    # nor HTTP, and what followed it on the kept-alive connection went unread
    "a DELETE kept alive behind a PROPFIND": (
        [_req("PROPFIND /fine HTTP/1.1"), _req("DELETE /admin/rt-31 HTTP/1.1")], "/admin/rt-31"),
    # red team: a method the kernel does not read names no host or path it reads, so a request with
    # one met no host or path rule (now refused under such rules, whatever its host)
    "a PROPFIND to the denied host, the connection's first request": (
        [_req("PROPFIND /rt-32 HTTP/1.1", host="secrets.internal")], "PROPFIND /rt-32"),
    "a PROPFIND to the denied host, kept alive behind a GET": (
        [_req("GET /fine HTTP/1.1"), _req("PROPFIND /rt-33 HTTP/1.1", host="secrets.internal")], "PROPFIND /rt-33"),
    "absolute form with a blank after the version": (
        [b"DELETE http://secrets.internal/admin/rt-29 HTTP/1.1 \r\nHost: public.example\r\n\r\n"], "/rt-29"),
}


@pytest.mark.parametrize("name", _open(list(RT_HTTP)))
def test_rt_http_is_refused(guard: Daemon, agent: Path, client: Path, web11: int, name: str) -> None:
    sends, marker = RT_HTTP[name]
    cfg: dict = {"mode": "http", "host": "127.0.0.1", "port": web11, "sends": [s.hex() for s in sends]}
    if name == "TCP Fast Open request":
        cfg |= {"how": "tfo", "tfo_first": _req("DELETE /admin/rt-8 HTTP/1.1").hex(), "sends": []}
    if name.startswith("one byte a send"):
        r = _req("DELETE /admin/rt-10 HTTP/1.1")
        cfg |= {"interleave": True, "sends": cuts(r, *range(1, len(r))), "pause": 0.01}
    Recorder.seen.clear()
    out = run_client(agent, client, cfg)
    time.sleep(0.2)
    print(f"RT http | {name} | {out} | seen={Recorder.seen}")
    assert not [s for s in Recorder.seen if marker in s and (s.startswith(("DELETE", marker)) or "secrets" in marker)], \
        (name, out)


def test_http_host_spellings_of_an_allowed_host_pass(guard: Daemon, agent: Path, client: Path, web11: int) -> None:
    """The ordinary spellings of a host no rule names, in the same session: not refused."""
    sends = [_req("GET /ok-1 HTTP/1.1", host="fine.internal."), _req("GET /ok-2 HTTP/1.1", host="FINE.internal:80"),
             b"GET /ok-3 HTTP/1.1\r\nHost:\tfine.internal \r\n\r\n"]
    Recorder.seen.clear()
    out = run_client(agent, client, {"mode": "http", "host": "127.0.0.1", "port": web11, "sends": [s.hex() for s in sends]})
    time.sleep(0.2)
    assert [s.split()[1] for s in Recorder.seen] == ["/ok-1", "/ok-2", "/ok-3"], (out, Recorder.seen)


# ---- Postgres TLS from a library the uprobes do not read -------------------------------------

NODE_PG_TLS = r"""
// Postgres over Node's own TLS: its OpenSSL encrypts into memory and libuv sends the records
// later, outside any SSL_write.  SSLRequest, a handshake on the same socket, then a
// StartupMessage and the statement; prints what happened.
const net = require("net"), tls = require("tls");
const [port, sql] = process.argv.slice(2);
const msg = (type, body) => { const h = Buffer.alloc(5); h.write(type); h.writeInt32BE(4 + body.length, 1);
                              return Buffer.concat([h, body]); };
const params = Buffer.from("user\0postgres\0database\0awtest\0\0");
const start = Buffer.alloc(8); start.writeInt32BE(8 + params.length, 0); start.writeInt32BE(196608, 4);
const sock = net.connect(Number(port), "127.0.0.1", () => {
  const req = Buffer.alloc(8); req.writeInt32BE(8, 0); req.writeInt32BE(80877103, 4); sock.write(req);
});
sock.on("error", (e) => { console.log("socket error " + e.code); process.exit(2); });
sock.once("data", (answer) => {
  if (answer[0] !== 0x53) { console.log("no TLS: " + answer[0]); process.exit(3); }
  const t = tls.connect({socket: sock, rejectUnauthorized: false}, () => {
    t.write(Buffer.concat([start, params]));
    let buf = Buffer.alloc(0), sent = false;
    t.on("data", (d) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 5 && buf.length >= 1 + buf.readInt32BE(1)) {
        const type = String.fromCharCode(buf[0]);
        buf = buf.subarray(1 + buf.readInt32BE(1));
        if (type !== "Z") continue;                       // ReadyForQuery
        if (sent) { console.log("ran"); process.exit(0); }
        sent = true;
        t.write(msg("Q", Buffer.from(sql + "\0")));
      }
    });
  });
  t.on("error", (e) => { console.log("tls error " + e.code); process.exit(2); });
});
setTimeout(() => { console.log("timeout"); process.exit(4); }, 15000);
"""


def test_postgres_tls_from_a_library_the_guard_does_not_read_is_refused(
        guard: Daemon, agent: Path, pg_tls: PgServer, tmp_path: Path) -> None:
    """A Go, Java, rustls or Node client encrypts its statements where no uprobe reads them: after
    its SSLRequest, its TLS records leave from outside every OpenSSL call the guard watches, and are
    refused (EACCES), with a verdict that says so; a psql in the same session, whose OpenSSL is
    watched, runs as before (and its denied statement is refused as before)."""
    table = "rt_node_tls"
    pg_tls.psql("awtest", f"drop table if exists {table}; create table {table} (a int); insert into {table} values (1)")
    script = tmp_path / "pg_tls.js"
    script.write_text(NODE_PG_TLS)
    r = _as_agent(agent, f"node {script} {pg_tls.port} 'drop table {table}'")
    assert "ran" not in r.stdout, r
    time.sleep(0.2)
    assert survives(pg_tls, table)
    assert f"drop table {table}" not in "\n".join(logged_messages(pg_tls)).lower()

    def refused() -> list[dict]:
        return [e for e in guard.events(kinds=["verdict"]) if e["verdict"]["rule"] == "unjudged-send"
                and "Postgres over TLS" in e["verdict"]["mechanism"] and e["process"]["exe"].endswith("node")]

    verdict = wait_for(refused, 20, what="the unjudged-send verdict of the Node client")[0]["verdict"]
    assert verdict["prevented"] and verdict["action"] == "deny", verdict
    ok = _as_agent(agent, f"psql 'host=127.0.0.1 port={pg_tls.port} user=postgres dbname=awtest sslmode=require' "
                          f"-Atc 'select count(*) from {table}'")
    assert ok.stdout.strip() == "1", ok
    denied = _as_agent(agent, f"psql 'host=127.0.0.1 port={pg_tls.port} user=postgres dbname=awtest "
                              f"sslmode=require' -Atc 'drop table {table}'")
    assert denied.returncode != 0 and survives(pg_tls, table), denied


CALLBACK_CARRIER = r"""
# Postgres over a TLS stack no uprobe reads (a libssl copy deleted from disk, through memory BIOs),
# its records sent from a callback of the system's OpenSSL running inside SSL_write/SSL_read of
# another, watched, connection on the same thread: the thread is inside a watched call, but not one
# on this socket.  Prints what happened.
import ctypes as C, os, shutil, socket, struct, sys, tempfile
port, sql = int(sys.argv[1]), sys.argv[2]
P = C.c_void_p
CB = C.CFUNCTYPE(None, C.c_int, C.c_int, C.c_int, C.c_void_p, C.c_size_t, C.c_void_p, C.c_void_p)
watched, crypto = C.CDLL("libssl.so.3"), C.CDLL("libcrypto.so.3")   # first: a bare name finds a loaded copy
copy = os.path.join(tempfile.mkdtemp(), "libssl-unread.so.3")
shutil.copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", copy)
unread = C.CDLL(copy)
os.unlink(copy)
for lib in (watched, unread):
    for name, res, args in (("TLS_client_method", P, []), ("SSL_CTX_new", P, [P]), ("SSL_new", P, [P]),
                            ("SSL_set_fd", C.c_int, [P, C.c_int]), ("SSL_connect", C.c_int, [P]),
                            ("SSL_write", C.c_int, [P, C.c_char_p, C.c_int]),
                            ("SSL_read", C.c_int, [P, C.c_char_p, C.c_int]), ("SSL_set_bio", None, [P, P, P]),
                            ("SSL_set_connect_state", None, [P]), ("SSL_do_handshake", C.c_int, [P]),
                            ("SSL_set_msg_callback", None, [P, CB])):
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
for name, res, args in (("BIO_new", P, [P]), ("BIO_s_mem", P, []), ("BIO_read", C.c_int, [P, C.c_char_p, C.c_int]),
                        ("BIO_write", C.c_int, [P, C.c_char_p, C.c_int]), ("BIO_ctrl_pending", C.c_size_t, [P])):
    f = getattr(crypto, name)
    f.restype, f.argtypes = res, args
params = b"user\0postgres\0database\0awtest\0\0"
startup = struct.pack("!II", len(params) + 8, 196608) + params
def query(q):
    body = q.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body
def tls_request():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(struct.pack("!II", 8, 80877103))
    assert s.recv(1) == b"S"
    return s

# the carrier: an ordinary Postgres TLS connection through the watched OpenSSL
k1 = tls_request()
s1 = watched.SSL_new(watched.SSL_CTX_new(watched.TLS_client_method()))
watched.SSL_set_fd(s1, k1.fileno())
assert watched.SSL_connect(s1) == 1
def until_ready(read):
    buf = b""
    while not (len(buf) >= 6 and buf[-6:-1] == b"Z\0\0\0\x05"):
        got = read()
        if not got:
            return buf
        buf += got
    return buf
def s1_read():
    chunk = C.create_string_buffer(65536)
    n = watched.SSL_read(s1, chunk, 65536)
    return chunk.raw[:n] if n > 0 else b""
watched.SSL_write(s1, startup, len(startup))
until_ready(s1_read)
queue, errors = [], []
def flush(*_):
    while queue:
        try:
            k2.sendall(queue.pop(0))
        except OSError as e:
            errors.append(e.errno)
hook = CB(flush)
watched.SSL_set_msg_callback(s1, hook)
def carry(data):                       # sent from inside the carrier's SSL_write and SSL_read
    queue.append(data)
    q = query("select 1")
    watched.SSL_write(s1, q, len(q))
    until_ready(s1_read)
    if errors:
        print("refused", errors)
        sys.exit(0)

# the hidden connection: TLS from the unread copy, into memory
k2 = tls_request()
s2 = unread.SSL_new(unread.SSL_CTX_new(unread.TLS_client_method()))
rb, wb = crypto.BIO_new(crypto.BIO_s_mem()), crypto.BIO_new(crypto.BIO_s_mem())
unread.SSL_set_bio(s2, rb, wb)
unread.SSL_set_connect_state(s2)
def out():
    n = crypto.BIO_ctrl_pending(wb)
    buf = C.create_string_buffer(max(n, 1))
    got = crypto.BIO_read(wb, buf, n) if n else 0
    return buf.raw[:max(got, 0)]
def fill():
    data = k2.recv(65536)
    crypto.BIO_write(rb, data, len(data))
unread.SSL_do_handshake(s2)
carry(out())                           # the ClientHello
while True:
    fill()
    done = unread.SSL_do_handshake(s2) == 1
    pending = out()
    if pending:
        carry(pending)
    if done:
        break
def s2_read():
    chunk = C.create_string_buffer(65536)
    while True:
        n = unread.SSL_read(s2, chunk, 65536)
        if n > 0:
            return chunk.raw[:n]
        fill()
for message in (startup, query(sql)):
    unread.SSL_write(s2, message, len(message))
    carry(out())
    until_ready(s2_read)
print("ran")
"""


def test_tls_records_sent_from_a_callback_inside_another_connections_call_are_refused(
        guard: Daemon, agent: Path, pg_tls: PgServer, tmp_path: Path) -> None:
    """The thread is inside a watched OpenSSL call, but on another connection: a callback run in
    it (the message callback here; a signal handler likewise) sends the records of a TLS stack no
    uprobe reads on a Postgres connection.  The send must be on the socket of the object whose call
    vouches for the thread (the ClientHello and each call's own sends tie objects to sockets), so it
    is refused (red team)."""
    table = "rt_cb_carrier"
    pg_tls.psql("awtest", f"drop table if exists {table}; create table {table} (a int); insert into {table} values (1)")
    script = tmp_path / "carrier.py"
    script.write_text(CALLBACK_CARRIER)
    r = _as_agent(agent, f"{sys.executable} {script} {pg_tls.port} 'drop table {table}'")
    assert "refused [13" in r.stdout and "ran" not in r.stdout, r      # EACCES
    time.sleep(0.2)
    assert survives(pg_tls, table)
    assert f"drop table {table}" not in "\n".join(logged_messages(pg_tls)).lower()
    wait_for(lambda: [e for e in guard.events(kinds=["verdict"]) if e["verdict"]["rule"] == "unjudged-send"
                      and e["process"]["pid"] and "Postgres over TLS" in e["verdict"]["mechanism"]],
             20, what="the unjudged-send verdict")


def test_tls_request_followed_by_anything_but_a_handshake_or_a_startup_is_refused(
        guard: Daemon, agent: Path, pg: PgServer) -> None:
    """After an SSLRequest or a GSSENCRequest only a TLS handshake (SSLRequest) or a StartupMessage
    in the clear may follow; bytes behind the request in its own send, or a GSSAPI token, are sent by
    something no guard reads, and are refused."""
    code = ("import socket, struct, sys; s = socket.create_connection(('127.0.0.1', %d)); "
            "s.sendall(struct.pack('!ii', 8, %d)); s.recv(1); "
            "s.sendall(struct.pack('!i', 40) + b'x' * 36); print('sent')")
    for request in (80877103, 80877104):
        r = _as_agent(agent, f'{sys.executable} -c "{code % (pg.port, request)}"')
        assert "sent" not in r.stdout and "PermissionError" in r.stderr, r


# ---- PostgreSQL 17's direct TLS: a ClientHello that offers ALPN "postgresql", no SSLRequest ------

def client_hello(*names: bytes, pad: int = 0, tls13: bool = True, early: bool = False) -> bytes:
    """A ClientHello handshake message (not a record) offering ALPN `names`, after a padding
    extension of `pad` bytes when asked, TLS 1.3 and 1.2 (supported_versions) unless not, and
    early data when asked: the shape a server walks, which is all the guard reads."""
    ext = b""
    if pad:
        ext += struct.pack("!HH", 21, pad) + b"\0" * pad
    if tls13:
        ext += struct.pack("!HHB", 43, 5, 4) + b"\x03\x04\x03\x03"
    if early:
        ext += struct.pack("!HH", 42, 0)
    if names:
        alpn = b"".join(bytes([len(n)]) + n for n in names)
        ext += struct.pack("!HHH", 16, len(alpn) + 2, len(alpn)) + alpn
    body = b"\x03\x03" + b"\x11" * 32 + b"\x00" + struct.pack("!H", 2) + b"\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(ext)) + ext
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, *cuts: int) -> bytes:
    """A handshake message in TLS records of type 22, cut at these offsets."""
    bounds = [0, *cuts, len(message)]
    return b"".join(b"\x16\x03\x01" + struct.pack("!H", b - a) + message[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True))


RAW_SEND = ("import socket, sys, time; s = socket.create_connection(('127.0.0.1', %d))\n"
            "for h in sys.argv[1:]: s.sendall(bytes.fromhex(h)); time.sleep(0.05)\n"
            "print('sent')")

DIRECT_TLS = {   # name: (the bytes, refused, the reason the verdict names)
    "a ClientHello offering postgresql, from no watched OpenSSL": (
        records(client_hello(b"h2", b"postgresql")), True, "Postgres over TLS"),
    "the same cut across two records inside the name": (
        records(client_hello(b"postgresql"), client_hello(b"postgresql").index(b"postgresql") + 4), True,
        "ClientHello the guard cannot read whole"),
    "the same behind 5000 bytes of padding (past the guard's window)": (
        records(client_hello(b"postgresql", pad=5000)), True, "ClientHello the guard cannot read whole"),
    "postgresql as the 17th name offered": (
        records(client_hello(*[b"x%02d" % i for i in range(16)], b"postgresql")), True,
        "ClientHello the guard cannot read whole"),
    # red team: a first send of one byte was judged on what the scratch held after it
    "the same, its first byte in a send of its own": (
        [records(client_hello(b"postgresql"))[:1], records(client_hello(b"postgresql"))[1:]], True, "Postgres over TLS"),
    "the same, the record cut across two sends": (
        [records(client_hello(b"postgresql"))[:40], records(client_hello(b"postgresql"))[40:]], True,
        "Postgres over TLS"),
    "a ClientHello offering h2 and http/1.1 (HTTPS)": (records(client_hello(b"h2", b"http/1.1")), False, ""),
    "a ClientHello offering no ALPN": (records(client_hello()), False, ""),
}


@pytest.mark.parametrize("name", list(DIRECT_TLS))
def test_postgres_direct_tls_is_read_as_postgres_over_tls(guard: Daemon, agent: Path, pg: PgServer, name: str) -> None:
    """PostgreSQL 17 takes a ClientHello as a connection's first bytes when its ALPN offers
    "postgresql" (`sslnegotiation=direct`, no SSLRequest).  Such a connection's sends must come from
    inside a watched OpenSSL call, as after an SSLRequest; one whose offer the guard cannot read
    whole (cut across records, past its window, more names than it reads) is refused in a session
    under SQL rules.  Other ClientHellos (HTTPS) go as before.  The server here is PostgreSQL 15,
    which takes no direct TLS: the send reaching it is what is asserted, not what it does next."""
    hello, refused, reason = DIRECT_TLS[name]
    raw_sends(guard, agent, pg.port, hello if isinstance(hello, list) else [hello], refused, reason)


def raw_sends(guard: Daemon, agent: Path, port: int, sends: list[bytes], refused: bool, reason: str) -> None:
    """Send these bytes, one send each, from the agent: all sent, or refused (EACCES) with an
    unjudged-send verdict whose mechanism names `reason`."""
    r = _as_agent(agent, f'{sys.executable} -c "{RAW_SEND % port}" ' + " ".join(h.hex() for h in sends))
    if not refused:
        assert "sent" in r.stdout, r
        return
    assert "sent" not in r.stdout and "PermissionError" in r.stderr, r
    wait_for(lambda: [e for e in guard.events(kinds=["verdict"]) if e["verdict"]["rule"] == "unjudged-send"
                      and e["process"]["pid"] and reason in e["verdict"]["mechanism"]], 20, what=reason)


@pytest.fixture(scope="module")
def sink() -> Iterator[int]:
    """A TCP server that reads and keeps every connection open: a TLS client's later flights meet
    the guard, not a server that hung up on the first."""
    srv = socket.create_server(("127.0.0.1", 0))

    def drain(c: socket.socket) -> None:
        with c:
            while c.recv(65536):
                pass

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=drain, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


NOT_A_HELLO = {   # name: (sends, refused, the reason the verdict names)
    # a MySQL client's handshake response of 790 bytes: its length (16 03 00) and number (01)
    "a MySQL handshake response of 790 bytes (16 03 00 01 ...)": (
        [b"\x16\x03\x00\x01" + b"\x8d\xa6\x0f\x00" + bytes(782)], False, ""),
    "a handshake record whose first message is not a ClientHello": (
        [b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"], False, ""),
    # OpenSSL skips empty records before the ClientHello (up to 32 of them)
    "an empty handshake record, then a ClientHello offering postgresql": (
        [b"\x16\x03\x01\x00\x00" + records(client_hello(b"postgresql"))], True,
        "ClientHello the guard cannot read whole"),
}


@pytest.mark.parametrize("name", list(NOT_A_HELLO))
def test_first_bytes_that_start_like_tls_but_hold_no_client_hello(guard: Daemon, agent: Path, sink: int,
                                                                   name: str) -> None:
    """A first send of 16 03 is a TLS handshake record only when it holds a ClientHello, the first
    message a server takes: its type (1) is the record's first byte, unless the record is empty.
    Anything else is neither Postgres nor HTTP and goes as such (a MySQL client was refused)."""
    sends, refused, reason = NOT_A_HELLO[name]
    raw_sends(guard, agent, sink, sends, refused, reason)


CCS = b"\x14\x03\x03\x00\x01\x01"
ALERT = b"\x15\x03\x03\x00\x02\x01\x5a"   # user_canceled, which a TLS 1.3 server reads on past
HRR = {   # name: (sends, refused, the reason the verdict names)
    "a second ClientHello (after a HelloRetryRequest) offering postgresql": (
        [records(client_hello()), CCS + records(client_hello(b"postgresql"))], True, "Postgres over TLS"),
    "the same behind an alert record": (
        [records(client_hello(b"h2")), CCS + ALERT + records(client_hello(b"postgresql"))], True, "Postgres over TLS"),
    "the same cut across two records": (
        [records(client_hello()), records(client_hello(b"postgresql"), 30)], True,
        "ClientHello the guard cannot read whole"),
    # red team: the second hello's first 4 bytes in a record of their own, so no record looked like
    # a ClientHello; an early application-data record ended the watch; Go's CCS alone was refused
    "the second ClientHello's header in a record of its own": (
        [records(client_hello()), CCS + records(client_hello(b"postgresql"), 4)], True,
        "ClientHello the guard cannot read whole"),
    # red team, round 3: the second hello sent ahead, in the tail of the first one's record
    "a second ClientHello in the first one's record": (
        [b"\x16\x03\x01" + struct.pack("!H", len(client_hello()) + len(client_hello(b"postgresql")))
         + client_hello() + client_hello(b"postgresql")], True, "ClientHello the guard cannot read whole"),
    "a first ClientHello offering early data": (
        [records(client_hello(b"http/1.1", early=True))], True, "ClientHello the guard cannot read whole"),
    "a CCS in a send of its own, then a second ClientHello offering h2": (
        [records(client_hello()), CCS, records(client_hello(b"h2"))], False, ""),
    "TLS 1.2 only: a later record that starts like a ClientHello is not one": (
        [records(client_hello(b"http/1.1", tls13=False)), CCS + b"\x16\x03\x03\x00\x28\x01" + bytes(39),
         b"\x17\x03\x03\x00\x10" + b"\xaa" * 16], False, ""),
    "TLS 1.2's later flights, then data": (
        [records(client_hello(b"http/1.1")), records(b"\x10\x00\x00\x02\x01\x00") + CCS
         + b"\x16\x03\x03\x00\x28" + bytes(range(0x40, 0x68)), b"\x17\x03\x03\x00\x10" + b"\xaa" * 16,
         b"\x17\x03\x03\x00\x10" + records(client_hello(b"postgresql"))[:16]], False, ""),
}


@pytest.mark.parametrize("name", list(HRR))
def test_a_second_client_hello_is_read_as_the_first(guard: Daemon, agent: Path, sink: int, name: str) -> None:
    """After a HelloRetryRequest a TLS 1.3 client sends a second ClientHello in the clear, and the
    server takes that one's ALPN: it is read as the first, until the client's first application
    data.  What follows that (records sent under the keys) is not read for one."""
    sends, refused, reason = HRR[name]
    raw_sends(guard, agent, sink, sends, refused, reason)


NODE_DIRECT_TLS = r"""
const tls = require("tls");
const [port, alpn] = process.argv.slice(2);
const t = tls.connect({host: "127.0.0.1", port: Number(port), ALPNProtocols: [alpn], rejectUnauthorized: false},
                      () => { console.log("handshake"); process.exit(0); });
t.on("error", (e) => { console.log("tls error " + e.code); process.exit(2); });
setTimeout(() => { console.log("timeout"); process.exit(4); }, 5000);
"""

PY_DIRECT_TLS = ("import socket, ssl, sys; ctx = ssl.create_default_context(); ctx.check_hostname = False; "
                 "ctx.verify_mode = ssl.CERT_NONE; ctx.set_alpn_protocols(['postgresql']); "
                 "s = socket.create_connection(('127.0.0.1', %d))\n"
                 "try: ctx.wrap_socket(s)\nexcept OSError as e: print(type(e).__name__, e.errno)")


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_postgres_direct_tls_from_node_is_refused_and_from_watched_openssl_is_not(
        guard: Daemon, agent: Path, pg: PgServer, tmp_path: Path) -> None:
    """Node's TLS (memory BIOs: its records leave after the OpenSSL call) offering "postgresql" is
    refused at its ClientHello; offering h2 it is HTTPS and goes.  Python's ssl on the system's
    OpenSSL (a socket BIO, as libpq's) offering "postgresql" goes: its handshake is sent from inside
    SSL_do_handshake."""
    script = tmp_path / "direct.js"
    script.write_text(NODE_DIRECT_TLS)
    r = _as_agent(agent, f"node {script} {pg.port} postgresql")
    assert "handshake" not in r.stdout and "refused" in r.stderr, r   # told on its terminal; Node waits
    wait_for(lambda: [e for e in guard.events(kinds=["verdict"]) if e["verdict"]["rule"] == "unjudged-send"
                      and e["process"]["exe"].endswith("node") and "Postgres over TLS" in e["verdict"]["mechanism"]],
             20, what="the Node client's unjudged-send verdict")
    r = _as_agent(agent, f"node {script} {pg.port} h2")
    assert "EACCES" not in r.stdout and "tls error" in r.stdout, r   # PostgreSQL 15 hangs up on it
    r = _as_agent(agent, f'{sys.executable} -c "{PY_DIRECT_TLS % pg.port}"')
    assert "PermissionError" not in r.stdout and " 13" not in r.stdout, r


# ---- ordinary clients must neither hang nor be refused ---------------------------------------

def _as_agent(agent: Path, cmd: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(agent), "-c", cmd], capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def test_rt_ordinary_clients(guard: Daemon, agent: Path, pg: PgServer, pg_tls: PgServer, web11: int, web: int) -> None:
    t0 = time.monotonic()
    r = _as_agent(agent, f"psql -h 127.0.0.1 -p {pg.port} -U postgres -d awtest -Atc 'select 41+1'")
    assert r.stdout.strip() == "42", r
    r = _as_agent(agent, f"psql 'host=127.0.0.1 port={pg_tls.port} user=postgres dbname=awtest sslmode=require' -Atc 'select 41+1'")
    assert r.stdout.strip() == "42", r
    subprocess.run(["pgbench", "-i", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "awtest"],
                   check=True, capture_output=True)   # outside the agent: -i drops tables
    r = _as_agent(agent, f"pgbench -n -S -t 200 -c 2 -h 127.0.0.1 -p {pg.port} -U postgres awtest")
    assert r.returncode == 0 and "number of transactions actually processed: 400" in r.stdout, r
    r = _as_agent(agent, f"pgbench -n -S -M extended -t 200 -h 127.0.0.1 -p {pg.port} -U postgres awtest")
    assert r.returncode == 0, r
    r = _as_agent(agent, f"pgbench -n -S -M prepared -t 200 -h 127.0.0.1 -p {pg.port} -U postgres awtest")
    assert r.returncode == 0, r
    for port in (web, web11):
        r = _as_agent(agent, f"curl -sS -m 10 http://127.0.0.1:{port}/fine && curl -sS -m 10 -X POST -d hello http://127.0.0.1:{port}/fine2")
        assert r.stdout == "okok", r
        # a body that starts with a word in capitals is a body (a query to ClickHouse's HTTP port)
        r = _as_agent(agent, f"curl -sS -m 10 -d 'SELECT 1' http://127.0.0.1:{port}/q && "
                             f"curl -sS -m 10 -d 'DELETE FROM t WHERE a = 1' http://127.0.0.1:{port}/q2")
        assert r.stdout == "okok", r
        code = ("import http.client as h; c=h.HTTPConnection('127.0.0.1', " + str(port) + ", timeout=10); "
                "[(c.request('GET', '/k' + str(i)), print(c.getresponse().read().decode(), end='')) for i in range(3)]")
        r = _as_agent(agent, f'{sys.executable} -c "{code}"')
        assert r.stdout == "okokok", r
    # bodies on a kept-alive connection (the kernel skips them by Content-Length): every request
    # is served, a body that looks like a request too (this server reads no chunked bodies)
    code = ("import http.client as h; c=h.HTTPConnection('127.0.0.1', " + str(web11) + ", timeout=10); "
            "[(c.request(m, '/b' + str(i), body=b), print(c.getresponse().read().decode(), end='')) "
            "for i, (m, b) in enumerate([('POST', 'x' * 5000), ('GET', None), ('POST', 'DELETE /admin/x'), "
            "('GET', None), ('POST', ''), ('GET', None)])]")
    r = _as_agent(agent, f'{sys.executable} -c "{code}"')
    assert r.stdout == "ok" * 6, r
    # curl's Fast Open (TCP_FASTOPEN_CONNECT) is refused, and curl goes on without it: the
    # request is judged as any other
    r = _as_agent(agent, f"curl -sS -m 10 --tcp-fastopen http://127.0.0.1:{web11}/fine")
    assert r.stdout == "ok", r
    r = _as_agent(agent, f"curl -sS -m 10 --tcp-fastopen -X DELETE http://127.0.0.1:{web11}/admin/rt-curl")
    assert r.stdout == "" and "Permission denied" in r.stderr, r
    print(f"RT ordinary clients took {time.monotonic() - t0:.1f}s")


def test_rt_line_protocol_client_is_not_held(guard: Daemon, agent: Path) -> None:
    """Not an HTTP client: a first line `SET k v` (an upper-case word and a space) is corked as a
    request line until its header block ends, which never comes."""
    # a client-first line protocol whose first line looks like a request line (Redis inline
    # commands, IRC's NICK/USER): its first send must not wait for a blank line that never comes
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def answer_lines() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.settimeout(5)
            try:
                data = c.recv(1024)
                c.sendall(b"+OK " + data)
            except OSError:
                pass
            c.close()
    threading.Thread(target=answer_lines, daemon=True).start()
    line_client = ("import socket; s=socket.create_connection(('127.0.0.1', " + str(srv.getsockname()[1]) +
                   ")); s.settimeout(5); s.sendall(b'SET k v\\r\\n'); print(s.recv(100))")
    r0 = subprocess.run([sys.executable, "-c", line_client.replace("\\\\", "\\")], capture_output=True, text=True, timeout=30)
    print(f"RT line protocol client outside the agent: {r0.stdout.strip()} {r0.stderr.strip()[-200:]}")
    r = _as_agent(agent, f'{sys.executable} -c "{line_client}"')
    srv.close()
    print(f"RT line protocol client: {r.stdout.strip()} {r.stderr.strip()[-200:]}")
    assert "+OK SET k v" in r0.stdout, r0
    assert "+OK SET k v" in r.stdout, r   # held: the guard corks the send waiting for a blank line

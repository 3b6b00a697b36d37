"""A red team against the socket capture without a syscall hook (default mode), as an agent would
attack it: urgent data and Fast Open through io_uring and 32-bit calls, a send io_uring runs at
the exit of another system call (whose registers it borrows), a sendmmsg vector steered to
another message, and a tracer that resumes an outside process by exiting.  The server's log is
the ground truth; `rt_capture.c` and `rt_ptrace.c` are the attackers' programs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, make_agent, need_root, wait_for
from pgserver import PgServer
from test_enforce import COMM, POLICY, logged_messages

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    need_root()
    d = Daemon(tmp_path_factory.mktemp("attacks"), [{"name": "guarded", "match": {"comm": [COMM]}}],
               policy=POLICY)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_agent(tmp_path_factory.mktemp("attacks-agent"), COMM)



@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("attack-tools")
    d.chmod(0o755)
    for src, out in (("rt_capture.c", "rt"), ("rt_ptrace.c", "ptx")):
        subprocess.run(["gcc", "-O1", "-o", str(d / out), str(HERE / src)], check=True)
    (d / "victim.c").write_text("#include <unistd.h>\nint main(void) { for (;;) sleep(1); }\n")
    subprocess.run(["gcc", "-O1", "-o", str(d / "victim"), str(d / "victim.c")], check=True)
    return d


def attack(agent: Path, tools: Path, pg: PgServer, *args: str) -> tuple[int, str]:
    p = subprocess.Popen([str(agent), "-c", " ".join([str(tools / "rt"), str(pg.port), "awtest", *args])],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=60)
    return p.pid, out


def trail(guard: Daemon, pid: int) -> list[dict[str, Any]]:
    return guard.session_events(pid, lambda es: any(e["kind"] == "session_end" for e in es))


def unjudged(guard: Daemon, pid: int) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        evs = [e for e in trail(guard, pid) if e["kind"] == "verdict" and e["verdict"]["rule"] == "unjudged-send"]
        return evs or None
    return list(wait_for(found, 20, what="the unjudged-send verdict"))


@pytest.mark.parametrize("mode", ["oob64", "oob32", "oobur", "tfo32"])
def test_urgent_data_or_fast_open_by_any_call_is_refused(guard: Daemon, agent: Path, tools: Path,
                                                         pg: PgServer, mode: str) -> None:
    """Two urgent bytes shift the server's framing past a CopyData (a DROP TABLE the matcher
    reads as data); Fast Open sends before the socket is guarded.  The flags were read from the
    system call's registers, which are io_uring_enter's under io_uring and a 32-bit call's own:
    such a send on a guarded socket is refused, whatever its flags."""
    table = f"at_{mode}"
    pg.psql("awtest", f"drop table if exists {table}; create table {table} (a int); insert into {table} values (1)")
    pid, out = attack(agent, tools, pg, mode, table)
    assert "complete DROP TABLE" not in out, out
    assert pg.psql("awtest", f"select count(*) from {table}").strip() == "1", out
    assert f"drop table {table}" not in "\n".join(logged_messages(pg)).lower()
    assert unjudged(guard, pid)


@pytest.mark.parametrize("mode", ["plain32", "uring"])
def test_a_send_the_capture_cannot_read_does_not_reach_a_guarded_server(guard: Daemon, agent: Path,
                                                                        tools: Path, pg: PgServer,
                                                                        mode: str) -> None:
    """A Query written with int 0x80 or sent by IORING_OP_SEND: the capture cannot read its
    buffer from the registers (a gap in the stream), so under SQL rules it is refused."""
    mark = f"at-mark-{mode}"
    pid, out = attack(agent, tools, pg, mode, mark)
    assert not any(mark in m for m in logged_messages(pg)), out
    assert unjudged(guard, pid)


def test_a_send_io_uring_runs_in_another_calls_exit_records_nothing_false(guard: Daemon, agent: Path,
                                                                          tools: Path, pg: PgServer) -> None:
    """An IORING_OP_SEND linked behind a read of an empty pipe runs when write(pipe, FAKE)
    completes that read: the registers are write()'s, naming FAKE.  The trail recorded FAKE and
    the server ran REAL (red team).  The registers' fd is not the socket: nothing is read from
    them, and under SQL rules the send is refused."""
    real, fake = "select 'REAL-secret-statement'", "select 'FAKE-innocent-stmnt12'"
    pid, out = attack(agent, tools, pg, "forge", f'"{real}"', f'"{fake}"')
    msgs = logged_messages(pg)
    assert not any("REAL-secret" in m for m in msgs) and not any("FAKE-innocent" in m for m in msgs), out
    assert unjudged(guard, pid)
    assert not [e for e in trail(guard, pid) if e["kind"] == "sql" and "FAKE" in json.dumps(e["sql"])]


def test_a_sendmmsg_vector_is_never_read_at_the_wrong_message(guard: Daemon, agent: Path, tools: Path,
                                                              pg: PgServer) -> None:
    """sendmmsg fires the tracepoint once per message and nothing says which: a vector whose
    first call stopped early left a cursor that the second call steered to a FAKE message the
    kernel never sent (red team).  Only a vector of one is read; the rest is a gap."""
    real, fake = "select 'REAL-mmsg-statement'", "select 'FAKE-mmsg-innocent!'"
    pid, out = attack(agent, tools, pg, "mmsgforge", f'"{real}"', f'"{fake}"')
    assert any("REAL-mmsg" in m for m in logged_messages(pg)), out   # it is allowed: it ran
    time.sleep(1.0)
    sql = [e["sql"]["query"] for e in trail(guard, pid) if e["kind"] == "sql"]
    assert not [q for q in sql if "FAKE" in q], sql


@pytest.mark.parametrize("how", ["detach", "exit"])
def test_an_outside_process_a_tracer_resumes_joins_the_session(guard: Daemon, agent: Path, tools: Path,
                                                               tmp_path: Path, how: str) -> None:
    """The agent stops an outside process, rewrites it to exec `touch denied-...`, and lets it run:
    by PTRACE_DETACH, or by exiting (the kernel detaches the tracee after the tracer left the
    tracked map; red team).  Either way it joins the session first, and the policy holds."""
    tmp_path.chmod(0o777)
    target = tmp_path / f"denied-escape-{how}"
    victim = subprocess.Popen([str(tools / "victim")])
    try:
        time.sleep(0.3)
        subprocess.run([str(agent), "-c", f"{tools / 'ptx'} {victim.pid} {how} {target}"],
                       capture_output=True, text=True, timeout=60)
        wait_for(lambda: victim.poll() is not None, 10, what="the rewritten process to end")
        assert not target.exists()
        assert victim.returncode == -9       # killed at its exec of touch, a denied command
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()


@pytest.mark.parametrize("mode", ["plain", "splice", "sendmmsg", "onewrite", "forked", pytest.param(
    "forkfirst", marks=pytest.mark.xfail(strict=True, reason=(
        "a child that shares the socket from before the connect sends after its parent died there: it is "
        "killed at that send, after the bytes are queued for the server (no hook refuses a Unix send)")))])
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_postgres_over_a_unix_socket_by_another_name_runs_nothing(guard: Daemon, agent: Path, pg: PgServer,
                                                                 tmp_path: Path, mode: str, link: str) -> None:
    """A link to `.s.PGSQL.<port>` under another name passes connect_unix.  The server end is known
    by its own bound name at the connect (sk_data_ready): the client is killed there, before it
    sends a byte, so nothing runs however it would have sent them: splice, one sendmmsg, startup
    and query in one write, a child forked after the connect (red team round 2).  Open: a child
    forked before the connect, which shares the socket its parent connects and dies for."""
    table = f"ux_{mode}_{link}"
    pg.psql("awtest", f"drop table if exists {table}; create table {table} (a int); insert into {table} values (1)")
    tmp_path.chmod(0o755)
    alias = tmp_path / "pg-alias"
    sock = pg.sockdir / f".s.PGSQL.{pg.port}"
    if link == "symlink":
        alias.symlink_to(sock)
    else:
        os.link(sock, alias)
    res = subprocess.run([str(agent), "-c", f"{sys.executable} {HERE / 'rt_pg_unix.py'} {alias} {mode} {table}"],
                         capture_output=True, text=True, timeout=60)
    time.sleep(0.5)
    assert pg.psql("awtest", f"select count(*) from {table}").strip() == "1", res
    assert f"drop table {table}" not in "\n".join(logged_messages(pg)).lower(), res
    assert "alive" not in res.stdout, res                       # the client was killed at its connect
    v = wait_for(lambda: [e for e in guard.events(kinds=["verdict"])
                          if e["verdict"]["mechanism"].startswith("SIGKILL at connect or send on a Unix")], 20,
                 what="the Unix-socket verdict")
    assert v[0]["verdict"]["prevented"] is True

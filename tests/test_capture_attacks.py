"""A red team against the socket capture without a syscall hook (default mode), as an agent would
attack it: urgent data and Fast Open through io_uring and 32-bit calls, a send io_uring runs at
the exit of another system call (whose registers it borrows), a sendmmsg vector steered to
another message, and a tracer that resumes an outside process by exiting.  The server's log is
the ground truth; `rt_capture.c` and `rt_ptrace.c` are the attackers' programs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
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


@pytest.mark.parametrize("mode", ["plain", "splice", "sendmmsg", "onewrite", "forked", "forkfirst", "passedfirst"])
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_postgres_over_a_unix_socket_by_another_name_runs_nothing(guard: Daemon, agent: Path, pg: PgServer,
                                                                 tmp_path: Path, mode: str, link: str) -> None:
    """A link to `.s.PGSQL.<port>` under another name passes connect_unix.  The server end is known
    by its own bound name at the connect (sk_data_ready): the client is killed there, before it
    sends a byte, so nothing runs however it would have sent them: splice, one sendmmsg, startup
    and query in one write, a child forked after the connect (red team round 2).  A socket another
    process holds before the connect (a child forked with it, or handed it over SCM_RIGHTS) would
    outlive that kill, connected: its connect is refused instead (connect_unix, EPERM), whatever
    name it reaches."""
    table = f"ux_{mode}_{link}"
    pg.psql("awtest", f"drop table if exists {table}; create table {table} (a int); insert into {table} values (1)")
    tmp_path.chmod(0o755)
    alias = tmp_path / "pg-alias"
    sock = pg.sockdir / f".s.PGSQL.{pg.port}"
    if link == "symlink":
        alias.symlink_to(sock)
    else:
        os.link(sock, alias)
    p = subprocess.Popen([str(agent), "-c", f"{sys.executable} {HERE / 'rt_pg_unix.py'} {alias} {mode} {table}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=60)
    time.sleep(0.5)
    assert pg.psql("awtest", f"select count(*) from {table}").strip() == "1", out
    assert f"drop table {table}" not in "\n".join(logged_messages(pg)).lower(), out
    assert "alive" not in out, out                              # the client was killed at its connect
    verdicts = [e["verdict"] for e in trail(guard, p.pid) if e["kind"] == "verdict"]
    if mode in ("forkfirst", "passedfirst"):
        assert "refused 1" in out and "child could not send 107" in out, out   # EPERM; then ENOTCONN
        (v,) = [v for v in verdicts if v["mechanism"].startswith("cgroup connect_unix (EPERM): a Unix socket "
                                                                   "another process holds")]
    else:
        (v,) = [v for v in verdicts if v["mechanism"].startswith("SIGKILL at connect or send on a Unix")]
    assert v["prevented"] is True and v["action"] == "deny"


FORK_WHILE_CONNECTING = r"""
# One thread connects a Unix socket and waits inside connect() (the listener's backlog is full);
# another forks.  The child would share the socket, connected once the backlog drains.
import os, socket, sys, threading, time
link, marker = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
def connect():
    try:
        s.connect(link)
        print("connected", flush=True)
    except OSError as e:
        print("connect failed", e.errno, flush=True)
t = threading.Thread(target=connect)
t.start()
time.sleep(0.5)
pid = os.fork()
if pid == 0:
    open(marker, "w").close()   # the child's first act
    os._exit(0)
print("child status", os.waitpid(pid, 0)[1], flush=True)
t.join()
time.sleep(1)
print("alive", flush=True)
"""


@pytest.mark.parametrize("name", ["pg", "other"])
def test_a_child_forked_while_a_thread_connects_a_unix_socket_never_runs(guard: Daemon, agent: Path,
                                                                         tmp_path: Path, name: str) -> None:
    """connect_unix saw the socket held by this process alone; another thread forks while the
    connect waits (a full backlog): the child shares the socket, which becomes a connection to
    Postgres (reached through a link), and would outlive the kill at sk_data_ready.  The child is
    killed at its fork, before its first instruction.  Whatever the socket reaches: while the
    connect goes on nothing tells which server it is."""
    tmp_path.chmod(0o777)
    path = tmp_path / (".s.PGSQL.5999" if name == "pg" else "app.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o777)
    srv.listen(0)
    filler = socket.socket(socket.AF_UNIX)
    filler.connect(str(path))          # the backlog of 0 holds this one: the next connect waits
    alias = tmp_path / "alias"
    alias.symlink_to(path)
    marker = tmp_path / "child-ran"
    script = tmp_path / "fork_connect.py"
    script.write_text(FORK_WHILE_CONNECTING)
    p = subprocess.Popen([str(agent), "-c", f"{sys.executable} {script} {alias} {marker}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(2.0)                # the child was forked and killed; the connect still waits
        conns = [srv.accept()[0]]      # the filler's: room for the agent's connect
        srv.settimeout(5)
        conns.append(srv.accept()[0])
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
        srv.close()
        filler.close()
    assert "child status 9" in out, out    # SIGKILL, before it ran
    assert not marker.exists(), out
    if name == "pg":
        assert "alive" not in out, out     # and the parent at its connect to Postgres
    else:
        assert "connected" in out and "alive" in out, out
    verdicts = [e["verdict"] for e in trail(guard, p.pid) if e["kind"] == "verdict"]
    (v,) = [v for v in verdicts if v["rule"] == "unix-connect-fork"]
    assert v["prevented"] is True and v["action"] == "kill"
    assert v["mechanism"].startswith("SIGKILL to the child at its fork, before it ran")
    for c in conns:
        c.close()


UNIX_CLIENT = r"""
# A threaded client of a Unix stream server (not Postgres), which forks after its connect.
import os, socket, sys, threading
s = socket.socket(socket.AF_UNIX)
done = threading.Event()   # the threads live through the connect (README: one exiting during it)
threads = [threading.Thread(target=done.wait) for _ in range(3)]
for t in threads:
    t.start()
s.connect(sys.argv[1])
s.sendall(b"ping\n")
print("reply", s.recv(16), flush=True)
pid = os.fork()
if pid == 0:
    s.sendall(b"child\n")
    os._exit(0)
print("child status", os.waitpid(pid, 0)[1], flush=True)
done.set()
"""


def test_a_threaded_client_of_another_unix_server_connects_and_forks(guard: Daemon, agent: Path,
                                                                      tmp_path: Path) -> None:
    """The checks above leave an ordinary client alone under SQL rules: threads share its
    descriptor table (the file's extra reference is connect()'s own), and a child forked after
    the connect shares a socket whose peer is not Postgres."""
    tmp_path.chmod(0o777)
    path = tmp_path / "app.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o777)
    srv.listen(4)
    got: list[bytes] = []

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            c.sendall(b"pong")
            while data := c.recv(64):
                got.append(data)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    script = tmp_path / "client.py"
    script.write_text(UNIX_CLIENT)
    res = subprocess.run([str(agent), "-c", f"{sys.executable} {script} {path}"], capture_output=True,
                         text=True, timeout=30)
    th.join(5)
    srv.close()
    assert "reply b'pong'" in res.stdout and "child status 0" in res.stdout, res
    assert b"".join(got) == b"ping\nchild\n", res


MANY_THREADS = r"""
import socket, sys, threading
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(int(sys.argv[2]))]
for t in threads:
    t.start()
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("connected", flush=True)
except OSError as e:
    print(f"refused {e.errno}", flush=True)
stop.set()
"""


@pytest.mark.parametrize("threads", [250, 260])
def test_a_process_of_more_threads_than_a_fork_check_reads_connects_no_unix_socket(
        guard: Daemon, agent: Path, tmp_path: Path, threads: int) -> None:
    """The fork check walks 256 threads: a connecting thread past them would go unseen, so under
    SQL rules a process of more threads has its Unix stream connects refused."""
    tmp_path.chmod(0o777)
    path = tmp_path / "app.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o777)
    srv.listen(4)
    script = tmp_path / "many.py"
    script.write_text(MANY_THREADS)
    try:
        res = subprocess.run([str(agent), "-c", f"{sys.executable} {script} {path} {threads}"],
                             capture_output=True, text=True, timeout=60)
    finally:
        srv.close()
    assert ("connected" if threads + 1 <= 256 else "refused 1") in res.stdout, res


def test_a_unix_connect_by_io_uring_is_refused_under_sql_rules(guard: Daemon, agent: Path, tools: Path,
                                                              tmp_path: Path) -> None:
    """IORING_OP_CONNECT: no thread of the process is inside connect() while it goes on (the call
    is io_uring_enter, or a worker's of its own), so a fork's check would not see it: under SQL
    rules such a Unix connect is refused (a connect() of the same socket is not: the test above)."""
    tmp_path.chmod(0o777)
    path = tmp_path / "app.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o777)
    srv.listen(4)
    try:
        res = subprocess.run([str(agent), "-c", f"{tools / 'rt'} 0 x uconnect {path}"],
                             capture_output=True, text=True, timeout=30)
    finally:
        srv.close()
    assert "cqe user_data=1 res=-1" in res.stdout, res   # -EPERM


# ---- red team round 2 of the Unix sharing checks ------------------------------------------
# rt_unix_share.c: a CLONE_FILES child with the table's count balanced by threads that unshare
# theirs, or by a group leader gone; rt_unix_retarget.c: a connect waiting on the agent's own full
# backlog, re-targeted to Postgres while another process gets the socket; rt_unix_churn.c and
# rt_unix_failed.c: ordinary clients the checks must leave alone.


@pytest.fixture(scope="module")
def unix_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("unix-tools")
    d.chmod(0o755)
    for name in ("rt_unix_share", "rt_unix_retarget", "rt_unix_churn", "rt_unix_failed", "rt_unix_chain",
                 "rt_unix_stale", "rt_unix_compat"):
        subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / name), str(HERE / f"{name}.c")], check=True)
    return d


def _table(pg: PgServer, table: str) -> None:
    pg.psql("awtest", f"drop table if exists {table}; create table {table} (a int); insert into {table} values (1)")


def _ran_nothing(pg: PgServer, table: str, out: str) -> None:
    time.sleep(3)   # a survivor's two sends, if there were one, are a second or two apart
    assert pg.psql("awtest", f"select count(*) from {table}").strip() == "1", out
    assert f"drop table {table}" not in "\n".join(logged_messages(pg)).lower(), out


@pytest.mark.parametrize("threads,children,how", [(2, 2, ""), (1, 1, ""), (0, 1, "leader"), (1, 2, "")])
def test_a_table_shared_with_a_clone_files_child_is_known_however_the_count_is_balanced(
        guard: Daemon, agent: Path, pg: PgServer, tmp_path: Path, unix_tools: Path, threads: int,
        children: int, how: str) -> None:
    """CLONE_FILES children share the connecting process's descriptor table; threads that
    unshare theirs (CLONE_THREAD without CLONE_FILES), or a group leader gone, count as threads
    but not as the table's users, and balanced the count (red team).  A child made with
    CLONE_FILES while tracked is noted at its fork: the connect is refused however the count is."""
    table = f"ux_share_{threads}_{children}{how}"
    _table(pg, table)
    tmp_path.chmod(0o755)
    alias = tmp_path / "alias"
    alias.symlink_to(pg.sockdir / f".s.PGSQL.{pg.port}")
    p = subprocess.Popen([str(agent), "-c", f"{unix_tools / 'rt_unix_share'} {alias} {table} {threads} {children} {how}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=60)
    _ran_nothing(pg, table, out)
    assert "refused 1" in out, out


@pytest.mark.parametrize("mode", ["fork", "scm", "none"])
def test_a_connect_waiting_on_a_full_backlog_shares_its_socket_with_nobody(
        guard: Daemon, agent: Path, pg: PgServer, tmp_path: Path, unix_tools: Path, mode: str) -> None:
    """connect_unix judges a connect at its start; one that waits on a full backlog (of a listener
    the agent made) looks its path up again when woken, which the agent turns to Postgres
    meanwhile (red team).  While it waits: fork: the socket dup'ed, the connect's descriptor
    number dup2'ed over with /dev/null, then a fork (the fork check reads the connecting thread's
    socket, not its descriptor: the child is killed before it runs); scm: the dup passed over
    SCM_RIGHTS to a child forked before the socket existed (the sender is killed at that send: its
    connect ends with it).  none: the connecting process is killed at its connect to Postgres."""
    table = f"ux_retarget_{mode}"
    _table(pg, table)
    tmp_path.chmod(0o777)
    sock = pg.sockdir / f".s.PGSQL.{pg.port}"
    p = subprocess.Popen([str(agent), "-c", f"{unix_tools / 'rt_unix_retarget'} {tmp_path} {sock} {table} {mode}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=60)
    _ran_nothing(pg, table, out)
    assert "alive" not in out, out
    rules = {e["verdict"]["rule"] for e in trail(guard, p.pid) if e["kind"] == "verdict"}
    assert {"fork": "unix-connect-fork", "scm": "unix-connect-pass", "none": "no-drop-table"}[mode] in rules, rules


def test_a_client_whose_threads_come_and_go_is_never_refused(guard: Daemon, agent: Path, tmp_path: Path,
                                                            unix_tools: Path) -> None:
    """A thread made is counted in the descriptor table before it counts as a thread: a check of
    one count against the other refused 181 of 20,000 connects of a client whose other thread
    makes and joins threads in a loop (red team).  The table is known shared by the fork of a
    CLONE_FILES child instead, and this client is never refused."""
    tmp_path.chmod(0o777)
    path = tmp_path / "app.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o777)
    srv.listen(512)
    srv.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                srv.accept()[0].close()
            except OSError:
                continue

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        res = subprocess.run([str(agent), "-c", f"{unix_tools / 'rt_unix_churn'} {path} 20000 churn"],
                             capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        th.join(2)
        srv.close()
    assert "ok 20000 eperm 0 other 0" in res.stdout, res


@pytest.mark.parametrize("server", ["absent", "stale"])
def test_a_child_forked_after_a_failed_unix_connect_lives(guard: Daemon, agent: Path, tmp_path: Path,
                                                          unix_tools: Path, server: str) -> None:
    """A thread's connect() to a Unix server that is not there failed, and it computes without a
    system call; another thread forks 100 ms later.  The child lives: the fork check reads the
    saved system call number, which a timer interrupt in user mode has rewritten by then."""
    tmp_path.chmod(0o777)
    path = tmp_path / "app.sock"
    if server == "stale":               # a socket file with no listener (ECONNREFUSED)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    res = subprocess.run([str(agent), "-c", f"{unix_tools / 'rt_unix_failed'} {path}"], capture_output=True,
                         text=True, timeout=30)
    assert "child status 0" in res.stdout, res


# ---- red team round 3 -----------------------------------------------------------------------


def _agent_run(agent: Path, cmd: str, timeout: int = 120) -> tuple[int, str]:
    p = subprocess.Popen([str(agent), "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=timeout)
    return p.pid, out


def _pg_alias(pg: PgServer, tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    alias = tmp_path / "alias"
    alias.symlink_to(pg.sockdir / f".s.PGSQL.{pg.port}")
    return alias


def test_a_table_shared_down_a_chain_of_clone_files_children_stays_known(
        guard: Daemon, agent: Path, pg: PgServer, tmp_path: Path, unix_tools: Path) -> None:
    """P makes C with CLONE_FILES, C makes C2 with CLONE_FILES: the note named the last pair, not P,
    and P's connect passed (red team).  The note is the table's, whoever shares it."""
    _table(pg, "ux_chain")
    _, out = _agent_run(agent, f"{unix_tools / 'rt_unix_chain'} {_pg_alias(pg, tmp_path)} ux_chain")
    _ran_nothing(pg, "ux_chain", out)


@pytest.mark.parametrize("flood", [0, 10000])
def test_a_shared_table_note_is_not_evicted_by_other_processes_forks(
        guard: Daemon, agent: Path, pg: PgServer, tmp_path: Path, unix_tools: Path, flood: int) -> None:
    """Thousands of session processes each made a CLONE_FILES child and evicted P's note from an
    LRU of 4,096 (red team).  Notes go when a table's last user exits, and a CLONE_FILES child
    for which there is no room is killed."""
    table = f"ux_fsevict_{flood}"
    _table(pg, table)
    _, out = _agent_run(agent, f"{unix_tools / 'rt_unix_share'} {_pg_alias(pg, tmp_path)} {table} 0 1 none {flood}",
                        timeout=300)
    _ran_nothing(pg, table, out)


@pytest.mark.parametrize("flood", [0, 20000])
def test_a_waiting_connects_entry_is_not_evicted_by_failed_connects(
        guard: Daemon, agent: Path, pg: PgServer, tmp_path: Path, unix_tools: Path, flood: int) -> None:
    """While a connect waits on the agent's own full backlog, 20,000 short-lived threads each fail
    a Unix connect, whose entries evicted the waiting thread's from an LRU (red team); then a fork
    and the name turned to Postgres.  Entries go with their thread, and a connect for which there
    is no room is refused: the child is killed at its fork."""
    table = f"ux_evict_{flood}"
    _table(pg, table)
    tmp_path.chmod(0o777)
    pid, out = _agent_run(agent, f"{unix_tools / 'rt_unix_retarget'} {tmp_path} {pg.sockdir / f'.s.PGSQL.{pg.port}'} "
                                 f"{table} evict{flood}")
    _ran_nothing(pg, table, out)
    assert "unix-connect-fork" in {e["verdict"]["rule"] for e in trail(guard, pid) if e["kind"] == "verdict"}


def test_a_signal_handler_on_the_waiting_connects_thread_changes_nothing(
        guard: Daemon, agent: Path, pg: PgServer, tmp_path: Path, unix_tools: Path) -> None:
    """A handler on the waiting thread (SA_RESTART) sends on a Unix socket, which drops the thread's
    entry, then forks: the child lives, but the connect restarts, meets the connect check again,
    and is refused (the socket is shared by then)."""
    _table(pg, "ux_sig")
    tmp_path.chmod(0o777)
    _, out = _agent_run(agent, f"{unix_tools / 'rt_unix_retarget'} {tmp_path} {pg.sockdir / f'.s.PGSQL.{pg.port}'} "
                               "ux_sig sig")
    _ran_nothing(pg, "ux_sig", out)


@pytest.mark.xfail(strict=True, reason=(
    "the waiting connect's socket registered in the fixed-file table of an io_uring that processes forked "
    "before the socket existed share, which install it (IORING_OP_FIXED_FD_INSTALL) once the connect reached "
    "Postgres: neither a fork nor a send that passes descriptors, and nothing on this kernel sees the "
    "registration; each sender is killed after its bytes are queued"))
def test_a_waiting_connects_socket_put_in_a_shared_io_uring(guard: Daemon, agent: Path, pg: PgServer,
                                                             tmp_path: Path, unix_tools: Path) -> None:
    """OPEN (red team round 3): the same re-targeted waiting connect, its socket shared through an
    io_uring's fixed files."""
    _table(pg, "ux_ring")
    tmp_path.chmod(0o777)
    _, out = _agent_run(agent, f"{unix_tools / 'rt_unix_retarget'} {tmp_path} {pg.sockdir / f'.s.PGSQL.{pg.port}'} "
                               "ux_ring ring")
    _ran_nothing(pg, "ux_ring", out)


@pytest.mark.parametrize("where", ["absent", "stale"])
def test_a_child_forked_while_a_thread_makes_a_tcp_connect_after_a_failed_unix_one_lives(
        guard: Daemon, agent: Path, tmp_path: Path, unix_tools: Path, where: str) -> None:
    """A thread's Unix connect fails, then the same thread waits in a TCP connect; another thread
    forks.  The failed connect's entry and the TCP connect's system call number looked like a
    Unix connect going on, and the child was killed (red team).  A connect of any other socket
    drops the thread's entry."""
    tmp_path.chmod(0o777)
    path = tmp_path / "app.sock"
    if where == "stale":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    _, out = _agent_run(agent, f"{unix_tools / 'rt_unix_stale'} {path}", timeout=60)
    assert "child status 0" in out, out


PY_PROBE_THEN_TCP = r"""
import socket, subprocess, threading, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(0)
fill = [socket.socket() for _ in range(3)]
for f in fill:
    f.setblocking(False)
    try: f.connect(l.getsockname())
    except BlockingIOError: pass
def worker():
    try:
        socket.socket(socket.AF_UNIX).connect("/run/no-such-daemon.sock")   # probe a local daemon
    except OSError as e:
        print("probe", e.errno, flush=True)
    s = socket.socket()
    try: s.connect(l.getsockname())                                          # fall back to TCP
    except OSError as e: print("tcp", e, flush=True)
threading.Thread(target=worker, daemon=True).start()
time.sleep(0.5)
print("subprocess rc", subprocess.run(["true"]).returncode, flush=True)
"""


def test_a_python_program_that_falls_back_to_tcp_runs_its_subprocess(guard: Daemon, agent: Path,
                                                                      tmp_path: Path) -> None:
    """The same in plain Python (red team): a worker probes a local daemon's socket, falls back to
    a TCP connect that waits, and the main thread's subprocess.run(["true"]) returned -9."""
    script = tmp_path / "probe.py"
    script.write_text(PY_PROBE_THEN_TCP)
    tmp_path.chmod(0o755)
    script.chmod(0o644)
    _, out = _agent_run(agent, f"{sys.executable} {script}", timeout=60)
    assert "subprocess rc 0" in out, out


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_in_a_32bit_socketcall_that_is_no_connect_kill_no_child(guard: Daemon, agent: Path,
                                                                         unix_tools: Path, threads: int) -> None:
    """Threads blocked in a 32-bit socketcall's accept (int 0x80) were taken for threads in connect,
    and every child forked was killed (red team).  socketcall's operation is read."""
    _, out = _agent_run(agent, f"{unix_tools / 'rt_unix_compat'} {threads}", timeout=60)
    assert "child status 0" in out, out

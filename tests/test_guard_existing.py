"""Connections an agent opened before the SQL guard could see them never carry a denied statement:
one opened while no SQL rule was loaded (a policy load then brings one), one that outlived the
daemon (killed: its guard goes on holding it; stopped: nobody holds it), and one a process brought
when the agent attached to it.  What no guard saw open is put in the guard refused (pidfd_getfd,
AW_PG_JOINED): where its next message starts is the agent's to choose, so every send fails and the
client reconnects, under the guard.  The server's table is the ground truth: a denied DROP TABLE
never runs."""

from __future__ import annotations

import ctypes as ct
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentwarden.probes.persist import Pins
from conftest import Daemon, make_agent, need_root, wait_for
from pgserver import PgServer

COMM = "aw-joined-agent"
NO_SQL_RULES = """version: 1
rules:
  - name: no-forbidden-binary
    when: {kind: exec, exec: {path: ["/usr/bin/aw-never-there"]}}
    action: deny
"""
DENY_DROP = NO_SQL_RULES + """  - name: no-drop-table
    when: {kind: sql, sql: {command: ["DROP TABLE"]}}
    action: deny
"""

# connects, says so, waits to be told to go on, then sends its statements on that same connection;
# a statement that fails is tried once more on a new connection (what a client with a pool does)
CLIENT = r"""
import sys, time, pathlib, psycopg
work = pathlib.Path(sys.argv[2])
conn = psycopg.connect(sys.argv[1], autocommit=True)
conn.execute("select 1")
(work / "ready").write_text("ready")
while not (work / "go").exists():
    time.sleep(0.05)
out = []
for sql in sys.argv[3:]:
    try:
        conn.execute(sql)
        out.append("ok")
    except Exception as e:
        try:
            conn = psycopg.connect(sys.argv[1], autocommit=True)
            conn.execute(sql)
            out.append(type(e).__name__ + "+ok")
        except Exception as e2:
            out.append(type(e).__name__ + "+" + type(e2).__name__)
(work / "result").write_text(",".join(out))
"""



@pytest.fixture()
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    need_root()
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", [{"name": "joined", "match": {"comm": [COMM]}}], policy=NO_SQL_RULES)
    yield d
    d.stop()


def connected(tmp_path: Path, pg: PgServer, table: str, *sql: str) -> tuple[subprocess.Popen[str], Path]:
    """An agent's client, connected and waiting (ready), with a table of one row to drop."""
    pg.psql("awtest", f"drop table if exists {table}; create table {table} (a int); insert into {table} values (1)")
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)
    (work / "client.py").write_text(CLIENT)
    agent = make_agent(tmp_path / "bin", COMM)
    p = subprocess.Popen([str(agent), "-c", f"{sys.executable} {work}/client.py '{pg.dsn}' {work} "
                                            + " ".join(f"'{s}'" for s in sql) + "; true"],   # the shell stays
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (work / "ready").exists(), 30, what="the client connected")
    return p, work


def go(p: subprocess.Popen[str], work: Path) -> str:
    (work / "go").write_text("go")
    p.communicate(timeout=60)
    return (work / "result").read_text() if (work / "result").exists() else ""


def rows(pg: PgServer, table: str) -> str:
    return pg.psql("awtest", f"select count(*) from {table}").strip()


def refused(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.events(kinds=["verdict"]) if (e.get("verdict") or {}).get("rule") == "unjudged-send"
            and "no guard saw" in e["verdict"]["mechanism"]]


def test_a_policy_load_refuses_connections_no_guard_saw_open(daemon: Daemon, pg: PgServer,
                                                            tmp_path: Path) -> None:
    daemon.start()
    p, work = connected(tmp_path, pg, "joined_reload", "select 2", "drop table joined_reload")
    daemon.policy.write_text(DENY_DROP)
    daemon.request("policy_reload")
    # the old connection refuses; the statement runs again on a new one, which the guard judges
    assert go(p, work) == "OperationalError+ok,OperationalError+OperationalError"
    assert rows(pg, "joined_reload") == "1"
    v = wait_for(lambda: refused(daemon), 20, what="the refusal recorded")
    assert v[0]["verdict"]["prevented"] is True and v[0]["verdict"]["action"] == "deny", v[0]
    drop = wait_for(lambda: [e for e in daemon.events(kinds=["verdict"])
                             if (e.get("verdict") or {}).get("rule") == "no-drop-table"], 20, what="the DROP refused")
    assert drop[0]["verdict"]["prevented"] is True


def test_a_killed_daemons_guard_goes_on_holding_its_connections(daemon: Daemon, pg: PgServer,
                                                                tmp_path: Path) -> None:
    """Its generation's sk_msg keeps the connection's framing and refuses the DROP after the new
    daemon started; the new daemon records that verdict from the old guard's ring, and lets the old
    generation go once its last connection closed."""
    daemon.policy.write_text(DENY_DROP)
    daemon.start()
    p, work = connected(tmp_path, pg, "joined_killed", "select 2", "drop table joined_killed")
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait()
    daemon.start()
    assert daemon.request("status")["predecessor_guards"], "the old guard is held"
    assert go(p, work) == "ok,OperationalError+OperationalError" and rows(pg, "joined_killed") == "1"
    wait_for(lambda: [e for e in daemon.events(kinds=["verdict"])
                      if (e.get("verdict") or {}).get("rule") == "no-drop-table"], 20, what="the old guard's verdict")
    wait_for(lambda: not daemon.request("status")["predecessor_guards"], 20, what="the old guard released")


def test_after_a_clean_stop_nobody_holds_a_connection_so_it_is_refused(daemon: Daemon, pg: PgServer,
                                                                       tmp_path: Path) -> None:
    daemon.policy.write_text(DENY_DROP)
    daemon.start()
    p, work = connected(tmp_path, pg, "joined_stopped", "select 2", "drop table joined_stopped")
    # stopped and its guard removed (a clean stop removes its own unless a root agent runs, as here;
    # the test removes the pins as an operator would)
    daemon.stop()
    daemon.start()
    assert go(p, work) == "OperationalError+ok,OperationalError+OperationalError"
    assert rows(pg, "joined_stopped") == "1"
    wait_for(lambda: refused(daemon), 20, what="the refusal recorded")


def test_an_allowed_statement_runs_on_the_new_connection(daemon: Daemon, pg: PgServer, tmp_path: Path) -> None:
    daemon.start()
    p, work = connected(tmp_path, pg, "joined_fine", "insert into joined_fine values (2)", "select 3")
    daemon.policy.write_text(DENY_DROP)
    daemon.request("policy_reload")
    assert go(p, work) == "OperationalError+ok,ok" and rows(pg, "joined_fine") == "2"


ATTACH = ("import ctypes, sys, os\n"
          "libc = ctypes.CDLL(None, use_errno=True)\n"
          "pid = int(sys.argv[1])\n"
          "print('attach', libc.ptrace(0x4206, pid, 0, 0))\n"    # PTRACE_SEIZE
          "libc.ptrace(0x4207, pid, 0, 0)\n"                     # PTRACE_INTERRUPT
          "os.waitpid(pid, 0x40000000)\n"                        # __WALL: the stop
          "print('detach', libc.ptrace(17, pid, 0, 0))\n")       # PTRACE_DETACH: resumed


def test_a_process_the_agent_attaches_to_cannot_use_its_connections(daemon: Daemon, pg: PgServer,
                                                                    tmp_path: Path) -> None:
    """A client outside every agent, connected; the agent attaches to it (ptrace) and it joins the
    session: the connection it had is refused, its new one is judged as the agent's."""
    daemon.policy.write_text(DENY_DROP)
    daemon.start()
    pg.psql("awtest", "drop table if exists joined_attach; create table joined_attach (a int); "
                      "insert into joined_attach values (1)")
    work = tmp_path / "work"
    work.mkdir()
    (work / "client.py").write_text(CLIENT)
    (work / "attach.py").write_text(ATTACH)
    outside = subprocess.Popen([sys.executable, str(work / "client.py"), pg.dsn, str(work), "select 2",
                                "drop table joined_attach"], start_new_session=True)
    try:
        wait_for(lambda: (work / "ready").exists(), 30, what="the outside client connected")
        agent = make_agent(tmp_path / "bin", COMM)
        res = subprocess.run([str(agent), "-c", f"{sys.executable} {work}/attach.py {outside.pid}; true"],
                             capture_output=True, text=True, timeout=60)
        assert "attach 0" in res.stdout, res
        wait_for(lambda: "are refused until they reconnect" in daemon.log.read_text(), 20,
                 what="the client's connection refused")
        (work / "go").write_text("go")
        outside.wait(60)
        result = (work / "result").read_text()
        assert result == "OperationalError+ok,OperationalError+OperationalError", result
        assert rows(pg, "joined_attach") == "1"
    finally:
        if outside.poll() is None:
            outside.kill()


def test_an_earlier_generation_is_taken_up_whatever_it_named_its_maps(tmp_path: Path) -> None:
    """A predecessor of another version (its sockhash and tail calls under other names): every map
    it pinned is held and pinned again here, the sockhash found by its type; a generation whose
    sockhashes are empty is let go, and its pins with it."""
    need_root()
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_void_p]
    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    pin_dir = f"/sys/fs/bpf/aw-test-succession-{os.getpid()}"
    old = f"{pin_dir}/gen-1-2"
    os.makedirs(old)
    try:
        for name, kind in (("map-sql_guard_socks_v0", 18), ("map-some_array", 2)):   # SOCKHASH, ARRAY
            fd = lib.bpf_map_create(kind, None, 8 if kind == 18 else 4, 4 if kind == 18 else 8, 16, None)
            assert fd >= 0, ct.get_errno()
            assert lib.bpf_obj_pin(fd, f"{old}/{name}".encode()) == 0
            os.close(fd)
        pins = Pins(pin_dir)
        pins.drop_older()
        assert not os.path.exists(old)
        assert list(pins.predecessors) == ["gen-1-2"]
        kept = sorted(os.listdir(pins.gen))
        assert kept == ["map-pred-gen-1-2-some_array", "map-pred-gen-1-2-sql_guard_socks_v0"], kept
        assert pins.release_predecessors() == ["gen-1-2"]     # its sockhash holds nothing
        assert os.listdir(pins.gen) == [] and not pins.predecessors
        pins.remove()
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)

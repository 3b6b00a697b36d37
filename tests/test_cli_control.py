"""Control socket authentication and the doctor command."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys

from conftest import Daemon

CONNECT = ("import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
           "s.sendall(b'{\"op\":\"status\"}\\n'); print(s.makefile().readline())")


def as_user(user: pwd.struct_passwd, sock: str, op: str) -> str:
    res = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                          sys.executable, "-c", CONNECT.replace("status", op), sock],
                         capture_output=True, text=True, timeout=30)
    return res.stdout + res.stderr


def test_socket_is_open_but_peer_credentials_decide(daemon: Daemon, test_user: pwd.struct_passwd) -> None:
    # world-connectable, so the launcher of an agent can approve its own held commands...
    st = os.stat(daemon.socket)
    assert stat.S_IMODE(st.st_mode) == 0o666 and st.st_uid == 0
    # ...but SO_PEERCRED refuses everything else to a user outside the control group
    out = as_user(test_user, str(daemon.socket), "status")
    assert '"ok":false' in out and f"uid {test_user.pw_uid} is neither root" in out, out
    out = as_user(test_user, str(daemon.socket), "query")
    assert '"ok":false' in out, out
    # pending answers, with only the requests this user may decide (none here)
    out = as_user(test_user, str(daemon.socket), "pending")
    assert '"ok":true' in out and '"pending":[]' in out.replace(" ", ""), out


def test_garbage_on_the_control_socket_is_answered_not_fatal(daemon: Daemon) -> None:
    import socket

    for payload in (b"\xff\xfe not json\n", b"[1,2]\n", b'{"op": "nope"}\n', b"\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(daemon.socket))
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.makefile().readline()
    assert daemon.request("ping")["pid"] == daemon.proc.pid if daemon.proc else False


def test_doctor_passes_on_a_prepared_machine(daemon: Daemon) -> None:
    res = daemon.cli("doctor")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tracepoint sched:sched_process_exec" in res.stdout and "kernel headers" in res.stdout


def test_query_rejects_bad_arguments(daemon: Daemon) -> None:
    res = daemon.cli("query", "--since", "yesterday-ish")
    assert res.returncode == 2 and "--since" in res.stderr
    res = daemon.cli("query", "--kind", "exec,bogus")
    assert res.returncode == 2 and "bogus" in res.stderr
    res = daemon.cli("query", "--limit", "-5")
    assert res.returncode == 2 and "--limit" in res.stderr and "Traceback" not in res.stderr


def test_a_wrong_argument_sent_to_the_socket_is_named_not_a_crash(daemon: Daemon) -> None:
    """A client that skips the CLI's checks: the daemon names the argument, logs no traceback."""
    import json
    import socket

    for req, named in (({"op": "query", "limit": -5}, "limit"), ({"op": "count", "pid": "x"}, "pid"),
                       ({"op": "query", "kinds": ["nope"]}, "kinds")):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(daemon.socket))
            s.sendall((json.dumps(req) + "\n").encode())
            reply = json.loads(s.makefile().readline())
        assert reply["ok"] is False and reply["error"].startswith(f"{named}: "), reply
    assert "control request failed" not in daemon.log.read_text()


def test_status_says_how_the_daemon_is(daemon: Daemon) -> None:
    import json

    res = daemon.cli("status", "--json", "--interval", "0.2")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    for key in ("uptime_s", "pinned_links_and_maps", "sessions", "events_per_s", "kernel_lost", "parser_desyncs",
                "verdicts_by_action", "pending_approvals"):
        assert key in st, key
    assert st["pinned_links_and_maps"] > 10 and st["pid"] == (daemon.proc.pid if daemon.proc else 0)
    for key in ("spool_batches", "spool_bytes", "spool_max_bytes", "queued", "dropped", "inserted"):
        assert key in st["store"], key
    human = daemon.cli("status", "--interval", "0.2")
    assert human.returncode == 0 and human.stdout.splitlines()[0].startswith("daemon     pid "), human.stdout
    assert {line.split()[0] for line in human.stdout.splitlines()} >= {
        "daemon", "guards", "sessions", "events", "lost", "store", "verdicts", "approvals"}

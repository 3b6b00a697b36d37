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


def test_socket_is_root_and_group_only(daemon: Daemon) -> None:
    st = os.stat(daemon.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0


def test_peer_credentials_decide_not_the_file_mode(daemon: Daemon, test_user: pwd.struct_passwd) -> None:
    os.chmod(daemon.socket, 0o666)   # even with the file opened up, SO_PEERCRED refuses
    try:
        res = subprocess.run(["setpriv", f"--reuid={test_user.pw_uid}", f"--regid={test_user.pw_gid}",
                              "--clear-groups", sys.executable, "-c", CONNECT, str(daemon.socket)],
                             capture_output=True, text=True, timeout=30)
    finally:
        os.chmod(daemon.socket, 0o660)
    assert '"ok":false' in res.stdout and f"uid {test_user.pw_uid} is neither root" in res.stdout, res


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

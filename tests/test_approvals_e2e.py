"""Approvals only from a person: every indirection an agent would try, refused.

A daemon of its own with a webhook (a real HTTP server on loopback) that receives the
one-time codes.  The agent runs in a session of its own, as under a terminal; the person
approves with Daemon.cli_as_person (reparented to init, another session).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agentwarden.enforce import callers
from conftest import Daemon, make_agent, need_root, wait_for

COMM = "aw-appr-agent"
ROOTLESS = "aw-rootless"     # a second profile, whose sessions may not run as root

POLICY = """
version: 1
rules:
  - name: no-root-agents
    when: {agent: [rootless], kind: session, session: {as_root: true}}
    action: deny
  - name: hold-touch
    when: {kind: exec, exec: {path: ["*/touch"], argv: ['held-']}}
    action: hold
    approvers: [self]
    timeout: 5m
  - name: hold-with-code
    when: {kind: exec, exec: {path: ["*/touch"], argv: ['coded-']}}
    action: hold
    approvers: [self]
    timeout: 5m
    code: true
"""


class Hook(BaseHTTPRequestHandler):
    posts: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        Hook.posts.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hook() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, hook: int) -> Iterator[Daemon]:
    need_root()
    d = Daemon(tmp_path_factory.mktemp("approvals"), [{"name": "appr", "match": {"comm": [COMM]}},
                                                       {"name": "rootless", "match": {"comm": [ROOTLESS]}}],
               policy=POLICY)
    cfg = json.loads(d.config.read_text())
    cfg["enforce"]["webhook"] = f"http://127.0.0.1:{hook}/hook"
    d.config.write_text(json.dumps(cfg))
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def agent() -> Iterator[Path]:
    d = Path(f"/tmp/aw-appr-{os.getpid()}")
    yield make_agent(d, COMM)
    shutil.rmtree(d, ignore_errors=True)


def env(agent: Path) -> dict[str, str]:
    return {"PATH": f"{agent.parent}:/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": os.getcwd()}


def held(d: Daemon, agent: Path, target: Path) -> dict[str, Any]:
    """The agent runs a held command (refused); the request it left."""
    res = subprocess.run([str(agent), "-c", f"touch {target}; echo rc=$?"], capture_output=True, text=True,
                         timeout=30, start_new_session=True, env=env(agent))
    assert "rc=137" in res.stdout, res
    return dict(wait_for(lambda: next((r for r in d.request("pending")["pending"] if str(target) in r["summary"]),
                                      None), what="the request"))


def still_pending(d: Daemon, rid: str) -> bool:
    return any(r["id"] == rid for r in d.request("pending")["pending"])


CLI = f"{sys.executable} -m agentwarden.cli.main"


def test_a_person_approves_and_the_event_says_how(daemon: Daemon, agent: Path, tmp_path: Path) -> None:
    req = held(daemon, agent, tmp_path / "held-ok")
    res = daemon.cli_as_person("approve", req["id"])
    assert res.returncode == 0, res.stderr
    ev = wait_for(lambda: next((e for e in daemon.events(kinds=["approval"])
                                if e["approval"]["id"] == req["id"] and e["approval"]["state"] == "approved"), None),
                  what="the approval event")
    assert "SO_PEERPIDFD" in ev["approval"]["auth"] and "outside every agent session" in ev["approval"]["auth"]


def test_approval_typed_through_a_multiplexer_the_agent_drives_is_refused(daemon: Daemon, agent: Path,
                                                                         tmp_path: Path) -> None:
    """The agent runs in a tmux pane (the tmux server is the person's, outside the agent); it asks
    the server for a new window that runs `agentwarden approve`.  That process is no descendant of
    the agent, but it shares the tmux server with it."""
    sock = tmp_path / "tmux.sock"
    target = tmp_path / "held-via-tmux"
    out = tmp_path / "approve.out"
    script = tmp_path / "agent.sh"
    script.write_text(
        f"touch {target}\n"
        f"id=$({CLI} pending --json --config {daemon.config} | {sys.executable} -c "
        "'import json,sys; print(json.loads(sys.stdin.readline())[\"id\"])')\n"
        f"tmux -S {sock} new-window \"{CLI} approve $id --config {daemon.config} > {out} 2>&1; "
        f"echo rc=\\$? >> {out}\"\n")
    tmux = ["tmux", "-S", str(sock)]
    subprocess.run(["setsid", "-f", *tmux, "new-session", "-d", "-x", "80", "-y", "24",
                    f"{agent} {script}; sleep 30"], check=True, env={**env(agent), "TERM": "xterm"},
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: out.exists() and "rc=" in out.read_text(), 30, what="the approve in the new window")
        text = out.read_text()
        assert "rc=1" in text and "tmux" in text and "drive" in text, text
        req = next(r for r in daemon.request("pending")["pending"] if str(target) in r["summary"])
        assert not target.exists()
        daemon.cli_as_person("deny", req["id"])
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_approval_from_the_agents_session_is_refused(daemon: Daemon, agent: Path, tmp_path: Path) -> None:
    """Not a descendant of the agent, but in its session (started by the same script, say)."""
    target = tmp_path / "held-same-session"
    res = subprocess.run(
        ["sh", "-c", f"{agent} -c 'touch {target}' & sleep 1.5; "
                     f"id=$({CLI} pending --json --config {daemon.config} | {sys.executable} -c "
                     "'import json,sys; print(json.loads(sys.stdin.readline())[\"id\"])'); "
                     f"{CLI} approve $id --config {daemon.config}; echo rc=$?"],
        capture_output=True, text=True, timeout=60, start_new_session=True, env=env(agent))
    assert "rc=1" in res.stdout and "shares its session" in res.stderr, res
    req = next(r for r in daemon.request("pending")["pending"] if str(target) in r["summary"])
    daemon.cli_as_person("deny", req["id"])


def test_one_time_code_comes_only_through_the_webhook(daemon: Daemon, agent: Path, tmp_path: Path) -> None:
    Hook.posts.clear()
    target = tmp_path / "coded-x"
    req = held(daemon, agent, target)
    assert req["needs_code"] is True and not set(req) & {"code", "code_hash", "target"}
    post = wait_for(lambda: next((p for p in Hook.posts if req["id"] in p["text"]), None), what="the webhook")
    code = post["text"].split("--code ", 1)[1].split("`", 1)[0]
    assert len(code) == 10 and code not in json.dumps(req)
    # not in the audit trail, the daemon's log, the state file or `pending`
    assert code not in json.dumps(daemon.events()) and code not in daemon.log.read_text()
    assert code not in (daemon.root / "approvals.json").read_text()
    res = daemon.cli_as_person("approve", req["id"])
    assert res.returncode == 1 and "one-time code" in res.stderr, res
    res = daemon.cli_as_person("approve", req["id"], "--code", "WRONGCODE1")
    assert res.returncode == 1 and "tries left" in res.stderr, res
    assert still_pending(daemon, req["id"])
    res = daemon.cli_as_person("approve", req["id"], "--code", code.lower())
    assert res.returncode == 0, res.stderr
    ev = wait_for(lambda: next((e for e in daemon.events(kinds=["approval"])
                                if e["approval"]["id"] == req["id"] and e["approval"]["state"] == "approved"), None),
                  what="the approval event")
    assert "one-time code" in ev["approval"]["auth"]


def test_guessing_the_code_denies_the_request(daemon: Daemon, agent: Path, tmp_path: Path) -> None:
    req = held(daemon, agent, tmp_path / "coded-guessed")
    for _ in range(5):
        res = daemon.cli_as_person("approve", req["id"], "--code", "AAAAAAAAAA")
        assert res.returncode == 1
    assert "denied after 5 wrong" in res.stderr, res
    assert not still_pending(daemon, req["id"])


def test_a_policy_can_refuse_agents_that_run_as_root(daemon: Daemon, agent: Path, test_user: Any) -> None:
    """Killed at its first instruction as root; runs as another user.  And `status` warns about the
    root sessions it lets run."""
    rootless = agent.parent / ROOTLESS
    shutil.copy2(agent, rootless)
    shared = Path(tempfile.mkdtemp(prefix="aw-rootless-"))
    shared.chmod(0o777)
    try:
        res = subprocess.run([str(rootless), "-c", f"touch {shared}/ran-as-root"], capture_output=True,
                             timeout=30, start_new_session=True)
        assert res.returncode == -9 and not (shared / "ran-as-root").exists(), res
        res = subprocess.run(["setpriv", f"--reuid={test_user.pw_uid}", f"--regid={test_user.pw_gid}",
                              "--clear-groups", str(rootless), "-c", f"touch {shared}/ran-as-user"],
                             capture_output=True, timeout=30, start_new_session=True)
        assert res.returncode == 0 and (shared / "ran-as-user").exists(), res
        v = wait_for(lambda: next((e for e in daemon.events(kinds=["verdict"])
                                   if e["verdict"]["rule"] == "no-root-agents"), None), what="the verdict")
        assert v["verdict"]["prevented"] is True and v["verdict"]["subject"] == "session"
        # an allowed root agent: status says what that means
        sleeper = subprocess.Popen([str(agent), "-c", "sleep 5"], start_new_session=True)
        try:
            status = wait_for(lambda: (lambda st: st if st["root_sessions"] else None)(daemon.request("status")),
                              what="the root session in status")
            assert "can stop or kill this daemon" in status["warnings"][0]
        finally:
            sleeper.kill()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_caller_that_exits_while_judged_is_refused() -> None:
    """The pid of an exited caller may already be another process's: never judged by number."""
    proc = subprocess.Popen(["sleep", "0.2"])
    pidfd = os.pidfd_open(proc.pid)
    proc.wait()
    try:
        assert callers.pidfd_pid(pidfd) == -1
        with pytest.raises(callers.CallerGone):
            callers.judge(proc.pid, pidfd, lambda pid: False, [])
    finally:
        os.close(pidfd)


FLOOD = ("import socket, sys, time\n"
         "held, busy = [], 0\n"
         "for _ in range(int(sys.argv[2])):\n"
         "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
         "    s.connect(sys.argv[1])\n"
         "    s.settimeout(0.2)\n"
         "    try:\n"
         "        busy += b'busy' in s.recv(200)\n"
         "    except socket.timeout:\n"
         "        held.append(s)\n"
         "print('held', len(held), 'busy', busy, flush=True)\n"
         "time.sleep(float(sys.argv[3]))\n")


def test_idle_control_clients_cannot_starve_approvals(daemon: Daemon, agent: Path, tmp_path: Path,
                                                     test_user: Any) -> None:
    """An agent (or another user) opening silent connections gets a few; the person who approves
    is served at once, and no connection costs a thread until it has sent its request."""
    assert daemon.proc is not None
    shared = Path(tempfile.mkdtemp(prefix="aw-flood-"))   # pytest's tmp tree is 0700: awtest cannot read it
    shared.chmod(0o755)
    script = shared / "flood.py"
    script.write_text(FLOOD)
    script.chmod(0o644)
    daemon.request("ping")
    time.sleep(1.0)
    threads_before = len(os.listdir(f"/proc/{daemon.proc.pid}/task"))
    flood = subprocess.Popen([str(agent), "-c", f"{sys.executable} {script} {daemon.socket} 80 8"],
                             stdout=subprocess.PIPE, text=True, start_new_session=True, env=env(agent))
    other = subprocess.Popen(["setpriv", f"--reuid={test_user.pw_uid}", f"--regid={test_user.pw_gid}",
                              "--clear-groups", sys.executable, str(script), str(daemon.socket), "80", "8"],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        agent_line = flood.stdout.readline() if flood.stdout else ""
        user_line = other.stdout.readline() if other.stdout else ""
        assert agent_line.split()[:2] == ["held", "4"], agent_line
        assert user_line.split()[:2] == ["held", "8"], user_line
        assert len(os.listdir(f"/proc/{daemon.proc.pid}/task")) <= threads_before + 2
        t0 = time.monotonic()
        assert daemon.request("ping")["pid"] == daemon.proc.pid
        assert daemon.cli_as_person("pending").returncode == 0
        assert time.monotonic() - t0 < 5
    finally:
        flood.kill()
        other.kill()
        shutil.rmtree(shared, ignore_errors=True)


def _try_ping(d: Daemon) -> dict[str, Any] | None:
    try:
        return dict(d.request("ping"))
    except Exception:
        return None

"""Held state across daemon restarts: never an orphan.

A daemon of its own, restarted inside the tests.  Pending requests come back with their
original deadline; an exec that was waiting for its decision when the daemon died (the
stop map is pinned in bpffs) is decided by the next daemon, and one that someone resumed
while no daemon was there is killed and recorded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, distinct_program, make_agent, need_root, wait_for

COMM = "aw-rs-agent"

POLICY = """
version: 1
rules:
  - name: hold-touch
    when: {kind: exec, exec: {path: ["*/touch"], argv: ['held-']}}
    action: hold
    approvers: [user:root]
    timeout: 10m
  - name: deny-by-argv
    when: {kind: exec, exec: {path: ["*/touch"], argv: ['denied-']}}
    action: deny
  - name: decided-in-userspace
    when: {kind: exec, exec: {path: ["*/aw-slowtouch"], argv: ['(?=.*denied-)']}}
    action: deny
"""


@pytest.fixture(scope="module")
def agent() -> Iterator[Path]:
    d = Path(f"/tmp/aw-restart-{os.getpid()}")
    path = make_agent(d, COMM)
    distinct_program(d / "aw-slowtouch")
    yield path
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture()
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    need_root()
    d = Daemon(tmp_path, [{"name": "restart", "match": {"comm": [COMM]}}], policy=POLICY)
    d.start()
    yield d
    d.stop()


def background(agent: Path, script: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(agent), "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True,
                            text=True, env={"PATH": f"{agent.parent}:/usr/bin:/bin"})


def restart(d: Daemon, kill: bool = False) -> None:
    assert d.proc is not None
    if kill:
        d.proc.kill()
        d.proc.wait()
    d.stop(keep_pins=True)
    d.start()


def test_pending_request_survives_a_restart(daemon: Daemon, agent: Path, tmp_path: Path) -> None:
    target = tmp_path / "held-across-restart"
    flag = tmp_path / "go"
    proc = background(agent, f"touch {target}; echo rc=$?; while [ ! -e {flag} ]; do sleep 0.1; done; "
                             f"touch {target}; echo rc=$?")
    req = wait_for(lambda: next(iter(daemon.request("pending")["pending"]), None), what="the pending request")
    restart(daemon)
    again = daemon.request("pending")["pending"]
    assert [(r["id"], r["expires"]) for r in again] == [(req["id"], req["expires"])]
    assert daemon.cli_as_person("approve", req["id"]).returncode == 0
    flag.touch()
    out, err = proc.communicate(timeout=30)
    assert out.split() == ["rc=137", "rc=0"], (out, err)   # the running agent was re-seeded, same session
    assert target.exists()


def test_exec_waiting_when_the_daemon_died_is_decided_by_the_next(daemon: Daemon, agent: Path,
                                                                  tmp_path: Path) -> None:
    assert daemon.proc is not None
    flag = tmp_path / "go"
    proc = background(agent, f"while [ ! -e {flag} ]; do sleep 0.05; done; "
                             f"aw-slowtouch {tmp_path}/fine & aw-slowtouch {tmp_path}/denied-x & wait")
    wait_for(lambda: any(e["process"]["pid"] == proc.pid for e in daemon.events(kinds=["session_start"])),
             what="the session start")
    os.kill(daemon.proc.pid, signal.SIGSTOP)      # it sees the stops but cannot decide them
    flag.touch()
    time.sleep(1.0)
    restart(daemon, kill=True)                    # SIGKILL: no cleanup; the pinned map keeps the stops
    proc.communicate(timeout=30)
    assert (tmp_path / "fine").exists() and not (tmp_path / "denied-x").exists()
    assert "stopped for a decision before this daemon started" in daemon.log.read_text()


def generations(d: Daemon) -> list[str]:
    return sorted(p for p in os.listdir(d.pin_dir) if p.startswith("gen-"))


def test_the_kernel_guards_outlive_a_killed_daemon(daemon: Daemon, agent: Path, tmp_path: Path) -> None:
    """SIGKILL (what a root agent can do) leaves the pinned guards in force until the next daemon
    replaces them; a clean stop removes them."""
    assert daemon.proc is not None and len(generations(daemon)) == 1
    pinned = os.listdir(os.path.join(daemon.pin_dir, generations(daemon)[0]))
    assert any(p.startswith("uprobe-") for p in pinned), pinned    # the TLS guards too
    daemon.proc.kill()
    daemon.proc.wait()
    res = subprocess.run([str(agent), "-c", f"touch {tmp_path}/denied-while-dead; echo rc=$?; "
                                            f"touch {tmp_path}/fine-while-dead; echo rc=$?"],
                         capture_output=True, text=True, timeout=30, start_new_session=True,
                         env={"PATH": f"{agent.parent}:/usr/bin:/bin"})
    assert res.stdout.split() == ["rc=137", "rc=0"], res
    assert not (tmp_path / "denied-while-dead").exists()
    old = generations(daemon)
    daemon.stop(keep_pins=True)
    daemon.start()
    assert len(generations(daemon)) == 1 and generations(daemon) != old   # replaced, not added
    assert "replaced the kernel guards a previous daemon left pinned" in daemon.log.read_text()
    wait_for(lambda: any("pinned guards held until this start" in e["verdict"]["mechanism"]
                         for e in daemon.events(kinds=["verdict"])), what="the record of the unclean stop")
    assert daemon.proc is not None
    daemon.proc.terminate()
    daemon.proc.wait(30)
    assert generations(daemon) == []   # a clean stop: enforcement stops with the service


def test_removed_pins_come_back(daemon: Daemon, agent: Path, tmp_path: Path) -> None:
    """The agent removes the pinned guards while the daemon runs: the daemon's own references kept
    them attached, it pins them again, and it is recorded."""
    (gen,) = generations(daemon)
    pins = sorted(os.listdir(os.path.join(daemon.pin_dir, gen)))
    res = subprocess.run([str(agent), "-c", f"rm -rf {daemon.pin_dir}/gen-*; "
                                            f"touch {tmp_path}/denied-meanwhile; echo rc=$?"],
                         capture_output=True, text=True, timeout=30, start_new_session=True,
                         env={"PATH": f"{agent.parent}:/usr/bin:/bin"})
    assert "rc=137" in res.stdout, res     # still guarded
    wait_for(lambda: os.path.isdir(os.path.join(daemon.pin_dir, gen)) and
             sorted(os.listdir(os.path.join(daemon.pin_dir, gen))) == pins, what="the pins back")
    wait_for(lambda: any("pinned again" in e["verdict"]["mechanism"] for e in daemon.events(kinds=["verdict"])),
             what="the tamper record")


def test_a_killed_daemon_whose_pins_were_removed_is_recorded(daemon: Daemon) -> None:
    """A root agent can kill the daemon and then remove the pins (no hook prevents an unlink):
    enforcement is off until the next start, which says so."""
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait()
    for g in generations(daemon):
        shutil.rmtree(os.path.join(daemon.pin_dir, g))
    daemon.stop(keep_pins=True)
    daemon.start()
    wait_for(lambda: any("pinned guards had been removed" in e["verdict"]["mechanism"]
                         for e in daemon.events(kinds=["verdict"])), what="the record")


def test_exec_resumed_while_no_daemon_ran_is_killed(daemon: Daemon, agent: Path, tmp_path: Path) -> None:
    assert daemon.proc is not None
    flag = tmp_path / "go"
    proc = background(agent, f"while [ ! -e {flag} ]; do sleep 0.05; done; exec aw-slowtouch {tmp_path}/fine")
    wait_for(lambda: any(e["process"]["pid"] == proc.pid for e in daemon.events(kinds=["session_start"])),
             what="the session start")
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    flag.touch()
    wait_for(lambda: "slowtouch" in Path(f"/proc/{proc.pid}/comm").read_text(), what="the exec")
    time.sleep(0.5)
    daemon.proc.kill()
    daemon.proc.wait()
    # no daemon: the pinned guards still kill it at its first system call when it is resumed
    os.kill(proc.pid, signal.SIGCONT)
    proc.communicate(timeout=30)
    assert proc.returncode == -9 and not (tmp_path / "fine").exists()

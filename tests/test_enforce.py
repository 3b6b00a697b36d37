"""Enforcement, end to end: real processes, real kernel hooks, real PostgreSQL and nftables.

A daemon with its own agent profile and policy; the fake agent runs the
operations; every check looks at the side effect (a file, a table, a log line,
a socket), not only at the verdict event.
"""

from __future__ import annotations

import csv
import ctypes as ct
import json
import os
import re
import shutil
import signal
import socket
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
import yaml
from conftest import Daemon, distinct_program, make_agent, need_root, node_found_ahead, wait_for
from pgserver import PgServer

COMM = "aw-guard-agent"
HARD_COMM = "aw-hard-agent"
REPO = Path(__file__).resolve().parent.parent

_DEFAULT = yaml.safe_load(REPO.joinpath("deploy/policy.yaml").read_text())
GIT_RULES = ("hold-force-push", "hold-push-without-refspec", "hold-push-of-a-bare-name",
             "hold-git-transport-not-started-by-git", "hold-git-command-git-does-not-name",
             "hold-ssh-whose-remote-command-config-sets", "hold-git-push-on-the-wire")
POLICY = "version: 1\n" + yaml.safe_dump({"patterns": _DEFAULT["patterns"]}, width=10**6) + """rules:
  - name: calls-are-fine
    # names an opaque kind: CALL is allowed, every other opaque statement meets the deny below
    when: {kind: sql, sql: {command: ["CALL"]}}
    action: allow
  - name: no-drop-table
    when: {kind: sql, sql: {command: ["DROP TABLE", "TRUNCATE"]}}
    action: deny
  - name: hold-drop-index
    when: {kind: sql, sql: {command: ["DROP INDEX"]}}
    action: hold
    approvers: [user:root]
    timeout: 2m
  - name: no-forbidden-host
    when: {kind: connect, connect: {dst: ["127.0.0.77/32"]}}
    action: deny
  - name: kill-on-connect
    when: {kind: connect, connect: {dst: ["127.0.0.78/32"]}}
    action: kill
  - name: forbidden-binary
    when: {kind: exec, exec: {path: ["*/aw-forbidden"]}}
    action: deny
  - name: deny-by-argv
    when: {kind: exec, exec: {path: ["*/touch"], argv: ['denied-']}}
    action: deny
  - name: deny-two-bound-args
    # names the argument boundary: two arguments, not one with a space in it
    when: {kind: exec, exec: {path: ["*/touch"], argv: ['\\x00[^\\x00]*bound-a\\x00[^\\x00]*bound-b']}}
    action: deny
  - name: hold-touch
    when: {kind: exec, exec: {path: ["*/touch"], argv: ['held-']}}
    action: hold
    approvers: [user:root]
    timeout: 2m
  - name: hold-briefly
    when: {kind: exec, exec: {path: ["*/touch"], argv: ['expires-']}}
    action: hold
    approvers: [user:root]
    timeout: 2s
  - name: decided-in-userspace
    # a lookahead: no DFA, so every aw-slowtouch waits stopped for the daemon's decision
    when: {kind: exec, exec: {path: ["*/aw-slowtouch"], argv: ['(?=.*denied-)']}}
    action: deny
  - name: quarantine-me
    when: {kind: exec, exec: {path: ["*/aw-quarantine"]}}
    action: quarantine
    duration: 5m
  - name: no-admin-delete
    when: {kind: http, http: {method: [DELETE], path: ["/admin/*"]}}
    action: deny
  - name: no-secrets-host
    when: {kind: http, http: {host: ["secrets.internal"]}}
    action: deny
  - name: hold-deploy
    when: {kind: http, http: {method: [POST], path: ["/deploy"]}}
    action: hold
    approvers: [user:root]
    timeout: 2m
""" + "".join("  " + line + "\n" for line in yaml.safe_dump(   # the default policy's git rules, as shipped
    [r for r in _DEFAULT["rules"] if r["name"] in GIT_RULES], width=10**6).splitlines())


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    need_root()
    d = Daemon(tmp_path_factory.mktemp("guard"), [{"name": "guarded", "match": {"comm": [COMM]}}],
               policy=POLICY)
    d.start()
    yield d
    d.stop()
    if os.environ.get("AW_SHOW_DAEMON_LOG"):
        print(d.log.read_text())


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The same policy with `probes.hardened: true` (the raw syscall hook), for its own agent:
    what only a syscall hook sees (README, Tampering)."""
    need_root()
    d = Daemon(tmp_path_factory.mktemp("hardened"), [{"name": "hardened", "match": {"comm": [HARD_COMM]}}],
               policy=POLICY, hardened=True)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def hard_agent() -> Iterator[Path]:
    d = Path(f"/tmp/aw-hard-{os.getpid()}")
    yield make_agent(d, HARD_COMM)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = Path(f"/tmp/aw-guard-{os.getpid()}")
    path = make_agent(d, COMM)
    for name in ("aw-forbidden", "aw-quarantine", "aw-slowtouch"):
        distinct_program(d / name)
    yield path
    shutil.rmtree(d, ignore_errors=True)


def run(agent: Path, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(agent), "-c", script], capture_output=True, text=True, timeout=timeout,
                          start_new_session=True,   # an agent runs in a session (terminal) of its own
                          env={"PATH": f"{agent.parent}:/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": os.getcwd()})


def verdicts(d: Daemon, rule: str, n: int = 1, timeout: float = 20) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        evs = [e for e in d.events(kinds=["verdict"]) if e["verdict"]["rule"] == rule]
        return evs if len(evs) >= n else None
    return list(wait_for(found, timeout, what=f"{n} verdicts of rule {rule}"))


def pending(d: Daemon) -> list[dict[str, Any]]:
    return list(d.request("pending")["pending"])


def wait_pending(d: Daemon, rule: str, timeout: float = 20) -> dict[str, Any]:
    return dict(wait_for(lambda: next((r for r in pending(d) if r["rule"] == rule), None), timeout,
                         what=f"a pending request of {rule}"))


# ---- exec ---------------------------------------------------------------------------------


def test_denied_exec_never_runs(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    marker = tmp_path / "forbidden-ran"
    res = run(agent, f"aw-forbidden {marker}; echo rc=$?; touch {tmp_path}/allowed; echo ok")
    assert "rc=137" in res.stdout, res     # SIGKILL before the first instruction
    assert not marker.exists()
    assert (tmp_path / "allowed").exists() and "ok" in res.stdout
    (v,) = verdicts(guard, "forbidden-binary")
    assert v["verdict"]["action"] == "deny" and v["verdict"]["prevented"] is True
    assert "kernel" in v["verdict"]["mechanism"] and v["exec"]["filename"].endswith("aw-forbidden")


def test_argv_decided_in_the_kernel(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    res = run(agent, f"touch {tmp_path}/denied-file; echo rc=$?; touch {tmp_path}/fine-file")
    assert "rc=137" in res.stdout, res
    assert not (tmp_path / "denied-file").exists()
    assert (tmp_path / "fine-file").exists()
    (v,) = verdicts(guard, "deny-by-argv")
    assert v["verdict"]["prevented"] is True and v["verdict"]["mechanism"] == "SIGKILL at exec (kernel)"
    assert v["verdict"]["latency_us"] is not None and v["verdict"]["latency_us"] >= 0
    # a non-ASCII command line is Python's to judge (Unicode \b, \s, case folding): same outcome
    res = run(agent, f"touch {tmp_path}/denied-café; echo rc=$?; touch {tmp_path}/fine-café; echo rc=$?")
    assert res.stdout.split() == ["rc=137", "rc=0"], res
    assert not (tmp_path / "denied-café").exists() and (tmp_path / "fine-café").exists()
    evs = verdicts(guard, "deny-by-argv", n=2)
    assert any("SIGSTOP" in e["verdict"]["mechanism"] for e in evs)


def test_the_kernel_tells_argument_boundaries_from_spaces(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "bound-a bound-b", tmp_path / "bound-b"
    res = run(agent, f"cd {tmp_path} && touch 'bound-a bound-b'; echo rc=$?; touch bound-a bound-b; echo rc=$?")
    assert res.stdout.split() == ["rc=0", "rc=137"], res
    assert one.exists() and not two.exists()
    (v,) = verdicts(guard, "deny-two-bound-args")
    assert v["verdict"]["mechanism"] == "SIGKILL at exec (kernel)"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_a_force_push_from_configuration_is_held(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """A push that names no refspec takes a +refspec (force) from the repository's config,
    which the agent can write; no spelling of the command line shows it."""
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    ident = ["-c", "user.name=t", "-c", "user.email=t@t"]
    _git(work, *ident, "commit", "-q", "--allow-empty", "-m", "one")
    _git(work, *ident, "commit", "-q", "--allow-empty", "-m", "two")
    _git(work, "push", "-q", str(remote), "HEAD:refs/heads/main")
    published = _git(remote, "rev-parse", "main")
    _git(work, "reset", "-q", "--hard", "HEAD~1")
    _git(work, *ident, "commit", "-q", "--allow-empty", "-m", "rewritten")
    res = run(agent, f"cd {work} && git remote add origin {remote} && "
                     "git config remote.origin.push '+refs/heads/*:refs/heads/*' && "
                     "git config 'remote.origin main.url' ../remote.git && "
                     "git config 'remote.origin main.push' +HEAD:refs/heads/main; "
                     "git push -q origin; echo rc=$?; git push -q 'origin main'; echo rc=$?; "
                     "git push -q -o x origin; echo rc=$?; git push -q origin main; echo rc=$?; "
                     "git push -q origin HEAD:refs/heads/side; echo rc=$?")
    assert res.stdout.split() == ["rc=137", "rc=137", "rc=137", "rc=137", "rc=0"], res
    assert _git(remote, "rev-parse", "main") == published      # history on the remote is intact
    assert _git(remote, "rev-parse", "side") == _git(work, "rev-parse", "HEAD")
    assert "hold-push-without-refspec" in res.stderr and "hold-push-of-a-bare-name" in res.stderr, res.stderr
    assert ("agentwarden: or name what to push and where, which configuration cannot change: "
            "git push origin HEAD:main") in res.stderr
    evs = verdicts(guard, "hold-push-without-refspec", n=3) + verdicts(guard, "hold-push-of-a-bare-name")
    assert all(e["verdict"]["mechanism"] != "" for e in evs)


def test_a_mistyped_git_command_git_would_guess_is_held(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """help.autocorrect, set in a config file the agent can write (here the repository's, with
    `git config`, which is allowed), makes `git psuh` run push in the same process: no exec
    shows the push, so a command word git does not know is held."""
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    _git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "one")
    _git(work, "remote", "add", "origin", str(remote))
    _git(work, "config", "help.autocorrect", "1")
    _git(work, "psuh", "-q", "origin", "HEAD:refs/heads/outside")   # outside any agent: git pushes
    assert _git(remote, "rev-parse", "outside") == _git(work, "rev-parse", "HEAD")
    res = run(agent, f"cd {work} && git config help.autocorrect 1; echo rc=$?; "
                     "git psuh -q origin HEAD:refs/heads/guessed; echo rc=$?; "
                     "git -C . status --short; echo rc=$?; git push -q origin HEAD:refs/heads/named; echo rc=$?")
    assert res.stdout.split() == ["rc=0", "rc=137", "rc=0", "rc=0"], res
    refs = _git(remote, "for-each-ref", "--format=%(refname)").split()
    assert "refs/heads/guessed" not in refs and "refs/heads/named" in refs, refs
    assert "hold-git-command-git-does-not-name" in res.stderr and "spell the git command out" in res.stderr, res.stderr
    (v,) = verdicts(guard, "hold-git-command-git-does-not-name")
    assert v["verdict"]["action"] == "hold" and v["process"]["argv"][1] == "psuh"


class _GitHttp(BaseHTTPRequestHandler):
    """git's smart HTTP protocol on loopback: `git http-backend` run as a CGI program per request."""
    root = ""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._cgi()

    def do_POST(self) -> None:
        self._cgi()

    def _cgi(self) -> None:
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {"GIT_PROJECT_ROOT": self.root, "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
               "REQUEST_METHOD": self.command, "QUERY_STRING": query, "REMOTE_USER": "t",
               "REMOTE_ADDR": "127.0.0.1", "CONTENT_TYPE": self.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
               "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""), "PATH": os.environ["PATH"]}
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        sep = b"\r\n\r\n" if b"\r\n\r\n" in out else b"\n\n"
        head, _, payload = out.partition(sep)
        status, headers = 200, []
        for line in head.decode().splitlines():
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_a_remote_helper_the_agent_drives_itself_is_held(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """`git remote-http` reads `push +ref` on stdin: a force push no command line shows (red team).
    git push over HTTP starts the same helper, and that chain runs (its parent decides); the
    agent's own is held before it reads a byte.  The server's refs are the ground truth."""
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    _git(remote, "config", "http.receivepack", "true")
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    ident = ["-c", "user.name=t", "-c", "user.email=t@t"]
    _git(work, *ident, "commit", "-q", "--allow-empty", "-m", "one")
    _git(work, "push", "-q", str(remote), "HEAD:refs/heads/main")
    published = _git(remote, "rev-parse", "main")
    _git(work, *ident, "commit", "-q", "--amend", "--allow-empty", "-m", "rewritten")
    handler = type("H", (_GitHttp,), {"root": str(tmp_path)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/remote.git"
    cmds = tmp_path / "cmds"
    cmds.write_text("push +refs/heads/main:refs/heads/main\n\n")
    (tmp_path / "fake").mkdir()
    shutil.copy2("/bin/bash", tmp_path / "fake" / "git")
    hook = f"#!/bin/sh\nexec git remote-http o {url} <{cmds}\n"
    try:
        res = run(agent, f"cd {work} && git push -q {url} HEAD:refs/heads/side; echo rc=$?; "
                         f"git remote-http o {url} <{cmds}; echo rc=$?; "
                         f"/usr/lib/git-core/git-remote-http o {url} <{cmds}; echo rc=$?; "
                         # red team: git steered into starting the helper itself, with the agent's stdin
                         f"GIT_SSH_COMMAND='exec git remote-http o {url} <{cmds} >&2 #' git fetch -q ssh://x/y; "
                         f"git -c core.sshCommand='exec git remote-http o {url} <{cmds} >&2 #' ls-remote ssh://x/y; "
                         f"printf '{hook}' > .git/hooks/pre-push && chmod +x .git/hooks/pre-push && "
                         f"git push -q {remote} HEAD:refs/heads/hooked; rm .git/hooks/pre-push; "
                         # git holds the agent's pipe too, when the agent hands it down (red team)
                         f"git -c core.sshCommand='exec git remote-http o {url} <&5 >&2 #' fetch -q ssh://x/y "
                         f"5< <(cat {cmds}); "
                         # a copy of bash named git is not git
                         f"{tmp_path}/fake/git -c 'git remote-http o {url} <{cmds}; true' fetch; echo done")
        # git's own helper, started and fed by a judged push, passes the wire rule
        # (hold-git-push-on-the-wire) as the push above did; with a library preloaded into it
        # (code of the agent's own in git's process) it is held on the wire
        # or with extra headers from configuration, which can end git's headers early and send
        # the agent's own ref update as the body (red team): from the environment, and from the
        # repository's config
        res2 = run(agent, f"cd {work} && LD_PRELOAD=/lib/x86_64-linux-gnu/libc.so.6 "
                          f"git push -q {url} HEAD:refs/heads/preloaded; echo rc=$?; "
                          "GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=http.extraHeader GIT_CONFIG_VALUE_0='X-A: b' "
                          f"git push -q {url} HEAD:refs/heads/envheader; echo rc=$?; "
                          "git config http.extraHeader 'X-A: b' && "
                          f"git push -q {url} HEAD:refs/heads/fileheader; echo rc=$?; git config --unset http.extraHeader")
    finally:
        server.shutdown()
    assert "rc=0" not in res2.stdout.split(), res2
    refs = _git(remote, "for-each-ref", "--format=%(refname)")
    assert "preloaded" not in refs and "envheader" not in refs and "fileheader" not in refs, refs
    assert verdicts(guard, "hold-git-push-on-the-wire")
    assert res.stdout.split()[:3] == ["rc=0", "rc=137", "rc=137"] and "done" in res.stdout, res
    assert _git(remote, "rev-parse", "main") == published            # no force push happened
    assert _git(remote, "rev-parse", "side") == _git(work, "rev-parse", "HEAD")
    assert "hold-git-transport-not-started-by-git" in res.stderr, res.stderr
    verdicts(guard, "hold-git-transport-not-started-by-git", n=7)


MEMFD = ("import os, sys\n"
         "fd = os.memfd_create(sys.argv[1])\n"
         "os.write(fd, open('/usr/bin/touch', 'rb').read())\n"
         "os.execve(f'/proc/self/fd/{fd}', [sys.argv[1], sys.argv[2]], {})\n")
FDEXEC = ("import os, sys\n"
          "fd = os.open('/usr/bin/touch', os.O_RDONLY)\n"
          "os.execve(f'/proc/self/fd/{fd}', ['x', sys.argv[1]], {})\n")
ALIASES = {
    "symlink": "ln -s /usr/bin/touch {d}/tch; {d}/tch {f}",
    "hardlink": "ln /usr/bin/touch {d}/hl; {d}/hl {f}",
    "copy": "cp /usr/bin/touch {d}/cp; {d}/cp {f}",
    "loader": "/lib64/ld-linux-x86-64.so.2 /usr/bin/touch {f}",
    "loader-argv0": "/lib64/ld-linux-x86-64.so.2 --argv0 ok /usr/bin/touch {f}",
    "shebang": "printf '#!/usr/bin/touch\\n' > {d}/sb; chmod +x {d}/sb; {d}/sb {f}",
    "memfd": "python3 {d}/memfd.py touch {f}",
    "memfd-named": "python3 {d}/memfd.py harmless {f}",
    "fd-exec": "python3 {d}/fdexec.py {f}",
    "exec-a": "(exec -a ok touch {f})",
    "busybox": "busybox touch {f}",
    "busybox-link": "ln -s $(command -v busybox) {d}/touch; {d}/touch {f}",
    "busybox-argv0": "(exec -a busybox-x busybox touch {f})",
    "busybox-renamed": "cp $(command -v busybox) {d}/bb; (exec -a busybox {d}/bb touch {f})",
    "appended": "cp /usr/bin/touch {d}/ap; printf X >> {d}/ap; {d}/ap {f}",
}


@pytest.mark.parametrize("how", sorted(ALIASES))
def test_a_denied_program_is_denied_under_every_alias(guard: Daemon, agent: Path, tmp_path: Path, how: str) -> None:
    """`*/touch` means the program touch: a link, copy, loader run, interpreter line, memfd or
    multi-call binary of it is touch too (enforce.programs)."""
    (tmp_path / "memfd.py").write_text(MEMFD)
    (tmp_path / "fdexec.py").write_text(FDEXEC)
    target = tmp_path / f"denied-{how}"
    res = run(agent, ALIASES[how].format(d=tmp_path, f=target) + "; echo rc=$?")
    assert "rc=137" in res.stdout and not target.exists(), res
    evs = [e for e in verdicts(guard, "deny-by-argv", n=1) if str(target) in " ".join(e["process"]["argv"])
           or str(target) in json.dumps(e)]
    assert evs or wait_for(lambda: [e for e in guard.events(kinds=["verdict"]) if str(target) in json.dumps(e)],
                           what="the verdict")


def test_a_loader_target_the_agent_can_swap_is_any_program(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """`ld.so ./link` opens ./link again after the decision: a target the agent can change (here a
    symlink to `true`, which no rule names) is judged as any program, so every rule's path
    condition holds: the touch rule's argv condition, and the path-only aw-forbidden rule."""
    (tmp_path / "link").symlink_to("/usr/bin/true")
    res = run(agent, f"cd {tmp_path}; /lib64/ld-linux-x86-64.so.2 ./link {tmp_path}/denied-swappable; echo rc=$?; "
                     f"/lib64/ld-linux-x86-64.so.2 ./link {tmp_path}/fine; echo rc=$?")
    assert res.stdout.split() == ["rc=137", "rc=137"], res
    evs = wait_for(lambda: [e for e in guard.events(kinds=["verdict"]) if "swappable" in json.dumps(e)
                            or (f"{tmp_path}/fine" in json.dumps(e) and e["verdict"]["rule"] == "forbidden-binary")],
                   what="the verdicts")
    assert {e["verdict"]["rule"] for e in evs} >= {"forbidden-binary"}


def test_a_copy_is_read_once_then_decided_in_the_kernel(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    copy = tmp_path / "again"
    shutil.copy2("/usr/bin/touch", copy)
    res = run(agent, f"{copy} {tmp_path}/denied-1; echo rc=$?; {copy} {tmp_path}/denied-2; echo rc=$?; "
                     f"{copy} {tmp_path}/fine; echo rc=$?")
    assert res.stdout.split() == ["rc=137", "rc=137", "rc=0"], res
    first, second = (wait_for(lambda n=n: next((e for e in guard.events(kinds=["verdict"])
                                                if f"{tmp_path}/denied-{n}" in json.dumps(e)), None),
                              what=f"verdict {n}") for n in (1, 2))
    assert "SIGSTOP" in first["verdict"]["mechanism"]            # a new file: read once (sha256)
    assert second["verdict"]["mechanism"] == "SIGKILL at exec (kernel)"   # known now: no stop


def _outside_shell(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A shell outside every agent session (one a person left running, an editor server) that runs
    what it reads on a FIFO."""
    fifo = tmp_path / "cmds"
    os.mkfifo(fifo)
    return subprocess.Popen(["bash", "-c", f"while read -r cmd < {fifo}; do eval \"$cmd\"; done"],
                            start_new_session=True), fifo


def _runs_outside(fifo: Path, target: Path) -> bool:
    """The outside process is told to `touch target`: did the file appear (no agent rule held it)?"""
    done = target.parent / "ran"   # a name no rule denies
    with open(fifo, "w") as f:
        f.write(f"touch {target}; touch {done}\n")
    wait_for(done.exists, what="the outside process to run the command")
    return target.exists()


# a debugger's attach: seize, stop, (write), resume by detaching
ATTACH = ("import ctypes, sys, os\n"
          "libc = ctypes.CDLL(None, use_errno=True)\n"
          "pid = int(sys.argv[1])\n"
          "print('attach', libc.ptrace(0x4206, pid, 0, 0))\n"    # PTRACE_SEIZE
          "libc.ptrace(0x4207, pid, 0, 0)\n"                     # PTRACE_INTERRUPT
          "os.waitpid(pid, 0x40000000)\n"                        # __WALL: the stop
          "print('stopped')\n"
          "print('detach', libc.ptrace(17, pid, 0, 0))\n")       # PTRACE_DETACH: resumed


def test_a_process_the_agent_attaches_to_joins_its_session(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """ptrace into a process outside every agent session (a shell the user left running, an
    editor server) would let the agent act through it untracked: a debugger stops it, writes
    it, resumes it.  Joined at the resume (sched_waking), with or without the syscall hook."""
    outside, fifo = _outside_shell(tmp_path)
    try:
        (tmp_path / "attach.py").write_text(ATTACH)
        res = run(agent, f"{sys.executable} {tmp_path}/attach.py {outside.pid}")
        assert "attach 0" in res.stdout and "stopped" in res.stdout, res
        target = tmp_path / "denied-through-the-shell"
        assert not _runs_outside(fifo, target)      # it is the agent's now: the policy holds for it
        v = wait_for(lambda: next((e for e in guard.events(kinds=["verdict"]) if str(target) in json.dumps(e)),
                                  None), what="the verdict")
        assert v["session_id"] and v["verdict"]["rule"] == "deny-by-argv"
    finally:
        outside.kill()


THREADED_SHELL = """
import subprocess, sys, threading
def serve():
    open(sys.argv[2], "w").write(str(threading.get_native_id()))
    while True:
        with open(sys.argv[1]) as f:
            for cmd in f:
                subprocess.run(cmd, shell=True)
t = threading.Thread(target=serve)
t.start()
t.join()
"""


def test_an_attach_by_thread_id_joins_the_whole_process(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """ptrace takes a thread id: the kernel joined that number, and the process it belongs to
    (whose thread then runs what the agent wrote into it) stayed outside (red team)."""
    fifo, tid_file = tmp_path / "cmds", tmp_path / "tid"
    os.mkfifo(fifo)
    (tmp_path / "threaded.py").write_text(THREADED_SHELL)
    outside = subprocess.Popen([sys.executable, str(tmp_path / "threaded.py"), str(fifo), str(tid_file)],
                               start_new_session=True)
    try:
        tid = int(wait_for(lambda: tid_file.exists() and tid_file.read_text(), what="the worker thread"))
        assert tid != outside.pid
        (tmp_path / "attach.py").write_text(ATTACH)
        res = run(agent, f"{sys.executable} {tmp_path}/attach.py {tid}")
        assert "attach 0" in res.stdout and "stopped" in res.stdout, res
        time.sleep(1.0)                 # the daemon joins the process a few ms after the kernel
        target = tmp_path / "denied-through-a-thread"
        assert not _runs_outside(fifo, target)      # the process joined: the policy holds for it
    finally:
        outside.kill()


def test_a_failed_or_empty_attach_joins_nothing(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """A ptrace attach that fails (another user's process: EPERM) or a process_vm_writev that writes
    nothing leaves the target outside the session.  Joined at the call's entry, any process of
    the host, a person's root shell included, could be pulled under the agent's policy and
    made unable to approve (red team)."""
    outside, fifo = _outside_shell(tmp_path)
    shared = Path(tempfile.mkdtemp(prefix="aw-attach-"))   # nobody reads its script here
    shared.chmod(0o755)
    try:
        (shared / "attach.py").write_text(
            "import ctypes, sys\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print('attach', libc.ptrace(16, int(sys.argv[1]), 0, 0))\n")          # PTRACE_ATTACH
        (shared / "empty.py").write_text(
            "import ctypes, sys\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print('write', libc.process_vm_writev(int(sys.argv[1]), None, 0, None, 0, 0))\n")
        res = run(agent, f"setpriv --reuid=nobody --regid=nogroup --clear-groups {sys.executable} "
                         f"{shared}/attach.py {outside.pid}; {sys.executable} {shared}/empty.py {outside.pid}")
        assert "attach -1" in res.stdout and "write 0" in res.stdout, res
        target = tmp_path / "denied-outside-still"
        assert _runs_outside(fifo, target)          # still outside every session: no agent rule applies to it
    finally:
        outside.kill()
        shutil.rmtree(shared, ignore_errors=True)


def test_argv_decided_in_userspace(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    res = run(agent, f"aw-slowtouch {tmp_path}/denied-file; echo rc=$?; aw-slowtouch {tmp_path}/fine-file")
    assert "rc=137" in res.stdout, res
    assert not (tmp_path / "denied-file").exists()
    assert (tmp_path / "fine-file").exists()
    (v,) = verdicts(guard, "decided-in-userspace")
    assert v["verdict"]["prevented"] is True and "SIGSTOP" in v["verdict"]["mechanism"]
    assert f"{tmp_path}/denied-file" in v["process"]["argv"]


def test_job_control_shell_sees_no_stop(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """An interactive shell in a terminal (as an agent's terminal tool runs it): commands that
    argv rules name but do not match are decided in the kernel, never stopped, so the shell
    never reports them "Stopped" and never moves them to the background."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:   # pragma: no cover (the child)
        os.execve(str(agent), [str(agent), "--norc", "--noprofile", "-i"],
                  {"PATH": f"{agent.parent}:/usr/bin:/bin", "TERM": "dumb", "PS1": "$ "})
    out = b""

    def read_until(marker: bytes, timeout: float) -> None:
        """Until marker appears followed by a digit (the echo of the typed line has `$?` there)."""
        nonlocal out
        end = time.monotonic() + timeout
        pattern = re.compile(re.escape(marker) + rb"\d" if marker.endswith(b"=") else re.escape(marker))
        while not pattern.search(out) and time.monotonic() < end:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    return

    try:
        read_until(b"$ ", 10)
        for i in range(30):
            os.write(fd, f"touch {tmp_path}/jc-{i}; echo rc-{i}=$?\n".encode())
            read_until(f"rc-{i}=".encode(), 10)
        os.write(fd, f"touch {tmp_path}/denied-jc; echo rc-denied=$?\n".encode())
        read_until(b"rc-denied=", 10)
        read_until(b"$ ", 2)
        os.write(fd, b"exit\n")
        read_until(b"\nexit", 2)
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "Stopped" not in text, text
    assert all(f"rc-{i}=0" in text for i in range(30)), text
    assert "rc-denied=137" in text and not (tmp_path / "denied-jc").exists(), text


def _background(agent: Path, script: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(agent), "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True,
                            text=True, env={"PATH": f"{agent.parent}:/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": os.getcwd()})


def approval_states(d: Daemon, rid: str) -> list[str]:
    return sorted(e["approval"]["state"] for e in d.events(kinds=["approval"]) if e["approval"]["id"] == rid)


def test_held_command_is_refused_then_runs_once_after_approve(guard: Daemon, agent: Path,
                                                              tmp_path: Path) -> None:
    target = tmp_path / "held-approved"
    flag = tmp_path / "go"
    proc = _background(agent, f"touch {target}; echo rc=$?; "
                              f"while [ ! -e {flag} ]; do sleep 0.1; done; "
                              f"touch {target}; echo rc=$?; touch {target}; echo rc=$?")
    req = wait_pending(guard, "hold-touch")
    assert str(target) in req["summary"] and req["kind"] == "exec"
    time.sleep(0.5)
    assert not target.exists()          # refused: killed before its first instruction, nothing waits
    res = guard.cli_as_person("approve", req["id"])
    assert res.returncode == 0, res.stderr
    flag.touch()
    out, err = proc.communicate(timeout=30)
    # the first try refused (and told why on its stderr), the retry ran, a third needs a new approval
    assert out.split() == ["rc=137", "rc=0", "rc=137"], (out, err)
    assert f"request {req['id']}" in err and f"agentwarden approve {req['id']}" in err, err
    assert target.exists()
    wait_for(lambda: approval_states(guard, req["id"]) == ["approved", "pending"], what="approval events")
    # the retry was let through by the kernel (no stop), which needs both sides' identity to agree
    wait_for(lambda: any(e["verdict"]["mechanism"] == "approved earlier: let through by the kernel"
                         for e in guard.events(kinds=["verdict"])), what="the kernel's approved-retry verdict")
    assert "exec identity mismatch" not in guard.log.read_text()
    decided = [e for e in guard.events(kinds=["approval"])
               if e["approval"]["id"] == req["id"] and e["approval"]["state"] == "approved"]
    assert decided[0]["approval"]["decided_by"] == "root"


def test_an_approval_covers_exactly_the_approved_command(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """Not another tail past what the kernel reads, not other argument boundaries, not another
    environment (GIT_CONFIG_*, KUBECONFIG), not another directory: one agent session tries them
    all after the approval, then the approved command itself."""
    long_args = " ".join(["x" * 200] * 25)    # > 4 KiB: the kernel cannot name it; userspace does
    cases = {
        "short": (f"touch {tmp_path}/held-exact a", [f"touch '{tmp_path}/held-exact a'",
                                                     f"FOO=1 touch {tmp_path}/held-exact a",
                                                     f"(cd / && touch {tmp_path}/held-exact a)"]),
        "long": (f"touch {tmp_path}/held-long {long_args} tail",
                 [f"touch {tmp_path}/held-long {long_args} EVIL"]),
    }
    for name, (approved, variants) in cases.items():
        flag = tmp_path / f"go-{name}"
        script = f"cd {tmp_path}; {approved}; echo rc=$?; while [ ! -e {flag} ]; do sleep 0.1; done; "
        script += "".join(f"{v}; echo rc=$?; " for v in variants) + f"{approved}; echo rc=$?"
        proc = _background(agent, script)
        req = wait_for(lambda a=approved: next((r for r in pending(guard) if r["summary"].startswith(a[:80])), None),
                       what="the request")
        assert guard.cli_as_person("approve", req["id"], "--for", "5m").returncode == 0
        flag.touch()
        out, err = proc.communicate(timeout=60)
        assert out.split() == ["rc=137"] * (1 + len(variants)) + ["rc=0"], (name, out, err[-500:])
        for r in pending(guard):
            guard.cli_as_person("deny", r["id"])


def test_held_command_retried_before_approval_stays_refused(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    target = tmp_path / "held-denied"
    res = run(agent, f"touch {target}; echo rc=$?; touch {target}; echo rc=$?")
    assert res.stdout.split() == ["rc=137", "rc=137"] and not target.exists(), res
    reqs = [r for r in pending(guard) if str(target) in r["summary"]]
    assert len(reqs) == 1, reqs          # the retry joins the same request
    assert guard.cli_as_person("deny", reqs[0]["id"]).returncode == 0
    res = run(agent, f"touch {target}; echo rc=$?")
    assert "rc=137" in res.stdout and not target.exists()
    guard.cli_as_person("deny", next(r["id"] for r in pending(guard) if str(target) in r["summary"]))


def test_held_request_expires(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    target = tmp_path / "expires-soon"
    res = run(agent, f"touch {target}; echo rc=$?")
    assert "rc=137" in res.stdout and not target.exists()
    req = next(r for r in pending(guard) if str(target) in r["summary"])
    wait_for(lambda: "expired" in approval_states(guard, req["id"]), what="the expiry event")
    assert guard.cli_as_person("approve", req["id"]).returncode != 0


def test_sigcont_cannot_release_a_hold(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """The agent hammers its held command with SIGCONT and `kill -CONT -PGID`: it never runs."""
    target = tmp_path / "held-resumed"
    res = run(agent, f"touch {target} & p=$!; for i in $(seq 300); do kill -CONT $p 2>/dev/null; done; "
                     f"wait $p; echo rc=$?; set -m; touch {target} & p=$!; kill -CONT -- -$p 2>/dev/null; "
                     f"fg >/dev/null 2>&1; wait $p; echo done")
    assert "done" in res.stdout or res.returncode in (137, -9), res
    time.sleep(0.5)
    assert not target.exists(), res
    for r in pending(guard):
        if str(target) in r["summary"]:
            guard.cli_as_person("deny", r["id"])


def _started_then_frozen(guard: Daemon, agent: Path, script: str, flag: Path) -> subprocess.Popen[str]:
    """Start the agent (its session begins while the daemon runs), freeze the daemon, then let the
    agent go on: every exec that needs a decision now waits for it as long as the test wants."""
    assert guard.proc is not None
    proc = _background(agent, f"while [ ! -e {flag} ]; do sleep 0.05; done; {script}")
    wait_for(lambda: any(e["process"]["pid"] == proc.pid for e in guard.events(kinds=["session_start"])),
             what="the session start")
    os.kill(guard.proc.pid, signal.SIGSTOP)
    flag.touch()
    return proc


def test_resume_during_the_decision_is_killed(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """With the daemon frozen, an exec waits for its decision; a SIGCONT from outside every agent
    session (a tmux server, a cron job) resumes it: the kernel kills it at the resume, from the
    sender's context (a kfunc), before its loader runs."""
    assert guard.proc is not None
    target = tmp_path / "fine-but-resumed"
    try:
        proc = _started_then_frozen(guard, agent, f"exec aw-slowtouch {target}", tmp_path / "go")
        wait_for(lambda: _proc_state(proc.pid) == "T" and "slowtouch" in Path(f"/proc/{proc.pid}/comm").read_text(),
                 timeout=10, what="the decision stop")
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(10)
    finally:
        os.kill(guard.proc.pid, signal.SIGCONT)
    assert proc.returncode == -9 and not target.exists()
    (v,) = wait_for(lambda: [e for e in verdicts(guard, "tamper") if f"pid {proc.pid}," in e["verdict"]["mechanism"]],
                    what="the resume's verdict")
    assert "SIGCONT" in v["verdict"]["mechanism"] and "killed at once" in v["verdict"]["mechanism"], v


PTRACE_ATTACH, PTRACE_CONT = 16, 7


@pytest.mark.parametrize("linked", ["dynamic", "static"])
def test_a_debugger_cannot_resume_an_exec_waiting_for_its_decision(guard: Daemon, agent: Path, tmp_path: Path,
                                                                   linked: str) -> None:
    """PTRACE_ATTACH and PTRACE_CONT resume a stopped process without any SIGCONT: it is killed
    when the debugger wakes it, from the debugger's context (sched_waking, a kfunc); should it
    win that race, a dynamic program still meets the uprobe on its loader's entry.  Neither
    reaches its first system call."""
    assert guard.proc is not None
    libc = ct.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ct.c_long, ct.c_long, ct.c_void_p, ct.c_void_p]
    target = tmp_path / "fine-but-debugged"
    program = distinct_program(tmp_path / "aw-newtouch", static=linked == "static")
    try:
        proc = _started_then_frozen(guard, agent, f"exec {program} {target}", tmp_path / "go")
        wait_for(lambda: _proc_state(proc.pid) == "T" and "aw-newtouch" in Path(f"/proc/{proc.pid}/comm").read_text(),
                 timeout=10, what="the decision stop")
        assert libc.ptrace(PTRACE_ATTACH, proc.pid, None, None) == 0, ct.get_errno()
        os.waitpid(proc.pid, 0x40000000)   # __WALL: the attach stop
        assert libc.ptrace(PTRACE_CONT, proc.pid, None, None) == 0, ct.get_errno()
        _, status = os.waitpid(proc.pid, 0x40000000)
        while os.WIFSTOPPED(status):       # a signal on the way to its death: pass it on
            libc.ptrace(PTRACE_CONT, proc.pid, None, ct.c_void_p(os.WSTOPSIG(status)))
            _, status = os.waitpid(proc.pid, 0x40000000)
    finally:
        os.kill(guard.proc.pid, signal.SIGCONT)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert not target.exists()
    wants = (f"woke pid {proc.pid} from a ptrace stop", "before the dynamic loader's first instruction")
    (v, *_) = wait_for(lambda: [e for e in verdicts(guard, "tamper")
                                if any(w in e["verdict"]["mechanism"] for w in wants)
                                and str(proc.pid) in json.dumps(e)], what="the escape's verdict")
    assert "at its first system call" not in v["verdict"]["mechanism"], v


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.parametrize("wrapper", [
    "su -s /bin/sh awtest -c '{cmd}'",
    "runuser -u awtest -- {cmd}",
    "setpriv --reuid=awtest --regid=awtest --clear-groups {cmd}",
    "sudo -n -u awtest {cmd}",
])
def test_no_hang_under_su_sudo_runuser_setpriv(guard: Daemon, agent: Path, tmp_path: Path, test_user: Any,
                                               wrapper: str) -> None:
    """The decision stop is made long (the daemon frozen for a moment) so that su/sudo/runuser see
    their child stop and stop themselves; the daemon resumes them after deciding."""
    assert guard.proc is not None
    if wrapper.startswith("sudo") and not shutil.which("sudo"):
        pytest.fail("sudo is not installed (deploy/setup.sh installs it)")
    shared = Path(tempfile.mkdtemp(prefix="aw-wrap-"))   # pytest's tmp tree is 0700: awtest cannot reach it
    shared.chmod(0o777)
    target = shared / "fine-under-wrapper"
    slow = distinct_program(shared / "aw-slowtouch")   # decided in userspace: it stops
    cmd = wrapper.format(cmd=f"{slow} {target}")
    try:
        proc = _started_then_frozen(guard, agent, f"{cmd}; echo rc=$?", shared / "go")
        time.sleep(1.0)
        assert _proc_state(proc.pid) != "", "the agent ended while the daemon was frozen"
    finally:
        os.kill(guard.proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=20)
    assert "rc=0" in out and target.exists(), (out, err)
    shutil.rmtree(shared, ignore_errors=True)


def test_no_hang_under_sudo_when_the_exec_waits_for_its_tls_uprobes(guard: Daemon, agent: Path, test_user: Any) -> None:
    """sudo stops itself when its child stops; a child stopped only for its TLS uprobes (a program
    that exports OpenSSL, found ahead on the agent's PATH: guard_exec.bpf.c tls_unattached) is
    resumed with no decision to make, and sudo with it (the daemon frozen meanwhile, so that sudo
    sees the stop)."""
    assert guard.proc is not None
    if not shutil.which("sudo") or not shutil.which("node"):
        pytest.fail("sudo and node are installed by deploy/setup.sh")
    shared = Path(tempfile.mkdtemp(prefix="aw-tlswait-"))
    shared.chmod(0o755)
    flag = shared / "go"
    try:
        node_found_ahead(guard, agent, shared)
        proc = _background(agent, f"while [ ! -e {flag} ]; do sleep 0.05; done; "
                                  f"sudo -n -u awtest {shared}/node -e 'console.log(6*7)'; echo rc=$?")
        wait_for(lambda: any(e["process"]["pid"] == proc.pid for e in guard.events(kinds=["session_start"])),
                 what="the session start")
        os.kill(guard.proc.pid, signal.SIGSTOP)
        try:
            flag.touch()
            time.sleep(1.0)
            assert _proc_state(proc.pid) != "", "the agent ended while the daemon was frozen"
        finally:
            os.kill(guard.proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
        assert "42" in out and "rc=0" in out, (out, err)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_approval_from_inside_an_agent_session_is_refused(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    target = tmp_path / "held-self-approved"
    cli = f"{sys.executable} -m agentwarden.cli.main"
    # the agent asks until the held touch is listed: a busy daemon may list it after any fixed sleep
    first_id = ("'import json,sys; line=sys.stdin.readline(); "
                "print(json.loads(line)[\"id\"] if line.strip() else \"\")'")
    script = (f"touch {target} & "
              f"for i in $(seq 100); do id=$({cli} pending --json --config {guard.config} | "
              f"{sys.executable} -c {first_id}); [ -n \"$id\" ] && break; sleep 0.2; done; "
              f"{cli} approve \"$id\" --config {guard.config}; echo approve-rc=$?; wait")
    proc = _background(agent, script)
    req = wait_pending(guard, "hold-touch")
    wait_for(lambda: any("refused approve" in line for line in guard.log.read_text().splitlines()),
             what="the refusal in the daemon log")
    assert req["id"] in [r["id"] for r in pending(guard)] and not target.exists()
    guard.cli_as_person("deny", req["id"])
    out, err = proc.communicate(timeout=30)
    assert "approve-rc=1" in out and "inside an agent session" in err, (out, err)


# ---- connect and quarantine -------------------------------------------------------------------


class Listener:
    """A TCP server on loopback that accepts and closes."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.close()


CONNECT = ("import socket, sys\n"
           "for host, port in zip(sys.argv[1::2], sys.argv[2::2]):\n"
           "    try:\n"
           "        socket.create_connection((host, int(port)), timeout=5).close(); print(host, 'ok')\n"
           "    except OSError as e: print(host, 'errno', e.errno)\n")


def test_denied_connect_fails_with_eperm(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    ok, bad = Listener("127.0.0.1"), Listener("127.0.0.77")
    script = tmp_path / "connect.py"
    script.write_text(CONNECT)
    res = run(agent, f"{sys.executable} {script} 127.0.0.77 {bad.port} 127.0.0.1 {ok.port}")
    assert "127.0.0.77 errno 1" in res.stdout and "127.0.0.1 ok" in res.stdout, res
    (v,) = verdicts(guard, "no-forbidden-host")
    assert v["verdict"]["prevented"] is True and f"127.0.0.77:{bad.port}" in v["verdict"]["mechanism"]
    # outside an agent, the same connect works
    socket.create_connection(("127.0.0.77", bad.port), timeout=5).close()


UDP = ("import socket, sys\n"
       "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
       "for host, port in zip(sys.argv[1::2], sys.argv[2::2]):\n"
       "    for how in ('sendto', 'sendmsg'):\n"
       "        try:\n"
       "            if how == 'sendto': s.sendto(how.encode(), (host, int(port)))\n"
       "            else: s.sendmsg([how.encode()], [], 0, (host, int(port)))\n"
       "            print(host, how, 'ok')\n"
       "        except OSError as e: print(host, how, 'errno', e.errno)\n")


def test_unconnected_datagrams_obey_connect_rules(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """sendto/sendmsg with an address never call connect(): the cgroup sendmsg hooks judge them."""
    bad = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bad.bind(("127.0.0.77", 0))
    ok = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ok.bind(("127.0.0.1", 0))
    script = tmp_path / "udp.py"
    script.write_text(UDP)
    res = run(agent, f"{sys.executable} {script} 127.0.0.77 {bad.getsockname()[1]} 127.0.0.1 {ok.getsockname()[1]}")
    assert res.stdout.split("\n")[:4] == ["127.0.0.77 sendto errno 1", "127.0.0.77 sendmsg errno 1",
                                          "127.0.0.1 sendto ok", "127.0.0.1 sendmsg ok"], res
    bad.settimeout(0.5)
    with pytest.raises(socket.timeout):
        bad.recv(100)                                  # nothing reached the forbidden host
    assert ok.recv(100) == b"sendto" and ok.recv(100) == b"sendmsg"
    evs = wait_for(lambda: [e for e in verdicts(guard, "no-forbidden-host", n=1)
                            if e["verdict"]["mechanism"].startswith("cgroup sendmsg")], what="the UDP verdicts")
    assert evs[0]["verdict"]["prevented"] is True
    sent = wait_for(lambda: [e for e in guard.events(kinds=["connect"]) if (e.get("net") or {}).get("direction")
                             == "sendto" and e["net"]["dst_port"] == ok.getsockname()[1]], what="the sendto event")
    assert sent[0]["net"]["transport"] == "udp" and sent[0]["net"]["dst_ip"] == "127.0.0.1" and len(sent) == 1


def test_kill_rule_refuses_and_ends_the_process(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    target = Listener("127.0.0.78")
    script = tmp_path / "connect.py"
    script.write_text(CONNECT + "import time; time.sleep(5); print('survived')\n")
    res = run(agent, f"{sys.executable} {script} 127.0.0.78 {target.port}; echo rc=$?")
    assert "survived" not in res.stdout and "rc=137" in res.stdout, res   # its output died with it
    (v,) = verdicts(guard, "kill-on-connect")
    assert v["verdict"]["action"] == "kill" and v["verdict"]["prevented"] is True


def test_quarantine_cuts_the_session_and_release_restores_it(guard: Daemon, agent: Path,
                                                              tmp_path: Path) -> None:
    ok = Listener("127.0.0.1")
    script = tmp_path / "connect.py"
    script.write_text(CONNECT)
    flag = tmp_path / "released"
    proc = _background(agent, f"{sys.executable} {script} 127.0.0.1 {ok.port}; aw-quarantine {tmp_path}/q; "
                              f"{sys.executable} {script} 127.0.0.1 {ok.port}; "
                              f"while [ ! -e {flag} ]; do sleep 0.2; done; "
                              f"{sys.executable} {script} 127.0.0.1 {ok.port}")
    (v,) = verdicts(guard, "quarantine-me")
    session = v["session_id"]
    nft = subprocess.run(["nft", "list", "table", "inet", "agentwarden"], capture_output=True, text=True)
    assert "sessions" in nft.stdout and "timeout" in nft.stdout, nft
    wait_for(lambda: any(e["verdict"]["action"] == "quarantine" and e["verdict"]["subject"] == "session"
                         for e in guard.events(kinds=["verdict"], session=session)), what="quarantine verdict")
    time.sleep(1.0)
    res = guard.cli("release", session)
    assert res.returncode == 0 and "released" in res.stdout, res
    flag.touch()
    out, _ = proc.communicate(timeout=30)
    lines = out.splitlines()
    assert lines[0] == "127.0.0.1 ok" and lines[1] == "127.0.0.1 errno 113" and lines[2] == "127.0.0.1 ok", out
    assert not (tmp_path / "q").exists()


# ---- SQL ----------------------------------------------------------------------------------------



def logged_messages(pg: PgServer) -> list[str]:
    path = pg.data / "log" / "pg.csv"
    with open(path, newline="") as f:
        return [row[13] for row in csv.reader(f) if len(row) > 13]


def refused(res: subprocess.CompletedProcess[str]) -> bool:
    """The send failed (EACCES) and the daemon closed the connection the client was waiting on."""
    return "connection abort" in res.stderr or "Permission denied" in res.stderr


def psql(agent: Path, dsn: str, sql: str) -> subprocess.CompletedProcess[str]:
    return run(agent, f"psql -X '{dsn}' -v ON_ERROR_STOP=0 <<'EOF'\n{sql}\nEOF\necho rc=$?")


DISGUISES = [
    "drop table guarded",
    "DROP /* hidden */ TABLE guarded",
    "-- a comment first\n  DrOp\n\t  TaBlE   guarded",
    "select 1; drop table guarded",
    "select 'a;b' as x; /* x */ drop table if exists guarded",
    "truncate guarded",
    "drop table guarded \\bind \\g",      # extended protocol: Parse/Bind/Execute
    "select 1 as x$$; drop table guarded; select 1 as y$$",   # $ inside a name opens no dollar quote
]


def test_drop_table_refused_in_every_disguise(guard: Daemon, agent: Path, pg: PgServer) -> None:
    pg.psql("awtest", "create table guarded (a int); insert into guarded values (1)")
    for i, sql in enumerate(DISGUISES):
        res = psql(agent, pg.dsn, f"insert into guarded values ({100 + i});\n{sql};")
        assert refused(res), (sql, res)
        assert pg.psql("awtest", "select count(*) from guarded").strip() == str(2 + i), sql
    messages = "\n".join(logged_messages(pg)).lower()
    assert "drop table guarded" not in messages and "truncate guarded" not in messages
    assert "drop table if exists guarded" not in messages
    assert "insert into guarded values (106)" in messages        # the statement before still worked
    evs = verdicts(guard, "no-drop-table", n=len(DISGUISES))
    assert all(e["verdict"]["prevented"] and e["verdict"]["mechanism"].startswith("sk_msg") for e in evs), \
        [(e["verdict"], e.get("sql"), e.get("process", {}).get("argv")) for e in evs]
    assert any("DROP TABLE GUARDED" in e["sql"]["query"] for e in evs)


def test_drop_table_refused_over_tls(guard: Daemon, agent: Path) -> None:
    server = PgServer(ssl=True)
    server.start()
    try:
        server.psql("awtest", "create table guarded_tls (a int)")
        res = psql(agent, f"sslmode=require {server.dsn}", "select 'before';\ndrop table guarded_tls;")
        assert "rc=137" in res.stdout or res.returncode in (137, -9), res     # psql killed at SSL_write
        assert server.psql("awtest", "select count(*) from guarded_tls").strip() == "0"
        messages = "\n".join(logged_messages(server)).lower()
        assert "drop table guarded_tls" not in messages and "select 'before'" in messages
        evs = [e for e in verdicts(guard, "no-drop-table", n=1) if e["verdict"]["mechanism"] ==
               "SIGKILL at SSL_write"]
        assert evs or verdicts(guard, "no-drop-table", n=len(DISGUISES) + 1)
    finally:
        server.stop()


OPAQUE = [
    "do $$ begin execute 'drop table ' || 'opaque_t'; end $$",
    "create function wipe() returns void language plpgsql as $$ begin execute 'drop table opaque_t'; end $$",
    "create or replace procedure wipe2() language sql as $$ drop table opaque_t $$",
    "copy (select 1) to program 'touch /tmp/aw-opaque-copy-program'",
    "prepare p as delete from opaque_t",
    "create trigger t after insert on opaque_t execute function suppress_redundant_updates_trigger()",
    "select 1 /*" + "x" * 5000 + "*/; drop table opaque_t",    # the DROP is past what the kernel reads
]


def test_opaque_sql_fails_closed(guard: Daemon, agent: Path, pg: PgServer) -> None:
    """Statements whose effect cannot be read from their text meet every denying rule (here the
    DROP TABLE deny), in the kernel, before the server sees them; one a rule names (CALL) passes."""
    pg.psql("awtest", "create table opaque_t (a int); insert into opaque_t values (1); "
                      "create procedure noop() language sql as $$ select 1 $$")
    for sql in OPAQUE:
        res = psql(agent, pg.dsn, f"{sql};")
        assert refused(res), (sql, res)
        assert pg.psql("awtest", "select count(*) from opaque_t").strip() == "1", sql
    assert not Path("/tmp/aw-opaque-copy-program").exists()
    messages = "\n".join(logged_messages(pg)).lower()
    assert "opaque_t" not in messages.replace("create table opaque_t", "").replace(
        "insert into opaque_t", "").replace("from opaque_t", ""), messages[-2000:]
    res = psql(agent, pg.dsn, "call noop();")
    assert "CALL" in res.stdout and not refused(res), res
    evs = verdicts(guard, "no-drop-table", n=len(OPAQUE))
    assert all(e["verdict"]["prevented"] for e in evs)


def test_held_statement_passes_after_approval(guard: Daemon, agent: Path, pg: PgServer, tmp_path: Path) -> None:
    pg.psql("awtest", "create table indexed (a int); create index indexed_a on indexed (a)")
    flag = tmp_path / "approved"
    # one agent session: refused, then (once approved) the same statement, spelled differently
    proc = _background(agent, f"psql -X '{pg.dsn}' -c 'drop index indexed_a'; echo rc=$?; "
                              f"while [ ! -e {flag} ]; do sleep 0.2; done; "
                              f"psql -X '{pg.dsn}' -c 'DROP   INDEX  indexed_a'; echo rc=$?")
    req = wait_pending(guard, "hold-drop-index")
    assert req["kind"] == "sql" and "DROP INDEX INDEXED_A" in req["summary"]
    assert pg.psql("awtest", "select count(*) from pg_indexes where indexname = 'indexed_a'").strip() == "1"
    assert guard.cli_as_person("approve", req["id"]).returncode == 0
    flag.touch()
    out, err = proc.communicate(timeout=60)
    assert "rc=2" in out and "connection abort" in err, (out, err)     # the first attempt
    assert out.rstrip().endswith("DROP INDEX\nrc=0"), (out, err)         # the retry
    assert pg.psql("awtest", "select count(*) from pg_indexes where indexname = 'indexed_a'").strip() == "0"


# ---- policy reload and self-protection ----------------------------------------------------------


def test_invalid_policy_is_rejected_and_the_old_one_stays(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    good = guard.policy.read_text()
    guard.policy.write_text(good.replace("action: deny\n", "action: obliterate\n", 1))
    try:
        res = guard.cli("policy", "reload")
        assert res.returncode == 1 and "no-drop-table" in res.stderr and "action" in res.stderr, res
        assert "line" in res.stderr or ":5:" in res.stderr or "policy.yaml:" in res.stderr
    finally:
        guard.policy.write_text(good)
    res = run(agent, f"aw-forbidden {tmp_path}/still; echo rc=$?")
    assert "rc=137" in res.stdout and not (tmp_path / "still").exists()
    assert guard.cli("policy", "reload").returncode == 0
    # SIGHUP from outside any agent reloads too
    assert guard.proc is not None
    loaded = guard.log.read_text().count("policy loaded")
    guard.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: guard.log.read_text().count("policy loaded") > loaded, what="the SIGHUP reload")


def test_agent_cannot_signal_the_daemon(guard: Daemon, agent: Path) -> None:
    assert guard.proc is not None
    pid = guard.proc.pid
    res = run(agent, f"/bin/kill -TERM {pid}; echo rc=$?; /bin/kill -HUP {pid}; echo rc=$?")
    assert res.stdout.count("rc=137") == 2, res
    time.sleep(1.0)
    assert guard.proc.poll() is None and guard.request("ping")["pid"] == pid
    evs = verdicts(guard, "self-protection", n=2)
    assert all(e["verdict"]["action"] == "kill" for e in evs)
    assert json.dumps(evs[0]).count("kill") >= 1


INT80_PTRACE = r"""
#include <stdio.h>
#include <stdlib.h>
/* ptrace through the 32-bit system call gate: its own numbers and registers (red team) */
static long ptrace32(long request, long pid)
{
    long ret;
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(26), "b"(request), "c"(pid), "d"(0), "S"(0) : "memory");
    return ret;
}
int main(int argc, char **argv)
{
    long pid = atol(argv[1]);
    printf("seize %ld\n", ptrace32(0x4206, pid));
    printf("detach %ld\n", ptrace32(17, pid));
    return 0;
}
"""


def test_a_32_bit_ptrace_joins_its_target_too(hardened: Daemon, hard_agent: Path, tmp_path: Path) -> None:
    """The syscall hook read only x86-64 numbers: ptrace through `int 0x80` (number 26) joined
    nothing, and the agent ran a denied command through a root shell outside (red team)."""
    agent = hard_agent   # joined at the syscall: the hardened mode
    (tmp_path / "p32.c").write_text(INT80_PTRACE)
    subprocess.run(["gcc", "-O1", "-o", str(tmp_path / "p32"), str(tmp_path / "p32.c")], check=True)
    outside, fifo = _outside_shell(tmp_path)
    try:
        res = run(agent, f"{tmp_path}/p32 {outside.pid}")
        assert "seize 0" in res.stdout, res
        target = tmp_path / "denied-through-int80"
        assert not _runs_outside(fifo, target)      # it joined the agent's session: the policy holds for it
    finally:
        outside.kill()


def test_a_root_agent_attaching_to_the_daemon_does_not_kill_it(hardened: Daemon, hard_agent: Path, tmp_path: Path) -> None:
    """PTRACE_SEIZE of the daemon succeeds before the kernel's SIGKILL lands on the agent; the
    daemon then joined the agent's session and its own calls killed it (red team).  The agent
    dies; the daemon never joins a session."""
    guard, agent = hardened, hard_agent   # killed at the syscall: the hardened mode
    assert guard.proc is not None
    pid = guard.proc.pid
    (tmp_path / "seize.py").write_text(
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('seize', libc.ptrace(0x4206, int(sys.argv[1]), 0, 0), flush=True)\n"
        "print('detach', libc.ptrace(17, int(sys.argv[1]), 0, 0), flush=True)\n")
    res = run(agent, f"{sys.executable} {tmp_path}/seize.py {pid}; echo rc=$?")
    assert "rc=137" in res.stdout, res
    time.sleep(2.0)
    assert guard.proc.poll() is None and guard.request("ping")["pid"] == pid


# Writes through /proc/PID/mem, the ways an agent would reach that file: each prints "opened"
# once it holds the descriptor and "wrote N" if the write returned.
MEM_WRITE = """
import os, sys
pid, how, addr, data = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
path = f"/proc/{pid}/mem"
if how == "task":      # another thread's file: /proc/PID/task/TID/mem
    path = f"/proc/{pid}/task/{max(int(t) for t in os.listdir(f'/proc/{pid}/task'))}/mem"
fd = 7 if how == "inherited" else os.open(path, os.O_RDWR)   # 7: the shell's `7<>` redirection
if how == "dup":
    fd = os.dup2(fd, 42)
print("opened", flush=True)
if how == "write":
    os.lseek(fd, addr, os.SEEK_SET)
    n = os.write(fd, data)
elif how == "writev":
    os.lseek(fd, addr, os.SEEK_SET)
    n = os.writev(fd, [data[:4], data[4:]])
elif how == "pwritev":
    n = os.pwritev(fd, [data], addr)
else:
    n = os.pwrite(fd, data, addr)
print("wrote", n, flush=True)
"""


def _heap_top(pid: int) -> int:
    """An address in the free top of a process's brk heap (glibc's main arena), 8 bytes from its end."""
    line = next(x for x in Path(f"/proc/{pid}/maps").read_text().splitlines() if x.endswith("[heap]"))
    return int(line.split("-")[1].split()[0], 16) - 8


@pytest.mark.parametrize("how", ["pwrite", "write", "writev", "pwritev", "task", "dup", "inherited"])
def test_a_root_agent_writing_the_daemons_memory_dies_before_a_byte_lands(hardened: Daemon, hard_agent: Path,
                                                                         tmp_path: Path, how: str) -> None:
    """/proc/PID/mem needs no ptrace attach and no process_vm_writev: a root agent could write the
    daemon's memory through it (red team).  The write is seen at its system call, whatever the
    descriptor's history (opened, another thread's file, dup'd, inherited from the shell): the
    agent is killed with the call's first page not yet pinned, so the marker never lands; the
    daemon records it and keeps answering."""
    guard, agent = hardened, hard_agent   # seen at the syscall: the hardened mode
    assert guard.proc is not None
    pid = guard.proc.pid
    addr = _heap_top(pid)
    marker = b"AW" + os.urandom(6)
    (tmp_path / "memw.py").write_text(MEM_WRITE)
    redirect = f"7<>/proc/{pid}/mem" if how == "inherited" else ""
    res = run(agent, f"{sys.executable} {tmp_path}/memw.py {pid} {how} {addr} {marker.hex()} {redirect}; echo rc=$?")
    assert "opened" in res.stdout and "wrote" not in res.stdout and "rc=137" in res.stdout, res
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        assert os.pread(fd, 8, addr) != marker
    except OSError:
        pass      # the heap shrank since: nothing was written there either way
    finally:
        os.close(fd)
    call = {"write": "write", "writev": "writev", "pwritev": "pwritev2"}.get(how, "pwrite64")   # glibc: pwritev2
    v = wait_for(lambda: next((e for e in guard.events(kinds=["verdict"]) if e["verdict"]["mechanism"].endswith(
        f": {call} to /proc/PID/mem aimed at the daemon") and str(tmp_path) in " ".join(e["process"]["argv"])),
        None), what="the self-protection record")
    assert v["verdict"]["rule"] == "self-protection" and v["verdict"]["action"] == "kill" and v["session_id"]
    assert guard.request("ping")["pid"] == pid


def test_writing_an_outside_process_memory_joins_it_to_the_session(hardened: Daemon, hard_agent: Path,
                                                                    tmp_path: Path) -> None:
    """A write into a shell of the agent's user that runs outside every session (through its
    /proc/PID/mem, no ptrace) could make it run anything: the shell joins the writer's session
    when the write succeeds, and the policy holds for what it runs."""
    outside, fifo = _outside_shell(tmp_path)
    try:
        time.sleep(0.2)
        addr = _heap_top(outside.pid)
        fd = os.open(f"/proc/{outside.pid}/mem", os.O_RDONLY)
        same = os.pread(fd, 8, addr)    # written back as it is: the shell must keep working
        os.close(fd)
        (tmp_path / "memw.py").write_text(MEM_WRITE)
        res = run(hard_agent, f"{sys.executable} {tmp_path}/memw.py {outside.pid} pwrite {addr} {same.hex()}")
        assert "wrote 8" in res.stdout, res
        time.sleep(0.5)
        assert not _runs_outside(fifo, tmp_path / "denied-after-a-mem-write")
    finally:
        outside.kill()


# A process outside every session that vforks a child which stops before its exec: the child
# shares its parent's memory, so /proc/CHILD/mem writes the parent (red team: the daemon's own
# `ss -K` child).  The parent then waits for the child, and afterwards runs what the FIFO says.
VFORKER = r"""
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/wait.h>
int main(int argc, char **argv) {
    pid_t child = vfork();
    if (child == 0) {
        raise(SIGSTOP);          /* stopped with the parent's memory, before any exec */
        _exit(0);
    }
    waitpid(child, NULL, 0);
    execl("/bin/sh", "sh", "-c", argv[1], (char *)NULL);
    return 1;
}
"""


def test_a_write_through_a_vfork_childs_mem_joins_the_memorys_owner(hardened: Daemon, hard_agent: Path,
                                                                      tmp_path: Path) -> None:
    """The file names the child; the memory is the parent's: the owner joins too, so what the
    parent runs afterwards is judged as the agent's (and into the daemon's memory, by any pid,
    the writer dies: guard_memwrite)."""
    (tmp_path / "vforker.c").write_text(VFORKER)
    subprocess.run(["gcc", "-O1", "-o", str(tmp_path / "vforker"), str(tmp_path / "vforker.c")], check=True)
    target = tmp_path / "denied-after-vfork"
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    parent = subprocess.Popen([str(tmp_path / "vforker"), f"read x < {fifo}; touch {target}; touch {tmp_path}/ran"],
                              start_new_session=True)
    try:
        child = int(wait_for(lambda: (lambda k: k[0] if k else None)(
            [int(c) for c in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]),
            what="the vfork child"))
        wait_for(lambda: Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
                 what="the child stopped")
        addr = _heap_top(child) if "[heap]" in Path(f"/proc/{child}/maps").read_text() else None
        if addr is None:     # no brk heap: the first writable mapping of the program
            line = next(x for x in Path(f"/proc/{child}/maps").read_text().splitlines() if " rw-p " in x)
            addr = int(line.split("-")[0], 16)
        fd = os.open(f"/proc/{child}/mem", os.O_RDONLY)
        same = os.pread(fd, 8, addr)
        os.close(fd)
        (tmp_path / "memw.py").write_text(MEM_WRITE)
        res = run(hard_agent, f"{sys.executable} {tmp_path}/memw.py {child} pwrite {addr} {same.hex()}")
        assert "wrote 8" in res.stdout, res
        os.kill(child, signal.SIGCONT)          # the child exits; the parent reads the FIFO next
        with open(fifo, "w") as f:
            f.write("go\n")
        parent.wait(30)
        assert not target.exists()              # the parent joined the session: denied-by-argv
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_root_agent_cannot_quietly_starve_or_unplug_the_daemon(hardened: Daemon, hard_agent: Path,
                                                                 tmp_path: Path) -> None:
    """Lower its limits or its priority (killed at the syscall, undone), remove its control
    socket (recreated): each is recorded, and the daemon still answers."""
    guard, agent = hardened, hard_agent   # killed at the syscall: the hardened mode
    assert guard.proc is not None
    pid = guard.proc.pid
    before = Path(f"/proc/{pid}/limits").read_text()
    # the soft limit: a lowered hard limit cannot be raised again without CAP_SYS_RESOURCE, which
    # root lacks on these machines (it is recorded as not restorable, and this daemon serves others)
    hard = next(line.split()[4] for line in before.splitlines() if line.startswith("Max open files"))
    # one prlimit64 call that sets (prlimit(1) reads first, and dies at that first call)
    setter = ("import ctypes, sys\n"
              "class R(ctypes.Structure): _fields_ = [('cur', ctypes.c_ulong), ('max', ctypes.c_ulong)]\n"
              "r = R(1000, int(sys.argv[2]))\n"
              "ctypes.CDLL(None).prlimit(int(sys.argv[1]), 7, ctypes.byref(r), None)\n")
    (tmp_path / "setlimit.py").write_text(setter)
    res = run(agent, f"{sys.executable} {tmp_path}/setlimit.py {pid} {hard}; echo rc=$?; "
                     f"renice -n 19 -p {pid}; echo rc=$?")
    assert res.stdout.split() == ["rc=137", "rc=137"], res
    wait_for(lambda: Path(f"/proc/{pid}/limits").read_text() == before, what="the limits restored")
    wait_for(lambda: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16]) != 19,
             what="the priority restored")
    run(agent, f"rm -f {guard.socket}")
    wait_for(lambda: guard.socket.exists(), what="the socket recreated")
    assert guard.request("ping")["pid"] == pid
    # prlimit64 dies at its entry before it sets anything here; setpriority takes effect and is undone
    mechs = wait_for(lambda: (lambda m: m if all(w in m for w in ("prlimit64", "setpriority",
                                                                   "priority was changed", "socket"))
                              else None)(" | ".join(e["verdict"]["mechanism"]
                                                    for e in guard.events(kinds=["verdict"])
                                                    if e["verdict"]["rule"] in ("tamper", "self-protection"))),
                     what="the tamper records")
    assert "recreated" in mechs


def test_freezing_the_daemons_cgroup_is_seen(guard: Daemon, agent: Path) -> None:
    """cgroup.freeze cannot be refused; the agent that writes it dies and it is recorded (the
    record waits in the ring buffer until someone thaws the daemon)."""
    from agentwarden.probes.loader import cgroup2_root

    assert guard.proc is not None
    root = Path(cgroup2_root())
    cg = root / f"aw-freeze-test-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "cgroup.procs").write_text(str(guard.proc.pid))
        time.sleep(2.5)   # the daemon notices its new cgroup once a second
        res = run(agent, f"echo 1 > {cg}/cgroup.freeze; echo rc=$?")
        assert res.returncode == -9 and "rc=" not in res.stdout, res
        time.sleep(0.5)
    finally:
        (cg / "cgroup.freeze").write_text("0")
        (root / "cgroup.procs").write_text(str(guard.proc.pid))
        wait_for(lambda: not (cg / "cgroup.procs").read_text().strip(), what="the daemon moved back")
        cg.rmdir()
    v = wait_for(lambda: next((e for e in guard.events(kinds=["verdict"])
                               if "cgroup.freeze" in e["verdict"]["mechanism"]), None), what="the record")
    assert v["verdict"]["action"] == "kill" and v["session_id"]


def test_a_new_session_never_inherits_a_quarantine(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """Quarantines outlive the daemon; a new daemon numbers its sessions' marks from 1 again. A
    mark an earlier session left quarantined is never given to a new session."""
    from agentwarden.enforce.quarantine import Quarantine

    q = Quarantine()
    stale = [Quarantine.mark_for(slot) for slot in range(1, 401)]
    live = {e.mark for e in q.entries()}
    mine = [m for m in stale if m not in live]
    ok = Listener("127.0.0.1")
    script = tmp_path / "connect.py"
    script.write_text(CONNECT)
    try:
        for m in mine:
            q.session(m, 120)
        res = run(agent, f"{sys.executable} {script} 127.0.0.1 {ok.port}")
        assert "127.0.0.1 ok" in res.stdout, res
    finally:
        for m in mine:
            q.release(m)


def test_a_deleted_quarantine_table_comes_back(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    proc = _background(agent, f"aw-quarantine {tmp_path}/q; sleep 1; nft delete table inet agentwarden; "
                              "echo deleted; sleep 3")
    (v,) = verdicts(guard, "quarantine-me")
    out, _ = proc.communicate(timeout=30)
    assert "deleted" in out

    def restored() -> bool:
        nft = subprocess.run(["nft", "list", "table", "inet", "agentwarden"], capture_output=True, text=True)
        return nft.returncode == 0 and "sessions" in nft.stdout and "elements" in nft.stdout
    wait_for(restored, 10, what="the table and the quarantine put back")
    wait_for(lambda: any("nftables" in e["verdict"]["mechanism"] and e["verdict"]["rule"] == "tamper"
                         for e in guard.events(kinds=["verdict"])), what="the tamper record")
    guard.cli_as_person("release", v["session_id"])


def test_the_daemons_scheduling_group_priority_comes_back(guard: Daemon, agent: Path) -> None:
    """Starving the daemon: with autogroup scheduling a session is one scheduling entity, and the
    daemon gives its own the nice of `nice:` (daemon.server._own_autogroup).  A root agent's
    `echo 19 > /proc/<daemon>/autogroup` would give it the least CPU against the agents' sessions:
    put back and recorded."""
    assert guard.proc is not None
    path = Path(f"/proc/{guard.proc.pid}/autogroup")
    if not path.exists():
        pytest.skip("this kernel schedules without autogroups")
    assert path.read_text().split()[-1] == "-10", path.read_text()
    proc = _background(agent, f"echo 19 > {path} && echo written; sleep 2")
    out, _ = proc.communicate(timeout=30)
    assert "written" in out
    wait_for(lambda: path.read_text().split()[-1] == "-10", 10, what="the group's nice put back")
    wait_for(lambda: any("scheduling group" in e["verdict"]["mechanism"] and e["verdict"]["rule"] == "tamper"
                         for e in guard.events(kinds=["verdict"])), what="the tamper record")


PIDFD_SIGNAL = ("import os, signal, sys\n"
                "fd = os.open(f'/proc/{sys.argv[1]}', os.O_DIRECTORY)\n"   # a pidfd without pidfd_open
                "signal.pidfd_send_signal(fd, signal.SIGSTOP)\n"
                "print('sent')\n")


def test_a_signal_to_the_daemon_by_any_path_is_seen(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """pidfd_send_signal through a /proc directory fd, or kill of the daemon's process group: no
    syscall hook names the daemon, the signal_generate tracepoint does.  The signal itself cannot
    be refused (a root agent's SIGSTOP stops the daemon); the sender dies and it is recorded."""
    assert guard.proc is not None
    (tmp_path / "sig.py").write_text(PIDFD_SIGNAL)
    try:
        res = run(agent, f"{sys.executable} {tmp_path}/sig.py {guard.proc.pid}; echo rc=$?")
        assert "rc=137" in res.stdout, res
    finally:
        os.kill(guard.proc.pid, signal.SIGCONT)
    evs = wait_for(lambda: [e for e in guard.events(kinds=["verdict"])
                            if "signal SIGSTOP" in e["verdict"]["mechanism"]], what="the verdict")
    assert evs[0]["verdict"]["rule"] == "self-protection" and evs[0]["session_id"]


# ---- HTTP ---------------------------------------------------------------------------------------


class Recorder(BaseHTTPRequestHandler):
    seen: list[str] = []

    def _answer(self) -> None:
        Recorder.seen.append(f"{self.command} {self.path} {self.headers.get('Host')}")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    do_GET = do_DELETE = _answer  # noqa: N815 (http.server's names)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """(plain port, TLS port) of one recording server."""
    import ssl

    d = tmp_path_factory.mktemp("web")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(d / "k.pem"), "-out", str(d / "c.pem")],
                   check=True, capture_output=True)
    plain = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    tls = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(d / "c.pem"), str(d / "k.pem"))
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    for srv in (plain, tls):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield plain.server_address[1], tls.server_address[1]
    plain.shutdown()
    tls.shutdown()


def test_http_requests_refused_before_they_leave(guard: Daemon, agent: Path, web: tuple[int, int]) -> None:
    port, tls_port = web
    Recorder.seen.clear()
    curl = "curl -s -o /dev/null -w '%{http_code}\\n' --max-time 10"
    res = run(agent, f"{curl} -X DELETE http://127.0.0.1:{port}/admin/users/7; echo rc=$?; "
                     f"{curl} -X GET http://127.0.0.1:{port}/admin/users/7; "
                     f"{curl} -X DELETE http://127.0.0.1:{port}/public/7; "
                     f"{curl} -H 'Host: SECRETS.internal:8080' http://127.0.0.1:{port}/x; echo rc=$?; "
                     f"{curl} -k -X DELETE https://127.0.0.1:{tls_port}/admin/tls; echo rc=$?")
    lines = res.stdout.split()
    # DELETE /admin refused (curl: send failed), GET and DELETE elsewhere served,
    # the secrets host refused, and over TLS curl is killed before it encrypts
    assert lines[0] == "000" and lines[1] != "rc=0", res
    assert lines[2:4] == ["200", "200"], res
    assert lines[4] == "000" and lines[5] != "rc=0", res
    assert lines[-1] == "rc=137", res
    assert Recorder.seen == [f"GET /admin/users/7 127.0.0.1:{port}", f"DELETE /public/7 127.0.0.1:{port}"]
    evs = verdicts(guard, "no-admin-delete", n=2)
    assert {e["verdict"]["mechanism"].split(",")[0] for e in evs} == {"sk_msg drop (EACCES)",
                                                                      "SIGKILL at SSL_write"}
    assert all(e["http"]["method"] == "DELETE" and e["http"]["path"].startswith("/admin/") for e in evs)
    (host,) = verdicts(guard, "no-secrets-host")
    assert host["http"]["host"] == "SECRETS.internal:8080" and host["verdict"]["prevented"] is True


def test_the_push_protocol_sent_by_a_client_of_the_agents_own_is_held(guard: Daemon, agent: Path,
                                                                        web: tuple[int, int]) -> None:
    """curl (or a script, or dulwich) speaking git's smart-HTTP push itself updates refs no command
    line shows: its POST to git-receive-pack is refused before it leaves, in plain HTTP, in any
    percent-encoded spelling of the last segment, and over TLS; the ref advertisement (GET) and
    fetches (git-upload-pack) are not."""
    port, tls_port = web
    Recorder.seen.clear()
    curl = "curl -s -o /dev/null -w '%{http_code}\\n' --max-time 10"
    body = "-H 'Content-Type: application/x-git-receive-pack-request' --data-binary @/etc/hostname"
    res = run(agent, f"{curl} http://127.0.0.1:{port}/r.git/info/refs?service=git-receive-pack; "
                     f"{curl} {body} http://127.0.0.1:{port}/r.git/git-receive-pack; echo rc=$?; "
                     f"{curl} {body} http://127.0.0.1:{port}/r.git/git%2Dreceive-pack; echo rc=$?; "
                     f"{curl} {body} http://127.0.0.1:{port}/r.git/git-upload-pack; "
                     f"{curl} -k {body} https://127.0.0.1:{tls_port}/r.git/git-receive-pack; echo rc=$?")
    lines = res.stdout.split()
    assert lines[0] == "200" and lines[1] == "000" and lines[3] == "000" and lines[5] == "200", res
    assert lines[2] != "rc=0" and lines[4] != "rc=0" and lines[-1] == "rc=137", res
    assert Recorder.seen == [f"GET /r.git/info/refs?service=git-receive-pack 127.0.0.1:{port}",
                             f"POST /r.git/git-upload-pack 127.0.0.1:{port}"], Recorder.seen
    # a request line split by tabs (servers split it on any whitespace; red team)
    raw = b"POST\t/r.git/git-receive-pack\tHTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx"
    res = run(agent, f"{sys.executable} {Path(__file__).parent / 'wire.py'} http 127.0.0.1 {port} {raw.hex()}")
    assert not res.stdout.startswith("ok"), res
    assert not [s for s in Recorder.seen if "receive-pack" in s and s.startswith("POST")], Recorder.seen
    reqs = wait_for(lambda: (lambda p: p if len(p) >= 2 else None)(
        [r for r in pending(guard) if r["rule"] == "hold-git-push-on-the-wire"]), what="the held pushes")
    assert {r["summary"].split(None, 1)[0] for r in reqs} == {"POST"}


def test_held_request_passes_after_approval(guard: Daemon, agent: Path, web: tuple[int, int],
                                            tmp_path: Path) -> None:
    port, _ = web
    Recorder.seen.clear()
    flag = tmp_path / "approved"
    post = f"curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 10 -X POST -d v=1 http://127.0.0.1:{port}/deploy"
    proc = _background(agent, f"{post}; while [ ! -e {flag} ]; do sleep 0.2; done; {post}")
    req = wait_pending(guard, "hold-deploy")
    assert req["kind"] == "http" and req["summary"] == f"POST 127.0.0.1:{port}/deploy"
    assert Recorder.seen == []
    assert guard.cli_as_person("approve", req["id"]).returncode == 0
    flag.touch()
    out, err = proc.communicate(timeout=60)
    assert out.split() == ["000", "200"], (out, err)     # refused, then let through once approved
    assert Recorder.seen == [f"POST /deploy 127.0.0.1:{port}"]


def test_refused_connection_is_closed_also_over_ipv6(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """A client that waits for an answer after its send failed (as libpq does) is not left hanging."""
    class V6(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    srv = V6(("::1", 0), Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    client = tmp_path / "client.py"
    client.write_text(
        "import socket, sys\n"
        "s = socket.create_connection(('::1', int(sys.argv[1])))\n"
        "try: s.sendall(b'DELETE /admin/v6 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "except OSError as e: print('send errno', e.errno)\n"
        "s.settimeout(20)\n"
        "try: print('recv', s.recv(10))\n"
        "except OSError as e: print('recv errno', e.errno)\n")
    try:
        Recorder.seen.clear()
        res = run(agent, f"{sys.executable} {client} {srv.server_address[1]}")
        assert res.stdout.split("\n")[:2] == ["send errno 13", "recv errno 103"], res   # EACCES, ECONNABORTED
        assert Recorder.seen == []
        (v,) = wait_for(lambda: [e for e in guard.events(kinds=["verdict"])
                                 if (e.get("http") or {}).get("path") == "/admin/v6"], what="the IPv6 verdict")
        assert v["verdict"]["mechanism"] == "sk_msg drop (EACCES), connection closed" and v["session_id"]
    finally:
        srv.shutdown()


def test_postgres_over_a_unix_socket_is_refused_under_sql_rules(guard: Daemon, agent: Path, pg: PgServer) -> None:
    """sk_msg judges TCP only: a session whose SQL is judged reaches Postgres over TCP, and is
    told so; outside agents the Unix socket works as before."""
    res = run(agent, f"psql -X -h {pg.sockdir} -p {pg.port} -U postgres -d awtest -c 'select 4200'; echo rc=$?; "
                     f"psql -X -At '{pg.dsn}' -c 'select 4300'; echo rc=$?")
    assert "rc=2" in res.stdout and "4200" not in res.stdout and "4300" in res.stdout, res
    assert "Operation not permitted" in res.stderr, res.stderr
    assert f"agentwarden: refused: Postgres over the Unix socket {pg.sockdir}/.s.PGSQL.{pg.port}" in res.stderr
    assert "psql -h 127.0.0.1" in res.stderr
    assert "select 4200" not in "\n".join(logged_messages(pg)).lower()
    v = wait_for(lambda: next((e for e in guard.events(kinds=["verdict"])
                               if e["verdict"]["mechanism"].startswith("cgroup connect_unix")), None),
                 what="the connect_unix verdict")
    assert v["verdict"]["rule"] == "no-drop-table" and v["verdict"]["prevented"] is True and v["net"]["path"] == f"{pg.sockdir}/.s.PGSQL.{pg.port}"
    assert pg.psql("awtest", "select 4400").strip() == "4400"     # not an agent: unchanged


PROC_PATH_CONNECT = ("import os, socket, sys\n"
                     "fd = os.open(sys.argv[1], os.O_PATH)\n"
                     "for path in (f'/proc/self/fd/{fd}', f'/dev/fd/{fd}'):\n"
                     "    s = socket.socket(socket.AF_UNIX)\n"
                     "    try: s.connect(path); print(path, 'connected')\n"
                     "    except OSError as e: print(path, 'errno', e.errno)\n")


def test_a_postgres_socket_reached_through_a_descriptor_path_is_refused(guard: Daemon, agent: Path,
                                                                         pg: PgServer, tmp_path: Path) -> None:
    """No link needed: an O_PATH open of the socket, then connect() to its /proc/self/fd or
    /dev/fd path (red team); the name is not there to read, so those paths are refused."""
    script = tmp_path / "procfd.py"
    script.write_text(PROC_PATH_CONNECT)
    tmp_path.chmod(0o755)
    res = run(agent, f"{sys.executable} {script} {pg.sockdir}/.s.PGSQL.{pg.port}")
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and all(line.endswith(" errno 1") for line in lines), res


FDGRAB = ("import ctypes, os, sys\n"
          "libc = ctypes.CDLL(None, use_errno=True)\n"
          "pidfd = libc.syscall(434, int(sys.argv[1]), 0)\n"
          "fd = libc.syscall(438, pidfd, int(sys.argv[2]), 0)\n"
          "print('took', fd)\n")


def test_taking_another_process_socket_is_refused_under_sql_rules(hardened: Daemon, hard_agent: Path,
                                                                   tmp_path: Path) -> None:
    """pidfd_getfd: a socket of a process outside the session never met the connect checks
    and is in no capture map (red team: a root agent ran DROP TABLE through one)."""
    guard, agent = hardened, hard_agent   # killed at the syscall: the hardened mode
    holder = subprocess.Popen([sys.executable, "-c", "import socket, sys, time\n"
                               "a, b = socket.socketpair(); print(a.fileno(), flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        fd = int((holder.stdout.readline() if holder.stdout else "0").strip())
        script = tmp_path / "grab.py"
        script.write_text(FDGRAB)
        tmp_path.chmod(0o755)
        res = run(agent, f"{sys.executable} {script} {holder.pid} {fd}; echo rc=$?")
        assert "took" not in res.stdout and "rc=137" in res.stdout, res
        (v,) = verdicts(guard, "descriptor-taken")
        assert v["verdict"]["prevented"] is True and "pidfd_getfd" in v["verdict"]["mechanism"]
    finally:
        holder.kill()
        holder.wait()


def test_an_exec_in_a_deep_directory_is_judged_too(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """Past 12 path components the directory walk goes on in another program, which then
    records the exec and runs its guard itself: a denied exec there is refused the same."""
    deep = tmp_path.joinpath(*[f"d{i}" for i in range(30)])
    deep.mkdir(parents=True)
    res = run(agent, f"cd {deep} && touch denied-deep; echo rc=$?; touch fine-deep; echo rc=$?")
    assert res.stdout.split() == ["rc=137", "rc=0"], res
    assert not (deep / "denied-deep").exists() and (deep / "fine-deep").exists()
    v = wait_for(lambda: next((e for e in guard.events(kinds=["verdict"]) if e["verdict"]["rule"] == "deny-by-argv"
                               and "denied-deep" in " ".join(e["process"]["argv"])), None), what="the verdict")
    assert v["verdict"]["mechanism"] == "SIGKILL at exec (kernel)"


def test_ssh_told_its_remote_command_by_a_config_file_is_held(guard: Daemon, agent: Path, tmp_path: Path) -> None:
    """`ssh host` with RemoteCommand in a config file the agent wrote runs git-receive-pack (or
    anything) with no command line showing it: held before ssh connects.  With a command on the
    command line ssh refuses such a config itself; with -N it runs no command."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    seen.append(conn.recv(64))
                except OSError:
                    seen.append(b"")

    threading.Thread(target=serve, daemon=True).start()
    plain = f"Host pushhost\n  HostName 127.0.0.1\n  Port {port}\n  BatchMode yes\n  ConnectTimeout 5\n"
    (tmp_path / "cfg").write_text(plain + "  RemoteCommand git-receive-pack /srv/r.git\n")
    (tmp_path / "plain").write_text(plain)
    res = run(agent, f"cd {tmp_path} && ssh -F cfg pushhost </dev/null; echo rc=$?; "
                     "ssh -F cfg -p 1 pushhost -v </dev/null; echo rc=$?; "
                     "ssh -F cfg pushhost true </dev/null; echo rc=$?")
    try:
        assert res.stdout.split() == ["rc=137", "rc=137", "rc=255"], res
        assert seen == [], seen                                 # nothing reached the server
        assert "Cannot execute command-line and remote command" in res.stderr, res.stderr
        assert "hold-ssh-whose-remote-command-config-sets" in res.stderr, res.stderr
        assert "name the remote command on ssh's command line" in res.stderr, res.stderr
        # not held: a command on the command line, or -N; both reach the listener
        res = run(agent, f"cd {tmp_path} && ssh -F plain pushhost true </dev/null; echo rc=$?; "
                         "ssh -F plain -N pushhost </dev/null; echo rc=$?")
        assert res.stdout.split() == ["rc=255", "rc=255"], res
        assert len(seen) == 2 and all(s.startswith(b"SSH-2.0") for s in seen), seen
    finally:
        listener.close()
    held = verdicts(guard, "hold-ssh-whose-remote-command-config-sets", n=2)
    assert {tuple(v["process"]["argv"][1:3]) for v in held} == {("-F", "cfg")}


# ---- the kernel's hashes and their Python twins ------------------------------------------------

TWIN_SQL = [
    'DROP TABLE IF EXISTS "Mixed Case"."T"',
    "drop table public.t1, t2 cascade",
    "TRUNCATE ONLY t3 RESTART IDENTITY",
    "/* lead */ DROP\tTABLE   t4 -- trail",
    "truncate tbl_éø",
    "drop table t5 \\bind \\g",                                   # Parse/Bind/Execute
    "drop index idx1",                                            # held: its hash is what an approval allows
    "DO $$ begin perform 42, 'str''q', E'\\n', 1.5e3; end $$",    # opaque: fails closed
    "DO $body$ begin raise notice 'x;y'; end $body$",
    "create function f() returns int as 'select 1' language sql",
]


def test_the_kernel_and_python_hash_every_statement_and_request_alike(guard: Daemon, agent: Path, pg: PgServer,
                                                                       web: tuple[int, int]) -> None:
    """An approval lets through what the kernel hashed, and the daemon finds the same statement or
    request again by its own hash (enforce/sqlnorm.py, request_key): for a corpus of spellings,
    each kernel refusal's hash is one Python computes from the same bytes."""
    port, tls_port = web
    before = guard.request("status")["enforcer"]
    for sql in TWIN_SQL:
        res = psql(agent, pg.dsn, f"{sql};")
        assert refused(res), (sql, res)
    curl = "curl -s -o /dev/null --max-time 10"
    run(agent, f"{curl} -X DELETE http://127.0.0.1:{port}/admin/a%20b?q=1; "
               f"{curl} -X DELETE 'http://127.0.0.1:{port}/admin/x/../y'; "
               f"{curl} -H 'Host: SECRETS.internal:8080' http://127.0.0.1:{port}/x; "
               f"{curl} -X POST -d x http://127.0.0.1:{port}/deploy; "
               f"{curl} -k -X POST -d x https://127.0.0.1:{tls_port}/deploy")
    wait_for(lambda: guard.request("status")["enforcer"]["kernel"] >= before["kernel"] + len(TWIN_SQL) + 5,
             what="a kernel record for every statement and request")
    after = guard.request("status")["enforcer"]
    assert after["twin_hash_unmatched"] == before["twin_hash_unmatched"], (before, after)
    # the count is live: the kernel looks for Host in the first 256 bytes of headers (a known
    # limit, tests/test_guard_splits.py), Python in all of them, so their keys differ here
    pad = "x" * 300
    run(agent, f"{sys.executable} -c \"import socket; s = socket.create_connection(('127.0.0.1', {port})); "
               f"s.sendall(b'DELETE /admin/z HTTP/1.1\\r\\nX-Pad: {pad}\\r\\nHost: h.example\\r\\n\\r\\n')\"")
    wait_for(lambda: guard.request("status")["enforcer"]["twin_hash_unmatched"] > after["twin_hash_unmatched"],
             what="the unmatched hash of a request whose Host the kernel did not read")

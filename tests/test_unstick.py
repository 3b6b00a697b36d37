"""Red team round 4: the daemon resumes the ancestors an exec's stop made stop themselves (sudo, su;
enforcer.unstick), also after a TLS wait.  A parent that is itself stopped for its own exec decision
must never be among them: it was, and a denied static program ran before its "deny" (the agent sent the
parent a SIGSTOP of its own, after its child began waiting for its TLS uprobes).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, make_agent, need_root, node_found_ahead
from test_enforce import COMM, POLICY

NODE = os.path.realpath(shutil.which("node") or "/usr/bin/node")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_root()
    root = tmp_path_factory.mktemp("unstick")
    (root / "d").mkdir(exist_ok=True)
    d = Daemon(root / "d", [{"name": "guarded", "match": {"comm": [COMM]}}], policy=POLICY)
    work = Path(f"/tmp/aw-unstick-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    work.chmod(0o755)
    agent = make_agent(work / "agent", COMM)
    slow = work / "aw-slowtouch"   # rule decided-in-userspace: deny on 'denied-'; built per target (fast_program)
    d.start()
    yield {"daemon": d, "agent": agent, "work": work, "slow": slow}
    d.stop()
    shutil.rmtree(work, ignore_errors=True)


def fast_program(env: dict[str, Any], target: Path, pad_mib: int) -> None:
    """rt_fast_static.c: static, no libc, creat(target) at its first instruction; pad_mib MiB of code, which
    the daemon hashes (programs.classify) before it decides, so the decision comes later."""
    subprocess.run(["gcc", "-O1", "-static", "-nostdlib", f"-DTARGET=\"{target}\"", f"-DPAD={pad_mib}", "-o",
                    str(env["slow"]), str(Path(__file__).with_name("rt_fast_static.c"))], check=True)


def found_copy(env: dict[str, Any], name: str) -> Path:
    bindir = env["work"] / name
    node_found_ahead(env["daemon"], env["agent"], bindir)
    return bindir


def attack(env: dict[str, Any], bindir: Path, target: Path) -> str:
    """A subshell A forks Node (C: TLS wait, stopped), then execs the denied static program (A: stopped for
    its decision).  The agent's shell then sends A a plain SIGSTOP (only SIGCONT is guarded): the kernel's
    own exec SIGSTOP is not recorded in stopped_at (a BPF program's signal does not run the signal_generate
    program), this one is, and it is later than C's stop.  unstick(C's ancestors) then resumes A."""
    st = "cut -d' ' -f3 /proc/$1/stat"
    return (f"state() {{ {st}; }}; "
            f"( {bindir}/node -e 'setTimeout(() => {{}}, 1500)' & p=$!; "
            f"while [ \"$(state $p)\" != T ]; do :; done; exec {env['slow']} {target} ) & a=$!; "
            f"while [ \"$(readlink /proc/$a/exe)\" != {env['slow']} ] || [ \"$(state $a)\" != T ]; do :; done; "
            f"kill -STOP $a; wait $a; echo rc=$?")


def test_control_the_denied_program_alone_is_refused(env: dict[str, Any]) -> None:
    target = env["work"] / "denied-control"
    fast_program(env, target, 256)
    res = subprocess.run([str(env["agent"]), "-c", f"{env['slow']} {target}; echo rc=$?"], capture_output=True,
                         text=True, timeout=30)
    print(f"\nRT unstick control | {res.stdout.strip()!r} | exists={target.exists()}")
    assert not target.exists()


def test_a_decision_stopped_parent_is_resumed_by_the_tls_wait_of_its_child(env: dict[str, Any]) -> None:
    """The daemon frozen 1.5 s (a busy daemon, as the repository's tests model it) while the child's Node exec
    and then the parent's denied exec are both stopped.  Thawed, it handles the child's TLS-only stop
    first: attach, SIGCONT, unstick(ancestors) -> SIGCONT to the parent (stopped after the child began
    waiting, state T).  The parent, a static program, runs before its own 'deny' is decided."""
    d = env["daemon"]
    bindir = found_copy(env, "bin-frozen")
    target = env["work"] / "denied-frozen"
    fast_program(env, target, 1)
    flag = env["work"] / "go-frozen"
    # the agent runs first (its own first exec is decided in userspace), waits for the flag, then attacks
    script = f"while [ ! -e {flag} ]; do sleep 0.05; done; " + attack(env, bindir, target)
    agent = subprocess.Popen([str(env["agent"]), "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    time.sleep(1.5)
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        flag.touch()
        time.sleep(1.5)
        states = {}
        for pid in os.listdir("/proc"):
            try:
                exe = os.readlink(f"/proc/{pid}/exe") if pid.isdigit() else ""
            except OSError:
                continue
            if exe.startswith(str(env["work"])):
                states[exe] = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        print(f"\nRT unstick frozen | states while the daemon is frozen: {states}")
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    out, err = agent.communicate(timeout=60)
    time.sleep(1)
    print(f"\nRT unstick frozen | {out.strip()!r} {err.strip()[-200:]!r} | denied file exists={target.exists()}")
    assert not target.exists(), "BYPASS: the denied exec ran (the daemon's unstick resumed it before its decision)"


@pytest.mark.parametrize("pad_mib", [1, 256])
@pytest.mark.parametrize("attempt", range(2))
def test_the_same_without_freezing_the_daemon(env: dict[str, Any], attempt: int, pad_mib: int) -> None:
    """No freeze: the parent only has to be stopped (and sent its SIGSTOP) within the ~45 ms the daemon takes
    to attach Node's uprobes; with 256 MiB of code, its own decision comes ~1 s after the resume."""
    bindir = found_copy(env, f"bin-live-{attempt}-{pad_mib}")
    target = env["work"] / f"denied-live-{attempt}-{pad_mib}"
    fast_program(env, target, pad_mib)
    res = subprocess.run([str(env["agent"]), "-c", attack(env, bindir, target)], capture_output=True, text=True,
                         timeout=60)
    time.sleep(1)
    print(f"\nRT unstick live {attempt} pad {pad_mib} MiB | {res.stdout.strip()!r} | denied file exists={target.exists()}")
    assert not target.exists(), "BYPASS: the denied exec ran"

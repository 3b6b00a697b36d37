"""Shared fixtures: a real daemon with real probes, a fake agent, the CLI.

The fake agent is a copy of bash whose file name (hence comm) matches a test
profile; everything it runs is a real process seen by the real kernel probes.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentwarden.daemon.control import ControlClient, ControlError

FAKE_COMM = "aw-fake-agent"
TEST_USER = "awtest"


def load_script(path: Path, name: str) -> Any:
    """A script of the repository that is not a package module (deploy/*/render.py), as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def self_signed(d: Path) -> None:
    """A certificate for 127.0.0.1 and its key, made here: d/c.pem and d/k.pem."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "k.pem"), "-out", str(d / "c.pem")],
                   check=True, capture_output=True)


def node_found_ahead(daemon: Daemon, agent: Path, bindir: Path, timeout: float = 15) -> dict[str, str]:
    """A fresh copy of Node (a new inode, never attached) in `bindir`, put on the PATH of a process of
    the agent (`sleep 0.5`: its environment is read while it runs), and found ahead by the daemon
    (daemon/tls_libs.py Ahead): its first exec in a session waits for its uprobes.  Returns that
    environment."""
    bindir.mkdir(exist_ok=True)
    bindir.chmod(0o755)   # whatever the umask (a test before may have run the daemon's, 027)
    shutil.copy2(os.path.realpath(shutil.which("node") or "/usr/bin/node"), bindir / "node")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    subprocess.run([str(agent), "-c", "sleep 0.5"], env=env, check=True, timeout=30)
    wait_for(lambda: f"found ahead of its first exec: {bindir}/node" in daemon.log.read_text(), timeout=timeout,
             what=f"{bindir}/node found ahead of its first exec")
    return env


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests load eBPF programs and must run as root (CI does)")


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentwarden.cli.main", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout)


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


class Daemon:
    """`agentwarden daemon` as a subprocess, with its own store, spool and socket."""

    def __init__(self, root: Path, agents: list[dict[str, Any]], store_path: Path | None = None,
                 policy: str = "", hardened: bool = False, wrap: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.wrap = wrap or []      # a command the daemon runs under (setpriv: a unit's capabilities)
        self.env = env              # extra environment (NOTIFY_SOCKET, WATCHDOG_USEC)
        # outside pytest's 0700 tmp tree, so tests can connect as other users
        sock_dir = Path(tempfile.mkdtemp(prefix="aw-sock-"))
        sock_dir.chmod(0o755)
        self.socket = sock_dir / "aw.sock"
        self.store_path = store_path or root / "store"
        self.spool = root / "spool"
        self.config = root / "config.yaml"
        self.log = root / "daemon.log"
        self.policy = root / "policy.yaml"
        if policy:
            self.policy.write_text(policy)
        cfg = {
            "agents": agents,
            "builtin_agents": False,
            "store": {"dsn": f"chdb://{self.store_path}", "spool_dir": str(self.spool),
                      "batch": {"size": 200, "interval": 0.2}},
            "control_socket": str(self.socket),
            "mask": {"key_file": str(root / "mask.key")},
            # no policy unless the test brings one (the host's /etc/agentwarden/policy.yaml is not ours)
            "enforce": {"policy_file": str(self.policy) if policy else "", "sql_approval_s": 60,
                        "state_file": str(root / "approvals.json")},
            # a pin directory of its own: tests run several daemons at once
            "probes": {"pin_dir": f"/sys/fs/bpf/aw-test-{os.getpid()}-{id(self):x}", "hardened": hardened},
            "log_level": "debug",
            "metrics": {"listen": ""},    # several daemons run at once; tests that scrape choose a port
            # a chain, its key and its logins of its own (the defaults are the host's, under /var/lib)
            "chain": {"key_file": str(root / "chain.key"), "state_file": str(root / "chain.json"),
                      "anchor_file": str(root / "anchor.jsonl")},
            "identity": {"state_file": str(root / "identity.json")},
        }
        self.config.write_text(json.dumps(cfg))   # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrap, sys.executable, "-m", "agentwarden.cli.main", "daemon", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env} if self.env else None,
                start_new_session=True)   # a session of its own, as systemd and container runtimes give it
        client = ControlClient(str(self.socket), timeout=5)

        def ready() -> bool:
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                client.request("ping")
                return True
            except ControlError:
                return False

        try:
            wait_for(ready, timeout, what="daemon control socket")
        except BaseException:
            # a daemon that failed to start (a verifier refusal) leaves its pinned generation in
            # force, as a crash would; nothing here starts another daemon on its pin directory
            # to replace it, so its cgroup programs would judge later daemons' sockets
            self.stop()
            raise

    @property
    def pin_dir(self) -> str:
        return str(json.loads(self.config.read_text())["probes"]["pin_dir"])

    def stop(self, keep_pins: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not keep_pins:
            from agentwarden.probes.loader import remove_pins

            remove_pins(self.pin_dir)

    def request(self, op: str, **args: Any) -> Any:
        return ControlClient(str(self.socket)).request(op, **args)

    def events(self, **query: Any) -> list[dict[str, Any]]:
        query.setdefault("limit", 10000)
        return list(self.request("query", **query)["events"])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(self.config, *args)

    def cli_as_person(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The CLI as a person runs it: from another terminal, not from the process that started
        the agent (pytest).  `setsid -f` reparents it to init, in a session of its own, so it
        shares no session, terminal or parent with the agents the tests start."""
        out = Path(tempfile.mkdtemp(prefix="aw-person-"))
        cmd = [sys.executable, "-m", "agentwarden.cli.main", *args, "--config", str(self.config)]
        subprocess.run(["setsid", "-f", "sh", "-c", '"$@" >"$0/out" 2>"$0/err"; echo $? >"$0/rc.tmp"; '
                        'mv "$0/rc.tmp" "$0/rc"', str(out), *cmd], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
        wait_for(lambda: (out / "rc").exists(), timeout, what=f"agentwarden {' '.join(args)}")
        res = subprocess.CompletedProcess(cmd, int((out / "rc").read_text()), (out / "out").read_text(),
                                          (out / "err").read_text())
        shutil.rmtree(out, ignore_errors=True)
        return res

    def session_events(self, root_pid: int, settle: Callable[[list[dict[str, Any]]], bool],
                       timeout: float = 60) -> list[dict[str, Any]]:
        """Events of the session whose root is root_pid, once settle(events) holds."""
        def ready() -> list[dict[str, Any]] | None:
            starts = [e for e in self.events(kinds=["session_start"]) if e["process"]["pid"] == root_pid]
            if not starts:
                return None
            evs = self.events(session=starts[0]["session_id"])
            return evs if settle(evs) else None
        return list(wait_for(ready, timeout, what=f"events of the session of pid {root_pid}"))


def ended(events: list[dict[str, Any]]) -> bool:
    return any(e["kind"] == "session_end" for e in events)


def bench_daemon(root: Path, name: str, comm: str, batch_size: int | None = None, policy: str = "") -> Daemon:
    """A daemon for the benchmarks: one agent profile, the shipped batch size (unless batch_size) and
    interval, info logging."""
    from agentwarden.daemon.config import BatchConfig

    batch_size = BatchConfig().size if batch_size is None else batch_size
    root.mkdir(parents=True, exist_ok=True)
    d = Daemon(root, [{"name": name, "match": {"comm": [comm]}}], policy=policy)
    cfg = json.loads(d.config.read_text())
    cfg["store"]["batch"] = {"size": batch_size, "interval": 1.0}
    cfg["log_level"] = "info"
    d.config.write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    """A real PostgreSQL server (tests/pgserver.py) for the tests of one module."""
    from pgserver import PgServer

    server = PgServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chdb runs one engine per process: every test of this process that opens the embedded store
    in-process shares this path (each with tables of its own)."""
    return tmp_path_factory.mktemp("chdb") / "store"


@pytest.fixture(scope="session")
def test_user() -> pwd.struct_passwd:
    need_root()
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", TEST_USER],
                       check=True)
        return pwd.getpwnam(TEST_USER)


_CREATE_C = r"""
#include <fcntl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        int fd = open(argv[i], O_CREAT | O_WRONLY, 0644);
        if (fd < 0) return 1;
        close(fd);
    }
    return 0;
}
"""


def distinct_program(dst: Path, static: bool = False) -> Path:
    """A program that creates the files it is given, as touch does, but built here: code of its
    own, so rules about touch do not apply to it by identity (enforce.programs; a copy of touch,
    even with bytes appended, is touch).  `static`: no dynamic loader runs it."""
    src = dst.parent / f".{dst.name}.c"
    src.write_text(_CREATE_C)
    subprocess.run(["gcc", "-O1", *(["-static"] if static else []), "-o", str(dst), str(src)], check=True,
                   capture_output=True)
    src.unlink()
    dst.chmod(0o755)
    return dst


def make_agent(directory: Path, comm: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    path = directory / comm
    shutil.copy2("/bin/bash", path)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def fake_agent() -> Iterator[Path]:
    d = Path(f"/tmp/agentwarden-test-{os.getpid()}")
    yield make_agent(d, FAKE_COMM)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    need_root()
    root = tmp_path_factory.mktemp("daemon")
    d = Daemon(root, [{"name": "fake", "match": {"comm": [FAKE_COMM]}}])
    d.start()
    yield d
    d.stop()
    if os.environ.get("AW_SHOW_DAEMON_LOG"):
        print(d.log.read_text())

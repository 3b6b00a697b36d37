"""`agentwarden login` end to end: the real daemon, the real CLI, a real OIDC provider on
loopback (tests/oidc_idp.py), an agent launched by a test user.

The person logs in with the device grant as the test user (audit login uid and uid); the agents
that person starts carry the verified email and groups; a hold whose approvers are a provider
group is decided by a member; after `logout` a new session is unverified and, with
`identity.require`, held at its first instruction until the person logs in again, or killed
when nobody does.  Logging in from inside an agent is refused.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_USER, Daemon, make_agent, need_root, wait_for

from tests.oidc_idp import CLIENT_ID, Person
from tests.oidc_idp import Provider as Idp

COMM = "aw-id-agent"
HOLD_TIMEOUT_S = 8

POLICY = """
version: 1
rules:
  - name: hold-touch-for-db
    when: {kind: exec, exec: {path: ["*/touch"], argv: ['held-']}}
    action: hold
    approvers: [group:db-approvers]
    timeout: 5m
"""


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    # the provider's account of the test user: preferred_username is their Unix name
    with Idp(Person(sub="u-123", email="alice@example.com", name="Alice", groups=["db-approvers", "engineering"],
                    username=TEST_USER)) as p:
        yield p


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, idp: Idp) -> Iterator[Daemon]:
    need_root()
    root = tmp_path_factory.mktemp("identity")
    d = Daemon(root, [{"name": "idagent", "match": {"comm": [COMM]}}], policy=POLICY)
    cfg = json.loads(d.config.read_text())
    cfg["identity"] = {"oidc": {"issuer": idp.issuer, "client_id": CLIENT_ID,
                                "scopes": ["openid", "email", "profile", "groups"]},
                       "state_file": str(root / "identity.json"), "require": True, "unverified": "hold",
                       "hold_timeout_s": HOLD_TIMEOUT_S}
    d.config.write_text(json.dumps(cfg))
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def world(daemon: Daemon) -> Iterator[Path]:
    """A directory the test user can use: the agent, a config naming the socket, the targets."""
    d = Path(tempfile.mkdtemp(prefix="aw-id-"))
    d.chmod(0o1777)
    make_agent(d / "bin", COMM)
    (d / "config.yaml").write_text(json.dumps({"control_socket": str(daemon.socket)}))
    (d / "config.yaml").chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_person(uid: int, gid: int, argv: list[str]) -> list[str]:
    """argv run as a person logged in as uid: the audit login uid set (as a login would), then
    the uid and groups."""
    line = shlex.join(argv)
    return ["sh", "-c", f"echo {uid} > /proc/self/loginuid && exec setpriv --reuid={uid} --regid={gid} "
                        f"--init-groups {line}"]


class Detached:
    """A command reparented to init in a session of its own (a person's other terminal)."""

    def __init__(self, argv: list[str]) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="aw-person-"))
        self.out.chmod(0o777)
        subprocess.run(["setsid", "-f", "sh", "-c", '"$@" >"$0/out" 2>"$0/err"; echo $? >"$0/rc.tmp"; '
                        'mv "$0/rc.tmp" "$0/rc"', str(self.out), *argv], check=True, stdin=subprocess.DEVNULL,
                       env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": os.getcwd()})

    def err(self) -> str:
        p = self.out / "err"
        return p.read_text() if p.exists() else ""

    def wait(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        wait_for(lambda: (self.out / "rc").exists(), timeout, what="the person's command")
        res = subprocess.CompletedProcess([], int((self.out / "rc").read_text()), (self.out / "out").read_text(),
                                          self.err())
        shutil.rmtree(self.out, ignore_errors=True)
        return res


def cli(world: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "agentwarden.cli.main", *args, "--config", str(world / "config.yaml")]


def login_device(idp: Idp, world: Path, user: Any) -> subprocess.CompletedProcess[str]:
    """The person runs `agentwarden login --device` and enters the code the CLI shows at the provider."""
    p = Detached(as_person(user.pw_uid, user.pw_gid, cli(world, "login", "--device")))
    code = wait_for(lambda: next((w.rstrip(".") for line in p.err().splitlines() if "enter the code" in line
                                  for w in line.split()[-1:]), None), 30, what="the device code")
    idp.approve_device(code)
    return p.wait()


def agent(world: Path, user: Any, script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(as_person(user.pw_uid, user.pw_gid, [str(world / "bin" / COMM), "-c", script]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={"PATH": f"{world / 'bin'}:/usr/bin:/bin", "PYTHONPATH": os.getcwd()})


def session_of(d: Daemon, pid: int) -> list[dict[str, Any]]:
    return d.session_events(pid, lambda evs: any(e["kind"] == "session_end" for e in evs))


def test_a_verified_person_end_to_end(daemon: Daemon, idp: Idp, world: Path, test_user: Any) -> None:
    # 1. the person logs in with the device grant
    res = login_device(idp, world, test_user)
    assert res.returncode == 0 and "logged in as alice@example.com" in res.stdout, res
    who = Detached(as_person(test_user.pw_uid, test_user.pw_gid, cli(world, "whoami", "--json"))).wait()
    binding = json.loads(who.stdout)["binding"]
    assert binding["email"] == "alice@example.com" and binding["uid"] == test_user.pw_uid, who
    assert binding["groups"] == ["db-approvers", "engineering"] and binding["method"] == "device"
    bound = wait_for(lambda: [e for e in daemon.events(kinds=["identity"]) if e["binding"]["state"] == "bound"],
                     what="the identity event")
    assert bound[-1]["binding"]["uid"] == test_user.pw_uid and bound[-1]["identity"]["verified"]

    # 2. an agent the person starts: every event carries the verified person; logging in from
    # inside it is refused; a command held for group:db-approvers waits
    target = world / f"held-{os.getpid()}"
    script = (f"touch {world}/plain-{os.getpid()}; "
              f"{sys.executable} -m agentwarden.cli.main login --id-token - --config {world}/config.yaml "
              f"</dev/null; echo login_rc=$?; touch {target}; echo rc=$?")
    p = agent(world, test_user, script)
    out, err = p.communicate(timeout=60)
    assert "login_rc=1" in out and "runs inside an agent session" in err, (out, err)
    assert "rc=137" in out and "group:db-approvers" in err, (out, err)
    events = session_of(daemon, p.pid)
    assert events and all(e["identity"]["verified"] and e["identity"]["email"] == "alice@example.com"
                          and e["identity"]["groups"] == ["db-approvers", "engineering"]
                          and e["identity"]["issuer"] == idp.issuer for e in events), events
    req = wait_for(lambda: next((r for r in daemon.request("pending")["pending"] if str(target) in r["summary"]),
                                None), what="the held request")
    assert req["approvers"] == ["group:db-approvers"]

    # 3. root, with no login and not in the provider's group, may not decide; the member does
    res = daemon.cli_as_person("approve", req["id"])
    assert res.returncode == 1 and "may not decide" in res.stderr, res
    res = Detached(as_person(test_user.pw_uid, test_user.pw_gid, cli(world, "approve", req["id"]))).wait()
    assert res.returncode == 0, res
    ev = wait_for(lambda: next((e for e in daemon.events(kinds=["approval"])
                                if e["approval"]["id"] == req["id"] and e["approval"]["state"] == "approved"), None),
                  what="the approval event")
    assert "verified alice@example.com" in ev["approval"]["auth"], ev

    # 4. logout: a new session is unverified and held at its first instruction until the person
    # logs in again; then it runs, as the verified person
    res = Detached(as_person(test_user.pw_uid, test_user.pw_gid, cli(world, "logout"))).wait()
    assert res.returncode == 0 and "logged out alice@example.com" in res.stdout, res
    marker = world / f"ran-{os.getpid()}"
    p = agent(world, test_user, f"touch {marker}; echo done")
    hold = wait_for(lambda: next((e for e in daemon.events(kinds=["verdict"])
                                  if e["verdict"]["rule"] == "identity-required" and e["process"]["pid"] == p.pid),
                                 None), what="the identity hold")
    assert hold["verdict"]["action"] == "hold" and not hold["identity"]["verified"], hold
    time.sleep(1)
    assert p.poll() is None and not marker.exists()          # nothing ran meanwhile
    res = login_device(idp, world, test_user)
    assert res.returncode == 0, res
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "done" in out and marker.exists(), (out, err)
    assert "run `agentwarden login`" in err
    events = sorted(session_of(daemon, p.pid), key=lambda e: e["ts"])
    resumed = next(i for i, e in enumerate(events) if e["kind"] == "verdict" and e["verdict"]["action"] == "resume")
    # the start and the hold say what was true then; from the resume on, the verified person
    assert not events[0]["identity"]["verified"] and events[0]["kind"] == "session_start", events[0]
    assert all(e["identity"]["verified"] and e["identity"]["email"] == "alice@example.com"
               for e in events[resumed:]), events[resumed:]
    assert any(e["kind"] == "exec" for e in events[resumed:])

    # 5. logged out again, nobody logs in: the held agent is killed at the timeout, having run nothing
    Detached(as_person(test_user.pw_uid, test_user.pw_gid, cli(world, "logout"))).wait()
    never = world / f"never-{os.getpid()}"
    p = agent(world, test_user, f"touch {never}")
    p.communicate(timeout=HOLD_TIMEOUT_S + 30)
    assert p.returncode == -9 or p.returncode == 137, p.returncode
    assert not never.exists()
    killed = wait_for(lambda: next((e for e in daemon.events(kinds=["verdict"])
                                    if e["verdict"]["rule"] == "identity-required"
                                    and e["verdict"]["action"] == "deny" and e["process"]["pid"] == p.pid), None),
                      what="the timeout verdict")
    assert "nobody logged in" in killed["verdict"]["mechanism"]
    states = [e["binding"]["state"] for e in daemon.events(kinds=["identity"])]
    assert states.count("bound") == 2 and states.count("logged_out") == 2, states

    # 6. still logged out: the held root resumed by someone else (job control, kill -CONT) is killed
    # by the decision stop's guards before it runs anything (red team)
    resumed = world / f"resumed-{os.getpid()}"
    p = agent(world, test_user, f"touch {resumed}")
    wait_for(lambda: any(e["verdict"]["rule"] == "identity-required" and e["process"]["pid"] == p.pid
                         for e in daemon.events(kinds=["verdict"])), what="the second identity hold")
    os.kill(p.pid, signal.SIGCONT)
    p.communicate(timeout=30)
    assert p.returncode in (-9, 137) and not resumed.exists(), p.returncode


def test_a_token_for_another_uid_another_person_or_replayed_is_refused_and_recorded(
        daemon: Daemon, idp: Idp, world: Path, test_user: Any) -> None:
    """Through the control socket as the CLI speaks it, each caller with an audit login uid: a nonce
    issued to root is no use to the test user, a used one is spent, a process without a login is
    nobody, and the provider's account must be the Unix person's."""
    sock = str(daemon.socket)

    def as_caller(uid: int, gid: int, code: str, login: bool = True) -> subprocess.CompletedProcess[str]:
        script = (f"import json, sys; sys.path.insert(0, {os.getcwd()!r}); "
                  "from agentwarden.daemon.control import ControlClient as C; "
                  f"c = C({sock!r}); {code}")
        argv = [sys.executable, "-c", script]
        return Detached(as_person(uid, gid, argv) if login else argv).wait()

    # root (login uid 0) logs in with its own nonce; the same token again is a replay
    mint = (f"import urllib.request; n = c.request('login_begin')['nonce']; "
            f"t = urllib.request.urlopen({idp.issuer + '/mint'!r} + '?nonce=' + n + '&u=root').read().decode(); ")
    res = as_caller(0, 0, mint + "print(json.dumps(c.request('login_finish', id_token=t, method='id_token'))); "
                    "print(c.request('login_finish', id_token=t, method='id_token'))")
    assert res.returncode == 1 and json.loads(res.stdout.splitlines()[0])["binding"]["uid"] == 0, res
    assert "nonce_unknown" in res.stderr, res
    # a nonce issued to root, used by the test user
    res = as_caller(0, 0, "print(c.request('login_begin')['nonce'])")
    stolen = res.stdout.strip()
    res = as_caller(test_user.pw_uid, test_user.pw_gid,
                    f"import urllib.request; t = urllib.request.urlopen({idp.issuer + '/mint'!r} + "
                    f"'?nonce={stolen}&u={TEST_USER}').read().decode(); "
                    "print(c.request('login_finish', id_token=t, method='id_token'))")
    assert res.returncode == 1 and "nonce_other_uid" in res.stderr, res
    # the test user with a valid token of another account of the provider (a colleague's)
    res = as_caller(test_user.pw_uid, test_user.pw_gid,
                    mint.replace("&u=root", "&u=colleague") + "print(c.request('login_finish', id_token=t))")
    assert res.returncode == 1 and "wrong_person" in res.stderr, res
    # a token obtained with another client, carrying a nonce from --print-nonce
    res = Detached(as_person(test_user.pw_uid, test_user.pw_gid, cli(world, "login", "--print-nonce"))).wait()
    n = json.loads(res.stdout)["nonce"]
    token = world / f"token-{os.getpid()}"
    import urllib.request

    token.write_text(urllib.request.urlopen(f"{idp.issuer}/mint?nonce={n}&u={TEST_USER}").read().decode())
    token.chmod(0o644)
    res = Detached(as_person(test_user.pw_uid, test_user.pw_gid, cli(world, "login", "--id-token",
                                                                       str(token)))).wait()
    assert res.returncode == 0 and "logged in as alice@example.com" in res.stdout, res
    Detached(as_person(test_user.pw_uid, test_user.pw_gid, cli(world, "logout"))).wait()
    # no audit login uid (a service, a container's process): no person to bind
    res = as_caller(0, 0, "print(c.request('login_begin'))", login=False)
    assert res.returncode == 1 and "no audit login uid" in res.stderr, res
    as_caller(0, 0, "c.request('logout')")

    def refusals() -> set[str]:
        return {e["binding"]["reason"].split(":")[0] for e in daemon.events(kinds=["identity"])
                if e["binding"]["state"] == "refused"}
    wait_for(lambda: {"nonce_unknown", "nonce_other_uid", "wrong_person"} <= refusals(),
             what="the refusals recorded")

"""Pod identity end to end: the real daemon watches a loopback API server (tests/test_k8s.py's
FakeAPI, real Pod JSON), an agent runs in a cgroup named as the kubelet and containerd name a
pod's container, and its session's events carry the pod; a policy rule about that namespace is
enforced in the kernel (the session's rule mask), and not for an agent outside any pod."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, make_agent, need_root, wait_for

from tests.test_k8s import NODE, FakeAPI, pod

COMM = "aw-k8s-agent"
POD_UID = "5f1d2c3b-0a9e-4d8c-b7a6-123456789abc"
CONTAINER_ID = "a3" * 32
POLICY = """
version: 1
rules:
  - name: team-a-may-not-touch
    when: {kind: exec, who: {namespaces: [team-a], service_accounts: [team-a/builder]},
           exec: {path: ["*/touch"], argv: ['k8s-denied-']}}
    action: kill
"""


def unified() -> Path:
    for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").exists() and (root / "cgroup.controllers").exists():
            return root
    pytest.fail("no cgroup v2 hierarchy on this machine")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeAPI, Path]]:
    token = tmp_path_factory.mktemp("k8s") / "token"
    token.write_text("sa-token\n")
    a = FakeAPI(token)
    a.lists = [("100", [pod("coder-7c9d", POD_UID, {"agent": CONTAINER_ID}, ns="team-a",
                            labels={"app": "coder"}, sa="builder")])]
    a.start()
    yield a, token
    a.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, api: tuple[FakeAPI, Path]) -> Iterator[Daemon]:
    need_root()
    d = Daemon(tmp_path_factory.mktemp("k8s-daemon"), [{"name": "k8sagent", "match": {"comm": [COMM]}}],
               policy=POLICY)
    cfg = json.loads(d.config.read_text())
    cfg["host"] = NODE
    cfg["kubernetes"] = {"enabled": True, "api": api[0].url, "token_file": str(api[1])}
    d.config.write_text(json.dumps(cfg))
    d.start()
    wait_for(lambda: (d.request("status").get("kubernetes") or {}).get("pods") == 1, 20, what="the pod list")
    yield d
    d.stop()


@pytest.fixture()
def pod_cgroup() -> Iterator[Path]:
    """The cgroup of container CONTAINER_ID of pod POD_UID, as containerd with the systemd driver names it."""
    leaf = (unified() / "kubepods.slice" / "kubepods-besteffort.slice"
            / f"kubepods-besteffort-pod{POD_UID.replace('-', '_')}.slice"
            / f"cri-containerd-{CONTAINER_ID}.scope")
    leaf.mkdir(parents=True, exist_ok=True)
    yield leaf
    for d in (leaf, *leaf.parents):
        if d == unified():
            break
        for _ in range(50):
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run(agent: Path, script: str, cgroup: Path | None) -> subprocess.CompletedProcess[str]:
    enter = f"echo $$ > {cgroup}/cgroup.procs && " if cgroup else ""
    return subprocess.run(["sh", "-c", f"{enter}exec {agent} -c '{script}'"], capture_output=True, text=True,
                          timeout=60, start_new_session=True)


def session(d: Daemon, marker: str) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        execs = [e for e in d.events(kinds=["exec"]) if marker in " ".join(e["process"]["argv"])]
        if not execs:
            return None
        evs = d.events(session=execs[0]["session_id"])
        return evs if any(e["kind"] == "session_end" for e in evs) else None
    return list(wait_for(ready, 30, what=f"the session that ran {marker}"))


def test_a_session_in_a_pod_carries_the_pod_and_its_rules(daemon: Daemon, pod_cgroup: Path) -> None:
    d = Path(tempfile.mkdtemp(prefix="aw-k8s-"))
    try:
        agent = make_agent(d / "bin", COMM)
        marker = f"k8s-ok-{os.getpid()}"
        res = run(agent, f"touch {d}/{marker}; touch {d}/k8s-denied-{os.getpid()}; echo rc=$?", pod_cgroup)
        assert "rc=137" in res.stdout and (d / marker).exists(), res
        events = session(daemon, marker)
        k8s = {json.dumps(e.get("k8s"), sort_keys=True) for e in events}
        assert len(k8s) == 1, (k8s, [(e["kind"], e.get("verdict")) for e in events if not e.get("k8s")])
        info = events[0]["k8s"]
        assert info["namespace"] == "team-a" and info["pod"] == "coder-7c9d" and info["container"] == "agent"
        assert info["image"] == "registry.example/agent:1.0" and info["service_account"] == "builder"
        assert info["node"] == NODE and info["labels"] == {"app": "coder"} and info["pod_uid"] == POD_UID
        verdicts = [e for e in events if e["kind"] == "verdict"]
        assert verdicts and verdicts[0]["verdict"]["rule"] == "team-a-may-not-touch", verdicts
        assert verdicts[0]["verdict"]["prevented"]

        # outside any pod: the same agent, no pod fields, the namespace rule does not apply
        other = f"k8s-host-{os.getpid()}"
        res = run(agent, f"touch {d}/{other}; touch {d}/k8s-denied-host-{os.getpid()}; echo rc=$?", None)
        assert "rc=0" in res.stdout, res
        assert all(e.get("k8s") is None for e in session(daemon, other))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_status_says_when_the_api_server_is_away(daemon: Daemon, api: tuple[FakeAPI, Path]) -> None:
    a, _ = api
    a.stop()
    try:
        st = wait_for(lambda: (lambda k: k if k and not k["connected"] else None)(daemon.request("status")["kubernetes"]),
                      30, what="the watch to notice")
        assert st["pods"] == 1 and st["last_error"], st     # the pods it knew are still known
        out = daemon.cli("status")
        assert "AWAY" in out.stdout, out
    finally:
        a.start()
    wait_for(lambda: daemon.request("status")["kubernetes"]["connected"], 60, what="the watch to come back")

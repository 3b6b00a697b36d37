"""The Kubernetes manifests: the checked-in files are the render, every document validates
(strict) against the oldest and newest supported Kubernetes, and what the pod needs is there."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from agentwarden.daemon.config import parse as parse_config
from conftest import load_script

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
FILES = {False: K8S / "agentwarden.yaml", True: K8S / "agentwarden-capabilities.yaml"}


RENDER = load_script(K8S / "render.py", "k8s_render")


def docs(capabilities: bool) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(FILES[capabilities].read_text()) if d]


def daemonset(capabilities: bool) -> dict[str, Any]:
    (ds,) = [d for d in docs(capabilities) if d["kind"] == "DaemonSet"]
    return ds


@pytest.mark.parametrize("capabilities", [False, True])
def test_the_checked_in_manifests_are_the_render(capabilities: bool) -> None:
    assert FILES[capabilities].read_text() == RENDER.render(capabilities), (
        f"run: python3 deploy/kubernetes/render.py{' --capabilities' if capabilities else ''} > {FILES[capabilities]}")


@pytest.mark.parametrize("version", RENDER.SUPPORTED)
@pytest.mark.parametrize("capabilities", [False, True])
def test_every_document_validates_strictly(capabilities: bool, version: str) -> None:
    for d in docs(capabilities):
        kubernetes_validate.validate(d, version, strict=True)


def test_the_pod_sees_the_node() -> None:
    ds = daemonset(False)
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] and pod["hostNetwork"] and pod["serviceAccountName"] == "agentwarden"
    (c,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    hosts = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    for path in ("/host", "/lib/modules", "/usr/src", "/sys/kernel/tracing", "/sys/fs/bpf", "/var/lib/agentwarden",
                 "/run/agentwarden"):
        assert path in mounts, path
    assert hosts[mounts["/host"]["name"]] == "/" and mounts["/host"]["readOnly"]
    env = {e["name"]: e for e in c["env"]}
    assert env["AGENTWARDEN_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "livenessProbe"):     # the control socket: root's, in the pod
        assert RENDER.CONTROL_SOCKET in c[probe]["exec"]["command"][-1]


def test_the_config_and_policy_parse_and_their_checksum_rolls_the_pods() -> None:
    (cm,) = [d for d in docs(False) if d["kind"] == "ConfigMap"]
    cfg = parse_config(cm["data"]["config.yaml"], "configmap")
    assert cfg.host_root == "/host" and cfg.enforce.policy_file == "/etc/agentwarden/policy.yaml"
    assert cm["data"]["policy.yaml"] == (REPO / "deploy" / "policy.yaml").read_text()
    (c,) = daemonset(False)["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["port"] == int(cfg.metrics_listen.rpartition(":")[2])
    assert cfg.control_socket == RENDER.CONTROL_SOCKET
    want = hashlib.sha256(yaml.safe_dump(cm["data"], sort_keys=True).encode()).hexdigest()
    assert daemonset(False)["spec"]["template"]["metadata"]["annotations"]["agentwarden.dev/config-checksum"] == want


def test_the_capability_variant_asks_for_what_the_unit_allows() -> None:
    """One list of capabilities: the systemd unit's bounding set, which a test starts the daemon under."""
    unit = (REPO / "deploy" / "systemd" / "agentwarden.service").read_text()
    allowed = {c.removeprefix("CAP_") for c in re.search(r"(?m)^CapabilityBoundingSet=(.*)$", unit)
               .group(1).split()}  # type: ignore[union-attr]
    (c,) = daemonset(True)["spec"]["template"]["spec"]["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == allowed
    assert daemonset(False)["spec"]["template"]["spec"]["containers"][0]["securityContext"] == {"privileged": True}


def test_the_liveness_probe_asks_a_real_daemon(daemon: Any) -> None:
    """The pod's liveness and startup check, run against a daemon (its control socket's path
    swapped for this daemon's): it passes; against a path where no daemon answers, it fails."""
    import subprocess
    import sys

    (c,) = daemonset(False)["spec"]["template"]["spec"]["containers"]
    code = c["livenessProbe"]["exec"]["command"][-1]
    assert RENDER.CONTROL_SOCKET in code
    ok = subprocess.run([sys.executable, "-c", code.replace(RENDER.CONTROL_SOCKET, str(daemon.socket))],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    gone = subprocess.run([sys.executable, "-c", code.replace(RENDER.CONTROL_SOCKET, "/nonexistent/aw.sock")],
                          capture_output=True, text=True, timeout=30)
    assert gone.returncode != 0

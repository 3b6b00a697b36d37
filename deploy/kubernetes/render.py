"""The Kubernetes manifests, rendered from deploy/config.yaml's defaults and deploy/policy.yaml.

    python3 deploy/kubernetes/render.py                 > deploy/kubernetes/agentwarden.yaml
    python3 deploy/kubernetes/render.py --capabilities  > deploy/kubernetes/agentwarden-capabilities.yaml

Both files are checked in (kubectl apply -f them as they are); tests/test_kubernetes.py keeps
them equal to this render and validates every document with kubernetes-validate --strict
against the oldest and newest Kubernetes this supports (SUPPORTED).  The ConfigMap's checksum
is the pod template's annotation, so a changed config or policy rolls the pods.
Standard library and PyYAML only: it runs offline, with no cluster.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
LABELS = {"app.kubernetes.io/name": "agentwarden"}
NAMESPACE = "agentwarden"
IMAGE = "agentwarden:0.1.0"      # docker build -f deploy/Dockerfile -t agentwarden:0.1.0 .
SUPPORTED = ("1.25.0", "1.37.0")  # the oldest and newest Kubernetes the manifests are validated for
METRICS_PORT = 9464
CONTROL_SOCKET = "/run/agentwarden/agentwarden.sock"
# the liveness check: a ping on the control socket, with the image's Python and nothing else
PING = ("import json, socket; s = socket.socket(socket.AF_UNIX); s.settimeout(8); "
        f"s.connect('{CONTROL_SOCKET}'); s.sendall(b'{{\"op\": \"ping\"}}\\n'); "
        "assert json.loads(s.makefile().readline())['ok']")
# what the daemon uses, each for one thing (deploy/systemd/agentwarden.service says which)
CAPABILITIES = ["BPF", "PERFMON", "SYSLOG", "SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "KILL", "DAC_OVERRIDE",
                "DAC_READ_SEARCH", "FOWNER", "CHOWN", "SYS_NICE", "SYS_RESOURCE", "IPC_LOCK"]

# The node's configuration for the daemon: the shipped defaults, with the paths a pod needs.
CONFIG = """\
# agentwarden in a DaemonSet pod (hostPID, hostNetwork); deploy/config.yaml documents every field
host_root: /host                      # the node's / (read-only): its libssl, cgroup2 root, users and groups
store:
  dsn: chdb:///var/lib/agentwarden/audit   # the node's own embedded store, or a server:
  # dsn_file: /etc/agentwarden-store/dsn   # from the agentwarden-store Secret (http(s)://user:pass@host:8123/db)
  retention_days: 90
  spool_dir: /var/lib/agentwarden/spool
  spool_max_bytes: 1073741824
control_socket: /run/agentwarden/agentwarden.sock
enforce:
  policy_file: /etc/agentwarden/policy.yaml   # `agentwarden policy reload` in the pod re-reads it
metrics:
  # the node's loopback (hostNetwork): the kubelet's probes reach it; 0.0.0.0 to scrape from the cluster
  listen: 127.0.0.1:9464
"""


def _meta(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": NAMESPACE, "labels": dict(LABELS), **extra}


def _host(name: str, path: str, kind: str = "Directory") -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": path, "type": kind}}


def documents(capabilities: bool) -> list[dict[str, Any]]:
    policy = (REPO / "deploy" / "policy.yaml").read_text()
    data = {"config.yaml": CONFIG, "policy.yaml": policy}
    checksum = hashlib.sha256(yaml.safe_dump(data, sort_keys=True).encode()).hexdigest()
    if capabilities:
        # what each capability is for: deploy/systemd/agentwarden.service.  Unconfined seccomp:
        # the runtime's default profile refuses bpf() and perf_event_open().
        security: dict[str, Any] = {"privileged": False, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"], "add": CAPABILITIES},
                                    "seccompProfile": {"type": "Unconfined"}}
    else:
        security = {"privileged": True}
    annotations = {"agentwarden.dev/config-checksum": checksum}
    if capabilities:   # the runtime's default AppArmor profile refuses bpffs pins (privileged skips it)
        annotations["container.apparmor.security.beta.kubernetes.io/agentwarden"] = "unconfined"
    # alive: the control socket answers (root's: nothing outside the pod can stall or fake it);
    # ready: /healthz, the trail can be kept (a store down with a full spool is not fixed by a
    # restart, so it never fails liveness)
    alive = {"exec": {"command": ["/opt/agentwarden/venv/bin/python", "-c", PING]}, "timeoutSeconds": 10}
    ready = {"httpGet": {"host": "127.0.0.1", "path": "/healthz", "port": METRICS_PORT}}
    container = {
        "name": "agentwarden",
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "args": ["daemon", "--config", "/etc/agentwarden/config.yaml", "--log-format", "json"],
        # events say which node they come from, not the pod's name
        "env": [{"name": "AGENTWARDEN_HOST", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "securityContext": security,
        # measured (README, Launch and memory): 463 MiB idle with the embedded store, about one
        # core under a saturating pgbench in an agent; the limit leaves room for chdb's merges
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "1536Mi"}},
        # the probes compile at start (about 8 s on 2 cores): up to 120 s before liveness counts
        "startupProbe": {**alive, "periodSeconds": 2, "failureThreshold": 60},
        "readinessProbe": {**ready, "periodSeconds": 10},
        "livenessProbe": {**alive, "periodSeconds": 20, "failureThreshold": 3},
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/agentwarden", "readOnly": True},
            {"name": "store-secret", "mountPath": "/etc/agentwarden-store", "readOnly": True},
            {"name": "host-root", "mountPath": "/host", "readOnly": True,
             "mountPropagation": "HostToContainer"},
            {"name": "modules", "mountPath": "/lib/modules", "readOnly": True},
            {"name": "src", "mountPath": "/usr/src", "readOnly": True},
            {"name": "tracefs", "mountPath": "/sys/kernel/tracing"},
            {"name": "debugfs", "mountPath": "/sys/kernel/debug"},
            # pins here outlive the pod: a killed or updated pod leaves the guards in force
            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
            {"name": "state", "mountPath": "/var/lib/agentwarden"},
            {"name": "run", "mountPath": "/run/agentwarden"},
        ],
    }
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": NAMESPACE,
                      "labels": {**LABELS, "pod-security.kubernetes.io/enforce": "privileged"}}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("agentwarden"),
         "automountServiceAccountToken": True},
        # the pods of the node, to name the pod behind an agent (read only)
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "agentwarden-pod-reader", "labels": dict(LABELS)},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "agentwarden-pod-reader", "labels": dict(LABELS)},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "agentwarden-pod-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "agentwarden", "namespace": NAMESPACE}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("agentwarden-config"), "data": data},
        # a ClickHouse server's DSN, password included; set `dsn`, and `store.dsn_file` in the config
        {"apiVersion": "v1", "kind": "Secret", "metadata": _meta("agentwarden-store"), "type": "Opaque",
         "stringData": {"dsn": ""}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta("agentwarden"),
         "spec": {
             "selector": {"matchLabels": dict(LABELS)},
             "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
             "template": {
                 "metadata": {"labels": dict(LABELS), "annotations": annotations},
                 "spec": {
                     "serviceAccountName": "agentwarden",
                     # host pids (the kernel's) in /proc; the node's network namespace, where the
                     # nftables quarantine and sock_diag close act on the agents' sockets
                     "hostPID": True,
                     "hostNetwork": True,
                     "dnsPolicy": "ClusterFirstWithHostNet",
                     "priorityClassName": "system-node-critical",
                     "tolerations": [{"operator": "Exists"}],
                     "terminationGracePeriodSeconds": 30,
                     "containers": [container],
                     "volumes": [
                         {"name": "config", "configMap": {"name": "agentwarden-config"}},
                         {"name": "store-secret",
                          "secret": {"secretName": "agentwarden-store", "optional": True,
                                     "defaultMode": 0o400}},
                         _host("host-root", "/"),
                         _host("modules", "/lib/modules"),
                         _host("src", "/usr/src"),
                         _host("tracefs", "/sys/kernel/tracing"),
                         _host("debugfs", "/sys/kernel/debug"),
                         _host("bpffs", "/sys/fs/bpf"),
                         _host("state", "/var/lib/agentwarden", "DirectoryOrCreate"),
                         _host("run", "/run/agentwarden", "DirectoryOrCreate"),
                     ],
                 },
             },
         }},
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config and the policy) as literal blocks, as a person writes them;
    no anchors and aliases for the probes that share a command."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                              style="|" if "\n" in s else None))


def render(capabilities: bool = False) -> str:
    head = ("# Rendered by deploy/kubernetes/render.py" + (" --capabilities" if capabilities else "")
            + ": edit that, or deploy/policy.yaml, and render again.\n"
            + ("# Capabilities instead of privileged: true (each one's use: the systemd unit).\n"
               if capabilities else "# privileged: true; agentwarden-capabilities.yaml: capabilities.\n"))
    body = (yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in documents(capabilities))
    return head + "---\n".join(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capabilities", action="store_true", help="capabilities instead of privileged: true")
    sys.stdout.write(render(ap.parse_args().capabilities))


if __name__ == "__main__":
    main()

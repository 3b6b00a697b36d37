"""daemon/k8s.py: cgroup paths to containers, and the node's pods from a real (loopback) API server.

The fake API server speaks real HTTP (chunked watch streams, pagination, 410s, TLS with a CA);
the PodCache under test runs unchanged against it.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import ssl
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agentwarden.core.events import K8sInfo
from agentwarden.daemon.k8s import ContainerRef, K8sError, PodCache, container_of, container_of_pid

FIXTURES = Path(__file__).resolve().parent / "k8s_fixtures"
NODE = "node-a"


def h(seed: str) -> str:
    """The 64-hex container ids the fixture files were written with."""
    return hashlib.sha256(seed.encode()).hexdigest()


U = "1b4e7c52-9d3a-4f1e-8b2a-6c0d5e4f3a21"
V = "8f0c2d9e-5a71-4b36-9e4d-2f1a7c3b6d58"
STATIC = hashlib.md5(b"static").hexdigest()

# fixture file -> (runtime, container id, pod uid), or None for "not a container"
CGROUPS: dict[str, tuple[str, str, str] | None] = {
    "containerd-systemd-v2-burstable": ("containerd", h("c1"), U),
    "containerd-systemd-v2-besteffort": ("containerd", h("c2"), V),
    "containerd-systemd-v2-guaranteed": ("containerd", h("c3"), U),
    "containerd-systemd-v2-cgroupns": ("containerd", h("c4"), V),
    "containerd-systemd-v2-static-pod": ("containerd", h("c5"), STATIC),
    "containerd-systemd-v1": ("containerd", h("c6"), U),
    "crio-systemd-v2": ("cri-o", h("c7"), U),
    "crio-systemd-v2-crun-container": ("cri-o", h("c8"), V),
    "crio-conmon": ("cri-o", "", U),
    "crio-cgroupfs-v1": ("cri-o", h("c10"), V),
    "docker-systemd-v2-k8s": ("docker", h("c11"), V),
    "cgroupfs-v1-burstable": ("", h("c12"), U),
    "cgroupfs-v1-guaranteed": ("", h("c13"), U),
    "cgroupfs-v2-besteffort": ("", h("c14"), V),
    "cgroupfs-v1-pod-level": ("", "", V),
    "cgroupfs-v1-inconsistent": ("", h("c20"), U),
    "kind-systemd-v2": ("containerd", h("c15"), V),
    "kind-nested-docker-v2": ("", h("c16"), V),
    "kind-nested-docker-v1": ("", h("c17"), U),
    "docker-plain-systemd-v2": ("docker", h("c18"), ""),
    "docker-plain-cgroupfs-v1": ("docker", h("c19"), ""),
    "host-session-v2": None,
    "host-init-v2": None,
    "host-containerd-service-v2": None,
    "host-session-v1": None,
    "in-container-cgroupns-root": None,
}


def test_every_fixture_file_is_listed() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.cgroup")) == sorted(CGROUPS)


@pytest.mark.parametrize("name", sorted(CGROUPS))
def test_container_of_fixture(name: str) -> None:
    want = CGROUPS[name]
    got = container_of((FIXTURES / f"{name}.cgroup").read_text())
    assert got == (ContainerRef(*want) if want else None)
    if got is not None:
        assert got.container_id == "" or len(got.container_id) == 64
        assert "_" not in got.pod_uid


@pytest.mark.parametrize("text", [
    "", "\n\n", "hello world", "0::", "12:memory", ":::::", "\x00\xff\xfe garbage\n1:2",
    "0::/kubepods/podnot-a-uid/abc", "0::/kubepods.slice/kubepods-burstable.slice\n",
    f"0::/kubepods/besteffort/pod{U}x/{h('x')[:40]}",   # a malformed uid, a short id
    f"0:relative/path/pod{U}/{h('x')}",
])
def test_container_of_garbage_is_none(text: str) -> None:
    assert container_of(text) is None


def test_container_of_never_raises() -> None:
    not_text: Any = None
    assert container_of(not_text) is None


def test_container_of_pid(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text((FIXTURES / "crio-systemd-v2.cgroup").read_text())
    assert container_of_pid(4242, proc=str(tmp_path)) == ContainerRef("cri-o", h("c7"), U)
    assert container_of_pid(4243, proc=str(tmp_path)) is None
    # pid 0 has no /proc entry: None, not an exception
    assert container_of_pid(0, proc="/proc") is None


# ---------------------------------------------------------------------------------------------
# a fake API server


def pod(name: str, uid: str, containers: dict[str, str], ns: str = "default", labels: dict[str, str] | None = None,
        rv: str = "1", sa: str = "default", runtime: str = "containerd", init: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None, restarted: dict[str, str] | None = None,
        owner: str = "ReplicaSet") -> dict[str, Any]:
    """A Pod as the API server sends it; containers: name -> container id (image: <name>:1.0)."""
    def statuses(named: dict[str, str]) -> list[dict[str, Any]]:
        out = []
        for cname, cid in named.items():
            st: dict[str, Any] = {
                "name": cname, "image": f"registry.example/{cname}:1.0",
                "imageID": f"registry.example/{cname}@sha256:{h(cname)}", "containerID": f"{runtime}://{cid}",
                "ready": True, "restartCount": 0, "started": True,
                "state": {"running": {"startedAt": "2024-05-01T10:00:00Z"}}, "lastState": {},
            }
            if restarted and cname in restarted:
                st["restartCount"] = 1
                st["lastState"] = {"terminated": {"exitCode": 1, "reason": "Error",
                                                  "containerID": f"{runtime}://{restarted[cname]}"}}
            out.append(st)
        return out

    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": rv,
                     "creationTimestamp": "2024-05-01T10:00:00Z", "labels": labels or {},
                     "annotations": annotations or {},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner, "name": f"{name}-rs",
                                          "uid": "00000000-0000-0000-0000-000000000001", "controller": True}]},
        "spec": {"nodeName": NODE, "serviceAccountName": sa, "restartPolicy": "Always",
                 "containers": [{"name": c, "image": f"registry.example/{c}:1.0"} for c in containers],
                 "initContainers": [{"name": c, "image": f"registry.example/{c}:1.0"} for c in init or {}]},
        "status": {"phase": "Running", "podIP": "10.244.1.7", "hostIP": "172.18.0.2",
                   "qosClass": "Burstable", "containerStatuses": statuses(containers),
                   "initContainerStatuses": statuses(init or {})},
    }


def ev(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": obj}


GONE = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                    "message": "too old resource version: 1 (41)", "reason": "Expired",
                                    "code": 410}}
CLOSE = "close"          # a watch step: end the stream cleanly (as the server's timeoutSeconds does)


class Status410:
    """A watch step: answer the next WATCH request with HTTP 410 Gone."""


class FakeAPI:
    """GET /api/v1/pods: LIST (paginated, page_size items a page) and WATCH (chunked JSON lines,
    scripted by push()).  Checks the node field selector and the bearer token on every request."""

    def __init__(self, token_file: Path | None, page_size: int = 2, tls: ssl.SSLContext | None = None) -> None:
        self.token_file = token_file
        self.page_size = page_size
        self.tls = tls
        self.lists: list[tuple[str, list[dict[str, Any]]]] = []   # successive LISTs; the last repeats
        self.list_no = 0
        self.requests: list[dict[str, Any]] = []
        self.steps: deque[Any] = deque()
        self.watch_gen = 0       # only the newest watch stream takes steps (an abandoned one just ends)
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.server: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def push(self, *steps: Any) -> None:
        with self.cond:
            self.steps.extend(steps)
            self.cond.notify_all()

    def reqs(self, watch: bool) -> list[dict[str, Any]]:
        with self.cond:
            return [r for r in self.requests if r["watch"] == watch]

    def start(self) -> None:
        api = self
        self.stopping.clear()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def send_json(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            def status(self, code: int, reason: str) -> None:
                self.send_json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": reason, "code": code})

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                watch = params.get("watch") in ("1", "true")
                with api.cond:
                    api.requests.append({"watch": watch, "params": params,
                                         "auth": self.headers.get("Authorization")})
                if url.path != "/api/v1/pods":
                    return self.status(404, "NotFound")
                if params.get("fieldSelector") != f"spec.nodeName={NODE}":
                    return self.status(400, "BadRequest")
                want = None if api.token_file is None else f"Bearer {api.token_file.read_text().strip()}"
                if self.headers.get("Authorization") != want:
                    return self.status(401, "Unauthorized")
                return self.watch() if watch else self.list(params)

            def list(self, params: dict[str, str]) -> None:
                if "continue" in params:
                    n, _, start = params["continue"].partition(":")
                    no, offset = int(n), int(start)
                else:
                    with api.cond:
                        no, offset = min(api.list_no, len(api.lists) - 1), 0
                        api.list_no += 1
                rv, items = api.lists[no]
                page = items[offset:offset + api.page_size]
                md: dict[str, Any] = {"resourceVersion": rv}
                if offset + api.page_size < len(items):
                    md["continue"] = f"{no}:{offset + api.page_size}"
                self.send_json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": md, "items": page})

            def watch(self) -> None:
                with api.cond:
                    api.watch_gen += 1
                    gen = api.watch_gen
                    if api.steps and isinstance(api.steps[0], Status410):
                        api.steps.popleft()
                        return self.status(410, "Expired")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.close_connection = True
                while True:
                    with api.cond:
                        api.cond.wait_for(lambda: api.steps or api.stopping.is_set(), timeout=0.1)
                        if api.stopping.is_set() or gen != api.watch_gen:
                            return          # cut mid-stream, as a dying API server does
                        if not api.steps:
                            continue
                        if isinstance(api.steps[0], Status410):
                            step: Any = CLOSE   # for the next request
                        else:
                            step = api.steps.popleft()
                    if step == CLOSE:
                        self.wfile.write(b"0\r\n\r\n")
                        return
                    data = step if isinstance(step, bytes) else json.dumps(step).encode() + b"\n"
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass   # refused TLS handshakes, cut streams: expected here

        server = Server(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self.server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        time.sleep(0.02)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def token(tmp_path: Path) -> Path:
    f = tmp_path / "token"
    f.write_text("token-one\n")
    return f


@pytest.fixture
def api(token: Path) -> Iterator[FakeAPI]:
    a = FakeAPI(token)
    a.start()
    yield a
    a.stop()


@pytest.fixture
def caches() -> Iterator[list[PodCache]]:
    made: list[PodCache] = []
    yield made
    for c in made:
        c.stop()


def started(caches: list[PodCache], *args: Any, **kw: Any) -> PodCache:
    c = PodCache(*args, **kw)
    caches.append(c)
    c.start()
    return c


C = {n: h(f"ctr-{n}") for n in ("web", "sidecar", "init", "db", "agent", "old-agent", "kube-apiserver", "e", "f")}
UID = {n: f"{hashlib.md5(n.encode()).hexdigest()[:8]}-1111-4222-8333-{hashlib.md5(n.encode()).hexdigest()[:12]}"
       for n in ("web", "db", "agent", "static", "e", "f", "late")}


def base_pods() -> list[dict[str, Any]]:
    return [
        pod("web-6d4cf56db6-x7k2p", UID["web"], {"web": C["web"], "sidecar": C["sidecar"]}, ns="shop",
            labels={"app": "web", "pod-template-hash": "6d4cf56db6"}, sa="web-sa", init={"init": C["init"]}, rv="10"),
        pod("db-0", UID["db"], {"db": C["db"]}, ns="shop", labels={"app": "db"}, rv="11", runtime="cri-o"),
        pod("agent-runner", UID["agent"], {"agent": C["agent"]}, ns="ci", labels={"team": "ml"}, sa="runner",
            rv="12", runtime="docker", restarted={"agent": C["old-agent"]}),
        pod("kube-apiserver-node-a", UID["static"], {"kube-apiserver": C["kube-apiserver"]}, ns="kube-system",
            rv="13", annotations={"kubernetes.io/config.mirror": STATIC, "kubernetes.io/config.hash": STATIC},
            owner="Node"),
    ]


def must(info: K8sInfo | None) -> K8sInfo:
    assert info is not None
    return info


def ref(name: str, uid: str = "", runtime: str = "containerd") -> ContainerRef:
    return ContainerRef(runtime, C[name] if name else "", uid)


def test_list_paginates_and_lookups_answer(api: FakeAPI, token: Path, caches: list[PodCache]) -> None:
    api.lists = [("100", base_pods())]
    cache = started(caches, api.url, NODE, token_file=str(token))
    wait_until(lambda: cache.status()["connected"] and api.reqs(watch=True), what="list + watch")

    lists = api.reqs(watch=False)
    assert len(lists) == 2                                   # 4 pods, 2 a page
    assert "continue" not in lists[0]["params"] and lists[1]["params"]["continue"] == "0:2"
    assert {r["params"]["limit"] for r in lists} == {"500"}
    assert {r["auth"] for r in api.requests} == {"Bearer token-one"}
    w = api.reqs(watch=True)[0]["params"]
    assert (w["resourceVersion"], w["allowWatchBookmarks"], w["fieldSelector"]) == ("100", "true", f"spec.nodeName={NODE}")

    st = cache.status()
    assert (st["pods"], st["deleted_kept"], st["relists"], st["last_error"]) == (4, 0, 0, "")
    assert (st["api"], st["node"]) == (api.url, NODE)
    assert isinstance(st["since"], float) and st["since"] >= 0

    info = cache.lookup(ref("sidecar", UID["web"]))
    assert info is not None
    assert (info.namespace, info.pod, info.container, info.image) == \
        ("shop", "web-6d4cf56db6-x7k2p", "sidecar", "registry.example/sidecar:1.0")
    assert (info.service_account, info.node, info.pod_uid, info.container_id) == ("web-sa", NODE, UID["web"], C["sidecar"])
    assert info.labels == {"app": "web", "pod-template-hash": "6d4cf56db6"}
    info.labels["app"] = "changed"                           # a copy: the cache is not changed through it
    assert must(cache.lookup(ref("web", UID["web"]))).labels["app"] == "web"

    assert must(cache.lookup(ref("init", UID["web"]))).container == "init"
    assert must(cache.lookup(ref("db", UID["db"], "cri-o"))).container == "db"
    # the restarted container's previous id still names it
    assert must(cache.lookup(ref("old-agent", UID["agent"], "docker"))).container == "agent"
    # a container the pod's status does not list yet: the pod-level answer
    fresh = cache.lookup(ContainerRef("containerd", h("brand-new"), UID["web"]))
    assert fresh is not None and (fresh.pod, fresh.container, fresh.image, fresh.container_id) == \
        ("web-6d4cf56db6-x7k2p", "", "", h("brand-new"))
    # CRI-O's conmon: pod only
    conmon = cache.lookup(ContainerRef("cri-o", "", UID["db"]))
    assert conmon is not None and (conmon.pod, conmon.container) == ("db-0", "")
    # no pod uid in the cgroup path (Docker-in-Kubernetes): by the container id alone
    assert must(cache.lookup(ContainerRef("docker", C["agent"], ""))).pod == "agent-runner"
    # a static pod: the cgroup has the config hash, the API server the mirror pod's own uid
    static = cache.lookup(ContainerRef("containerd", C["kube-apiserver"], STATIC))
    assert static is not None and (static.pod, static.container, static.pod_uid) == \
        ("kube-apiserver-node-a", "kube-apiserver", UID["static"])
    # ... also by the hash alone (a container its status does not list yet)
    assert must(cache.lookup(ContainerRef("containerd", h("unlisted"), STATIC))).pod == "kube-apiserver-node-a"
    assert cache.lookup(ContainerRef("containerd", h("nobody"), UID["late"])) is None
    assert cache.lookup(ContainerRef("docker", h("nobody"), "")) is None


def test_watch_events_update_the_cache(api: FakeAPI, token: Path, caches: list[PodCache]) -> None:
    api.lists = [("100", base_pods())]
    cache = started(caches, api.url, NODE, token_file=str(token))
    wait_until(lambda: api.reqs(watch=True), what="the watch")

    late = pod("late-1", UID["late"], {"e": C["e"]}, ns="jobs", labels={"v": "1"}, rv="101")
    api.push(ev("ADDED", late))
    info = wait_until(lambda: cache.lookup(ref("e", UID["late"])), what="ADDED")
    assert (info.namespace, info.pod, info.container, info.labels) == ("jobs", "late-1", "e", {"v": "1"})

    relabelled = pod("late-1", UID["late"], {"e": C["e"]}, ns="jobs", labels={"v": "2", "new": "yes"}, rv="102")
    api.push(ev("MODIFIED", relabelled))
    wait_until(lambda: must(cache.lookup(ref("e", UID["late"]))).labels == {"v": "2", "new": "yes"},
               what="MODIFIED")

    api.push(ev("DELETED", pod("db-0", UID["db"], {"db": C["db"]}, ns="shop", rv="103")))
    wait_until(lambda: cache.status()["deleted_kept"] == 1, what="DELETED")
    st = cache.status()
    assert (st["pods"], st["deleted_kept"]) == (4, 1)        # web, agent, static, late; db kept
    assert must(cache.lookup(ref("db", UID["db"]))).pod == "db-0"

    # a bookmark moves the resourceVersion; the reopened watch starts from it
    api.push({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                             "metadata": {"resourceVersion": "150"}}}, CLOSE)
    wait_until(lambda: len(api.reqs(watch=True)) == 2, what="the watch reopened")
    assert api.reqs(watch=True)[1]["params"]["resourceVersion"] == "150"
    assert len(api.reqs(watch=False)) == 2 and cache.status()["relists"] == 0   # no relist for that


@pytest.mark.parametrize("how", ["error-event", "http-410"])
def test_gone_relists(how: str, api: FakeAPI, token: Path, caches: list[PodCache]) -> None:
    e = pod("e-pod", UID["e"], {"e": C["e"]}, labels={"gen": "2"}, rv="300")
    f = pod("f-pod", UID["f"], {"f": C["f"]}, rv="301")
    api.lists = [("100", base_pods()[:1]), ("300", [e, f])]
    if how == "http-410":
        api.push(Status410())          # the first WATCH is refused
    cache = started(caches, api.url, NODE, token_file=str(token), keep_deleted_s=60.0)
    if how == "error-event":
        wait_until(lambda: api.reqs(watch=True), what="the watch")
        api.push(GONE)

    wait_until(lambda: cache.status()["relists"] == 1, what="a relist")
    info = wait_until(lambda: cache.lookup(ref("e", UID["e"])), what="the second LIST's pods")
    assert info.labels == {"gen": "2"}
    assert must(cache.lookup(ref("f", UID["f"]))).pod == "f-pod"
    st = cache.status()
    # web is in no LIST any more: kept as deleted, still resolvable
    assert (st["pods"], st["deleted_kept"]) == (2, 1)
    assert must(cache.lookup(ref("web", UID["web"]))).pod == "web-6d4cf56db6-x7k2p"
    wait_until(lambda: any(r["params"]["resourceVersion"] == "300" for r in api.reqs(watch=True)),
               what="the watch from the new list's resourceVersion")
    assert len([r for r in api.reqs(watch=False) if "continue" not in r["params"]]) == 2
    assert cache.status()["connected"] is True


def test_deleted_pod_kept_then_dropped(api: FakeAPI, token: Path, caches: list[PodCache]) -> None:
    clock = Clock()
    api.lists = [("100", base_pods())]
    cache = started(caches, api.url, NODE, token_file=str(token), keep_deleted_s=300.0, clock=clock)
    wait_until(lambda: api.reqs(watch=True), what="the watch")
    api.push(ev("DELETED", pod("db-0", UID["db"], {"db": C["db"]}, ns="shop", rv="101")))
    wait_until(lambda: cache.status()["deleted_kept"] == 1, what="DELETED")

    clock.t += 299.0
    assert must(cache.lookup(ref("db", UID["db"]))).container == "db"
    assert must(cache.lookup(ContainerRef("cri-o", C["db"], ""))).pod == "db-0"
    clock.t += 1.0
    assert cache.lookup(ref("db", UID["db"])) is None
    assert cache.lookup(ContainerRef("cri-o", C["db"], "")) is None   # its container index went too
    st = cache.status()
    assert (st["pods"], st["deleted_kept"]) == (3, 0)
    assert cache.lookup(ref("web", UID["web"])) is not None      # the live ones stay


def test_api_server_away_then_back(api: FakeAPI, token: Path, caches: list[PodCache]) -> None:
    api.lists = [("100", base_pods())]
    cache = started(caches, api.url, NODE, token_file=str(token))
    wait_until(lambda: api.reqs(watch=True), what="the watch")
    api.push(ev("MODIFIED", pod("db-0", UID["db"], {"db": C["db"]}, ns="shop", labels={"x": "y"}, rv="120")))
    wait_until(lambda: must(cache.lookup(ref("db", UID["db"]))).labels == {"x": "y"}, what="MODIFIED")

    api.stop()
    wait_until(lambda: not cache.status()["connected"], what="disconnected")
    st = cache.status()
    assert st["last_error"] != "" and st["pods"] == 4
    # answers from the cache meanwhile
    assert must(cache.lookup(ref("sidecar", UID["web"]))).container == "sidecar"

    seen = len(api.requests)
    api.start()                                                  # the same port
    wait_until(lambda: cache.status()["connected"], timeout=10.0, what="reconnected")
    after = api.requests[seen:]
    # a watch from where it was, not a relist
    assert after[0]["watch"] is True and after[0]["params"]["resourceVersion"] == "120"
    assert cache.status()["relists"] == 0 and len(api.reqs(watch=False)) == 2


def test_token_is_reread_at_each_connection(api: FakeAPI, token: Path, caches: list[PodCache]) -> None:
    api.lists = [("100", base_pods())]
    cache = started(caches, api.url, NODE, token_file=str(token))
    wait_until(lambda: api.reqs(watch=True), what="the watch")
    token.write_text("token-two\n")                             # the kubelet rotated it
    api.push(CLOSE)
    wait_until(lambda: len(api.reqs(watch=True)) == 2, what="the watch reopened")
    auths = [r["auth"] for r in api.requests]
    assert auths[:-1] == ["Bearer token-one"] * (len(auths) - 1) and auths[-1] == "Bearer token-two"
    wait_until(lambda: cache.status()["connected"], what="connected")
    assert cache.status()["last_error"] == ""                   # never refused (the server checks)


def test_no_token_file_no_header(caches: list[PodCache]) -> None:
    api = FakeAPI(token_file=None)
    api.lists = [("7", base_pods()[:1])]
    api.start()
    try:
        cache = started(caches, api.url, NODE)
        wait_until(lambda: cache.status()["pods"] == 1, what="the list")
        assert [r["auth"] for r in api.requests] == [None] * len(api.requests)
    finally:
        api.stop()


def test_a_wrong_token_is_an_error(api: FakeAPI, tmp_path: Path, caches: list[PodCache]) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    api.lists = [("100", base_pods())]
    cache = started(caches, api.url, NODE, token_file=str(wrong))
    wait_until(lambda: cache.status()["last_error"], what="an error")
    st = cache.status()
    assert "HTTP 401" in str(st["last_error"]) and st["connected"] is False and st["pods"] == 0


def test_a_bad_event_line_rewatches(api: FakeAPI, token: Path, caches: list[PodCache]) -> None:
    api.lists = [("100", base_pods())]
    cache = started(caches, api.url, NODE, token_file=str(token))
    wait_until(lambda: api.reqs(watch=True), what="the watch")
    api.push(ev("ADDED", pod("e-pod", UID["e"], {"e": C["e"]}, rv="105")), b"{not json\n")
    wait_until(lambda: "not a JSON event" in str(cache.status()["last_error"]), what="the error")
    wait_until(lambda: len(api.reqs(watch=True)) == 2, what="the watch reopened")
    assert api.reqs(watch=True)[1]["params"]["resourceVersion"] == "105"
    wait_until(lambda: cache.status()["connected"], what="connected again")
    assert must(cache.lookup(ref("e", UID["e"]))).pod == "e-pod"


def test_stop_is_prompt(api: FakeAPI, token: Path) -> None:
    api.lists = [("100", base_pods())]
    cache = PodCache(api.url, NODE, token_file=str(token))
    cache.start()
    wait_until(lambda: api.reqs(watch=True), what="the watch")   # blocked reading the open stream
    t0 = time.monotonic()
    cache.stop()
    assert time.monotonic() - t0 < 1.0
    assert not any(t.name == "k8s-pods" and t.is_alive() for t in threading.enumerate())


def test_needs_a_node_and_a_url() -> None:
    with pytest.raises(K8sError, match="node"):
        PodCache("https://10.0.0.1:443", "")
    with pytest.raises(K8sError, match="not http"):
        PodCache("10.0.0.1:443", NODE)


# ---------------------------------------------------------------------------------------------
# TLS, in-cluster


def make_ca(cn: str) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A cluster CA, the API server's certificate from it (SAN IP 127.0.0.1), and an unrelated CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca("kubernetes")
    _, other = make_ca("kubernetes")                            # same name, another key
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("kubernetes.default.svc")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "other-ca.crt").write_bytes(other.public_bytes(pem))
    (d / "server.crt").write_bytes(cert.public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return {n: d / n for n in ("ca.crt", "other-ca.crt", "server.crt", "server.key")}


@pytest.fixture
def tls_api(pki: dict[str, Path], token: Path) -> Iterator[FakeAPI]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server.crt"], pki["server.key"])
    a = FakeAPI(token, tls=ctx)
    a.lists = [("100", base_pods())]
    a.start()
    yield a
    a.stop()


def test_https_with_the_cluster_ca(tls_api: FakeAPI, token: Path, pki: dict[str, Path],
                                   caches: list[PodCache]) -> None:
    cache = started(caches, tls_api.url, NODE, token_file=str(token), ca_file=str(pki["ca.crt"]))
    wait_until(lambda: tls_api.reqs(watch=True), what="list + watch over TLS")
    st = cache.status()
    assert (st["connected"], st["pods"], st["last_error"]) == (True, 4, "")
    assert must(cache.lookup(ref("web", UID["web"]))).container == "web"


@pytest.mark.parametrize("ca", ["other-ca.crt", ""])
def test_https_with_another_ca_fails(ca: str, tls_api: FakeAPI, token: Path, pki: dict[str, Path],
                                     caches: list[PodCache]) -> None:
    cache = started(caches, tls_api.url, NODE, token_file=str(token), ca_file=str(pki[ca]) if ca else "")
    wait_until(lambda: cache.status()["last_error"], what="a TLS error")
    st = cache.status()
    assert "CERTIFICATE_VERIFY_FAILED" in str(st["last_error"])
    assert (st["connected"], st["pods"]) == (False, 0)
    assert tls_api.requests == []                                # nothing was sent


def test_in_cluster(tls_api: FakeAPI, pki: dict[str, Path], tmp_path: Path, token: Path,
                    monkeypatch: pytest.MonkeyPatch, caches: list[PodCache]) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(K8sError, match="not running in a Kubernetes pod"):
        PodCache.in_cluster(NODE)

    sa = tmp_path / "sa"
    sa.mkdir()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(tls_api.port))
    with pytest.raises(K8sError, match="token is missing"):
        PodCache.in_cluster(NODE, sa_dir=str(sa))
    (sa / "token").write_text(token.read_text())
    (sa / "ca.crt").write_bytes(pki["ca.crt"].read_bytes())
    cache = PodCache.in_cluster(NODE, sa_dir=str(sa), keep_deleted_s=5.0)
    caches.append(cache)
    assert (cache.api, cache.token_file, cache.ca_file, cache.keep_deleted_s) == \
        (tls_api.url, str(sa / "token"), str(sa / "ca.crt"), 5.0)
    cache.start()
    wait_until(lambda: cache.status()["pods"] == 4, what="an in-cluster list")
    assert cache.status()["connected"] is True

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00:10:96::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert PodCache.in_cluster(NODE, sa_dir=str(sa)).api == "https://[fd00:10:96::1]:443"


def test_forged_cgroup_paths_name_no_pod() -> None:
    """A user's delegated systemd subtree may be named after any pod's container (red team): not a pod.
    A container naming a cgroup below itself after another pod stays its own pod's."""
    uid_a, uid_b = UID["web"], UID["db"]
    forged = (f"0::/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-burstable.slice/"
              f"kubepods-burstable-pod{uid_b.replace('-', '_')}.slice/cri-containerd-{C['db']}.scope\n")
    assert container_of(forged) is None
    assert container_of(f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{C['db']}.scope\n") \
        is None
    nested = (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_a.replace('-', '_')}.slice/"
              f"cri-containerd-{C['web']}.scope/kubepods-pod{uid_b.replace('-', '_')}.slice/"
              f"cri-containerd-{C['db']}.scope\n")
    assert container_of(nested) == ContainerRef("containerd", C["web"], uid_a)


def test_a_tenant_pod_with_a_mirror_annotation_does_not_take_a_static_pods_processes(
        api: FakeAPI, token: Path, caches: list[PodCache]) -> None:
    fake = pod("not-static", UID["e"], {"e": C["e"]}, ns="tenant", rv="20",
               annotations={"kubernetes.io/config.mirror": STATIC})
    api.lists = [("20", [*base_pods(), fake])]
    c = started(caches, api.url, NODE, token_file=str(token))
    wait_until(lambda: c.status()["pods"] == 5, what="the list")
    got = must(c.lookup(ContainerRef("containerd", C["kube-apiserver"], STATIC)))
    assert got.namespace == "kube-system", got

"""Which Kubernetes pod and container a process runs in.

Why: on a Kubernetes node the agent sessions we record run inside pods, and "uid 1000 ran
`rm -rf`" says little next to "namespace ci, pod runner-7f9c, container agent, image
ghcr.io/acme/agent:1.4".  The daemon runs as a DaemonSet with the host's /proc, so two
halves answer the question:

* `container_of()` reads a process's /proc/PID/cgroup: the kubelet and the container runtime
  name the cgroups after the pod UID and the container ID (containerd, CRI-O, Docker; the
  systemd and cgroupfs cgroup drivers; cgroup v1 and v2; nested kind nodes).
* `PodCache` keeps the pods *of this node* from the API server (one LIST, then a WATCH that
  resumes from the last resourceVersion) and maps pod UID / container ID to the pod's names.

The RBAC this needs is only get/list/watch on pods.  The `spec.nodeName` field selector keeps
both the daemon's memory and the API server's load proportional to one node, not to the
cluster; per pod only a compact record is kept (names, labels, container id -> name and image),
never the whole object.  Lookups are served from memory, so they keep answering from the last
known state while the API server is away, and a deleted pod is remembered a few minutes so the
late events of its processes still resolve.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentwarden.core.events import K8sInfo

log = logging.getLogger(__name__)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class K8sError(RuntimeError):
    """A Kubernetes API problem worth a clear message (not in a cluster, HTTP error, bad stream)."""


class _Gone(Exception):
    """HTTP 410 / watch ERROR 410: our resourceVersion is too old (or a continue token expired)."""


# ---------------------------------------------------------------------------------------------
# cgroup path -> container


@dataclass(frozen=True)
class ContainerRef:
    runtime: str        # containerd | cri-o | docker | "" (a bare id: cgroupfs driver, runtime unknown)
    container_id: str   # 64 hex digits, or "" (a pod-level cgroup such as CRI-O's conmon)
    pod_uid: str        # dashed UUID form (a static pod: the kubelet's 32-hex config hash), or ""


_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
# `pod<uid>` (cgroupfs) or `kubepods[-qos]-pod<uid_with_underscores>.slice` (systemd driver; kind
# prefixes `kubelet-`); static pods are named after their 32-hex config hash instead of a UUID
_POD = re.compile(rf"(?:^|-)pod({_UUID}|[0-9a-f]{{32}})(?:\.slice)?$")
_CTR = re.compile(r"^(cri-containerd|crio|docker)-([0-9a-f]{64})(?:\.scope)?$")
# CRI-O's monitor process: it lives in the pod but is no container of it
_CONMON = re.compile(r"^crio-conmon-[0-9a-f]{64}(?:\.scope)?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RUNTIME = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker"}
# with cgroup v1 every controller has a line; these are the ones a container is always placed in
_PREFERRED = ("memory", "pids", "name=systemd")


# where a container's cgroup may hang: the kubelet's pods, a node container (kind), Docker's tree,
# system services.  Not user.slice: systemd delegates the subtree of user@UID.service to that user,
# who could name a cgroup after another pod's container there (red team); a cgroup namespace's
# path starts with `..` and then one of these.
_TRUSTED_ROOT = re.compile(r"^(kubepods.*|kubelet.*|system\.slice|docker|[0-9a-f]{64}"
                           r"|(docker|cri-containerd|crio)-[0-9a-f]{64}\.scope)$")


def _parse_path(path: str) -> ContainerRef | None:
    """The outermost pod and the container right below it (a kind node is itself a container, and
    kubepods sit inside it: its id comes first in the path and must not win; a cgroup a container
    made below itself, named after another pod, is still that container's)."""
    comps = [c for c in path.split("/") if c]
    while comps and comps[0] == "..":
        comps.pop(0)
    if not comps or not _TRUSTED_ROOT.match(comps[0]):
        return None
    runtime = cid = ""
    parent = ""
    for i, comp in enumerate(comps):
        if m := _POD.search(comp):
            pod = m.group(1).replace("_", "-")
            below = comps[i + 1] if i + 1 < len(comps) else ""
            if c := _CTR.match(below):
                return ContainerRef(_RUNTIME[c.group(1)], c.group(2), pod)
            if _CONMON.match(below):
                return ContainerRef("cri-o", "", pod)
            if _HEX64.match(below):
                # cgroupfs names the container by its bare id: the runtime is not in the path
                return ContainerRef("", below, pod)
            return ContainerRef("", "", pod)
        if m := _CTR.match(comp):
            runtime, cid = _RUNTIME[m.group(1)], m.group(2)
        elif _HEX64.match(comp):
            # only Docker's own tree says the runtime of a bare id
            runtime, cid = ("docker" if parent == "docker" else ""), comp
        parent = comp
    if not cid:
        return None
    return ContainerRef(runtime, cid, "")


def container_of(cgroup_text: str) -> ContainerRef | None:
    """The container (and pod) named by the text of /proc/PID/cgroup; None for a host process,
    or text that is not a cgroup file.  Never raises."""
    best: ContainerRef | None = None
    best_rank: tuple[bool, bool, int] = (False, False, -1)
    try:
        for line in cgroup_text.splitlines():
            parts = line.strip().split(":", 2)
            if len(parts) != 3 or not parts[2].startswith("/"):
                continue
            ref = _parse_path(parts[2])
            if ref is None:
                continue
            controllers = parts[1].split(",")
            pref = 2 if any(c in _PREFERRED for c in controllers) else 1 if parts[1] == "" else 0
            # the most complete answer first, then the most trustworthy line (first one on ties)
            rank = (bool(ref.container_id), bool(ref.pod_uid), pref)
            if rank > best_rank:
                best, best_rank = ref, rank
    except Exception:   # the contract is "never raise": bad input is "not a container"
        log.debug("unparsable cgroup text %.200r", cgroup_text, exc_info=True)
        return None
    return best


def container_of_pid(pid: int, proc: str = "/proc") -> ContainerRef | None:
    """container_of() for a live process; None when it is gone (or its cgroup file unreadable)."""
    try:
        text = Path(proc, str(pid), "cgroup").read_text(errors="replace")
    except (OSError, ValueError):
        return None
    return container_of(text)


# ---------------------------------------------------------------------------------------------
# the pods of this node


class _Pod:
    """What is kept of a pod: a few strings (interned: namespaces, images, label keys repeat
    across pods) and the container id -> (name, image) map."""

    __slots__ = ("namespace", "name", "uid", "node", "service_account", "labels", "containers",
                 "mirror", "deleted_at")

    def __init__(self, namespace: str, name: str, uid: str, node: str, service_account: str,
                 labels: dict[str, str], containers: dict[str, tuple[str, str]], mirror: str) -> None:
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.node = node
        self.service_account = service_account
        self.labels = labels
        self.containers = containers
        self.mirror = mirror
        self.deleted_at: float | None = None


def _d(x: object) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _s(x: object) -> str:
    return sys.intern(x) if isinstance(x, str) else ""


def _compact(obj: object) -> _Pod | None:
    """The record kept for a Pod object (None when it has no uid: nothing could find it)."""
    md = _d(_d(obj).get("metadata"))
    uid = md.get("uid")
    if not isinstance(uid, str) or not uid:
        return None
    spec, status = _d(_d(obj).get("spec")), _d(_d(obj).get("status"))
    containers: dict[str, tuple[str, str]] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        statuses = status.get(key)
        for cs in statuses if isinstance(statuses, list) else ():
            cs = _d(cs)
            named = (_s(cs.get("name")), _s(cs.get("image")))
            # the previous instance too: a restarted container's late events name the old id
            ids = (cs.get("containerID"), _d(_d(cs.get("lastState")).get("terminated")).get("containerID"))
            for raw in ids:
                # "containerd://<hex>", "cri-o://<hex>", "docker://<hex>"
                cid = raw.rpartition("://")[2] if isinstance(raw, str) else ""
                if cid:
                    containers.setdefault(cid, named)
    labels = {_s(k): _s(v) for k, v in _d(md.get("labels")).items()}
    # a static pod's cgroup is named after its config hash; the API server's mirror pod has its
    # own uid and carries the hash in this annotation
    mirror = _d(md.get("annotations")).get("kubernetes.io/config.mirror")
    # ...but only a pod the kubelet made (owned by its Node): any tenant may put the annotation on
    # a pod of their own and claim a static pod's processes (red team)
    owners = md.get("ownerReferences")
    if not any(_d(o).get("kind") == "Node" for o in (owners if isinstance(owners, list) else ())):
        mirror = ""
    return _Pod(_s(md.get("namespace")), _s(md.get("name")), uid, _s(spec.get("nodeName")),
                _s(spec.get("serviceAccountName")), labels, containers,
                mirror if isinstance(mirror, str) else "")


class PodCache:
    """The pods of one node, kept current by a LIST + WATCH thread; lookups from any thread."""

    BACKOFF_MIN_S = 0.5
    BACKOFF_MAX_S = 30.0
    LIST_LIMIT = 500

    def __init__(self, api: str, node: str, token_file: str = "", ca_file: str = "",
                 keep_deleted_s: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 timeout_s: float = 10.0, watch_timeout_s: int = 300) -> None:
        if not node:
            # without the field selector this would cache every pod of the cluster
            raise K8sError("PodCache needs this node's name (the downward API's spec.nodeName)")
        url = urllib.parse.urlsplit(api)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise K8sError(f"API server URL {api!r} is not http(s)://host[:port]")
        self.api = api
        self.node = node
        self.token_file = token_file
        self.ca_file = ca_file
        self.keep_deleted_s = keep_deleted_s
        self.timeout_s = timeout_s
        self.watch_timeout_s = watch_timeout_s
        self._clock = clock
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._selector = f"spec.nodeName={node}"

        self._lock = threading.Lock()      # the store and the status below
        self._pods: dict[str, _Pod] = {}
        self._by_container: dict[str, str] = {}   # container id -> pod uid
        self._by_mirror: dict[str, str] = {}      # static pod config hash -> mirror pod uid
        self._deleted: dict[str, float] = {}      # pod uid -> deleted at, oldest first
        self._rv = ""
        self._lists = 0
        self._connected = False
        self._changed_at = clock()
        self._last_error = ""

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock_lock = threading.Lock()
        self._sock: socket.socket | None = None   # the open request's, for stop() to cut
        self._watch_events = 0
        self._logged = ""                          # the last error logged at warning level

    @classmethod
    def in_cluster(cls, node: str, *, sa_dir: str = SA_DIR, **kw: Any) -> PodCache:
        """The cache of a pod's own cluster: the API server from the service environment, the
        pod's service account token and CA."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise K8sError("not running in a Kubernetes pod: KUBERNETES_SERVICE_HOST/PORT are not set")
        token, ca = Path(sa_dir, "token"), Path(sa_dir, "ca.crt")
        for f in (token, ca):
            if not f.is_file():
                raise K8sError(f"no service account credentials: {f} is missing "
                               "(automountServiceAccountToken: false?)")
        if ":" in host:   # an IPv6 service address
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", node, token_file=str(token), ca_file=str(ca), **kw)

    # -- thread -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="k8s-pods", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._cut()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the Kubernetes pod watch did not stop within %.1f s", timeout_s)
            self._thread = None

    def _cut(self) -> None:
        """Wake a read blocked on the open response: shutdown() does, close() from another thread
        does not (on Linux).  The plain socket's, so that TLS does not try a close_notify."""
        with self._sock_lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):   # already closed: nothing to wake
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _run(self) -> None:
        listed = False
        backoff = self.BACKOFF_MIN_S
        while not self._stop.is_set():
            fresh = not listed
            began = time.monotonic()
            self._watch_events = 0
            try:
                if not listed:
                    self._list()
                    listed = True
                self._watch()
                # a watch the server ended (its timeoutSeconds) reopens at once from the last rv; one
                # that ended at once having said nothing waits, lest a broken server make us spin
                if self._watch_events or time.monotonic() - began >= 1.0:
                    backoff = self.BACKOFF_MIN_S
                    continue
            except _Gone:
                if self._stop.is_set():
                    break
                log.info("Kubernetes pod watch: resourceVersion %r is too old, listing again", self._rv)
                listed = False
                if not fresh or self._watch_events or time.monotonic() - began >= 1.0:
                    continue   # the usual case (an outage, an etcd compaction): relist at once
                # expired right after a fresh list: relisting at once could spin
            except Exception as e:
                if self._stop.is_set():
                    break
                self._failed(e)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.BACKOFF_MAX_S)

    def _failed(self, e: BaseException) -> None:
        msg = str(e) if isinstance(e, K8sError) else f"{type(e).__name__}: {e}"
        with self._lock:
            was, self._last_error = self._connected, msg
            self._set_connected(False)
        # one warning per outage (or change of error); the retries at debug level
        level = logging.WARNING if was or msg != self._logged else logging.DEBUG
        log.log(level, "Kubernetes API %s: %s", self.api, msg)
        self._logged = msg

    def _set_connected(self, up: bool) -> None:
        if up != self._connected:
            self._connected, self._changed_at = up, self._clock()

    # -- HTTP -------------------------------------------------------------------------------

    def _path(self, **params: str) -> str:
        q = urllib.parse.urlencode({"fieldSelector": self._selector, **params})
        return f"{self._prefix}/api/v1/pods?{q}"

    def _open(self, path: str, read_timeout_s: float) -> http.client.HTTPResponse:
        """A GET's response, status 200 (410 raises _Gone); the socket kept for stop() to cut."""
        headers = {"Accept": "application/json", "User-Agent": "agentwarden"}
        if self.token_file:
            # read at every connection: projected service account tokens rotate (about hourly)
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as e:
                raise K8sError(f"cannot read the token file {self.token_file}: {e}") from e
            headers["Authorization"] = f"Bearer {token}"
        conn: http.client.HTTPConnection
        if self._https:
            ctx = ssl.create_default_context(cafile=self.ca_file or None)
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s, context=ctx)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        resp: http.client.HTTPResponse | None = None
        try:
            conn.connect()
            sock = conn.sock
            assert sock is not None
            with self._sock_lock:
                self._sock = sock
            if self._stop.is_set():   # stop() ran before there was a socket to cut
                raise K8sError("stopped")
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status == 410:
                raise _Gone()
            if resp.status != 200:
                body = resp.read(300).decode(errors="replace")
                raise K8sError(f"GET {path.partition('?')[0]}: HTTP {resp.status} {resp.reason}: {body}")
            sock.settimeout(read_timeout_s)
            return resp
        except BaseException:
            self._close(resp)
            conn.close()
            raise

    def _close(self, resp: http.client.HTTPResponse | None) -> None:
        with self._sock_lock:
            sock, self._sock = self._sock, None
        if resp is not None:
            resp.close()
        if sock is not None:
            sock.close()

    def _list(self) -> None:
        """LIST every page, then replace the store at once (a half list would drop live pods)."""
        items: list[_Pod] = []
        cont, rv = "", ""
        while True:
            params = {"limit": str(self.LIST_LIMIT)}
            if cont:
                params["continue"] = cont
            resp = self._open(self._path(**params), self.timeout_s)
            try:
                page = json.load(resp)
            finally:
                self._close(resp)
            if not isinstance(page, dict) or not isinstance(page.get("items"), list):
                raise K8sError("LIST /api/v1/pods: the answer is not a PodList")
            items.extend(p for p in map(_compact, page["items"]) if p is not None)
            md = _d(page.get("metadata"))
            rv = str(md.get("resourceVersion") or rv)
            cont = str(md.get("continue") or "")
            if not cont or self._stop.is_set():
                break
        if self._stop.is_set():
            return
        self._replace(items, rv)

    def _watch(self) -> None:
        """One WATCH from the last resourceVersion, until the server ends it (or stop())."""
        path = self._path(watch="1", resourceVersion=self._rv, allowWatchBookmarks="true",
                          timeoutSeconds=str(self.watch_timeout_s))
        # bookmarks come about every minute; silence past the server's own timeout is a dead peer
        resp = self._open(path, self.watch_timeout_s + self.timeout_s)
        with self._lock:
            self._set_connected(True)
        try:
            while not self._stop.is_set():
                line = resp.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError as e:
                    raise K8sError(f"WATCH /api/v1/pods: not a JSON event: {line[:120]!r}") from e
                self._apply(event)
                self._watch_events += 1
        finally:
            self._close(resp)

    # -- the store --------------------------------------------------------------------------

    def _replace(self, items: Iterable[_Pod], rv: str) -> None:
        now = self._clock()
        with self._lock:
            fresh = {p.uid: p for p in items}
            for uid, old in self._pods.items():
                if uid not in fresh:
                    # gone while we were not watching: kept like a DELETED one
                    if old.deleted_at is None:
                        old.deleted_at = now
                        self._deleted[uid] = now
                    fresh[uid] = old
            for pod in fresh.values():
                if pod.deleted_at is None:
                    self._deleted.pop(pod.uid, None)
            self._pods = fresh
            self._by_container = {cid: p.uid for p in fresh.values() for cid in p.containers}
            self._by_mirror = {p.mirror: p.uid for p in fresh.values() if p.mirror}
            self._rv = rv
            self._lists += 1
            self._set_connected(True)
            self._prune(now)

    def _apply(self, event: object) -> None:
        """One watch event into the store (also the benchmark's way in)."""
        ev = _d(event)
        kind, obj = ev.get("type"), _d(ev.get("object"))
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise K8sError(f"WATCH /api/v1/pods: error {obj.get('code')} {obj.get('reason', '')}: "
                           f"{obj.get('message', '')}")
        rv = _d(obj.get("metadata")).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            pod = _compact(obj)
            if pod is not None:
                now = self._clock()
                with self._lock:
                    self._put(pod, deleted_at=now if kind == "DELETED" else None)
                    self._prune(now)
        elif kind != "BOOKMARK":
            raise K8sError(f"WATCH /api/v1/pods: unknown event type {kind!r}")
        if isinstance(rv, str) and rv:
            self._rv = rv

    def _put(self, pod: _Pod, deleted_at: float | None) -> None:
        old = self._pods.get(pod.uid)
        if old is not None:
            self._unindex(old)
            if deleted_at is not None and old.deleted_at is not None:
                deleted_at = old.deleted_at   # a repeated DELETED does not extend the stay
        pod.deleted_at = deleted_at
        self._pods[pod.uid] = pod
        for cid in pod.containers:
            self._by_container[cid] = pod.uid
        if pod.mirror:
            self._by_mirror[pod.mirror] = pod.uid
        if deleted_at is None:
            self._deleted.pop(pod.uid, None)
        elif pod.uid not in self._deleted:
            self._deleted[pod.uid] = deleted_at

    def _unindex(self, pod: _Pod) -> None:
        for cid in pod.containers:
            if self._by_container.get(cid) == pod.uid:
                del self._by_container[cid]
        if pod.mirror and self._by_mirror.get(pod.mirror) == pod.uid:
            del self._by_mirror[pod.mirror]

    def _prune(self, now: float) -> None:
        """Drop the pods deleted more than keep_deleted_s ago (oldest first: insertion order)."""
        while self._deleted:
            uid, at = next(iter(self._deleted.items()))
            if now - at < self.keep_deleted_s:
                break
            del self._deleted[uid]
            pod = self._pods.pop(uid, None)
            if pod is not None:
                self._unindex(pod)

    # -- queries ----------------------------------------------------------------------------

    def lookup(self, ref: ContainerRef) -> K8sInfo | None:
        """The pod (and container, when the API server has reported it) of a cgroup's ref; None for
        a pod this node does not know (yet, or any more)."""
        with self._lock:
            self._prune(self._clock())
            pod = None
            if ref.pod_uid:
                pod = self._pods.get(ref.pod_uid) or self._pods.get(self._by_mirror.get(ref.pod_uid, ""))
            if pod is None and ref.container_id:
                # no pod in the path (Docker-in-Kubernetes), or a pod uid the API does not use
                pod = self._pods.get(self._by_container.get(ref.container_id, ""))
            if pod is None:
                return None
            # a container too new for the pod's status yet (or conmon's ""): the pod-level answer
            container, image = pod.containers.get(ref.container_id, ("", ""))
            return K8sInfo(namespace=pod.namespace, pod=pod.name, container=container, image=image,
                           service_account=pod.service_account, node=pod.node, labels=dict(pod.labels),
                           pod_uid=pod.uid, container_id=ref.container_id)

    def status(self) -> dict[str, object]:
        """For `agentwarden status` and metrics.  connected: the last LIST or WATCH succeeded and no
        error came since; last_error stays after a reconnect (what the last outage was); since:
        seconds (on the cache's clock) since connected last changed; relists: LISTs after the first."""
        with self._lock:
            self._prune(self._clock())
            deleted = len(self._deleted)
            return {"api": self.api, "node": self.node, "connected": self._connected,
                    "pods": len(self._pods) - deleted, "deleted_kept": deleted,
                    "relists": max(self._lists - 1, 0), "last_error": self._last_error,
                    "since": round(self._clock() - self._changed_at, 3)}

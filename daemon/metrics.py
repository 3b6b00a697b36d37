"""Prometheus metrics and a health check on a local HTTP address (`metrics.listen`).

The figures are the ones `agentwarden status` shows, read from the same place when scraped
(daemon.server.Daemon.status), so the two never disagree.  Per-stage latency histograms are
fed by the pipeline for one event in SAMPLE_EVERY: timing every event would add about 1 µs of
histogram locking per stage to a pipeline that spends about 40 µs on a statement.

`/healthz` answers 200 when the daemon can keep the trail (the store writer runs, and the store
is connected or the spool has room: events go somewhere), 503 with the reason otherwise.  The
probes are attached before the listener starts, so a listener that answers has probes.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SAMPLE_EVERY = 64
STAGE_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2, 0.1)


class _StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        pipe, store = st["pipeline"], st["store"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"agentwarden_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"agentwarden_{name}", doc, value=value)

        yield gauge("uptime_seconds", "Seconds since the daemon started", st["uptime_s"])
        yield gauge("pinned_links_and_maps", "BPF links and maps pinned (they outlive the daemon)",
                    st["pinned_links_and_maps"])
        yield gauge("predecessor_guards", "Earlier daemons' guards still holding connections they saw open",
                    len(st["predecessor_guards"]))
        yield counter("guard_adoption_errors", "Sockets of agents the daemon could not put in the guard",
                      st["guard_adoption_errors"])
        yield gauge("sessions", "Live agent sessions", st["sessions"])
        yield gauge("tracked_processes", "Processes tracked in agent sessions", st["tracked_processes"])
        yield counter("records", "Kernel records read", pipe["records"])
        yield counter("malformed_records", "Kernel records that could not be decoded", pipe["malformed"])
        events = CounterMetricFamily("agentwarden_events", "Events that reached the store and tail, by kind",
                                     labels=["kind"])
        for kind, n in sorted((pipe.get("by_kind") or {}).items()):
            events.add_metric([kind], n)
        yield events
        yield counter("lost_events", "Events or records declared lost (the sum of lost events' counts)",
                      pipe["lost"])
        yield counter("kernel_lost", "Records the kernel could not put in a full ring buffer",
                      st["kernel_lost"])
        yield counter("parser_desyncs", "Times a protocol parser skipped bytes of a connection",
                      st["parser_desyncs"])
        yield gauge("store_connected", "1 when the store takes inserts", 1 if store["dsn_connected"] else 0)
        yield counter("store_inserted", "Events inserted into the store", store["inserted"])
        yield counter("store_spooled", "Events written to the spool", store["spooled"])
        yield counter("store_dropped", "Events dropped because the spool was full", store["dropped"])
        yield gauge("store_queued", "Events waiting for the writer's next batch", store["queued"])
        yield gauge("spool_batches", "Batches waiting in the spool", store["spool_batches"])
        yield gauge("spool_bytes", "Bytes in the spool", store["spool_bytes"])
        yield gauge("spool_max_bytes", "The spool's cap (store.spool_max_bytes)", store["spool_max_bytes"])
        verdicts = CounterMetricFamily("agentwarden_verdicts", "Verdicts by action", labels=["action"])
        for action, n in sorted((st.get("verdicts_by_action") or {}).items()):
            verdicts.add_metric([action], n)
        yield verdicts
        yield gauge("pending_approvals", "Approval requests waiting for a person", st["pending_approvals"])


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per request, at most MAX_CLIENTS at once (more are closed at once): a client
    that trickles bytes holds one thread for TIMEOUT seconds a read, never the listener, and
    closing the server does not wait for it (red team: a local user stalling the one thread)."""

    daemon_threads = True
    block_on_close = False
    MAX_CLIENTS = 16

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.MAX_CLIENTS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = 5     # a read that waits longer drops the client

    def log_message(self, format: str, *args: Any) -> None:   # noqa: A002 (the stdlib's name)
        log.debug("metrics: " + format, *args)


class Metrics:
    def __init__(self, status: Callable[[], dict[str, Any]], health: Callable[[], tuple[bool, str]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatusCollector(status))
        self.stage_seconds = Histogram("agentwarden_stage_seconds",
                                       f"Time an event spends in a pipeline stage (1 in {SAMPLE_EVERY})",
                                       ["stage"], registry=self.registry, buckets=STAGE_BUCKETS)
        self.health = health
        self._prom = make_wsgi_app(self.registry)
        self._server: WSGIServer | None = None

    def observe(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, why = self.health()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [(why + "\n").encode()]
        if path in ("/metrics", "/"):
            return list(self._prom(environ, start_response))
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"/metrics or /healthz\n"]

    def serve(self, listen: str) -> tuple[str, int]:
        """Listen on `host:port` in a thread of its own; returns the address bound."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        server_class = _Server6 if ":" in host else _Server
        self._server = make_server(host, int(port), self.app, server_class=server_class,
                                   handler_class=_QuietHandler)
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        bound = self._server.server_address
        log.info("metrics and /healthz on http://%s:%d", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

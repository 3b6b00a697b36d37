"""The event pipeline, one explicit stage after another.

    ring buffer -> decode (probes.loader) -> track (tracker: processes, sessions)
                                          -> reassemble + parse (conns, l7/)
                                          -> decide (enforce.enforcer) -> mask -> store / tail
                guard records (probes/guard.py) -> on_guard (enforce.enforcer)

Stages take and return an Event; a sink is any callable taking an Event.  The
enforcer's verdict and approval events come back through `outbox` and pass the
same stages and sinks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agentwarden.core.events import Event
from agentwarden.daemon.conns import ConnTracker, Watch
from agentwarden.daemon.tracker import Tracker
from agentwarden.probes import guard, loader, net
from agentwarden.probes import process as pr

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]
Stage = Callable[[Event], Event]


@dataclass
class PipelineStats:
    records: int = 0
    malformed: int = 0
    events: int = 0
    sink_errors: int = 0


class Pipeline:
    def __init__(self, tracker: Tracker, sinks: Sequence[Sink], stages: Sequence[Stage] = (),
                 watch_socket: Watch | None = None, forget_socket: Callable[[int, int], None] | None = None,
                 on_connect: Callable[[int], None] | None = None,
                 on_guard: Callable[[guard.Guard], None] | None = None,
                 outbox: Callable[[], Sequence[Event]] | None = None) -> None:
        self.tracker = tracker
        self.on_connect = on_connect
        self.on_guard = on_guard
        self.outbox = outbox
        self.conns = ConnTracker(tracker, watch_socket, forget_socket)
        self.sinks = list(sinks)
        self.stages = list(stages)
        self.stats = PipelineStats()

    def on_record(self, data: bytes) -> None:
        """Ring buffer callback: garbage is counted and logged, never raised."""
        self.stats.records += 1
        try:
            raw = loader.decode(data)
        except pr.DecodeError as e:
            self.stats.malformed += 1
            log.warning("malformed probe record dropped: %s", e)
            return
        try:
            if isinstance(raw, guard.Guard):
                if self.on_guard is not None:
                    self.on_guard(raw)
                events = []
            elif isinstance(raw, net.ConnOpen | net.ConnClose | net.Data):
                if isinstance(raw, net.ConnOpen):
                    self.tracker.refresh_cwd(raw.h.pid)
                    if self.on_connect is not None:
                        self.on_connect(raw.h.pid)
                events = self.conns.handle(raw)
            else:
                # a process's sockets end with it: their last statements come before its exit
                events = self.conns.on_exit(raw) if isinstance(raw, pr.Exit) else []
                events += self.tracker.handle(raw)
                if isinstance(raw, pr.Fork):
                    self.conns.on_fork(raw.h.pid, raw.child)
        except Exception:
            self.stats.malformed += 1
            log.exception("tracker failed on %r", raw)
            return
        self.emit(events)
        self.flush_outbox()

    def flush_outbox(self) -> None:
        if self.outbox is not None:
            extra = self.outbox()
            if extra:
                self.emit(extra)

    def emit(self, events: Sequence[Event]) -> None:
        for ev in events:
            for stage in self.stages:
                ev = stage(ev)
            self.stats.events += 1
            for sink in self.sinks:
                try:
                    sink(ev)
                except Exception:
                    self.stats.sink_errors += 1
                    log.exception("sink %r failed", sink)

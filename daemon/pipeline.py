"""The event pipeline, one explicit stage after another.

    ring buffer -> decode (probes.loader) -> one handler per record type (Pipeline.handlers):
        guard records        -> enforce.enforcer on_guard: verdicts
        socket records       -> conns (reassemble, daemon/protocols/ parse)
        process records      -> tracker (processes, sessions)
    then every event:  stages (enforce.enforcer stage, mask) -> sinks (store, tail)

A handler returns the events its record made.  A stage takes one event and returns it (maybe
changed), or a list of it followed by any it gives rise to (the enforcer's verdicts after the
fact); those pass the stages after it, once their event reached the sinks.  A sink is any
callable taking an event.  Events decided outside the loop's calls (approvals on the control
socket, the daemon's own tamper checks) come in through `outbox`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentwarden.core.events import Event
from agentwarden.daemon.conns import ConnTracker, Watch
from agentwarden.daemon.tracker import Tracker
from agentwarden.probes import guard, loader, net
from agentwarden.probes import process as pr

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]
# a stage returns its event (maybe changed), or a list: the event, then those it gave rise to
Stage = Callable[[Event], "Event | list[Event]"]


@dataclass
class PipelineStats:
    records: int = 0
    malformed: int = 0
    events: int = 0
    sink_errors: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)    # events that reached the sinks, by kind
    lost: int = 0                                            # the sum of every lost event's count
    desyncs: int = 0          # lost events of a connection: a parser skipped bytes (Tracker.lost_on)


class Pipeline:
    def __init__(self, tracker: Tracker, sinks: Sequence[Sink], stages: Sequence[Stage] = (),
                 watch_socket: Watch | None = None, forget_socket: Callable[[int, int], None] | None = None,
                 on_connect: Callable[[int], None] | None = None,
                 on_exec: Callable[[int], None] | None = None,
                 on_fork: Callable[[int, int], None] | None = None,
                 on_guard: Callable[[guard.Guard], list[Event]] | None = None,
                 outbox: Callable[[], Sequence[Event]] | None = None) -> None:
        self.tracker = tracker
        self.on_connect = on_connect
        self.on_exec = on_exec
        self.on_fork = on_fork         # (parent, child): the lineage stage's cause passes to the child
        self.on_guard = on_guard
        self.outbox = outbox
        self.conns = ConnTracker(tracker, watch_socket, forget_socket)
        self.sinks = list(sinks)
        self.stages = list(stages)
        self.stats = PipelineStats()
        # per-stage latency for one record in `sample_every` (daemon.metrics): its capture
        # (decode, track, parse), each stage by its owner's name, and the sinks
        self.timing: Callable[[str, float], None] | None = None
        self.sample_every = 64
        self._stage_names = [type(getattr(s, "__self__", s)).__name__.lower() for s in self.stages]
        self._countdown = 1
        self._time_next = False
        # record type -> its handler; every other record is the tracker's (process records)
        self.handlers: dict[type, Callable[[Any], list[Event]]] = {
            guard.Guard: self._guard,
            net.ConnOpen: self._conn_open,
            net.ConnClose: self.conns.handle,
            net.Data: self.conns.handle,
            pr.Exit: self._exit,
            pr.Fork: self._fork,
            pr.Exec: self._exec,
            pr.SessionExec: self._exec,
        }

    def on_record(self, data: bytes) -> None:
        """Ring buffer callback: garbage is counted and logged, never raised."""
        self.stats.records += 1
        try:
            raw = loader.decode(data)
        except pr.DecodeError as e:
            self.stats.malformed += 1
            log.warning("malformed probe record dropped: %s", e)
            return
        timed = False
        if self.timing is not None:
            self._countdown -= 1
            if self._countdown <= 0:
                self._countdown, timed, t0 = self.sample_every, True, time.perf_counter()
        try:
            events = self.handlers.get(type(raw), self.tracker.handle)(raw)
        except Exception:
            self.stats.malformed += 1
            log.exception("handler failed on %r", raw)
            return
        if timed and self.timing is not None:
            self.timing("capture", time.perf_counter() - t0)
            self._time_next = bool(events)
        self.emit(events)
        self.flush_outbox()

    def _guard(self, raw: guard.Guard) -> list[Event]:
        return self.on_guard(raw) if self.on_guard is not None else []

    def _conn_open(self, raw: net.ConnOpen) -> list[Event]:
        self.tracker.refresh_cwd(raw.h.pid)
        if self.on_connect is not None:
            self.on_connect(raw.h.pid)
        return self.conns.handle(raw)

    def _exec(self, raw: pr.Exec | pr.SessionExec) -> list[Event]:
        events = self.tracker.handle(raw)
        if self.on_exec is not None and raw.h.pid in self.tracker.procs:   # still tracked after it
            self.on_exec(raw.h.pid)
        return events

    def _exit(self, raw: pr.Exit) -> list[Event]:
        # a process's sockets end with it: their last statements come before its exit
        return self.conns.on_exit(raw) + self.tracker.handle(raw)

    def _fork(self, raw: pr.Fork) -> list[Event]:
        events = self.tracker.handle(raw)
        self.conns.on_fork(raw.h.pid, raw.child)
        if self.on_fork is not None:
            self.on_fork(raw.h.pid, raw.child)
        return events

    def flush_outbox(self) -> None:
        if self.outbox is not None:
            extra = self.outbox()
            if extra:
                self.emit(extra)

    def emit(self, events: Sequence[Event], first_stage: int = 0) -> None:
        stages = self.stages[first_stage:] if first_stage else self.stages
        for ev in events:
            timing = self.timing if self._time_next else None   # one sampled event (metrics)
            self._time_next = False
            later: list[tuple[int, list[Event]]] | None = None
            after = first_stage
            for stage in stages:
                after += 1
                if timing is None:
                    out = stage(ev)
                else:
                    t0 = time.perf_counter()
                    out = stage(ev)
                    timing(self._stage_names[after - 1], time.perf_counter() - t0)
                if isinstance(out, list):     # per event and stage: a list only when it made more
                    ev = out[0]
                    if len(out) > 1:
                        later = later or []
                        later.append((after, out[1:]))
                else:
                    ev = out
            st = self.stats
            st.events += 1
            st.by_kind[ev.kind] = st.by_kind.get(ev.kind, 0) + 1
            if ev.lost is not None:
                st.lost += ev.lost.count
                st.desyncs += ev.net is not None
            t0 = time.perf_counter() if timing is not None else 0.0
            for sink in self.sinks:
                try:
                    sink(ev)
                except Exception:
                    self.stats.sink_errors += 1
                    log.exception("sink %r failed", sink)
            if timing is not None:
                timing("sinks", time.perf_counter() - t0)
            if later:
                for at, made in later:        # after the event they came of, through the stages after
                    self.emit(made, at)

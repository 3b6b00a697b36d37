"""Live fan-out of events to `agentwarden tail` subscribers.

Each subscriber has a bounded queue; a subscriber too slow to keep up loses
events (and is told how many), the pipeline never waits for it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from agentwarden.core.events import Event
from agentwarden.daemon.query import EventQuery


@dataclass
class Subscriber:
    filter: EventQuery
    queue: queue.Queue[Event] = field(default_factory=lambda: queue.Queue(maxsize=10_000))
    dropped: int = 0


class Hub:
    def __init__(self) -> None:
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, f: EventQuery) -> Subscriber:
        sub = Subscriber(f)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def publish(self, ev: Event) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            if sub.filter.matches(ev):
                try:
                    sub.queue.put_nowait(ev)
                except queue.Full:
                    sub.dropped += 1

    def __len__(self) -> int:
        return len(self._subs)

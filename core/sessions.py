"""Sessions and their processes as the tracker (daemon/tracker.py, their one owner) keeps them,
and the read-only view of them the enforcer is given (`SessionView`), so that the enforcer
needs the tracker's types, not the tracker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from agentwarden.core.events import Event, ExecInfo, Identity, K8sInfo, Kind
from agentwarden.probes.process import RawHeader


@dataclass
class Session:
    key: int
    id: str
    agent: str
    identity: Identity
    root_pid: int
    start_ns: int
    live: set[int] = field(default_factory=set)
    events: int = 0
    root_exit: ExecInfo | None = None
    root: Proc | None = None
    k8s: K8sInfo | None = None       # the pod of the root process, when it runs in one

    def summary(self) -> dict[str, object]:
        return {
            "session_id": self.id,
            "agent": self.agent,
            "root_pid": self.root_pid,
            "start_ns": self.start_ns,
            "identity": vars(self.identity),
            "k8s": vars(self.k8s) if self.k8s is not None else None,
            "processes": len(self.live),
            "events": self.events,
        }


@dataclass
class Proc:
    pid: int
    ppid: int
    session: int
    uid: int
    exe: str
    argv: list[str]
    cwd: str
    exec_ns: int = 0
    execd: bool = False        # exec'd while tracked: its exit is worth an event
    filename: str = ""


class SessionListener(Protocol):
    """Told by the tracker when a session starts (after its `session_start` event) and ends (after
    its `session_end`); what it returns follows that event down the pipeline."""

    def session_started(self, s: Session) -> list[Event]: ...

    def session_ended(self, s: Session) -> list[Event]: ...

    def process_joined(self, pid: int) -> None:
        """A running process joined a session (an agent attached to it): what it already holds
        (its sockets) was opened outside the session."""


class SessionView(Protocol):
    """What the tracker shows the enforcer: its sessions by kernel key, its processes by pid,
    and events made with a session's and a process's fields filled in."""

    host: str
    sessions: dict[int, Session]
    procs: dict[int, Proc]

    def event_for(self, kind: Kind, h: RawHeader) -> Event | None: ...

    def event_for_pid(self, kind: Kind, pid: int, ts_ns: int) -> Event | None: ...

    def rebind(self, key: int) -> Session | None: ...

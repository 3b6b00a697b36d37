"""Held operations and the people who may release them.

Pure bookkeeping: no sockets, no signals (the enforcer acts on decisions).  The
caller is established by the control socket (SO_PEERCRED); this module decides
whether that person may decide this request.  Nothing from inside an agent
session may decide anything, root included: an agent must not approve itself.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


class ApprovalError(RuntimeError):
    """Shown to the caller verbatim."""


@dataclass(frozen=True)
class Caller:
    uid: int
    user: str                  # the person: audit login user if set, else the uid's name
    groups: frozenset[str]
    in_agent_session: bool


@dataclass
class Request:
    id: str
    rule: str
    kind: str                  # exec | sql | http | connect
    summary: str               # what is held, already masked
    session_id: str
    agent: str
    launcher: str              # the person who launched the agent
    approvers: tuple[str, ...]
    created: float
    expires: float
    state: str = "pending"     # pending | approved | denied | expired
    decided_by: str = ""
    decided_at: float = 0.0
    approved_for_s: int = 0    # 0: this one operation
    target: dict[str, Any] = field(default_factory=dict)   # the enforcer's: pid, statement hash, ...

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["approvers"] = list(self.approvers)
        d.pop("target")
        return d


def may_decide(req: Request, caller: Caller) -> bool:
    """Does one of the request's approvers name this caller?"""
    for a in req.approvers:
        if a == "self" and caller.user == req.launcher:
            return True
        kind, _, name = a.partition(":")
        if (kind == "user" and caller.user == name) or (kind == "group" and name in caller.groups):
            return True
    return False


class Approvals:
    def __init__(self, clock: Callable[[], float] = time.time,
                 on_change: Callable[[Request], None] | None = None) -> None:
        self.clock = clock
        self.on_change = on_change
        self._lock = threading.Lock()
        self._reqs: dict[str, Request] = {}

    def _changed(self, req: Request) -> None:
        if self.on_change is not None:
            self.on_change(req)

    def request(self, *, rule: str, kind: str, summary: str, session_id: str, agent: str, launcher: str,
                approvers: tuple[str, ...], timeout_s: int, target: dict[str, Any] | None = None) -> Request:
        now = self.clock()
        with self._lock:
            rid = secrets.token_hex(4)
            while rid in self._reqs:
                rid = secrets.token_hex(4)
            req = Request(rid, rule, kind, summary, session_id, agent, launcher, tuple(approvers), now,
                          now + timeout_s, target=dict(target or {}))
            self._reqs[rid] = req
        self._changed(req)
        return req

    def pending(self) -> list[Request]:
        with self._lock:
            return sorted((r for r in self._reqs.values() if r.state == "pending"), key=lambda r: r.created)

    def get(self, rid: str) -> Request:
        with self._lock:
            req = self._reqs.get(rid)
        if req is None:
            raise ApprovalError(f"no such request {rid!r}")
        return req

    def find_pending(self, predicate: Callable[[Request], bool]) -> Request | None:
        return next((r for r in self.pending() if predicate(r)), None)

    def may_decide(self, req: Request, caller: Caller) -> bool:
        return not caller.in_agent_session and may_decide(req, caller)

    def _decide(self, rid: str, caller: Caller, state: str, for_s: int) -> Request:
        if caller.in_agent_session:
            raise ApprovalError("approvals cannot come from inside an agent session")
        with self._lock:
            req = self._reqs.get(rid)
            if req is None:
                raise ApprovalError(f"no such request {rid!r}")
            if req.state != "pending":
                raise ApprovalError(f"request {rid} is already {req.state}")
            if not may_decide(req, caller):
                raise ApprovalError(f"{caller.user} (uid {caller.uid}) may not decide request {rid}; "
                                    f"approvers: {', '.join(req.approvers)} (self = {req.launcher})")
            req.state, req.decided_by, req.decided_at = state, caller.user, self.clock()
            req.approved_for_s = for_s if state == "approved" else 0
        self._changed(req)
        return req

    def approve(self, rid: str, caller: Caller, for_s: int | None = None) -> Request:
        return self._decide(rid, caller, "approved", max(0, for_s or 0))

    def deny(self, rid: str, caller: Caller) -> Request:
        return self._decide(rid, caller, "denied", 0)

    def expire(self) -> list[Request]:
        """Pending requests past their timeout become expired (and their operation is denied)."""
        now = self.clock()
        with self._lock:
            gone = [r for r in self._reqs.values() if r.state == "pending" and r.expires <= now]
            for r in gone:
                r.state, r.decided_at = "expired", now
            # decided requests are forgotten after an hour (their events are in the store)
            old = [k for k, r in self._reqs.items() if r.state != "pending" and now - r.decided_at > 3600]
            for rid in old:
                del self._reqs[rid]
        for r in gone:
            self._changed(r)
        return gone

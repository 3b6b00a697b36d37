"""Held operations and the people who may release them.

Pure bookkeeping: no sockets, no signals (the enforcer acts on decisions).  The
caller is established by the control socket (SO_PEERCRED); this module decides
whether that person may decide this request.  Nothing from inside an agent
session may decide anything, root included: an agent must not approve itself.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from agentwarden.core.files import write_atomic

log = logging.getLogger(__name__)


class ApprovalError(RuntimeError):
    """Shown to the caller verbatim."""


@dataclass(frozen=True)
class Caller:
    uid: int
    user: str                  # the person: audit login user if set, else the uid's name
    groups: frozenset[str]
    refused: str = ""          # why this process may never decide (inside or next to an agent), "" if not
    auth: str = ""             # how the caller was established, for the audit trail
    email: str = ""            # verified by the daemon (`agentwarden login`), "" when not logged in


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
    auth: str = ""             # how the decider was authenticated
    code_hash: str = ""        # sha256 of the one-time code the approvers were sent ("" for none)
    code_failures: int = 0
    code: str = field(default="", repr=False)   # the code itself: in memory until it is sent, never saved

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["approvers"] = list(self.approvers)
        for secret in ("target", "code", "code_hash", "code_failures"):
            d.pop(secret)
        d["needs_code"] = bool(self.code_hash)
        return d


MAX_CODE_FAILURES = 5


def _code_hash(code: str) -> str:
    import hashlib

    return hashlib.sha256(code.encode()).hexdigest()


def may_decide(req: Request, caller: Caller) -> bool:
    """Does one of the request's approvers name this caller?"""
    for a in req.approvers:
        if a == "self" and caller.user == req.launcher:
            return True
        kind, _, name = a.partition(":")
        if (kind == "user" and caller.user == name) or (kind == "group" and name in caller.groups):
            return True
        if kind == "email" and caller.email and caller.email.lower() == name.lower():
            return True
    return False


@dataclass
class Allowance:
    """What an approval lets through again: until a time, a number of times (-1: any)."""

    until: float
    uses: int


class Approvals:
    """Requests and the allowances approvals grant, saved to `path` (0600) at every change,
    so a restarted daemon still knows what is pending (with its original deadline) and what
    a person approved."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 on_change: Callable[[Request], None] | None = None, path: str = "") -> None:
        self.clock = clock
        self.on_change = on_change
        self.path = path
        self._lock = threading.RLock()
        self._reqs: dict[str, Request] = {}
        self._allow: dict[str, Allowance] = {}

    def _changed(self, req: Request) -> None:
        self.save()
        if self.on_change is not None:
            self.on_change(req)

    # ---- persistence ------------------------------------------------------------------

    def save(self) -> None:
        if not self.path:
            return
        with self._lock:
            reqs = [{k: v for k, v in asdict(r).items() if k != "code"} for r in self._reqs.values()]
            data = {"requests": reqs,
                    "allow": {k: asdict(a) for k, a in self._allow.items()}}
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            write_atomic(self.path, json.dumps(data))
        except OSError as e:
            log.error("cannot save approvals to %s: %s", self.path, e)

    def load(self) -> list[Request]:
        """Requests and allowances of an earlier run; returns the requests still pending."""
        if not self.path:
            return []
        try:
            with open(self.path) as f:
                data = json.load(f)
            names = {f.name for f in fields(Request)}
            reqs = [Request(**{k: v for k, v in r.items() if k in names}) for r in data.get("requests", [])]
            allow = {str(k): Allowance(float(a["until"]), int(a["uses"]))
                     for k, a in (data.get("allow") or {}).items()}
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, KeyError) as e:
            # unreadable state fails closed: nothing pending, nothing pre-approved
            log.error("approvals state %s unreadable, starting without it: %s", self.path, e)
            return []
        now = self.clock()
        with self._lock:
            for r in reqs:
                r.approvers = tuple(r.approvers)
                self._reqs[r.id] = r
            self._allow = {k: a for k, a in allow.items() if a.until > now and a.uses != 0}
        return [r for r in reqs if r.state == "pending"]

    # ---- allowances -------------------------------------------------------------------

    def allow(self, key: str, until: float, uses: int = -1) -> None:
        with self._lock:
            self._allow[key] = Allowance(until, uses)
        self.save()

    def allowed(self, key: str, consume: bool = False) -> bool:
        """Does an approval cover this operation now?  consume: it counts as one use."""
        with self._lock:
            a = self._allow.get(key)
            if a is None or a.until <= self.clock() or a.uses == 0:
                return False
            if consume and a.uses > 0:
                a.uses -= 1
        if consume:
            self.save()
        return True

    def allowances(self, prefix: str) -> list[tuple[str, float, int]]:
        """(key, until, uses left or -1) of the live allowances whose key starts with prefix."""
        now = self.clock()
        with self._lock:
            return [(k, a.until, a.uses) for k, a in self._allow.items()
                    if k.startswith(prefix) and a.until > now and a.uses != 0]

    def request(self, *, rule: str, kind: str, summary: str, session_id: str, agent: str, launcher: str,
                approvers: tuple[str, ...], timeout_s: int, target: dict[str, Any] | None = None,
                code: bool = False) -> Request:
        """A new pending request.  code: it needs a one-time code, which only the notification
        (the webhook, out of band) carries; the request keeps its hash."""
        now = self.clock()
        with self._lock:
            rid = secrets.token_hex(4)
            while rid in self._reqs:
                rid = secrets.token_hex(4)
            req = Request(rid, rule, kind, summary, session_id, agent, launcher, tuple(approvers), now,
                          now + timeout_s, target=dict(target or {}))
            if code:
                req.code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(10))
                req.code_hash = _code_hash(req.code)
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
        return not caller.refused and may_decide(req, caller)

    def _decide(self, rid: str, caller: Caller, state: str, for_s: int, code: str = "") -> Request:
        if caller.refused:
            raise ApprovalError(f"approvals cannot come from here: {caller.refused}")
        wrong_code = False
        with self._lock:
            req = self._reqs.get(rid)
            if req is None:
                raise ApprovalError(f"no such request {rid!r}")
            if req.state != "pending":
                raise ApprovalError(f"request {rid} is already {req.state}")
            if not may_decide(req, caller):
                raise ApprovalError(f"{caller.user} (uid {caller.uid}) may not decide request {rid}; "
                                    f"approvers: {', '.join(req.approvers)} (self = {req.launcher})")
            auth = caller.auth
            if req.code_hash and state == "approved":
                if not code or not secrets.compare_digest(_code_hash(code.strip().upper()), req.code_hash):
                    req.code_failures += 1
                    wrong_code = True
                    if req.code_failures >= MAX_CODE_FAILURES:
                        state, auth = "denied", f"{MAX_CODE_FAILURES} wrong one-time codes"
                else:
                    auth += "; one-time code sent out of band"
            if not wrong_code or state == "denied":
                req.state, req.decided_by, req.decided_at = state, caller.user, self.clock()
                req.approved_for_s = for_s if state == "approved" else 0
                req.auth = auth
        if wrong_code:
            self.save()
            if req.state == "denied":
                self._changed(req)
                raise ApprovalError(f"request {rid} denied after {MAX_CODE_FAILURES} wrong one-time codes")
            raise ApprovalError(f"request {rid} needs the one-time code sent to its approvers (--code); "
                                f"{MAX_CODE_FAILURES - req.code_failures} tries left")
        self._changed(req)
        return req

    def approve(self, rid: str, caller: Caller, for_s: int | None = None, code: str = "") -> Request:
        return self._decide(rid, caller, "approved", max(0, for_s or 0), code)

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
            stale = [k for k, a in self._allow.items() if a.until <= now or a.uses == 0]
            for k in stale:
                del self._allow[k]
        for r in gone:
            self._changed(r)
        if (old or stale) and not gone:
            self.save()
        return gone

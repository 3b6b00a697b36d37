"""Which events a person asked for: one filter for the store (`query`, `count`) and the live
feed (`tail`), so both answer the same question the same way.

Built from a control request (or the CLI's own, daemon down); a wrong argument is a
`QueryError` naming it, answered to the caller and never a ClickHouse exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentwarden.core.events import Event, Kind, as_kind, parse_ts
from agentwarden.daemon.control import BadRequest

MAX_LIMIT = 100_000


class QueryError(BadRequest):
    """A request's argument that cannot be a filter; the message names the argument."""


def _int(req: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = req.get(name)
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise QueryError(f"{name}: not a whole number: {value!r}") from None
    if not low <= n <= high:
        raise QueryError(f"{name}: must be between {low} and {high}, not {n}")
    return n


def _time(req: dict[str, Any], name: str) -> int | None:
    value = req.get(name)
    if not value:
        return None
    try:
        return parse_ts(str(value))
    except ValueError:
        raise QueryError(f"{name}: not a time: {value!r}") from None


def _text(req: dict[str, Any], name: str) -> str | None:
    value = req.get(name)
    return str(value) if value not in (None, "") else None


@dataclass
class EventQuery:
    since_ns: int | None = None
    until_ns: int | None = None
    session: str | None = None
    user: str | None = None
    agent: str | None = None
    kinds: list[Kind] = field(default_factory=list)
    grep: str | None = None
    pid: int | None = None
    host: str | None = None
    rule: str | None = None      # a verdict's or an approval's rule
    action: str | None = None    # a verdict's action
    limit: int = 100

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> EventQuery:
        try:
            kinds = [as_kind(str(k)) for k in req.get("kinds") or [] if k]
        except ValueError as e:
            raise QueryError(f"kinds: {e}") from None
        limit = _int(req, "limit", 100, 1, MAX_LIMIT)
        assert limit is not None
        return cls(since_ns=_time(req, "since"), until_ns=_time(req, "until"), session=_text(req, "session"),
                   user=_text(req, "user"), agent=_text(req, "agent"), kinds=kinds, grep=_text(req, "grep"),
                   pid=_int(req, "pid", None, 1, 2**32 - 1), host=_text(req, "host"), rule=_text(req, "rule"),
                   action=_text(req, "action"), limit=limit)

    def matches(self, ev: Event) -> bool:
        """The live feed's test: the same conditions as the store's WHERE (store.Store._where)."""
        if self.since_ns is not None and ev.ts_ns < self.since_ns:
            return False
        if self.until_ns is not None and ev.ts_ns > self.until_ns:
            return False
        if self.session and ev.session_id != self.session:
            return False
        if self.user and self.user not in (ev.identity.user, ev.identity.login_user, ev.identity.email):
            return False
        if self.agent and ev.agent != self.agent:
            return False
        if self.kinds and ev.kind not in self.kinds:
            return False
        if self.pid is not None and ev.process.pid != self.pid:
            return False
        if self.host and ev.host != self.host:
            return False
        if self.rule and self.rule not in ((ev.verdict.rule if ev.verdict else None),
                                           (ev.approval.rule if ev.approval else None)):
            return False
        if self.action and (ev.verdict.action if ev.verdict else None) != self.action:
            return False
        if self.grep:
            p = ev.process
            text = " ".join([" ".join(p.argv), p.exe, ev.exec.filename if ev.exec else "", p.cwd,
                             ev.sql.query if ev.sql else ""])
            if self.grep.lower() not in text.lower():
                return False
        return True

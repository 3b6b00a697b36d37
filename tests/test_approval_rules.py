"""Who may decide a held operation, and the webhook that announces it (a real HTTP server)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from agentwarden.enforce.approvals import ApprovalError, Approvals, Caller, Request
from agentwarden.enforce.webhook import Webhook
from conftest import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def caller(user: str, uid: int = 1000, groups: tuple[str, ...] = (), agent: bool = False) -> Caller:
    return Caller(uid=uid, user=user, groups=frozenset(groups),
                  refused="pid 1 runs inside an agent session" if agent else "")


@pytest.fixture
def reg() -> tuple[Approvals, list[tuple[str, str]], Clock]:
    clock = Clock()
    seen: list[tuple[str, str]] = []
    a = Approvals(clock, on_change=lambda r: seen.append((r.id, r.state)))
    return a, seen, clock


def held(a: Approvals, approvers: tuple[str, ...] = ("self",), timeout_s: int = 60) -> Request:
    return a.request(rule="r", kind="exec", summary="kubectl delete ns prod", session_id="s1", agent="cursor",
                     launcher="alice", approvers=approvers, timeout_s=timeout_s, target={"pid": 1})


def test_self_means_the_launcher(reg: Any) -> None:
    a, seen, _ = reg
    r = held(a)
    with pytest.raises(ApprovalError, match="may not decide"):
        a.approve(r.id, caller("bob"))
    assert a.approve(r.id, caller("alice"), for_s=600).state == "approved"
    assert r.decided_by == "alice" and r.approved_for_s == 600
    assert seen == [(r.id, "pending"), (r.id, "approved")]


def test_user_and_group_approvers(reg: Any) -> None:
    a, _, _ = reg
    r1 = held(a, ("user:carol",))
    r2 = held(a, ("group:sre",))
    with pytest.raises(ApprovalError):
        a.approve(r1.id, caller("alice"))         # the launcher is not listed
    assert a.approve(r1.id, caller("carol")).state == "approved"
    with pytest.raises(ApprovalError):
        a.deny(r2.id, caller("dave", groups=("dev",)))
    assert a.deny(r2.id, caller("dave", groups=("dev", "sre"))).state == "denied"


def test_root_gets_no_bypass_and_agents_never_decide(reg: Any) -> None:
    a, _, _ = reg
    r = held(a, ("self", "group:sre"))
    with pytest.raises(ApprovalError, match="may not decide"):
        a.approve(r.id, caller("root", uid=0))
    for who in (caller("alice", agent=True), caller("root", uid=0, groups=("sre",), agent=True)):
        with pytest.raises(ApprovalError, match="inside an agent session"):
            a.approve(r.id, who)
        assert not a.may_decide(r, who)
    assert a.may_decide(r, caller("root", uid=0, groups=("sre",)))
    assert [p.id for p in a.pending()] == [r.id]


def test_decided_once_and_expiry(reg: Any) -> None:
    a, seen, clock = reg
    r = held(a, timeout_s=30)
    late = held(a, timeout_s=300)
    clock.now += 31
    assert [x.id for x in a.expire()] == [r.id] and r.state == "expired"
    with pytest.raises(ApprovalError, match="already expired"):
        a.approve(r.id, caller("alice"))
    a.deny(late.id, caller("alice"))
    with pytest.raises(ApprovalError, match="already denied"):
        a.approve(late.id, caller("alice"))
    with pytest.raises(ApprovalError, match="no such request"):
        a.get("nope")
    assert (r.id, "expired") in seen and a.pending() == []
    assert a.find_pending(lambda x: True) is None


class Hook(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []
    statuses: list[int] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.bodies.append(body)
        self.send_response(status)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, type[Hook]]]:
    Hook.bodies, Hook.statuses = [], []
    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", Hook
    server.shutdown()


def test_webhook_retries_then_delivers_once(reg: Any, hook: Any) -> None:
    a, _, _ = reg
    url, handler = hook
    handler.statuses = [503, 503]
    w = Webhook(url, backoff_s=0.01, host="build-7")
    r = held(a)
    w.notify(r)
    wait_for(lambda: w.sent == 1, 10, 0.05, "the webhook delivery")
    (body,) = handler.bodies
    assert f"agentwarden approve {r.id}" in body["text"] and f"agentwarden deny {r.id}" in body["text"]
    assert "kubectl delete ns prod" in body["text"] and "alice" in body["text"] and "build-7" in body["text"]
    w.close()


def test_webhook_does_not_retry_a_client_error(reg: Any, hook: Any) -> None:
    a, _, _ = reg
    url, handler = hook
    handler.statuses = [400, 200]
    w = Webhook(url, backoff_s=0.01)
    w.notify(held(a))
    wait_for(lambda: w.failed == 1, 10, 0.05, "the refusal")
    w.close()
    assert handler.bodies == [] and handler.statuses == [200]

"""The enforcer's decisions, without root or a kernel: a real Tracker, real policy and
approvals, and a recording `Effects` in place of signals, sockets and the guard maps.
The end-to-end tests (test_enforce.py) prove the same effects on a real kernel."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import signal
import struct
import time
from typing import Any

import pytest
from agentwarden.core import procfs
from agentwarden.core.events import Event, HttpInfo, Identity, LlmInfo, NetInfo, SqlInfo
from agentwarden.daemon.config import parse as parse_config
from agentwarden.daemon.profiles import Profiles
from agentwarden.daemon.tracker import Tracker
from agentwarden.enforce import sqlnorm
from agentwarden.enforce.approvals import ApprovalError, Approvals, Caller
from agentwarden.enforce.effects import Effects
from agentwarden.enforce.enforcer import Enforcer, request_key
from agentwarden.enforce.kernel import Plan
from agentwarden.enforce.policy import parse as parse_policy
from agentwarden.enforce.quarantine import Quarantine
from agentwarden.probes import guard as g
from agentwarden.probes import process as pr

KEY = 41
NOBODY = pwd.getpwnam("nobody")
NOBODY_GROUP = grp.getgrgid(NOBODY.pw_gid).gr_name

POLICY = f"""version: 1
rules:
  - name: no-drop-table
    when: {{kind: sql, sql: {{command: ["DROP TABLE"]}}}}
    action: deny
  - name: hold-drop-index
    when: {{kind: sql, sql: {{command: ["DROP INDEX"]}}}}
    action: hold
    approvers: [user:root]
    timeout: 2m
  - name: kill-on-connect
    when: {{kind: connect, connect: {{dst: ["127.0.0.78/32"]}}}}
    action: kill
  - name: only-for-another-agent
    when: {{agent: [someone-else], kind: exec, exec: {{path: ["*/rm"]}}}}
    action: deny
  - name: hold-deploy
    when: {{kind: http, http: {{method: [POST], path: ["/deploy"]}}}}
    action: hold
    approvers: [user:root]
    timeout: 2m
  - name: only-for-the-group
    when: {{who: {{groups: [{NOBODY_GROUP}]}}, kind: exec, exec: {{path: ["*/shred"]}}}}
    action: deny
"""


class Recorded:
    """An Effects that does nothing but remember, in order, what it was asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.tracked: set[int] = set()

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == name]

    def signal(self, pid: int, start: int | None, sig: int) -> bool:
        self.calls.append(("signal", pid, sig))
        return True

    def tell(self, pid: int, text: str) -> bool:
        self.calls.append(("tell", pid, text))
        return True

    def close_tcp(self, dst: str, local_port: int, remote_port: int) -> bool:
        self.calls.append(("close_tcp", dst, local_port, remote_port))
        return True

    def apply(self, plan: Plan, daemon_pid: int, programs: dict[tuple[int, int], int] | None = None) -> None:
        self.calls.append(("apply", plan))

    def add_program(self, key: tuple[int, int], bits: int) -> None:
        self.calls.append(("add_program", key, bits))

    def set_session(self, session: int, mask: int, mark: int) -> None:
        self.calls.append(("set_session", session, mask, mark))

    def drop_session(self, session: int) -> None:
        self.calls.append(("drop_session", session))

    def allow_exec(self, session: int, ident: int, until_boot_ns: int, uses: int) -> None:
        self.calls.append(("allow_exec", session, ident, uses))

    def allow_statement(self, session: int, stmt_hash: int, until_boot_ns: int) -> None:
        self.calls.append(("allow_statement", session, stmt_hash, until_boot_ns))

    def decided(self, pid: int) -> None:
        self.calls.append(("decided", pid))

    def guard_sockets(self, pid: int, session: int) -> tuple[list[tuple[str, int]], bool]:
        self.calls.append(("guard_sockets", pid, session))
        return [], False

    def deciding_add(self, pid: int, since_boot_ns: int) -> None:
        self.calls.append(("deciding_add", pid))

    def judge_transport(self, pid: int, since_boot_ns: int) -> None:
        self.calls.append(("judge_transport", pid))

    def deciding(self) -> dict[int, int]:
        return {}

    def stopped_at(self, pid: int) -> int:
        return 0

    def is_tracked(self, pid: int) -> bool:
        return pid in self.tracked

    def session_of(self, pid: int) -> int | None:
        return KEY if pid in self.tracked else None

    def judged_transport(self, pid: int) -> bool:
        return False


class World:
    """One agent session (this test's own process is its root) under POLICY."""

    def __init__(self, identity: Identity | None = None, policy: str = POLICY) -> None:
        cfg = parse_config("agents:\n  - {name: unit-agent, match: {comm: [aw-unit-agent]}}\n")
        profiles = Profiles(cfg.agents, builtin=False)
        self.tracker = Tracker("unit-host", profiles, untrack_session=lambda key: None)
        self.effects = Recorded()
        self.pid = os.getpid()
        self.effects.tracked.add(self.pid)
        effects: Effects = self.effects    # the protocol the daemon's HostEffects meets too
        self.enforcer = Enforcer(effects, self.tracker, parse_policy(policy), approvals=Approvals(),
                                 quarantine=None)
        self.tracker.listeners.append(self.enforcer)
        snap = procfs.snapshot(self.pid)
        if snap is not None and identity is not None:   # the identity the tracker reads at the start
            snap = dataclasses.replace(snap, login_uid=identity.login_uid)
        out: list[Event] = []
        start = self.tracker.start_session(KEY, profiles[0], snap, self.pid, 0 if identity else os.getuid(),
                                           "/usr/bin/aw-unit-agent", time.time_ns(), out)
        assert out[0] is start
        self.session = self.tracker.sessions[KEY]
        self.made: list[Event] = out[1:]

    def stage(self, ev: Event) -> None:
        out = self.enforcer.stage(ev)
        if isinstance(out, list):
            assert out[0] is ev
            self.made += out[1:]
        else:
            assert out is ev

    def on_guard(self, rec: g.Guard) -> None:
        self.made += self.enforcer.on_guard(rec)

    def verdicts(self) -> list[Event]:
        """Verdicts made since the last call: returned by the entry points, or (decided on the
        control thread) in the outbox."""
        made, self.made = self.made, []
        return [e for e in made + self.enforcer.drain() if e.kind == "verdict"]

    def rule_bit(self, name: str) -> int:
        return 1 << next(i for i, r in enumerate(self.enforcer.policy.rules) if r.name == name)

    def hdr(self) -> pr.RawHeader:
        return pr.RawHeader(pid=self.pid, tid=self.pid, uid=os.getuid(), gid=os.getgid(), profile=0,
                            ts_boot_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME), session=KEY, cgroup=1,
                            comm="aw-unit-agent")

    def guard(self, what: int, done: int, rule: str, **kw: Any) -> g.Guard:
        index = next(i for i, r in enumerate(self.enforcer.policy.rules) if r.name == rule)
        fields: dict[str, Any] = {"hash": 0, "target": 0, "addr": "", "text": b""} | kw
        return g.Guard(h=self.hdr(), what=what, done=done, rule=index,
                       action=self.enforcer.policy.rules[index].action, **fields)


def query_message(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def test_a_session_gets_the_rules_for_its_agent_and_person_and_a_quarantine_mark() -> None:
    w = World()
    ((session, mask, mark),) = w.effects.of("set_session")
    assert session == KEY and Quarantine.slot_of(mark) == 1
    assert mask & w.rule_bit("no-drop-table") and mask & w.rule_bit("kill-on-connect")
    assert not mask & w.rule_bit("only-for-another-agent")


@pytest.mark.parametrize("user, applies", [("root", False), ("nobody", True)])
def test_a_group_rule_follows_the_person_who_logged_in_not_the_uid(user: str, applies: bool) -> None:
    # the agent runs as root (sudo); the person is the login user
    w = World(Identity(uid=0, user="root", login_uid=pwd.getpwnam(user).pw_uid, login_user=user))
    ((_, mask, _),) = w.effects.of("set_session")
    assert bool(mask & w.rule_bit("only-for-the-group")) is applies


def test_a_statement_the_kernel_did_not_stop_is_killed_after_the_fact() -> None:
    w = World()
    ev = w.tracker.event_for_pid("sql", w.pid, time.time_ns(), net=NetInfo(transport="tcp"),
                                 sql=SqlInfo(query="DROP TABLE t", command="DROP TABLE"))
    assert ev is not None
    w.stage(ev)
    assert w.effects.of("signal") == [(w.pid, signal.SIGKILL)]
    (v,) = w.verdicts()
    assert v.verdict is not None and v.verdict.rule == "no-drop-table"
    assert v.verdict.mechanism == "SIGKILL after the fact" and v.verdict.prevented is False
    assert w.enforcer.stats["after_the_fact"] == 1


def test_an_llm_call_meets_the_http_rules() -> None:
    """A request shaped like an LLM call is an `llm` event, and is still an HTTP request to every rule
    (red team: one to any host, `.../chat/completions` with a model and messages, skipped the HTTP
    rules the kernel does not judge: globs, HTTP/2, rules past the 64th)."""
    w = World(policy="""version: 1
rules:
  - name: no-paste-sites
    when: {kind: http, http: {host: ["*.paste.example"]}}
    action: kill
""")
    ev = w.tracker.event_for_pid("llm", w.pid, time.time_ns(), net=NetInfo(transport="tcp"),
                                 http=HttpInfo(method="POST", host="x.paste.example", path="/a/chat/completions"),
                                 llm=LlmInfo(provider="openai", model="m"))
    assert ev is not None
    w.stage(ev)
    assert w.effects.of("signal") == [(w.pid, signal.SIGKILL)]
    (v,) = w.verdicts()
    assert v.verdict is not None and v.verdict.rule == "no-paste-sites"


def test_an_after_the_fact_kill_never_reaches_a_reused_pid() -> None:
    """The statement is read after its process ended; its pid may be another process's now (one
    outside the session): nothing is signalled, and the verdict says so."""
    w = World()
    ev = w.tracker.event_for_pid("sql", w.pid, time.time_ns(), net=NetInfo(transport="tcp"),
                                 sql=SqlInfo(query="DROP TABLE t", command="DROP TABLE"))
    assert ev is not None
    w.effects.tracked.discard(w.pid)          # gone from the kernel's tracked processes
    w.stage(ev)
    assert w.effects.of("signal") == []
    (v,) = w.verdicts()
    assert v.verdict is not None and "nothing was killed" in v.verdict.mechanism


def test_a_refused_connect_under_a_kill_rule_also_ends_the_process() -> None:
    w = World()
    w.on_guard(w.guard(g.G_CONNECT, g.DONE_REFUSED, "kill-on-connect", target=5432, addr="127.0.0.78"))
    assert w.effects.of("signal") == [(w.pid, signal.SIGKILL)]
    (v,) = w.verdicts()
    assert v.verdict is not None and v.verdict.prevented and v.verdict.mechanism == "cgroup connect (EPERM) 127.0.0.78:5432"


def test_a_held_statement_passes_only_after_a_person_approves_it() -> None:
    w = World()
    (st,) = sqlnorm.statements(b"drop index i")
    local, remote = 40000, 5432
    target = local << 32 | (int.from_bytes(struct.pack("!H", remote), "little") << 16)
    w.on_guard(w.guard(g.G_SQL, g.DONE_REFUSED, "hold-drop-index", hash=st.hash, target=target,
                                addr="127.0.0.1", text=query_message("drop index i")))
    assert w.effects.of("close_tcp") == [("127.0.0.1", local, remote)]
    (v,) = w.verdicts()
    assert v.verdict is not None and v.verdict.action == "hold" and v.verdict.approval_id
    assert v.sql is not None and v.sql.query == "DROP INDEX I"   # as the kernel hashed it
    request = v.verdict.approval_id
    # the same request again (the agent retries) is the same pending request, not a new one
    w.on_guard(w.guard(g.G_SQL, g.DONE_REFUSED, "hold-drop-index", hash=st.hash, target=target,
                                addr="127.0.0.1", text=query_message("drop index i")))
    assert [e.verdict.approval_id for e in w.verdicts() if e.verdict] == [request]
    inside = Caller(uid=0, user="root", groups=frozenset(), refused="pid 1 runs inside an agent session")
    with pytest.raises(ApprovalError):
        w.enforcer.approve(request, inside, None)
    with pytest.raises(ApprovalError):
        w.enforcer.approve(request, Caller(uid=65534, user="nobody", groups=frozenset()), None)
    assert w.effects.of("allow_statement") == []
    w.enforcer.approve(request, Caller(uid=0, user="root", groups=frozenset({"root"})), None)
    ((session, stmt, _),) = w.effects.of("allow_statement")
    assert (session, stmt) == (KEY, st.hash)


def test_the_end_of_a_session_clears_its_kernel_state() -> None:
    w = World()
    out = w.tracker.handle(pr.Exit(h=w.hdr(), code=0, signal=None))   # its root, its last process
    assert [e.kind for e in out] == ["exit", "session_end"] and KEY not in w.tracker.sessions
    assert w.effects.of("drop_session") == [(KEY,)]


def test_a_policy_reload_reprograms_every_live_session() -> None:
    w = World()
    w.enforcer.load(parse_policy(POLICY.replace("127.0.0.78/32", "127.0.0.79/32")))
    assert len(w.effects.of("apply")) == 2 and len(w.effects.of("set_session")) == 2
    assert w.effects.of("set_session")[0] == w.effects.of("set_session")[1]   # same rules, same mark


def test_a_held_request_is_recorded_masked_and_keyed_as_the_kernel_keys_it() -> None:
    w = World()
    w.enforcer.mask_text = lambda text: text.replace("hunter2", "***")
    key = request_key(HttpInfo(method="POST", host="ci.internal", path="/deploy"))
    request = b"POST /deploy?token=hunter2 HTTP/1.1\r\nHost: ci.internal:8080\r\nContent-Length: 0\r\n\r\n"
    w.on_guard(w.guard(g.G_HTTP, g.DONE_REFUSED, "hold-deploy", hash=key, addr="127.0.0.1",
                                target=40000 << 32, text=request))
    (v,) = w.verdicts()
    assert v.http is not None and (v.http.method, v.http.host, v.http.path) == ("POST", "ci.internal:8080", "/deploy")
    assert v.http.query == "token=***" and v.verdict is not None and v.verdict.approval_id
    (pending,) = w.enforcer.approvals.pending()
    assert pending.summary == "POST ci.internal:8080/deploy" and pending.target["hash"] == key
    assert w.enforcer.stats["twin_hash_unmatched"] == 0
    w.on_guard(w.guard(g.G_HTTP, g.DONE_REFUSED, "hold-deploy", hash=key ^ 1, addr="127.0.0.1",
                                target=40000 << 32, text=request))
    assert w.enforcer.stats["twin_hash_unmatched"] == 1    # a key Python does not make from these bytes


def test_verdicts_come_back_from_the_call_that_made_them_and_the_outbox_holds_the_rest() -> None:
    w = World()
    made = w.enforcer.on_guard(w.guard(g.G_CONNECT, g.DONE_REFUSED, "kill-on-connect", target=1, addr="127.0.0.78"))
    assert [e.kind for e in made] == ["verdict"] and w.enforcer.drain() == []
    w.enforcer.tamper("seen from a check of the daemon's own")   # not an entry point: the outbox
    (tamper,) = w.enforcer.drain()
    assert tamper.verdict is not None and tamper.verdict.rule == "tamper"


def test_what_the_last_process_sent_is_judged_with_its_session_after_the_session_ends() -> None:
    # the pipeline drains a process's unanswered statements at its exit, before the tracker's
    # session_end; they reach the enforcer's stage after the session ended
    w = World()
    (st,) = sqlnorm.statements(b"drop index i")
    w.on_guard(w.guard(g.G_SQL, g.DONE_REFUSED, "hold-drop-index", hash=st.hash, addr="127.0.0.1",
                       target=40000 << 32, text=query_message("drop index i")))
    (held,) = w.verdicts()
    assert held.verdict is not None
    w.enforcer.approve(held.verdict.approval_id, Caller(uid=0, user="root", groups=frozenset({"root"})), None)
    drained = w.tracker.event_for_pid("sql", w.pid, time.time_ns(), net=NetInfo(transport="tcp"),
                                      sql=SqlInfo(query="drop index i", command="DROP INDEX"))
    assert drained is not None
    w.tracker.handle(pr.Exit(h=w.hdr(), code=0, signal=None))
    assert KEY not in w.tracker.sessions and w.effects.of("drop_session") == [(KEY,)]
    w.stage(drained)
    verdict = [v for v in w.verdicts() if v.verdict and v.verdict.rule == "hold-drop-index"][-1].verdict
    assert verdict is not None and verdict.action == "allow" and verdict.mechanism == "approved earlier"
    assert w.effects.of("signal") == []


def test_events_made_before_an_entry_point_fails_are_not_lost() -> None:
    w = World()

    def broken(pid: int, start: int | None, sig: int) -> bool:
        raise OSError("the effect failed")

    w.effects.signal = broken   # type: ignore[method-assign]
    with pytest.raises(OSError):
        # the verdict is made, then the kill rule's signal fails
        w.enforcer.on_guard(w.guard(g.G_CONNECT, g.DONE_REFUSED, "kill-on-connect", target=1, addr="127.0.0.78"))
    assert [e.kind for e in w.enforcer.drain()] == ["verdict"]


ROOT_AND_CONTRACTORS = """version: 1
rules:
  - name: no-root-agents
    when: {kind: session, session: {as_root: true}}
    action: kill
  - name: no-contractors
    when: {kind: session, who: {emails: ["*@contractor.example"]}}
    action: kill
"""


def held_for_login(policy: str, root_uid: int) -> tuple[Any, Any, Any, Any]:
    """A session of person 1000 (its root running as root_uid) held by identity.require: hold."""
    from agentwarden.core import identity
    from agentwarden.enforce.policy import with_identity_rule

    cfg = parse_config("agents:\n  - {name: unit-agent, match: {comm: [aw-unit-agent]}}\n")
    profiles = Profiles(cfg.agents, builtin=False)
    bindings = identity.Bindings("h", "", 3600)
    tracker = Tracker("h", profiles, untrack_session=lambda k: None, bindings=bindings)
    eff = Recorded()
    pid = os.getpid()
    eff.tracked.add(pid)
    enf = Enforcer(eff, tracker, with_identity_rule(parse_policy(policy), "hold", 300), approvals=Approvals(),
                   quarantine=None)
    tracker.listeners.append(enf)
    bindings.listeners.append(lambda b: enf.identity_bound(b.uid))
    snap = procfs.snapshot(pid)
    assert snap is not None
    snap = dataclasses.replace(snap, login_uid=1000)
    tracker.start_session(KEY, profiles[0], snap, pid, root_uid, "/usr/bin/aw-unit-agent", time.time_ns(), [])
    hdr = pr.RawHeader(pid=pid, tid=pid, uid=root_uid, gid=0, profile=0,
                       ts_boot_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME), session=KEY, cgroup=1,
                       comm="aw-unit-agent")
    enf.on_guard(g.Guard(h=hdr, what=g.G_SESSION, done=g.DONE_STOPPED, rule=0, action=0, hash=0, target=0,
                         addr="", text=b""))
    return enf, eff, bindings, tracker


def login(bindings: Any, email: str) -> None:
    from agentwarden.core.oidc import Claims

    bindings.bind(1000, 1000, Claims(issuer="https://idp.example", sub="s", email=email, name="", groups=(),
                                     groups_unknown=False, username="", nonce=None, expires=0), "device")


def test_a_held_session_is_judged_again_by_every_session_rule_when_its_person_logs_in() -> None:
    """Red team: the identity hold came first, and a login resumed the root without the other
    session rules (an as_root kill, a rule about the person's email)."""
    enf, eff, bindings, _ = held_for_login(ROOT_AND_CONTRACTORS, root_uid=0)
    pid = os.getpid()
    assert ("deciding_add", pid) in eff.calls          # resumed by anyone else: the stop's guards
    assert not [c for c in eff.calls if c[0] == "signal"]
    login(bindings, "bob@example.com")
    signals = [c[2] for c in eff.calls if c[0] == "signal"]
    assert signals == [signal.SIGKILL], signals        # root: killed, not resumed
    assert [(e.verdict.action, e.verdict.rule) for e in enf.drain() if e.verdict][-1] == ("kill", "no-root-agents")


CONTRACTORS = """version: 1
rules:
  - name: no-contractors
    when: {kind: session, who: {emails: ["*@contractor.example"]}}
    action: kill
"""


def test_a_login_resumes_a_held_session_that_no_rule_refuses() -> None:
    # (the test process is root: the as_root rule is left out here)
    enf, eff, bindings, tracker = held_for_login(CONTRACTORS, root_uid=1000)
    login(bindings, "carol@contractor.example")          # a person another rule refuses
    assert [c[2] for c in eff.calls if c[0] == "signal"] == [signal.SIGKILL]
    enf2, eff2, bindings2, tracker2 = held_for_login(CONTRACTORS, root_uid=1000)
    login(bindings2, "dave@example.com")
    assert [c[2] for c in eff2.calls if c[0] == "signal"] == [signal.SIGCONT]
    assert ("decided", os.getpid()) in eff2.calls
    assert tracker2.sessions[KEY].identity.email == "dave@example.com"
    assert [e.verdict.action for e in enf2.drain() if e.verdict][-1] == "resume"


def test_an_exec_stopped_only_for_its_tls_uprobes_is_attached_then_resumed_without_a_verdict() -> None:
    """guard_exec.bpf.c AW_EXEC_TLS with no rule: the daemon's attach_tls runs while the exec waits,
    then it resumes; nothing was decided, so nothing is recorded (and nothing waits for the ring,
    even under a policy on `cause`)."""
    w = World()
    attached: list[int] = []
    w.enforcer.attach_tls = attached.append
    w.effects.calls.clear()
    w.on_guard(g.Guard(h=w.hdr(), what=g.G_EXEC, done=g.DONE_STOPPED, rule=-1, action=0, hash=0,
                       target=g.EXEC_TLS, addr="", text=b"/usr/bin/node"))
    assert attached == [w.pid]
    assert w.effects.calls == [("decided", w.pid), ("signal", w.pid, signal.SIGCONT)]
    assert w.verdicts() == []


ON_CAUSE = """version: 1
rules:
  - name: cheap-models-run-nothing
    when: {kind: exec, cause: {model: ["cheap-*"]}}
    action: deny
"""


def _stopped_exec(w: World) -> g.Guard:
    return g.Guard(h=w.hdr(), what=g.G_EXEC, done=g.DONE_STOPPED, rule=-1, action=0, hash=0, target=0,
                   addr="", text=b"/usr/bin/python3")


def test_an_exec_decided_on_its_cause_waits_for_the_ring_and_runs_when_no_tool_call_asked() -> None:
    """A rule on who asked: the stopped exec waits for two reads of the main ring (the LLM reply may
    be in it), then runs when no tool call asked for it."""
    w = World(policy=ON_CAUSE)
    w.effects.calls.clear()
    w.on_guard(_stopped_exec(w))
    assert not w.effects.of("signal"), "decided before the ring was read again"
    for _ in range(3):
        time.sleep(0.003)
        w.made += w.enforcer.retry_deferred()
    assert w.effects.of("signal") == [(w.pid, signal.SIGCONT)]
    assert w.verdicts() == []


def test_an_exec_whose_cause_went_unread_is_refused_by_a_rule_on_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    """Red team: with the capture over DEFER_S behind, the LLM reply whose tool call asked for the
    exec (a cheap model's) was still unread at the deadline, so no cause was found and the rule
    did not hold: it failed open.  An unread cause now meets every rule on cause that refuses."""
    from agentwarden.enforce import enforcer as enf_mod

    monkeypatch.setattr(enf_mod, "DEFER_S", 0.0)    # the deadline passes before any read
    w = World(policy=ON_CAUSE)
    w.effects.calls.clear()
    w.on_guard(_stopped_exec(w))
    w.made += w.enforcer.retry_deferred()           # one read, begun before the record: not enough
    assert w.effects.of("signal") == [(w.pid, signal.SIGKILL)]
    [v] = w.verdicts()
    assert (v.verdict.action, v.verdict.rule, v.verdict.prevented) == ("deny", "cheap-models-run-nothing", True)
    assert "its cause unknown" in v.verdict.mechanism


def test_an_unread_cause_meets_only_rules_that_refuse() -> None:
    """policy.caused_as: an unknown cause never lets a rule on cause allow or audit what it would
    not otherwise, and meets `asked: false` holds as much as `model:` denies."""
    from agentwarden.core.events import CAUSE_UNKNOWN, CauseInfo
    from agentwarden.enforce.policy import caused_as

    pol = parse_policy("""version: 1
rules:
  - name: audit-asked
    when: {kind: exec, cause: {asked: true}}
    action: audit
  - name: hold-unasked
    when: {kind: exec, cause: {asked: false}}
    action: hold
    approvers: [user:root]
    timeout: 2m
  - name: deny-cheap
    when: {kind: exec, cause: {model: ["cheap-*"]}}
    action: deny
""")
    unknown = CauseInfo(match=CAUSE_UNKNOWN)
    assert [caused_as(r, unknown) for r in pol.rules] == [False, True, True]
    assert [caused_as(r, None) for r in pol.rules] == [False, True, False]

"""The decide stage: turns the policy into actions and every action into a verdict event.

Two inputs.  Guard records (probes/guard.py) say what the kernel did or is
waiting on: a stopped exec, a refused connect, a dropped SQL send.  Ordinary
events (exec, connect, sql, http) are judged here when the kernel could not
judge them, and then the action comes after the fact (`prevented: false`).

Runs on the probe thread; approvals arrive on the control thread, so shared
state is behind one lock and events leave through `drain()`, never directly.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from agentwarden.daemon.events import (
    ApprovalInfo,
    Event,
    ExecInfo,
    HttpInfo,
    Identity,
    Process,
    SqlInfo,
    VerdictInfo,
    format_ts,
    new_event_id,
)
from agentwarden.daemon.tracker import Session, Tracker
from agentwarden.enforce import kernel, sqlnorm
from agentwarden.enforce.approvals import Approvals, Caller, Request
from agentwarden.enforce.policy import Policy, Rule, Verdict, decide
from agentwarden.enforce.quarantine import Quarantine, QuarantineError
from agentwarden.probes import guard as g

log = logging.getLogger(__name__)

DENYING = ("deny", "kill", "quarantine", "hold")
SUBJECT = {g.G_EXEC: "exec", g.G_CONNECT: "connect", g.G_SQL: "sql", g.G_SQL_TLS: "sql",
           g.G_SESSION: "session", g.G_SELF: "self", g.G_HTTP: "http", g.G_HTTP_TLS: "http"}
MECHANISM = {
    (g.G_EXEC, g.DONE_KILLED): "SIGKILL at exec (kernel)",
    (g.G_EXEC, g.DONE_STOPPED): "SIGSTOP at exec, decided in userspace",
    (g.G_CONNECT, g.DONE_REFUSED): "cgroup connect (EPERM)",
    (g.G_SQL, g.DONE_REFUSED): "sk_msg drop (EACCES)",
    (g.G_SQL_TLS, g.DONE_KILLED): "SIGKILL at SSL_write",
    (g.G_HTTP, g.DONE_REFUSED): "sk_msg drop (EACCES)",
    (g.G_HTTP_TLS, g.DONE_KILLED): "SIGKILL at SSL_write",
    (g.G_SELF, g.DONE_KILLED): "SIGKILL at the syscall",
}
SYSCALLS = {62: "kill", 200: "tkill", 234: "tgkill", 101: "ptrace", 321: "bpf", 434: "pidfd_open",
            311: "process_vm_writev"}


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: tells a process from a later one with the same pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _proc_view(pid: int) -> tuple[list[str], str, str]:
    """argv, exe and cwd of a live process ("" / [] where /proc says nothing)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return [], "", ""
    out = []
    for link in ("exe", "cwd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/{link}"))
        except OSError:
            out.append("")
    return argv, out[0], out[1]


def _signal(pid: int, start: int | None, sig: int) -> bool:
    if start is not None and _start_ticks(pid) != start:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def close_connection(dst: str, local_port: int, remote_port: int) -> bool:
    """Abort one TCP connection (sock_diag SOCK_DESTROY, through iproute2's `ss -K`).

    After sk_msg drops a send the socket cannot send again, and a Postgres client
    that saw its send fail waits for the server's answer: closing the connection
    turns that wait into an immediate "connection aborted".
    """
    try:
        host = f"[{dst}]" if ":" in dst else dst   # ss wants IPv6 addresses in brackets
        res = subprocess.run(["ss", "-K", "-t", "-n", "dst", host, "dport", "=", f":{remote_port}",
                              "sport", "=", f":{local_port}"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot close %s:%d: %s", dst, remote_port, e)
        return False
    closed = res.returncode == 0 and res.stdout.count("\n") > 1
    if not closed:
        log.info("no connection to %s:%d from port %d to close: %s", dst, remote_port, local_port,
                 res.stderr.strip() or "not found")
    return closed


def _ports(target: int) -> tuple[int, int]:
    """(local, remote) port of an sk_msg record: sk_msg_md keeps the remote one in network order."""
    local, raw = target >> 32, target & 0xFFFFFFFF
    remote = socket.ntohs(raw >> 16) if raw >> 16 else socket.ntohs(raw & 0xFFFF)
    return local, remote


def request_line(head: bytes, tls: bool) -> HttpInfo:
    """Method, host, path and query of the request at the start of a refused send."""
    line, _, rest = head.partition(b"\r\n")
    parts = line.decode(errors="replace").split(" ")
    target = parts[1] if len(parts) > 1 else ""
    target = target.partition("#")[0]
    path, _, query = target.partition("?")
    host = ""
    for header in rest.split(b"\r\n"):
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip().decode(errors="replace")
            break
    return HttpInfo(method=parts[0], scheme="https" if tls else "http", host=host, path=path, query=query,
                    tls=tls)


def person(identity: Identity) -> str:
    """Who launched the agent: the login user (it survives sudo and su), else the uid's user."""
    return identity.login_user or identity.user


_MIX = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def request_key(http: HttpInfo) -> int:
    """guard.bpf.c's identity of a request (http_candidates): method, host and path hashes, mixed."""
    host = http.host.split(":")[0].lower()
    hm, hh = sqlnorm.fnv(http.method.encode()), sqlnorm.fnv(host.encode())
    hp = sqlnorm.fnv(http.path.encode()[:128])
    return ((((hm * _MIX) & _M64) ^ hh) * _MIX & _M64) ^ hp


def user_groups(user: str) -> frozenset[str]:
    """Unix groups of a person: the primary group and every group listing them."""
    out: set[str] = set()
    with contextlib.suppress(KeyError):
        out.add(grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name)
    out.update(gr.gr_name for gr in grp.getgrall() if user in gr.gr_mem)
    return frozenset(out)


def pg_texts(data: bytes) -> list[bytes]:
    """Query texts of the Query and Parse messages at the start of a send (as the kernel frames it)."""
    out: list[bytes] = []
    off = 0
    while off + 5 <= len(data) and len(out) < 8:
        kind, length = data[off], int.from_bytes(data[off + 1:off + 5], "big")
        if length < 4:
            break
        body = data[off + 5:off + 1 + length]
        if kind == ord("Q"):
            out.append(body.split(b"\0", 1)[0])
        elif kind == ord("P"):
            parts = body.split(b"\0", 2)
            if len(parts) > 1:
                out.append(parts[1])
        off += 1 + length
    return out


@dataclass
class _Held:
    """An exec stopped in the kernel, waiting for a person."""

    pid: int
    start: int | None
    session: int
    argv: tuple[str, ...]


class Enforcer:
    def __init__(self, probes: Any, tracker: Tracker, policy: Policy, *, approvals: Approvals,
                 quarantine: Quarantine | None, mask_text: Callable[[str], str] = lambda s: s,
                 notify: Callable[[Request], None] | None = None, sql_approval_s: int = 600) -> None:
        self.kernel = kernel.KernelPolicy(probes)
        self.tracker = tracker
        self.approvals = approvals
        self.quarantine = quarantine
        self.mask_text = mask_text
        self.notify = notify
        self.sql_approval_s = sql_approval_s
        self.daemon_pid = os.getpid()
        self._lock = threading.RLock()
        self._outbox: list[Event] = []
        self._groups: dict[str, frozenset[str]] = {}
        self._slots: dict[int, int] = {}           # session key -> quarantine mark slot
        self._next_slot = 0
        self._ids: dict[str, int] = {}             # session id -> key, for sessions the tracker forgot
        self._marks: dict[str, int] = {}           # session id -> mark it was quarantined under
        self._known: dict[int, Session] = {}       # session key -> session, kept a minute past its end
        self._ended: list[tuple[float, int]] = []
        self._held: dict[str, _Held] = {}          # approval id -> stopped exec
        self._approved_exec: dict[tuple[int, tuple[str, ...]], float] = {}
        self._approved_ops: dict[tuple[int, int], float] = {}   # (session, statement/request hash)
        self.stats = {"verdicts": 0, "kernel": 0, "after_the_fact": 0}
        self.policy = policy
        self.plan = kernel.compile_policy(policy)
        self.kernel.apply(self.plan, self.daemon_pid)
        approvals.on_change = self._on_approval

    # ---- policy ----------------------------------------------------------------------

    def load(self, policy: Policy) -> None:
        """Swap the policy: kernel maps first, then every live session's rule mask."""
        with self._lock:
            plan = kernel.compile_policy(policy)
            self.kernel.apply(plan, self.daemon_pid)
            self.policy, self.plan = policy, plan
            self._groups.clear()   # group membership may have changed too
            for key, s in list(self.tracker.sessions.items()):
                self._program_session(key, s)
        log.info("policy loaded: %d rules from %s", len(policy.rules), policy.source or "?")

    def _groups_of(self, user: str) -> frozenset[str]:
        if user not in self._groups:
            self._groups[user] = user_groups(user) if user else frozenset()
        return self._groups[user]

    def _program_session(self, key: int, s: Session) -> None:
        users = {u for u in (s.identity.user, s.identity.login_user) if u}
        mask = kernel.session_mask(self.policy, s.agent, users, self._groups_of(person(s.identity)))
        slot = self._slots.get(key)
        if slot is None:
            # round robin: a mark comes back only after 16383 sessions, long after any quarantine
            # of its previous session has expired
            used = set(self._slots.values())
            for _ in range(0x3FFF):
                self._next_slot = self._next_slot % 0x3FFF + 1
                if self._next_slot not in used:
                    slot = self._slots[key] = self._next_slot
                    break
        self._ids[s.id] = key
        self._known[key] = s
        self.kernel.set_session(key, mask, Quarantine.mark_for(slot) if slot else 0)

    def _workdir(self, key: int | None) -> str:
        """The agent's working directory: where its root process is."""
        s = self.tracker.sessions.get(key) if key is not None else None
        return s.root.cwd if s is not None and s.root is not None else ""

    def _session_key(self, session_id: str) -> int | None:
        return self._ids.get(session_id)

    # ---- events out --------------------------------------------------------------------

    def drain(self) -> list[Event]:
        with self._lock:
            out, self._outbox = self._outbox, []
        return out

    def _emit(self, ev: Event) -> None:
        with self._lock:
            self._outbox.append(ev)

    def _verdict(self, base: Event, action: str, rule: str, subject: str, mechanism: str, prevented: bool,
                 approval_id: str = "", since_boot_ns: int | None = None,
                 at_boot_ns: int | None = None) -> Event:
        ev = replace(base, kind="verdict", ts_ns=time.time_ns(), event_id=new_event_id(),
                     verdict=VerdictInfo(action=action, rule=rule, subject=subject, mechanism=mechanism,
                                prevented=prevented, approval_id=approval_id,
                                latency_us=((at_boot_ns or boot_ns()) - since_boot_ns) // 1000
                                if since_boot_ns else None))
        self.stats["verdicts"] += 1
        self._emit(ev)
        log.info("verdict %s by rule %r on %s (pid %d, %s)%s", action, rule, subject, ev.process.pid,
                 mechanism, "" if prevented else " after the fact")
        return ev

    # ---- kernel records ------------------------------------------------------------------

    def on_guard(self, rec: g.Guard) -> None:
        with self._lock:
            try:
                self._on_guard(rec)
            finally:
                if rec.what == g.G_SESSION:
                    # stopped until its rules were known: whatever happened, let it run
                    key = rec.h.session
                    s = self.tracker.sessions.get(key)
                    if s is not None:
                        self._program_session(key, s)
                    _signal(rec.h.pid, None, signal.SIGCONT)

    def _base(self, rec: g.Guard) -> Event:
        """The process and session a kernel record is about, also when the session has just ended
        (verdicts are read ahead of capture, but a short-lived agent may be gone already)."""
        ev = self.tracker.event_for("verdict", rec.h)
        if ev is not None:
            return ev
        ev = Event(kind="verdict", ts_ns=time.time_ns(), host=self.tracker.host,
                   process=Process(pid=rec.h.pid, uid=rec.h.uid, argv=[rec.h.comm]))
        s = self._known.get(rec.h.session)
        if s is not None:
            ev.session_id, ev.agent, ev.identity = s.id, s.agent, s.identity
        return ev

    def _rule(self, index: int) -> Rule | None:
        return self.policy.rules[index] if 0 <= index < len(self.policy.rules) else None

    def _on_guard(self, rec: g.Guard) -> None:
        if rec.what == g.G_SESSION:
            return
        self.stats["kernel"] += 1
        subject = SUBJECT.get(rec.what, "?")
        base = self._base(rec)
        rule = self._rule(rec.rule)
        name = rule.name if rule else ""
        mech = MECHANISM.get((rec.what, rec.done), "kernel")
        if rec.what == g.G_EXEC:
            filename = rec.text.decode(errors="replace")
            base.exec = ExecInfo(filename=filename)
            if rec.done == g.DONE_STOPPED:
                self._decide_stopped_exec(rec, base)
                return
            self._verdict(base, rec.action, name, subject, mech, True, since_boot_ns=rec.h.ts_boot_ns)
        elif rec.what == g.G_CONNECT:
            base.net = None
            base.verdict = None
            self._verdict(base, rec.action, name, subject, f"{mech} {rec.addr}:{rec.target}", True,
                          since_boot_ns=rec.h.ts_boot_ns)
        elif rec.what in (g.G_SQL, g.G_SQL_TLS, g.G_HTTP, g.G_HTTP_TLS):
            self._on_refused(rec, base, rule, mech)
        elif rec.what == g.G_SELF:
            call = SYSCALLS.get(rec.target, str(rec.target))
            self._verdict(base, "kill", "self-protection", subject, f"{mech}: {call} aimed at the daemon",
                          True, since_boot_ns=rec.h.ts_boot_ns)
        if rule is not None and rule.action == "quarantine":
            self._quarantine(rec.h.session, rule.duration_s, base)
        if rule is not None and rule.action == "kill" and rec.done == g.DONE_REFUSED:
            # the kernel refused the operation; `kill` also ends the process that tried
            _signal(rec.h.pid, None, signal.SIGKILL)

    def _decide_stopped_exec(self, rec: g.Guard, base: Event) -> None:
        pid, key = rec.h.pid, rec.h.session
        start = _start_ticks(pid)
        # The verdict ring is read ahead of capture, so the tracker may not have this
        # exec yet; the process is stopped before its first instruction, so /proc
        # holds exactly the argv, image and directory the kernel was given.
        seen, exe, cwd = _proc_view(pid)
        if seen:
            base.process.argv, base.process.exe = seen, exe or base.process.exe
            base.process.cwd = cwd or base.process.cwd
            base.process.pid = pid
        exec_ev = replace(base, kind="exec")
        verdict = decide(self.policy, exec_ev, self._groups_of(person(exec_ev.identity)), self._workdir(key))
        argv = tuple(base.process.argv)
        approved = self._approved_exec.get((key, argv), 0) > time.time()
        if approved:
            verdict = Verdict("allow", verdict.rule)
        mech = "SIGSTOP at exec, decided in userspace"
        if verdict.action in ("allow", "audit"):
            _signal(pid, start, signal.SIGCONT)
            if verdict.rule:
                self._verdict(base, verdict.action, verdict.rule, "exec", mech + (
                    " (approved earlier)" if approved else ""), False, since_boot_ns=rec.h.ts_boot_ns)
            return
        if verdict.action == "hold":
            rule = next(r for r in self.policy.rules if r.name == verdict.rule)
            req = self.approvals.request(
                rule=rule.name, kind="exec", summary=self.mask_text(" ".join(argv)),
                session_id=base.session_id, agent=base.agent,
                launcher=person(base.identity), approvers=rule.approvers,
                timeout_s=rule.timeout_s, target={"pid": pid, "session": key})
            self._held[req.id] = _Held(pid, start, key, argv)
            self._verdict(base, "hold", rule.name, "exec", mech + ", stopped until approved", True, req.id,
                          since_boot_ns=rec.h.ts_boot_ns)
            return
        _signal(pid, start, signal.SIGKILL)
        self._verdict(base, verdict.action, verdict.rule, "exec", mech, True, since_boot_ns=rec.h.ts_boot_ns)
        if verdict.action == "quarantine":
            rule = next(r for r in self.policy.rules if r.name == verdict.rule)
            self._quarantine(key, rule.duration_s, base)

    def _on_refused(self, rec: g.Guard, base: Event, rule: Rule | None, mech: str) -> None:
        """A statement or request the kernel stopped: record it, close its connection, maybe hold it."""
        if rec.what in (g.G_SQL, g.G_SQL_TLS):
            subject = "sql"
            stmts = [st for t in pg_texts(rec.text) for st in sqlnorm.statements(t)]
            hit = next((st for st in stmts if st.hash == rec.hash), None)
            base.sql = SqlInfo(query=self.mask_text(hit.text if hit else "; ".join(st.text for st in stmts)))
            summary = base.sql.query
        else:
            subject = "http"
            base.http = request_line(rec.text, rec.what == g.G_HTTP_TLS)
            base.http.query = self.mask_text(base.http.query)
            summary = self.mask_text(f"{base.http.method} {base.http.host}{base.http.path}")
        approval_id = ""
        if rule is not None and rule.action == "hold" and rec.hash:
            # approving lets this exact statement or request through for the session
            key = rec.h.session
            pending = self.approvals.find_pending(
                lambda r: r.target.get("session") == key and r.target.get("hash") == rec.hash)
            if pending is None:
                pending = self.approvals.request(
                    rule=rule.name, kind=subject, summary=summary, session_id=base.session_id,
                    agent=base.agent, launcher=person(base.identity), approvers=rule.approvers,
                    timeout_s=rule.timeout_s, target={"session": key, "hash": rec.hash})
            approval_id = pending.id
        decided = boot_ns()
        if rec.done == g.DONE_REFUSED and rec.addr:
            local, remote = _ports(rec.target)
            if close_connection(rec.addr, local, remote):
                mech += ", connection closed"
        self._verdict(base, rec.action, rule.name if rule else "", subject, mech, True, approval_id,
                      since_boot_ns=rec.h.ts_boot_ns, at_boot_ns=decided)

    # ---- after the fact ------------------------------------------------------------------

    def stage(self, ev: Event) -> Event:
        """Pipeline stage (before masking): judge what the kernel could not."""
        if ev.kind == "session_start":
            with self._lock:
                key = next((k for k, s in self.tracker.sessions.items() if s.id == ev.session_id), None)
                if key is not None and key not in self._slots:
                    self._program_session(key, self.tracker.sessions[key])
            return ev
        if ev.kind == "session_end":
            with self._lock:
                key = self._ids.pop(ev.session_id, None)
                if key is not None:
                    self._slots.pop(key, None)
                    self.kernel.drop_session(key)
                    self._ended.append((time.monotonic(), key))
            return ev
        if ev.kind not in ("exec", "connect", "sql", "http") or not self.policy.rules:
            return ev
        if ev.kind == "exec" and ev.exec is not None and ev.exec.errno is not None:
            return ev
        with self._lock:
            try:
                self._after(ev)
            except Exception:
                log.exception("policy evaluation failed on %s event", ev.kind)
        return ev

    def _after(self, ev: Event) -> None:
        verdict = decide(self.policy, ev, self._groups_of(person(ev.identity)),
                         self._workdir(self._session_key(ev.session_id)))
        if not verdict.rule:
            return
        index = next(i for i, r in enumerate(self.policy.rules) if r.name == verdict.rule)
        in_kernel = index < g.MAX_RULES
        if ev.kind == "exec" and in_kernel:
            return          # every exec rule of the first 64 is a kernel candidate: judged at the stop
        if ev.kind == "connect" and in_kernel and self.plan.exact >> index & 1:
            return          # refused by the kernel
        if verdict.action not in DENYING:
            if verdict.action == "allow" or ev.kind != "connect":
                self._verdict(ev, verdict.action, verdict.rule, ev.kind, "userspace", False)
            return
        key = self._session_key(ev.session_id)
        if key is not None and (ev.sql is not None or ev.http is not None):
            # what a person approved for this session passes here as it passed the kernel
            hashes = ({st.hash for st in sqlnorm.statements(ev.sql.query)} if ev.sql is not None
                      else {request_key(ev.http)} if ev.http is not None else set())
            now = time.time()
            if any(self._approved_ops.get((key, h), 0) > now for h in hashes):
                self._verdict(ev, "allow", verdict.rule, ev.kind, "approved earlier", False)
                return
        self.stats["after_the_fact"] += 1
        rule = self.policy.rules[index]
        if verdict.action == "quarantine":
            if key is not None:
                self._quarantine(key, rule.duration_s, ev)
            mech = "nftables quarantine after the fact"
        else:
            _signal(ev.process.pid, None, signal.SIGKILL)
            mech = "SIGKILL after the fact"
        self._verdict(ev, verdict.action, verdict.rule, ev.kind, mech, False)

    def _quarantine(self, key: int, duration_s: int, base: Event) -> None:
        slot = self._slots.get(key)
        if self.quarantine is None or not slot:
            log.warning("cannot quarantine session %s: %s", base.session_id,
                        "nftables unavailable" if self.quarantine is None else "no mark slot")
            return
        try:
            self.quarantine.session(Quarantine.mark_for(slot), duration_s)
            self._marks[base.session_id] = Quarantine.mark_for(slot)
        except QuarantineError as e:
            log.error("quarantine of session %s failed: %s", base.session_id, e)
            return
        self._verdict(base, "quarantine", "", "session", f"nftables mark {Quarantine.mark_for(slot):#x} for "
                      f"{duration_s}s", True)

    def release(self, session_id: str) -> int:
        """Lift a session's quarantine (also after the session ended: the rules outlive it)."""
        with self._lock:
            mark = self._marks.get(session_id)
            if mark is None and session_id in self._ids:
                slot = self._slots.get(self._ids[session_id])
                mark = Quarantine.mark_for(slot) if slot else None
            if mark is None or self.quarantine is None:
                return 0
            return self.quarantine.release(mark)

    # ---- approvals -------------------------------------------------------------------------

    def approve(self, request_id: str, caller: Caller, for_s: int | None) -> Request:
        with self._lock:
            req = self.approvals.approve(request_id, caller, for_s)
            self._carry_out(req)
            return req

    def deny(self, request_id: str, caller: Caller) -> Request:
        with self._lock:
            req = self.approvals.deny(request_id, caller)
            self._carry_out(req)
            return req

    def tick(self) -> None:
        with self._lock:
            for req in self.approvals.expire():
                self._carry_out(req)
            while self._ended and time.monotonic() - self._ended[0][0] > 60:
                self._known.pop(self._ended.pop(0)[1], None)
            now = time.time()
            self._approved_exec = {k: t for k, t in self._approved_exec.items() if t > now}
            self._approved_ops = {k: t for k, t in self._approved_ops.items() if t > now}

    def _carry_out(self, req: Request) -> None:
        """Act on a decided request: resume or kill a stopped exec; let an SQL statement through."""
        held = self._held.pop(req.id, None)
        if held is not None:
            if req.state == "approved":
                if req.approved_for_s:
                    self._approved_exec[(held.session, held.argv)] = time.time() + req.approved_for_s
                ok = _signal(held.pid, held.start, signal.SIGCONT)
            else:
                ok = _signal(held.pid, held.start, signal.SIGKILL)
            if not ok:
                log.info("held process %d is gone", held.pid)
        elif req.kind in ("sql", "http") and req.state == "approved":
            key, h = int(req.target["session"]), int(req.target["hash"])
            for_s = req.approved_for_s or self.sql_approval_s
            self.kernel.allow_statement(key, h, boot_ns() + for_s * 1_000_000_000)
            self._approved_ops[(key, h)] = time.time() + for_s

    def _on_approval(self, req: Request) -> None:
        """Every state of every request is an audit event; a new one is also announced."""
        ev = Event(kind="approval", ts_ns=time.time_ns(), host=self.tracker.host, session_id=req.session_id,
                   agent=req.agent,
                   approval=ApprovalInfo(id=req.id, state=req.state, rule=req.rule, subject=req.kind,
                                         summary=req.summary, approvers=list(req.approvers),
                                         decided_by=req.decided_by, approved_for_s=req.approved_for_s,
                                         expires=format_ts(int(req.expires * 1e9))))
        key = self._session_key(req.session_id)
        s = self.tracker.sessions.get(key) if key is not None else None
        if s is not None:
            ev.identity = s.identity
        pid = req.target.get("pid")
        if isinstance(pid, int):
            ev.process.pid = pid
        self._emit(ev)
        if req.state == "pending" and self.notify is not None:
            try:
                self.notify(req)
            except Exception:
                log.exception("approval notification failed")

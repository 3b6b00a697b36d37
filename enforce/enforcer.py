"""The decide stage: turns the policy into actions and every action into a verdict event.

Two inputs.  Guard records (probes/guard.py) say what the kernel did or is
waiting on: a stopped exec, a refused connect, a dropped SQL send.  Ordinary
events (exec, connect, sql, http) are judged here when the kernel could not
judge them, and then the action comes after the fact (`prevented: false`).

Runs on the probe thread; approvals arrive on the control thread, so shared
state is behind one lock.  The entry points the daemon's loop calls (`on_guard`, `stage`,
`retry_deferred`, `unstick`, `tick`, `readopt`, `check_quarantine`) return the events they made;
what is decided anywhere else (approvals on the control thread, `tamper` from the daemon's
checks) waits in the outbox for `drain()`.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Concatenate, ParamSpec

from agentwarden.core.events import (
    CAUSE_UNKNOWN,
    ApprovalInfo,
    CauseInfo,
    Event,
    ExecInfo,
    HttpInfo,
    NetInfo,
    Process,
    SqlInfo,
    VerdictInfo,
    format_ts,
    new_event_id,
)
from agentwarden.core.identity import Groups, person, person_uid
from agentwarden.core.sessions import Session, SessionView
from agentwarden.enforce import callers, kernel, sqlnorm
from agentwarden.enforce.approvals import Approvals, Caller, Request
from agentwarden.enforce.effects import Effects, start_ticks
from agentwarden.enforce.policy import IDENTITY_RULE, Parent, Policy, Rule, decide, host_read
from agentwarden.enforce.programs import Programs, changeable
from agentwarden.enforce.quarantine import Quarantine, QuarantineError
from agentwarden.probes import guard as g
from agentwarden.probes import process as pr

log = logging.getLogger(__name__)

DENYING = ("deny", "kill", "quarantine", "hold")
DEFER_S = 1.0           # a stopped exec waits at most this long for its session or cause to be read
RING_SETTLE_S = 0.002   # a stopped exec weighed on its cause waits this long for the ring (retry_deferred)
SUBJECT = {g.G_EXEC: "exec", g.G_CONNECT: "connect", g.G_SQL: "sql", g.G_SQL_TLS: "sql",
           g.G_SESSION: "session", g.G_SELF: "self", g.G_HTTP: "http", g.G_HTTP_TLS: "http",
           g.G_RESUME: "exec", g.G_ESCAPED: "exec", g.G_DGRAM: "connect", g.G_UNIX: "connect",
           g.G_FDGRAB: "connect", g.G_UNJUDGED: "connect", g.G_UNIX_SHARED: "connect"}
MECHANISM = {
    (g.G_EXEC, g.DONE_KILLED): "SIGKILL at exec (kernel)",
    (g.G_EXEC, g.DONE_STOPPED): "SIGSTOP at exec, decided in userspace",
    (g.G_CONNECT, g.DONE_REFUSED): "cgroup connect (EPERM)",
    (g.G_DGRAM, g.DONE_REFUSED): "cgroup sendmsg (EPERM)",
    (g.G_UNIX, g.DONE_REFUSED): "cgroup connect_unix (EPERM)",
    (g.G_UNIX, g.DONE_KILLED): "SIGKILL at connect or send on a Unix socket to Postgres (sk_data_ready)",
    (g.G_UNIX_SHARED, g.DONE_REFUSED): "cgroup connect_unix (EPERM)",
    (g.G_UNIX_SHARED, g.DONE_KILLED): "SIGKILL to the child at its fork, before it ran (sched_process_fork)",
    (g.G_SQL, g.DONE_REFUSED): "sk_msg drop (EACCES)",
    (g.G_SQL_TLS, g.DONE_KILLED): "SIGKILL at SSL_write",
    (g.G_HTTP, g.DONE_REFUSED): "sk_msg drop (EACCES)",
    (g.G_HTTP_TLS, g.DONE_KILLED): "SIGKILL at SSL_write",
    (g.G_SELF, g.DONE_KILLED): "SIGKILL at the syscall",
}
SYSCALLS = {62: "kill", 200: "tkill", 234: "tgkill", 101: "ptrace", 321: "bpf", 434: "pidfd_open",
            311: "process_vm_writev", 302: "prlimit64", 144: "sched_setscheduler", 142: "sched_setparam",
            203: "sched_setaffinity", 314: "sched_setattr", 440: "process_madvise", 448: "process_mrelease",
            141: "setpriority", 251: "ioprio_set", 438: "pidfd_getfd",
            # through its /proc/PID/mem (guard_task.bpf.c guard_memwrite)
            1: "write to /proc/PID/mem", 20: "writev to /proc/PID/mem", 18: "pwrite64 to /proc/PID/mem",
            296: "pwritev to /proc/PID/mem", 328: "pwritev2 to /proc/PID/mem"}


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _only_tls(rec: g.Guard) -> bool:
    """An exec the kernel stopped only for its TLS uprobes (guard_exec.bpf.c AW_EXEC_TLS with no
    rule): nothing to decide."""
    return bool(rec.target & g.EXEC_TLS) and rec.rule < 0


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


def _git_config_shapes_requests(pid: int, env: dict[bytes, bytes]) -> bool:
    """Whether a config file git's helper reads (the repository's, the user's, the system's) sets
    extra HTTP headers or includes another file.  Read while the helper waits stopped at its
    exec; a file rewritten between this read and the helper's own is a race this cannot close."""
    root = f"/proc/{pid}/root"
    cwd = os.readlink(f"/proc/{pid}/cwd") if os.path.exists(f"/proc/{pid}/cwd") else "/"
    home = env.get(b"HOME", b"").decode(errors="replace")
    git_dir = env.get(b"GIT_DIR", b".git").decode(errors="replace")
    git_dir = git_dir if git_dir.startswith("/") else os.path.join(cwd, git_dir)
    xdg = env.get(b"XDG_CONFIG_HOME", b"").decode(errors="replace") or (home and f"{home}/.config")
    files = ["/etc/gitconfig", f"{git_dir}/config", f"{git_dir}/config.worktree"]
    files += [f"{home}/.gitconfig"] if home else []
    files += [f"{xdg}/git/config"] if xdg else []
    for path in files:
        try:
            with open(root + path, "rb") as f:
                text = f.read(1 << 20).lower()
        except OSError:
            continue
        if b"extraheader" in text or b"include" in text:
            return True
    return False


def _parent_of(pid: int, programs: Programs, direct: bool) -> Parent | None:
    """A stopped exec's parent, from /proc (the parent of a process stopped for a decision is
    alive while it waits for it; gone or unreadable: None, no exception applies).  Its program
    is trusted when the exec's user could not have written it, or when it is the code of a
    program the policy names (so git is git for a root agent too).  `direct`: the kernel saw
    this exec as the process's first since the fork (guard.bpf.c, self_exec_id)."""
    p = callers.proc(pid)
    if p is None or p.ppid <= 1:
        return None
    argv, exe, _cwd = _proc_view(p.ppid)
    if not argv or not exe:
        return None
    try:
        trusted = (not changeable(exe, callers.euid(pid) or 0)
                   or programs.is_named_parent(f"/proc/{p.ppid}/exe"))
    except OSError:
        trusted = False
    return Parent(exe, argv, trusted, _feeds_stdin(p.ppid, pid), direct)


def _feeds_stdin(parent: int, pid: int) -> bool:
    """Is pid's standard input a pipe that parent holds an end of (git writing to its helper)?"""
    try:
        pipe = os.readlink(f"/proc/{pid}/fd/0")
        if not pipe.startswith("pipe:"):
            return False
        return any(os.readlink(f"/proc/{parent}/fd/{fd}") == pipe for fd in os.listdir(f"/proc/{parent}/fd"))
    except OSError:
        return False


CLK_TCK = os.sysconf("SC_CLK_TCK")


def exec_ident(pid: int) -> int:
    """guard.bpf.c's identity of an exec, for approved retries: the command line (with its
    argument boundaries), the program's inode, the working directory's inode and the
    environment, hashed and mixed.  A copy or a replaced file is another program; the same
    text in another directory or with another environment is another operation.  0 when
    /proc no longer has the process.  Read while the process is stopped at its first
    instruction, so /proc holds exactly what the kernel was given."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read()
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
        file, cwd = g.inode_key(os.stat(f"/proc/{pid}/exe")), g.inode_key(os.stat(f"/proc/{pid}/cwd"))
    except OSError:
        return 0
    h = sqlnorm.fnv(text[:-1] if text.endswith(b"\0") else text)
    mixed = ((((h * _MIX) & _M64) ^ file) * _MIX & _M64) ^ cwd
    return ((mixed * _MIX) & _M64) ^ env_hash(env)


ENV_CHUNK = 512   # guard.bpf.c AW_ENV_CHUNK


def env_hash(env: bytes) -> int:
    """guard.bpf.c's hash of an environment: FNV-1a over little-endian 8-byte words of each
    512-byte chunk, the last one zero-padded, then the length mixed in."""
    h = sqlnorm.FNV_OFF
    padded = env + b"\0" * (-len(env) % ENV_CHUNK)
    for (w,) in struct.iter_unpack("<Q", padded):
        h = ((h ^ w) * sqlnorm.FNV_PRIME) & _M64
    return ((h ^ len(env)) * sqlnorm.FNV_PRIME) & _M64


def _state(pid: int) -> str:
    """"T" stopped, "Z" zombie, ...; "" when the process is gone."""
    p = callers.proc(pid)
    return p.state if p is not None else ""


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


_MIX = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def request_key(http: HttpInfo) -> int:
    """guard.bpf.c's identity of a request (http_candidates): method, host and path hashes, mixed."""
    host = host_read(http.host)
    hm, hh = sqlnorm.fnv(http.method.encode()), sqlnorm.fnv(host.encode())
    hp = sqlnorm.fnv(http.path.encode()[:128])
    return ((((hm * _MIX) & _M64) ^ hh) * _MIX & _M64) ^ hp


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


P = ParamSpec("P")


def returns_events(fn: Callable[Concatenate[Enforcer, P], None]
                   ) -> Callable[Concatenate[Enforcer, P], list[Event]]:
    """An entry point of the daemon's loop: the events it makes are its return value, not queued.
    Called inside another one (check_quarantine's tamper), they join that one's."""
    @functools.wraps(fn)
    def run(self: Enforcer, /, *args: P.args, **kwargs: P.kwargs) -> list[Event]:
        if getattr(self._local, "made", None) is not None:
            fn(self, *args, **kwargs)
            return []
        made: list[Event] = []
        self._local.made = made
        try:
            fn(self, *args, **kwargs)
        except BaseException:
            with self._lock:            # what it made before it failed is still recorded
                self._outbox.extend(made)
            raise
        finally:
            self._local.made = None
        return made
    return run


def prepare(policy: Policy) -> tuple[kernel.Plan, Programs]:
    """What a policy needs before it can be applied: its kernel plan (0.3 s for the default
    policy's DFAs) and the identities of the programs it names (0.45 s of reading files)."""
    return kernel.compile_policy(policy), Programs.load(policy)


_UNGUARDED = ("connection closed, its sends refused (sk_msg EACCES): no guard saw it open (opened while no "
              "SQL/HTTP rule was loaded, or by a process that joined the session), so where its next "
              "message starts is unknown; the client reconnects under the guard")


class Enforcer:
    def __init__(self, effects: Effects, tracker: SessionView, policy: Policy, *, approvals: Approvals,
                 quarantine: Quarantine | None, mask_text: Callable[[str], str] = lambda s: s,
                 notify: Callable[[Request], None] | None = None, sql_approval_s: int = 600,
                 prepared: tuple[kernel.Plan, Programs] | None = None,
                 cause_of: Callable[[Event], CauseInfo | None] = lambda ev: None,
                 attach_tls: Callable[[int], None] = lambda pid: None) -> None:
        """`prepared`: the policy's kernel plan and program identities, made beforehand
        (prepare(): the daemon makes them while bcc compiles the probes).  `cause_of`: the tool call
        that asked for an exec, from what the capture has read (daemon/lineage.py Lineage.cause_of).
        `attach_tls`: the daemon's uprobes on the program file of an exec the kernel stopped because
        the file exports OpenSSL and has none yet (guard_exec.bpf.c tls_unattached; daemon/server.py),
        before the exec resumes."""
        self.cause_of = cause_of
        self.attach_tls = attach_tls
        self.effects = effects
        self.tracker = tracker
        self.approvals = approvals
        self.quarantine = quarantine
        self.mask_text = mask_text
        self.notify = notify
        self.sql_approval_s = sql_approval_s
        self.daemon_pid = os.getpid()
        self._lock = threading.RLock()
        self._outbox: list[Event] = []            # made outside an entry point (the control thread)
        self._local = threading.local()            # .made: the events of the entry point running
        self._groups = Groups()
        self._slots: dict[int, int] = {}           # session key -> quarantine mark slot
        self._next_slot = 0
        self._ids: dict[str, int] = {}             # session id -> key, for sessions the tracker forgot
        self._marks: dict[str, int] = {}           # session id -> mark it was quarantined under
        self._known: dict[int, Session] = {}       # session key -> session, kept a minute past its end
        self._ended: list[tuple[float, int]] = []
        # ancestors a decision stop may have stopped too (sudo, su, runuser stop themselves
        # when their child stops): (deadline, pids, boot ns of the decision stop)
        self._unstick: list[tuple[float, list[int], int]] = []
        self._quarantined: dict[int, float] = {}   # mark -> monotonic deadline (0: until released)
        self._judged_sessions: set[int] = set()
        # sessions held at their root's first instruction until their person logs in
        # (identity.require: hold): key -> (monotonic deadline, root pid, boot ns it stopped, its
        # start ticks, its uid)
        self._login_wait: dict[int, tuple[float, int, int | None, int | None, int]] = {}
        # stopped execs decided after the main ring was read once more: of sessions not read yet, or
        # (a rule on cause) whose tool call may still be in it: (monotonic deadline, record, the
        # main ring reads done when it came)
        self._deferred: list[tuple[float, g.Guard, int]] = []
        self._reads = 0
        self.stats = {"verdicts": 0, "kernel": 0, "after_the_fact": 0, "escapes": 0, "twin_hash_unmatched": 0}
        self.verdicts_by_action: dict[str, int] = {}
        self.policy = policy
        self.plan, self.programs = prepared or prepare(policy)
        self.effects.apply(self.plan, self.daemon_pid, self.programs.known)
        approvals.on_change = self._on_approval

    # ---- policy ----------------------------------------------------------------------

    def load(self, policy: Policy) -> None:
        """Swap the policy: kernel maps first, then every live session's rule mask."""
        with self._lock:
            plan = kernel.compile_policy(policy)
            programs = Programs.load(policy)
            self.effects.apply(plan, self.daemon_pid, programs.known)
            self.policy, self.plan, self.programs = policy, plan, programs
            self._groups.forget()   # group membership may have changed too
            for key, s in list(self.tracker.sessions.items()):
                self._program_session(key, s)
            self.guard_existing()
        log.info("policy loaded: %d rules from %s", len(policy.rules), policy.source or "?")

    def guard_existing(self, pids: Iterable[int] | None = None) -> int:
        """When the policy has SQL or HTTP rules: the connections tracked processes already have
        that no guard holds (opened while no such rule was loaded, or by a process that joined a
        session) would never be judged, and where their next message starts is the agent's to
        choose (half a statement left in the server).  They are put in the guard refused: every
        send fails (EACCES, recorded), the client reconnects, and the new connection is judged.
        Connections an earlier daemon's guard holds stay with it (probes Pins.predecessors).
        pids: those to look at (None: every tracked process).  Returns how many were refused."""
        if not self.plan.guards_streams:
            return 0
        n = 0
        for pid in list(self.tracker.procs) if pids is None else pids:
            p = self.tracker.procs.get(pid)
            if p is None:
                continue
            closed, unreachable = self.effects.guard_sockets(pid, p.session)
            n += len(closed)
            for ip, port in closed:
                base = self.tracker.event_for_pid("verdict", pid, time.time_ns())
                if base is not None:
                    base.net = NetInfo("tcp", ip, port)
                    self._verdict(base, "deny", "unjudged-send", "connect", _UNGUARDED, True)
            if unreachable:
                # a connection nothing can judge or close (pidfd_getfd refused: an LSM, Yama; a thread's
                # own file table on a kernel before 6.9): its holder goes, rather than its sends
                killed = self.effects.signal(pid, None, 9)
                base = self.tracker.event_for_pid("verdict", pid, time.time_ns())
                if base is not None:
                    why = "SIGKILL: it holds a connection no guard saw open, which the daemon could not reach"
                    self._verdict(base, "kill", "unjudged-send", "connect",
                                  why + ("" if killed else " (the kill failed)"), killed)
        if n:
            log.warning("%d connections agents already had, which no guard saw open, are refused until they "
                        "reconnect (under the SQL and HTTP guards)", n)
        return n

    def _program_session(self, key: int, s: Session) -> None:
        mask = kernel.session_mask(self.policy, s.agent, s.identity, self._groups.of(person(s.identity)),
                                   s.k8s)
        slot = self._slots.get(key)
        if slot is None:
            # round robin: a mark comes back only after 16383 sessions of this daemon.  Quarantines
            # outlive the daemon, and a new daemon counts from 1 again: a mark that is quarantined
            # now (an earlier daemon's session) is never given to a new session
            used = set(self._slots.values()) | self._quarantined_slots()
            for _ in range(0x3FFF):
                self._next_slot = self._next_slot % 0x3FFF + 1
                if self._next_slot not in used:
                    slot = self._slots[key] = self._next_slot
                    break
        self._ids[s.id] = key
        self._known[key] = s
        self.effects.set_session(key, mask, Quarantine.mark_for(slot) if slot else 0)
        # statements and requests a person approved for this session (also before a restart)
        now_wall, now_boot = time.time(), boot_ns()
        for allow_key, until, _ in self.approvals.allowances(f"op:{s.id}:"):
            h = int(allow_key.rsplit(":", 1)[1])
            self.effects.allow_statement(key, h, now_boot + int((until - now_wall) * 1e9))
        for allow_key, until, uses in self.approvals.allowances(f"exec:{s.id}:"):
            ident = int(allow_key.rsplit(":", 1)[1])
            self.effects.allow_exec(key, ident, now_boot + int((until - now_wall) * 1e9), uses)

    def _quarantined_slots(self) -> set[int]:
        if self.quarantine is None:
            return set()
        try:
            marks = {e.mark for e in self.quarantine.entries()}
        except QuarantineError:
            return set()
        return {slot for m in marks if (slot := Quarantine.slot_of(m)) is not None}

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
        made = getattr(self._local, "made", None)
        if made is not None:
            made.append(ev)
            return
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
        self.verdicts_by_action[action] = self.verdicts_by_action.get(action, 0) + 1
        self._emit(ev)
        log.info("verdict %s by rule %r on %s (pid %d, %s)%s", action, rule, subject, ev.process.pid,
                 mechanism, "" if prevented else " after the fact")
        return ev

    def _unix_shared(self, rec: g.Guard, base: Event, name: str, mech: str) -> None:
        """A Unix socket another process shares, connected by a session under SQL rules (refused),
        or a child forked while its parent connected one (killed before it ran): whichever process
        outlived the kill at sk_data_ready would send on a Postgres connection unjudged."""
        path = rec.text.split(b"\0", 1)[0].decode(errors="replace")
        base.net = NetInfo(transport="unix", path=path, direction="connect")
        base.verdict = None
        if rec.done == g.DONE_REFUSED:
            self._verdict(base, "deny", name, "connect",
                          f"{mech}: a Unix socket another process holds (forked, dup'ed or passed before "
                          f"the connect) may reach Postgres through a link, and the process that shares it "
                          f"would outlive the kill at its connect (or a connect a fork's check would not "
                          f"see: by io_uring, or from more than 256 threads); rule {name!r} judges this "
                          f"session's SQL",
                          True, since_boot_ns=rec.h.ts_boot_ns)
            why = (f"agentwarden: refused: connect of a Unix socket this process shares with another "
                   f"(forked, dup'ed or passed before the connect) to {path}; statements of this session are "
                   f"judged (rule {name}): connect before forking, or over TCP\n")
            if not self.effects.tell(rec.h.pid, why) and rec.target:
                self.effects.tell(rec.target, why)
            return
        killed = rec.done == g.DONE_KILLED
        if rec.hash == g.UNIX_PASSED:
            self._verdict(base, "kill", "unix-connect-pass", "connect",
                          "SIGKILL at the send (sk_data_ready): descriptors passed over a Unix socket while "
                          "another thread of the sender connected one, which the receiver would have held "
                          "connected" + ("" if killed else " (the kernel could not signal it)"),
                          killed, since_boot_ns=rec.h.ts_boot_ns)
            return
        self._verdict(base, "kill", "unix-connect-fork", "connect",
                      f"{mech}: process {rec.target} was forked while another thread of its parent "
                      f"connected a Unix socket, and would have shared it"
                      + ("" if killed else " (the kernel could not signal it)"),
                      killed, since_boot_ns=rec.h.ts_boot_ns)

    # ---- kernel records ------------------------------------------------------------------

    @returns_events
    def on_guard(self, rec: g.Guard) -> None:
        if rec.what == g.G_EXEC and rec.done == g.DONE_STOPPED and not _only_tls(rec) and (
                self.policy.uses_cause
                or (rec.h.session not in self.tracker.sessions and rec.h.session not in self._known)):
            # verdicts are read ahead of capture: this session's start record, or the LLM reply whose
            # tool call asked for this exec (the agent read it before it ran the command), may still
            # be in the main ring.  Decide once the ring was read again (the exec waits stopped
            # meanwhile), or after 1 s.
            self._deferred.append((time.monotonic() + DEFER_S, rec, self._reads))
            return
        self._on_guard_now(rec)

    @property
    def deferred(self) -> bool:
        """A stopped exec of a known session waits only for the main ring to be read again
        (retry_deferred): the daemon reads it at once.  One whose session is not read yet waits
        for the ring's own wakeup (no busy loop for up to its 1 s)."""
        known = (rec.h.session in self.tracker.sessions or rec.h.session in self._known
                 for _, rec, _ in self._deferred)
        return self.policy.uses_cause and any(known)

    @returns_events
    def retry_deferred(self) -> None:
        """After the main ring was read: the stopped execs whose session is known now, and whose
        ring has been read since their record came (a read that began after it)."""
        self._reads += 1
        if not self._deferred:
            return
        now = time.monotonic()
        waiting, self._deferred = self._deferred, []
        for deadline, rec, reads in waiting:
            known = rec.h.session in self.tracker.sessions or rec.h.session in self._known
            # a read begun after the record came, and RING_SETTLE_S after it: a record reserved on
            # another CPU and not yet committed stops a read, and the LLM reply may be behind it
            # (red team: two reads microseconds apart could miss it)
            read = self._reads > reads + 1 and now - (deadline - DEFER_S) >= RING_SETTLE_S
            if (known and (not self.policy.uses_cause or read)) or deadline <= now:
                # past the deadline with the ring not read since: the tool call that asked for it
                # may still be unread, so its cause is unknown, not absent (policy.caused_as)
                self._on_guard_now(rec, cause_unread=self.policy.uses_cause and not read)
            else:
                self._deferred.append((deadline, rec, reads))

    def _on_guard_now(self, rec: g.Guard, cause_unread: bool = False) -> None:
        with self._lock:
            try:
                self._on_guard(rec, cause_unread)
            finally:
                if rec.what == g.G_SESSION:
                    # stopped until its rules were known: let it run, unless a session rule refuses it
                    key = rec.h.session
                    s = self.tracker.sessions.get(key)
                    if s is not None:
                        self._program_session(key, s)
                    if not self._refuse_session(key, rec.h.pid, rec.h.uid, True, rec.h.ts_boot_ns):
                        self.effects.signal(rec.h.pid, None, signal.SIGCONT)

    def _refuse_session(self, key: int, pid: int, uid: int, held: bool, since: int | None) -> bool:
        """Session rules (`kind: session`, e.g. as_root): True when the session was refused."""
        self._judged_sessions.add(key)
        if not self.plan.session_rules:
            return False
        s = self.tracker.sessions.get(key)
        ev = self.tracker.event_for_pid("session_start", pid, time.time_ns()) if s is not None else None
        if ev is None:
            ev = Event(kind="session_start", ts_ns=time.time_ns(), host=self.tracker.host,
                       process=Process(pid=pid))
        euid = callers.euid(pid)
        ev.process.uid = 0 if 0 in (uid, euid) else uid
        verdict = decide(self.policy, ev, self._groups.of(person(ev.identity)))
        rule = next((r for r in self.policy.rules if r.name == verdict.rule), None)
        if verdict.action == "hold" and rule is not None:
            # identity.require with `unverified: hold` (the one session rule that holds)
            if not held and _state(pid) != "T":
                # running before this daemon started (a restart): its identity is re-read from the
                # bindings, not held; it has run already, and killing every running agent at a
                # restart would punish the person for the daemon's
                self._verdict(replace(ev, kind="verdict"), "audit", verdict.rule, "session",
                              "running before this daemon started: not held", False)
                return False
            # the root stays stopped at its first instruction until its person logs in, or dies at
            # the timeout; stopped the way an exec waiting for a decision is, so whoever resumes it
            # (SIGCONT, job control, a debugger) is caught by the decision stop's guards
            start = start_ticks(pid)
            self._login_wait[key] = (time.monotonic() + rule.timeout_s, pid, since, start, uid)
            self.effects.deciding_add(pid, since if since is not None else boot_ns())
            self.effects.tell(pid, f"agentwarden: this agent session has no verified identity; run "
                                   f"`agentwarden login` (as {person(ev.identity)}) within "
                                   f"{rule.timeout_s} s, outside the agent, and it will start")
            self._verdict(replace(ev, kind="verdict"), "hold", verdict.rule, "session",
                          "SIGSTOP at the session's first instruction: waiting for `agentwarden login`", True,
                          since_boot_ns=since)
            person_id = person_uid(ev.identity.uid, ev.identity.login_uid)
            again = self.tracker.rebind(key)
            if again is not None and again.identity.verified and person_id is not None:
                self.identity_bound(person_id)   # the person logged in while this was decided
            return True
        if verdict.action not in ("deny", "kill", "hold"):
            return False
        if rule is not None and rule.hint:
            self.effects.tell(pid, f"agentwarden: {rule.hint}")
        self.effects.signal(pid, None, signal.SIGKILL)
        self._verdict(replace(ev, kind="verdict"), verdict.action, verdict.rule, "session",
                      "the agent's root killed at its first instruction" if held else
                      "the running agent's root killed (it started before the daemon)", held,
                      since_boot_ns=since)
        return True

    def _base(self, rec: g.Guard) -> Event:
        """The process and session a kernel record is about, also when the session has just ended
        (verdicts are read ahead of capture, but a short-lived agent may be gone already).  A record
        made in no process's context (pid 0: sock_ops, when a handshake completes) has its session."""
        ev = self.tracker.event_for("verdict", rec.h) if rec.h.pid else None
        if ev is not None:
            return ev
        ev = Event(kind="verdict", ts_ns=time.time_ns(), host=self.tracker.host,
                   process=Process(pid=rec.h.pid, uid=rec.h.uid, argv=[rec.h.comm]))
        s = self._known.get(rec.h.session)
        if s is not None:
            ev.session_id, ev.agent, ev.identity, ev.k8s = s.id, s.agent, s.identity, s.k8s
        return ev

    def _rule(self, index: int) -> Rule | None:
        return self.policy.rules[index] if 0 <= index < len(self.policy.rules) else None

    def _on_guard(self, rec: g.Guard, cause_unread: bool = False) -> None:
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
            if rec.argv:   # what the kernel read at the exec, not the tracker's older view
                base.process = replace(base.process, argv=list(rec.argv), exe=filename)
            if rec.done == g.DONE_STOPPED:
                self._decide_stopped_exec(rec, base, cause_unread)
                return
            if rec.done == g.DONE_APPROVED:
                # the kernel let an approved retry run; count the use here too (it is what survives restarts)
                self.approvals.allowed(f"exec:{base.session_id}:{rec.hash}", consume=True)
                self._verdict(base, "allow", name, subject, "approved earlier: let through by the kernel",
                              False, since_boot_ns=rec.h.ts_boot_ns)
                return
            self._verdict(base, rec.action, name, subject, mech, True, since_boot_ns=rec.h.ts_boot_ns)
        elif rec.what in (g.G_CONNECT, g.G_DGRAM):
            base.net = None
            base.verdict = None
            self._verdict(base, rec.action, name, subject, f"{mech} {rec.addr}:{rec.target}", True,
                          since_boot_ns=rec.h.ts_boot_ns)
        elif rec.what == g.G_UNIX:
            path = rec.text.split(b"\0", 1)[0].decode(errors="replace") or "@" + \
                rec.text[1:].split(b"\0", 1)[0].decode(errors="replace")   # an abstract name
            base.net = NetInfo(transport="unix", path=path, direction="connect")
            base.verdict = None
            self._verdict(base, "deny", name, subject,
                          f"{mech}: Postgres over a Unix socket cannot be judged before the server runs a "
                          f"statement, and rule {name!r} judges this session's SQL", True,
                          since_boot_ns=rec.h.ts_boot_ns)
            why = (f"agentwarden: refused: Postgres over the Unix socket {path}; statements of this session "
                   f"are judged (rule {name}) and that needs TCP: connect with host=127.0.0.1 "
                   f"(psql -h 127.0.0.1)\n")
            # a client that gives up at once (psql) may be gone: its parent (the kernel read it at
            # the refusal) shares its terminal
            proc = self.tracker.procs.get(rec.h.pid)
            parent = rec.target or (proc.ppid if proc is not None else 0)
            if not self.effects.tell(rec.h.pid, why) and parent:
                self.effects.tell(parent, why)
        elif rec.what == g.G_UNIX_SHARED:
            self._unix_shared(rec, base, name, mech)
        elif rec.what == g.G_FDGRAB:
            self._verdict(base, "kill", "descriptor-taken", subject,
                          "SIGKILL at pidfd_getfd: a socket taken from another process would reach its "
                          "server without the connect checks, and unseen", True,
                          since_boot_ns=rec.h.ts_boot_ns)
        elif rec.what == g.G_UNJUDGED:
            unjudged = {
                g.UNJUDGED_OOB: "sk_msg drop (EACCES): urgent data (MSG_OOB), which the server's recv skips, "
                                "so the kernel cannot frame the stream as the server reads it",
                g.UNJUDGED_UNREAD: "sk_msg drop (EACCES): a send whose flags the kernel cannot read "
                                   "(io_uring, a 32-bit call), so it cannot tell urgent data from the stream",
                g.UNJUDGED_JOINED: "sk_msg drop (EACCES): a connection no guard saw open (opened while no "
                                   "SQL/HTTP rule was loaded, or by a process that joined the session), so "
                                   "where its messages start is unknown: reconnect",
                g.UNJUDGED_PARTIAL: "SIGKILL at SSL_write: the previous write on this TLS connection went "
                                    "only in part (SSL_MODE_ENABLE_PARTIAL_WRITE), so where its messages "
                                    "start is no longer known",
                g.UNJUDGED_NESTED: "SIGKILL at SSL_write: a write inside another on the same thread (from a "
                                   "callback), or after one whose return never came (longjmp), so the "
                                   "framing of neither can be trusted",
                g.UNJUDGED_EARLY: "connection reset (nftables, ECONNRESET): a send was already waiting in "
                                  "tcp_sendmsg, or bytes queued (TCP Fast Open), when the connection was "
                                  "established, and would have gone on past the SQL/HTTP guard",
                g.UNJUDGED_RETRY: "SIGKILL at SSL_write: a write after one that failed (WANT_WRITE: part "
                                  "of it may have gone) that does not begin with the same bytes, or a failed "
                                  "write too big to check (192 KiB)",
                g.UNJUDGED_HUGE: "SIGKILL at SSL_write: a write of 2 GiB or more, past what the framing "
                                 "counts",
                g.UNJUDGED_HANDSHAKE: "SIGKILL at SSL_write: a TLS handshake inside SSL_write (no "
                                      "SSL_connect first), so the write was framed against the previous "
                                      "connection's state",
                g.UNJUDGED_SENDFILE: "SIGKILL at SSL_sendfile or SSL_write_early_data: plaintext the TLS "
                                     "guard does not see (kTLS, 0-RTT)",
                g.UNJUDGED_HELD: "connection reset (nftables, ECONNRESET): another sk_msg program holds the "
                                 "socket, so the SQL/HTTP guard cannot",
                g.UNJUDGED_TLS: "sk_msg drop (EACCES): Postgres over TLS sent from outside every OpenSSL "
                                "call the TLS guard reads (another TLS library: Go, Java, rustls, Node's; or "
                                "a libssl the guard is not on, such as a copy deleted from disk), so its "
                                "statements cannot be judged",
                g.UNJUDGED_GSS: "sk_msg drop (EACCES): Postgres with GSSAPI encryption, which no guard "
                                "reads",
                g.UNJUDGED_DEPTH: "sk_msg drop (EACCES): more HTTP requests in one send than the guard "
                                  "can judge (about eight), so the rest of it was not read",
                g.UNJUDGED_CUT: "sk_msg drop (EACCES): a request body that starts with an HTTP/1 request "
                                "line (or like one, cut at the end of its send), which a server that "
                                "reads no body takes, with what follows it, for requests the guard does "
                                "not frame",
                g.UNJUDGED_METHOD: ("SIGKILL at SSL_write" if rec.done == g.DONE_KILLED
                                    else "sk_msg drop (EACCES)")
                + ": an HTTP request line whose method the guard does not read (any token but 3 to 7 "
                  "capital letters: PROPFIND, M-SEARCH, get), so its host and path cannot be judged",
                g.UNJUDGED_HTTP2: ("SIGKILL at SSL_write" if rec.done == g.DONE_KILLED
                                   else "sk_msg drop (EACCES)")
                + ": HTTP/2 (its connection preface), whose requests are HPACK-coded frames the guard does "
                  "not read, in a session under an HTTP rule that denies or holds: use HTTP/1.1 (curl "
                  "--http1.1)",
                g.UNJUDGED_HELLO: "sk_msg drop (EACCES): a TLS ClientHello the guard cannot read whole "
                                  "(cut across records or sends, or over 4 KiB), which could open Postgres "
                                  "over TLS with no SSLRequest (PostgreSQL 17's direct TLS) and hide the "
                                  "ALPN that says so",
            }
            if rec.target == g.UNJUDGED_FULL:
                if rec.done == g.DONE_KILLED:
                    how = "SIGKILL at SSL_write: no room to frame another TLS stream"
                elif rec.h.pid == 0:
                    how = "connection reset (nftables, ECONNRESET): no room for another connection"
                else:
                    how = "EPERM at connect: no memory for the connection's guard state"
                why = f"{how} in the SQL/HTTP guard (it is full: probes.guard_connections)"
            else:
                why = unjudged.get(rec.target, "EPERM: TCP Fast Open (MSG_FASTOPEN or TCP_FASTOPEN_CONNECT), "
                                   "or a connect that is not connect() (io_uring, a 32-bit call), sends data "
                                   "before the socket reaches the SQL/HTTP guard")
            action = "kill" if rec.done == g.DONE_KILLED else "deny"
            prevented = True
            if rec.h.pid == 0:   # sock_ops: the connection is reset by the nftables rule, if it can be
                if base.k8s is not None:   # the rule is the daemon's network namespace's, not the pod's
                    prevented = False
                    why += "; not reset: the session is in a pod, whose network namespace has no such rule"
                elif self.quarantine is None:
                    prevented = False
                    why += "; nftables is unavailable, so nothing resets it (see the daemon's log)"
            self._verdict(base, action, "unjudged-send", subject, why, prevented,
                          since_boot_ns=rec.h.ts_boot_ns)
            if rec.target in (g.UNJUDGED_TLS, g.UNJUDGED_GSS, g.UNJUDGED_HELLO) and rec.h.pid:
                # the client sees only EACCES (or a failed handshake): say why on its terminal, or
                # on its parent's when it gave up at once
                told = (f"agentwarden: refused: {why}; use a client linked to the system's OpenSSL "
                        "(psql, libpq, psycopg) or sslmode=disable\n")
                proc = self.tracker.procs.get(rec.h.pid)
                if not self.effects.tell(rec.h.pid, told) and proc is not None and proc.ppid:
                    self.effects.tell(proc.ppid, told)
        elif rec.what in (g.G_SQL, g.G_SQL_TLS, g.G_HTTP, g.G_HTTP_TLS):
            self._on_refused(rec, base, rule, mech)
        elif rec.what in (g.G_RESUME, g.G_ESCAPED):
            self.stats["escapes"] += 1
            if rec.what == g.G_RESUME:
                target = ("it was killed at once (SIGKILL from the kernel, at the resume)"
                          if rec.action == "kill" else
                          "if it runs, it dies before its loader's first instruction or at its first "
                          "system call")
                mech = (f"SIGCONT to pid {rec.target}, stopped for a decision: " + target + "; "
                        + self._punish(rec, rec.done == g.DONE_KILLED, "sender"))
                killed = rec.h.session != 0 or rec.action == "kill"
            elif rec.target == g.ESCAPE_PTRACE:
                mech = (f"woke pid {rec.hash} from a ptrace stop while its exec waited for a decision: "
                        + ("it was killed at once (SIGKILL from the kernel, at the wakeup)"
                           if rec.done == g.DONE_KILLED else "it could not be killed here") + "; "
                        + self._punish(rec, rec.action == "kill", "tracer"))
                killed = rec.done == g.DONE_KILLED or rec.h.session != 0
            else:
                base.exec = ExecInfo(filename=base.process.exe)
                mech = ("ran while stopped for a decision: SIGKILL " +
                        ("before the dynamic loader's first instruction" if rec.target == g.ESCAPE_LOADER
                         else "at its first system call"))
                killed = rec.done == g.DONE_KILLED
            self._verdict(base, "kill" if killed else "audit", "tamper", "exec", mech,
                          killed, since_boot_ns=rec.h.ts_boot_ns)
        elif rec.what == g.G_SELF:
            sig = rec.target - 1000
            call = ("cgroup.freeze of the daemon's cgroup" if rec.target == g.SELF_FREEZE else
                    f"signal {signal.Signals(sig).name}" if 0 < sig < 65 and sig in signal.valid_signals()
                    else SYSCALLS.get(rec.target, str(rec.target)))
            killed = rec.done == g.DONE_KILLED
            if not killed and rec.h.session:   # an agent's, whose kernel signal could not go
                mech, killed = self._punish(rec, False, "sender"), True
            self._verdict(base, "kill" if killed else "audit", "self-protection", subject,
                          f"{mech if killed else 'seen'}: {call} aimed at the daemon", killed,
                          since_boot_ns=rec.h.ts_boot_ns)
        if rule is not None and rule.action == "quarantine":
            self._quarantine(rec.h.session, rule.duration_s, base)
        if rule is not None and rule.action == "kill" and rec.done == g.DONE_REFUSED:
            # the kernel refused the operation; `kill` also ends the process that tried
            self.effects.signal(rec.h.pid, None, signal.SIGKILL)

    def _punish(self, rec: g.Guard, by_kernel: bool, who: str) -> str:
        """An agent's process that resumed an exec waiting for its decision dies: by the kernel, or
        here when the kernel's deferred signal could not go (one per CPU at a time)."""
        if not rec.h.session:
            return f"the {who} is outside any agent session"
        if by_kernel:
            return f"the {who} was killed"
        self.effects.signal(rec.h.pid, None, signal.SIGKILL)
        return f"the {who} was killed (by the daemon: the kernel's signal could not go)"

    def _attach_tls(self, pid: int) -> None:
        """An exec the kernel stopped because its program file exports OpenSSL and has no uprobes
        yet: the daemon attaches them (and takes the file out of tls_unattached) before it resumes."""
        try:
            self.attach_tls(pid)
        except Exception:   # one file never keeps an exec stopped; its capture may miss TLS
            log.exception("attaching TLS uprobes to the program of pid %d", pid)

    def _decide_stopped_exec(self, rec: g.Guard, base: Event, cause_unread: bool = False) -> None:
        """An exec the kernel stopped before its first instruction: resume it, or kill it.

        `cause_unread`: its deadline passed before the main ring was read again (or an earlier
        daemon stopped it), so the LLM reply whose tool call asked for it may not be read: its
        cause is unknown (policy.caused_as), whatever the lineage would find.

        A hold is a refusal too: the command is killed, the request waits for a person, and
        once approved the same command (argv, program file, directory) may run again.  Nothing
        stays stopped while a person decides, so there is nothing for SIGCONT, `fg`, a
        debugger or a daemon restart to release.
        """
        pid, key = rec.h.pid, rec.h.session
        start = start_ticks(pid)
        if rec.target & g.EXEC_TLS:
            self._attach_tls(pid)
            if _only_tls(rec):   # no rule stopped it: the kernel's verdict (none, or allow) stands
                ancestors = self._ancestors(pid)
                self.effects.decided(pid)
                self.effects.signal(pid, start, signal.SIGCONT)
                if ancestors:   # a sudo above it stopped itself too
                    self._unstick.append((time.monotonic() + 2.0, ancestors, rec.h.ts_boot_ns))
                    self.unstick()
                return
        # The verdict ring is read ahead of capture, so the tracker may not have this
        # exec yet; the process is stopped before its first instruction, so /proc
        # holds exactly the argv, image and directory the kernel was given.
        seen, exe, cwd = _proc_view(pid)
        if seen:
            base.process.argv, base.process.exe = seen, exe or base.process.exe
            base.process.cwd = cwd or base.process.cwd
            base.process.pid = pid
        ancestors = self._ancestors(pid)
        exec_ev = replace(base, kind="exec", process=replace(base.process))
        # what the file is (a copy, link, memfd, loader or multi-call binary is the program it runs)
        program = self.programs.classify(pid, list(base.process.argv)) if seen else None
        aliases: tuple[str, ...] = ()
        if program is not None:
            aliases = program.aliases
            if program.exe:
                exec_ev.process.exe, exec_ev.process.argv = program.exe, list(program.argv)
            if program.cacheable and program.key is not None:
                self.effects.add_program(program.key, program.bits)
        if self.policy.uses_cause:   # the tool call that asked for it, if one did (when.cause)
            # behind, the newest tool call may be unread: one found is an older one of the same
            # text, not necessarily what asked for it now (red team: an older reply of another model)
            exec_ev.cause = CauseInfo(match=CAUSE_UNKNOWN) if cause_unread else self.cause_of(exec_ev)
        verdict = decide(self.policy, exec_ev, self._groups.of(person(exec_ev.identity)), self._workdir(key),
                         aliases, _parent_of(pid, self.programs, bool(rec.target & 1)))
        argv = tuple(base.process.argv)
        ident = exec_ident(pid) if seen else 0
        if rec.hash and ident and rec.hash != ident:
            # the kernel and this module must agree, or approved retries would never match
            log.error("exec identity mismatch for pid %d: kernel %#x, userspace %#x", pid, rec.hash, ident)
        ident = rec.hash or ident
        allow_key = f"exec:{base.session_id}:{ident}"
        mech = "SIGSTOP at exec, decided in userspace"
        if exec_ev.cause is not None and exec_ev.cause.match == CAUSE_UNKNOWN:
            mech += (f"; its cause unknown: the capture was over {DEFER_S:g} s behind (or an earlier daemon "
                     "stopped it), so the tool call that asked for it may be unread")
        try:
            if verdict.action == "hold" and ident and self.approvals.allowed(allow_key, consume=True):
                self.effects.decided(pid)
                self.effects.signal(pid, start, signal.SIGCONT)
                self._verdict(base, "allow", verdict.rule, "exec", mech + " (approved earlier)", False,
                              since_boot_ns=rec.h.ts_boot_ns)
                return
            if verdict.action in ("allow", "audit"):
                if self._judged_transport(exec_ev, key, aliases, pid):
                    self.effects.judge_transport(pid, rec.h.ts_boot_ns)
                self.effects.decided(pid)
                self.effects.signal(pid, start, signal.SIGCONT)
                if verdict.rule:
                    self._verdict(base, verdict.action, verdict.rule, "exec", mech, False,
                                  since_boot_ns=rec.h.ts_boot_ns)
                return
            rule = next(r for r in self.policy.rules if r.name == verdict.rule)
            if verdict.action == "hold":
                req = self.approvals.find_pending(
                    lambda r: r.session_id == base.session_id and r.target.get("ident") == ident)
                if req is None:
                    req = self.approvals.request(
                        rule=rule.name, kind="exec", summary=self.mask_text(" ".join(argv)),
                        session_id=base.session_id, agent=base.agent, launcher=person(base.identity),
                        approvers=rule.approvers, timeout_s=rule.timeout_s,
                        target={"ident": ident, "pid": pid, "lineage": self._lineage(key)}, code=rule.code)
                told = self.effects.tell(pid, self._hold_message(req, rule))
                self.effects.signal(pid, start, signal.SIGKILL)
                self.effects.decided(pid)
                self._verdict(base, "hold", rule.name, "exec", mech + ", refused until approved (SIGKILL)"
                              + ("" if told else "; the agent's stderr could not be written"), True, req.id,
                              since_boot_ns=rec.h.ts_boot_ns)
                return
            self.effects.signal(pid, start, signal.SIGKILL)
            self.effects.decided(pid)
            self._verdict(base, verdict.action, verdict.rule, "exec", mech, True,
                          since_boot_ns=rec.h.ts_boot_ns)
            if verdict.action == "quarantine":
                self._quarantine(key, rule.duration_s, base)
        finally:
            if ancestors:
                self._unstick.append((time.monotonic() + 2.0, ancestors, rec.h.ts_boot_ns))
                self.unstick()

    def _judged_transport(self, exec_ev: Event, key: int, aliases: tuple[str, ...], pid: int) -> bool:
        """The exec runs only because a rule's parent_unless held (without its parent the rule
        would hold it: git's own helper, started and fed by a judged push), and nothing in its
        environment loads code of the agent's into it.  HTTP rules with unless_judged_transport
        let such a process through (its refspecs are its judged parent's)."""
        if not any(r.http_unless_transport for r in self.policy.rules):
            return False
        alone = decide(self.policy, exec_ev, self._groups.of(person(exec_ev.identity)), self._workdir(key),
                       aliases, None)
        rule = next((r for r in self.policy.rules if r.name == alone.rule), None)
        if rule is None or not rule.exec_parent_unless or alone.action not in DENYING:
            return False
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            return False
        # code of the agent's loaded into it, or configuration of the agent's in the environment
        # (red team: http.extraHeader with line breaks ended git's headers early and sent the
        # agent's ref update as the body)
        if any(k.startswith((b"LD_", b"GIT_CONFIG")) for k in env):
            return False
        return not _git_config_shapes_requests(pid, env)

    def _hold_message(self, req: Request, rule: Rule) -> str:
        who = ", ".join(f"self ({req.launcher})" if a == "self" else a for a in req.approvers)
        code = " --code CODE (sent to the approvers out of band)" if req.target.get("code") else ""
        return (f"agentwarden: refused, held for approval: {req.summary}\n"
                f"agentwarden: request {req.id} (rule {rule.name}); approvers: {who}; "
                f"expires in {rule.timeout_s}s\n"
                f"agentwarden: an approver runs `agentwarden approve {req.id}{code}`, "
                f"then the same command may be run again\n"
                + (f"agentwarden: {rule.hint}\n" if rule.hint else ""))

    def _lineage(self, key: int) -> dict[str, object]:
        """The requesting agent's root and its ancestors, for judging who may approve later."""
        s = self.tracker.sessions.get(key) or self._known.get(key)
        return callers.lineage(s.root_pid) if s is not None else {}

    def _ancestors(self, pid: int) -> list[int]:
        """The process's ancestors inside agent sessions (at most 16), nearest first."""
        out: list[int] = []
        p = callers.proc(pid)
        while p is not None and p.ppid > 1 and len(out) < 16 and self.effects.is_tracked(p.ppid):
            out.append(p.ppid)
            p = callers.proc(p.ppid)
        return out

    @returns_events
    def unstick(self) -> None:
        """Resume ancestors that stopped because a decision stopped their child.

        sudo, su and runuser stop themselves when the command they wait for stops, and
        nothing would resume them.  Only a stop signalled after the decision stop began
        (the kernel's stopped_at) is undone, and only for two seconds after it.
        """
        if not self._unstick:
            return
        now = time.monotonic()
        keep = []
        deciding = self.effects.deciding()
        for deadline, pids, since in self._unstick:
            for p in pids:
                # never one stopped for its own decision (red team: a parent that exec'd a denied
                # program, then was sent a SIGSTOP of its own, was resumed past its decision)
                if p not in deciding and self.effects.stopped_at(p) >= since and _state(p) == "T":
                    log.info("resuming pid %d, stopped because its child was stopped for a decision", p)
                    self.effects.signal(p, None, signal.SIGCONT)
            if deadline > now:
                keep.append((deadline, pids, since))
        self._unstick = keep

    @returns_events
    def readopt(self) -> None:
        """Execs an earlier daemon stopped and never decided (the stop map is pinned in bpffs).

        Still stopped: decided now.  Running: someone resumed it while no daemon watched, so
        it is killed and recorded.  Gone: forgotten.
        """
        with self._lock:
            held = {pid for _, pid, _, _, _ in self._login_wait.values()}
            for pid, since in self.effects.deciding().items():
                if pid in held:
                    continue   # a session root held for its person's login (session_started re-held it)
                state = _state(pid)
                started = start_ticks(pid)
                if started is not None and started * 1_000_000_000 // CLK_TCK > since:
                    state = ""   # the pid was reused: the stopped process is gone
                key = self.effects.session_of(pid)
                h = pr.RawHeader(pid=pid, tid=pid, uid=0, gid=0, profile=0, ts_boot_ns=since,
                                 session=key or 0, cgroup=0, comm="")
                rec = g.Guard(h, g.G_EXEC, g.DONE_STOPPED, -1, "", 0, 0, "", b"")
                base = self._base(rec)
                seen, exe, cwd = _proc_view(pid)
                base.process.argv, base.process.exe, base.process.cwd = seen, exe, cwd
                base.exec = ExecInfo(filename=exe)
                if state in ("", "Z", "X"):
                    self.effects.decided(pid)
                    self._verdict(base, "audit", "tamper", "exec", "left undecided when no daemon was "
                                  "running; the process is gone: it may have run unchecked", False)
                    continue
                if state == "T" and key is not None:
                    log.warning("deciding pid %d, stopped for a decision before this daemon started", pid)
                    # the LLM reply that asked for it was read (if at all) by the earlier daemon
                    self._decide_stopped_exec(rec, base, cause_unread=self.policy.uses_cause)
                    continue
                self.effects.signal(pid, None, signal.SIGKILL)
                self.effects.decided(pid)
                self.stats["escapes"] += 1
                self._verdict(base, "kill", "tamper", "exec", "resumed while no daemon was deciding it: "
                              "SIGKILL at daemon start", False)

    def _on_refused(self, rec: g.Guard, base: Event, rule: Rule | None, mech: str) -> None:
        """A statement or request the kernel stopped: record it, close its connection, maybe hold it."""
        if rec.what in (g.G_SQL, g.G_SQL_TLS):
            subject = "sql"
            stmts = [st for t in pg_texts(rec.text) for st in sqlnorm.statements(t)]
            hit = next((st for st in stmts if st.hash == rec.hash), None)
            base.sql = SqlInfo(query=self.mask_text(hit.text if hit else "; ".join(st.text for st in stmts)))
            summary = base.sql.query
            twin_agrees = hit is not None
        else:
            subject = "http"
            http = base.http = request_line(rec.text, rec.what == g.G_HTTP_TLS)
            twin_agrees = request_key(http) == rec.hash
            http.query = self.mask_text(http.query)
            summary = self.mask_text(f"{http.method} {http.host}{http.path}")
        if rec.hash and not twin_agrees:
            # the kernel's hash is what an approval lets through and what enforce/sqlnorm.py or
            # request_key() must find again after the fact: they disagree, or the statement lies
            # past the bytes the record carries (tests/test_enforce.py holds a corpus to 0)
            self.stats["twin_hash_unmatched"] += 1
            log.warning("the kernel's %s hash %#x matches nothing Python reads in the same bytes",
                        subject, rec.hash)
        approval_id = ""
        if rule is not None and rule.action == "hold" and rec.hash:
            # approving lets this exact statement or request through for the session
            key = rec.h.session
            pending = self.approvals.find_pending(
                lambda r: r.session_id == base.session_id and r.target.get("hash") == rec.hash)
            if pending is None:
                pending = self.approvals.request(
                    rule=rule.name, kind=subject, summary=summary, session_id=base.session_id,
                    agent=base.agent, launcher=person(base.identity), approvers=rule.approvers,
                    timeout_s=rule.timeout_s, target={"session": key, "hash": rec.hash,
                                                      "lineage": self._lineage(key)}, code=rule.code)
            approval_id = pending.id
        decided = boot_ns()
        if rec.done == g.DONE_REFUSED and rec.addr:
            local, remote = _ports(rec.target)
            if self.effects.close_tcp(rec.addr, local, remote):
                mech += ", connection closed"
        self._verdict(base, rec.action, rule.name if rule else "", subject, mech, True, approval_id,
                      since_boot_ns=rec.h.ts_boot_ns, at_boot_ns=decided)

    # ---- after the fact ------------------------------------------------------------------

    def stage(self, ev: Event) -> Event | list[Event]:
        """Pipeline stage (before masking): the event, or the event followed by the verdicts of what
        the kernel could not judge (they pass the stages after this one)."""
        made = self._judge(ev)
        return [ev, *made] if made else ev

    @returns_events
    def session_started(self, s: Session) -> None:
        """The tracker's announcement (core.sessions.SessionListener): the kernel gets the session's
        rules and mark."""
        with self._lock:
            if s.key not in self._slots:
                self._program_session(s.key, s)
            if s.key >> 63 and s.key not in self._judged_sessions:
                # found running at daemon start (seed keys have the top bit): the kernel did not
                # hold it; one the kernel started is judged at its hold record (on_guard)
                self._refuse_session(s.key, s.root_pid, s.root.uid if s.root else -1, False, None)

    def process_joined(self, pid: int) -> None:
        """A process the agent attached to brings the sockets it had: into the guard with them."""
        self.guard_existing([pid])

    @returns_events
    def session_ended(self, s: Session) -> None:
        """The kernel forgets the session now (it has no process left).  Its key, mark and
        approvals stay a minute (tick): what its last process sent and was drained at its exit
        is judged after this call, in the events that came before its `session_end`."""
        with self._lock:
            held = self._login_wait.pop(s.key, None)
            if held is not None:
                self.effects.decided(held[1])
            if self._ids.get(s.id) == s.key and all(k != s.key for _, k in self._ended):
                self.effects.drop_session(s.key)
                self._ended.append((time.monotonic(), s.key))

    @returns_events
    def _judge(self, ev: Event) -> None:
        if ev.kind == "llm" and ev.http is not None:
            # an LLM call is an HTTP request: every HTTP rule holds for it (red team: a request shaped
            # like one, to any host, skipped the HTTP rules the kernel does not judge)
            ev = replace(ev, kind="http")
        if ev.kind not in ("exec", "connect", "sql", "http") or not self.policy.rules:
            return
        if ev.kind == "exec" and ev.exec is not None and ev.exec.errno is not None:
            return
        with self._lock:
            try:
                self._after(ev)
            except Exception:
                log.exception("policy evaluation failed on %s event", ev.kind)

    def _after(self, ev: Event) -> None:
        verdict = decide(self.policy, ev, self._groups.of(person(ev.identity)),
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
        if (ev.kind == "http" and self.policy.rules[index].http_unless_transport and ev.process is not None
                and self.effects.judged_transport(ev.process.pid)):
            return          # git's own helper, as the kernel let it through
        key = self._session_key(ev.session_id)
        if key is not None and (ev.sql is not None or ev.http is not None):
            # what a person approved for this session passes here as it passed the kernel
            hashes = ({st.hash for st in sqlnorm.statements(ev.sql.query)} if ev.sql is not None
                      else {request_key(ev.http)} if ev.http is not None else set())
            if any(self.approvals.allowed(f"op:{ev.session_id}:{h}") for h in hashes):
                self._verdict(ev, "allow", verdict.rule, ev.kind, "approved earlier", False)
                return
        self.stats["after_the_fact"] += 1
        rule = self.policy.rules[index]
        if verdict.action == "quarantine":
            if key is not None:
                self._quarantine(key, rule.duration_s, ev)
            mech = "nftables quarantine after the fact"
        elif key is not None and self.effects.session_of(ev.process.pid) == key:
            self.effects.signal(ev.process.pid, None, signal.SIGKILL)
            mech = "SIGKILL after the fact"
        else:
            # the process has ended, and its pid may be another's now (outside the session, or none
            # of the kernel's): a kill by number would reach the wrong process
            mech = "after the fact: the process had already ended, nothing was killed"
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
            self._quarantined[Quarantine.mark_for(slot)] = time.monotonic() + duration_s if duration_s else 0
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
            self._quarantined.pop(mark, None)
            return self.quarantine.release(mark)

    # ---- approvals -------------------------------------------------------------------------

    def approve(self, request_id: str, caller: Caller, for_s: int | None, code: str = "") -> Request:
        with self._lock:
            req = self.approvals.approve(request_id, caller, for_s, code)
            self._carry_out(req)
            return req

    def deny(self, request_id: str, caller: Caller) -> Request:
        with self._lock:
            req = self.approvals.deny(request_id, caller)
            self._carry_out(req)
            return req

    def tamper(self, what: str) -> None:
        """Record tampering with the daemon or its guards that was undone (or could not be)."""
        ev = Event(kind="verdict", ts_ns=time.time_ns(), host=self.tracker.host,
                   process=Process(pid=os.getpid()))
        self._verdict(ev, "audit", "tamper", "daemon", what, False)
        log.warning("tampering: %s", what)

    @returns_events
    def check_quarantine(self) -> None:
        """The nftables table as the daemon left it: rules and live quarantines put back if a
        root agent (or anyone) deleted them.  Checked every second (a netlink monitor would be
        immediate; see README)."""
        now = time.monotonic()
        self._quarantined = {m: t for m, t in self._quarantined.items() if t == 0 or t > now}
        if self.quarantine is None or not (self._quarantined or self.plan.quarantines):
            return   # a policy that never quarantines has nothing in the table to protect
        try:
            rules_restored = self.quarantine.ensure()
            live = {e.mark for e in self.quarantine.entries() if not e.dst}
            lost = [m for m in self._quarantined if m not in live]
            for m in lost:
                t = self._quarantined[m]
                self.quarantine.session(m, max(1, int(t - now)) if t else 0)
        except QuarantineError as e:
            log.error("cannot check the nftables quarantine: %s", e)
            return
        if rules_restored or lost:
            self.tamper(f"nftables table inet {self.quarantine.table} was changed: rules restored"
                        f"{f', {len(lost)} quarantined session(s) put back' if lost else ''}")

    @returns_events
    def tick(self) -> None:
        with self._lock:
            for req in self.approvals.expire():
                self._carry_out(req)
            now = time.monotonic()
            for key, (deadline, pid, since, start, _) in list(self._login_wait.items()):
                if deadline <= now:
                    del self._login_wait[key]
                    self.effects.signal(pid, start, signal.SIGKILL)
                    self.effects.decided(pid)
                    ev = self.tracker.event_for_pid("verdict", pid, time.time_ns()) or \
                        Event(kind="verdict", ts_ns=time.time_ns(), host=self.tracker.host,
                              process=Process(pid=pid))
                    self._verdict(ev, "deny", IDENTITY_RULE, "session",
                                  "the held agent's root killed: nobody logged in before the timeout", True,
                                  since_boot_ns=since)
            while self._ended and time.monotonic() - self._ended[0][0] > 60:
                key = self._ended.pop(0)[1]
                s = self._known.pop(key, None)
                self._slots.pop(key, None)
                if s is not None and self._ids.get(s.id) == key:
                    del self._ids[s.id]

    def identity_bound(self, uid: int) -> None:
        """A person logged in (core.identity.Bindings listener, on a control thread): their sessions
        held for it take the binding, are judged again by every session rule (the login may make
        another one refuse them: an `as_root` kill, a rule about this email), and start."""
        with self._lock:
            for key, (_, pid, since, start, root_uid) in list(self._login_wait.items()):
                s = self.tracker.sessions.get(key)
                if s is None or person_uid(s.identity.uid, s.identity.login_uid) != uid:
                    continue   # another person's (or nobody's login: never released by one)
                s = self.tracker.rebind(key)
                if s is None or not s.identity.verified:
                    continue
                del self._login_wait[key]
                self._program_session(key, s)
                if self._refuse_session(key, pid, root_uid, True, since):
                    self.effects.decided(pid)
                    continue
                ev = self.tracker.event_for_pid("verdict", pid, time.time_ns())
                if ev is not None:
                    self._verdict(ev, "resume", IDENTITY_RULE, "session",
                                  f"SIGCONT: {s.identity.email or s.identity.sub} logged in", True,
                                  since_boot_ns=since)
                self.effects.decided(pid)
                self.effects.signal(pid, start, signal.SIGCONT)

    def login_waiting(self) -> set[int]:
        """Roots held for their person's login: they have not run an instruction."""
        with self._lock:
            return {pid for _, pid, _, _, _ in self._login_wait.values()}

    def _carry_out(self, req: Request) -> None:
        """Act on a decided request: let the same command, statement or request through again."""
        if req.state != "approved":
            return
        if req.kind == "exec" and req.target.get("ident"):
            # no --for: the one retry, within the retry window; --for: any number of times until then
            for_s = req.approved_for_s or self.sql_approval_s
            uses = -1 if req.approved_for_s else 1
            ident = int(req.target["ident"])
            self.approvals.allow(f"exec:{req.session_id}:{ident}", time.time() + for_s, uses)
            key = self._ids.get(req.session_id)
            if key is not None:
                self.effects.allow_exec(key, ident, boot_ns() + for_s * 1_000_000_000, uses)
        elif req.kind in ("sql", "http"):
            h = int(req.target["hash"])
            for_s = req.approved_for_s or self.sql_approval_s
            self.approvals.allow(f"op:{req.session_id}:{h}", time.time() + for_s)
            key = self._ids.get(req.session_id)
            if key is not None:
                self.effects.allow_statement(key, h, boot_ns() + for_s * 1_000_000_000)

    def _on_approval(self, req: Request) -> None:
        """Every state of every request is an audit event; a new one is also announced."""
        ev = Event(kind="approval", ts_ns=time.time_ns(), host=self.tracker.host, session_id=req.session_id,
                   agent=req.agent,
                   approval=ApprovalInfo(id=req.id, state=req.state, rule=req.rule, subject=req.kind,
                                         summary=req.summary, approvers=list(req.approvers),
                                         decided_by=req.decided_by, approved_for_s=req.approved_for_s,
                                         expires=format_ts(int(req.expires * 1e9)), auth=req.auth))
        key = self._session_key(req.session_id)
        s = self.tracker.sessions.get(key) if key is not None else None
        if s is not None:
            ev.identity, ev.k8s = s.identity, s.k8s
        pid = req.target.get("pid")
        if isinstance(pid, int):
            ev.process.pid = pid
        self._emit(ev)
        if req.state == "pending" and self.notify is not None:
            try:
                self.notify(req)
            except Exception:
                log.exception("approval notification failed")

"""Track stage: raw probe records in, contract events out.

Keeps the user-space picture of every tracked process (parent, image, argv,
cwd) and of every session (its root and the launching identity), so each event
leaves here whole: who launched the agent, which process, what it ran.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from agentwarden.core import identity, procfs
from agentwarden.core.events import (
    Event,
    ExecInfo,
    HttpInfo,
    K8sInfo,
    Kind,
    LlmInfo,
    LostInfo,
    NetInfo,
    Process,
    SqlInfo,
)
from agentwarden.core.sessions import Proc, Session, SessionListener
from agentwarden.daemon.profiles import Profile, Profiles
from agentwarden.probes import process as pr

log = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")
# execvp() tries each $PATH entry in turn; these errors there mean "try the next".
_SEARCH_ERRNOS = {errno_mod.ENOENT, errno_mod.ENOTDIR, errno_mod.EACCES}
FAILED_EXEC_HOLD_NS = 300_000_000


class Parts(NamedTuple):
    """The parts of an event the tracker does not fill itself (session and process it does)."""

    exec: ExecInfo | None = None
    net: NetInfo | None = None
    sql: SqlInfo | None = None
    http: HttpInfo | None = None
    llm: LlmInfo | None = None


@dataclass
class _PendingFail:
    args: pr.ExecArgs | None
    h: pr.RawHeader
    errno: int
    seen_ns: int


class Tracker:
    """Turns RawEvents into Events.  Not thread-safe: runs on the probe thread."""

    def __init__(self, host: str, profiles: Profiles,
                 untrack_session: Callable[[int], object],
                 clock_offset_ns: int | None = None,
                 track: Callable[[int, int, int], object] | None = None,
                 bindings: identity.Bindings | None = None,
                 pod_of: Callable[[int], K8sInfo | None] | None = None) -> None:
        """`track(pid, session, profile)`: make the kernel count a process in a session (a
        process an agent attached to by one of its thread ids, which the kernel joined as is).
        `bindings`: identity-provider logins, frozen into each session at its start; `pod_of(pid)`:
        the Kubernetes pod a process runs in (daemon/k8s.py)."""
        self.host = host
        self.bindings = bindings
        self.pod_of = pod_of
        self.profiles = profiles
        self._untrack_session = untrack_session
        self._track = track
        self.offset = clock_offset_ns if clock_offset_ns is not None else pr.boot_clock_offset_ns()
        self.sessions: dict[int, Session] = {}
        self.listeners: list[SessionListener] = []   # told of each session's start and end
        self.procs: dict[int, Proc] = {}
        self._args: dict[int, pr.ExecArgs] = {}
        self._fails: dict[int, _PendingFail] = {}
        self._rejected: set[int] = set()
        self._early: dict[int, list[pr.RawEvent]] = {}   # pid -> records read at its exec, before its session
        self._suspects: set[int] = set()

    # ---- helpers -------------------------------------------------------------

    def _wall(self, boot_ns: int) -> int:
        return boot_ns + self.offset

    def _event(self, kind: Kind, s: Session | None, p: Proc | None, ts_ns: int, parts: Parts) -> Event:
        ev = Event(kind=kind, ts_ns=ts_ns, host=self.host, exec=parts.exec, net=parts.net, sql=parts.sql,
                   http=parts.http, llm=parts.llm)
        if s is not None:
            ev.session_id = s.id
            ev.agent = s.agent
            ev.identity = s.identity
            ev.k8s = s.k8s
            s.events += 1
        if p is not None:
            ev.process = Process(pid=p.pid, ppid=p.ppid, uid=p.uid, exe=p.exe, argv=list(p.argv), cwd=p.cwd)
        return ev

    def _proc(self, h: pr.RawHeader) -> Proc:
        """The tracked process of a record; created from the record if a fork was missed."""
        p = self.procs.get(h.pid)
        if p is None:
            snap = procfs.snapshot(h.pid)
            p = Proc(pid=h.pid, ppid=snap.ppid if snap else 0, session=h.session, uid=h.uid,
                     exe=snap.exe if snap else "", argv=snap.argv if snap else [],
                     cwd=snap.cwd if snap else "")
            self.procs[h.pid] = p
            s = self.sessions.get(h.session)
            if s is not None:
                s.live.add(h.pid)
        return p

    def event_for(self, kind: Kind, h: pr.RawHeader, *, exec: ExecInfo | None = None,
                  net: NetInfo | None = None, sql: SqlInfo | None = None,
                  http: HttpInfo | None = None, llm: LlmInfo | None = None) -> Event | None:
        """An event about the process of a probe record, with its session's identity."""
        if h.session in self._rejected:
            return None
        p = self._proc(h)
        s = self.sessions.get(p.session)
        if s is None:
            return None
        return self._event(kind, s, p, self._wall(h.ts_boot_ns), Parts(exec, net, sql, http, llm))

    def event_for_pid(self, kind: Kind, pid: int, ts_ns: int, *, exec: ExecInfo | None = None,
                      net: NetInfo | None = None, sql: SqlInfo | None = None,
                      http: HttpInfo | None = None, llm: LlmInfo | None = None) -> Event | None:
        p = self.procs.get(pid)
        s = self.sessions.get(p.session) if p else None
        if p is None or s is None:
            return None
        return self._event(kind, s, p, ts_ns, Parts(exec, net, sql, http, llm))

    def wall(self, boot_ns: int) -> int:
        return self._wall(boot_ns)

    # ---- sessions ------------------------------------------------------------

    def start_session(self, key: int, profile: Profile, snap: procfs.ProcSnapshot | None,
                      pid: int, uid: int, filename: str, ts_ns: int, out: list[Event],
                      pod: K8sInfo | None = None) -> Event:
        """A new session: its `session_start` event goes to `out`, then what each listener made of
        it (the enforcer programs the kernel for it, or refuses it); that event is returned."""
        start_ticks = snap.start_ticks if snap else (ts_ns - self.offset) * CLK_TCK // 1_000_000_000
        s = Session(
            key=key,
            id=procfs.session_id(self.host, pid, start_ticks),
            agent=profile.name,
            identity=identity.of_process(uid, snap, self.bindings),
            root_pid=pid,
            start_ns=ts_ns,
            k8s=pod if pod is not None else self._pod(pid),
        )
        self.sessions[key] = s
        p = Proc(pid=pid, ppid=snap.ppid if snap else 0, session=key, uid=uid,
                 exe=(snap.exe if snap and snap.exe else filename),
                 argv=(snap.argv if snap and snap.argv else [filename]),
                 cwd=snap.cwd if snap else "", exec_ns=ts_ns, execd=True, filename=filename)
        self.procs[pid] = p
        s.root = p
        s.live.add(pid)
        log.info("session %s started: agent %s pid %d user %s", s.id, s.agent, pid, s.identity.user)
        ev = self._event("session_start", s, p, ts_ns, Parts(exec=ExecInfo(filename=filename)))
        out.append(ev)
        for listener in self.listeners:
            out += listener.session_started(s)
        return ev

    def _pod(self, pid: int) -> K8sInfo | None:
        if self.pod_of is None:
            return None
        try:
            return self.pod_of(pid)
        except Exception:   # a pod lookup must never cost a session its start
            log.exception("pod lookup for pid %d failed", pid)
            return None

    def rebind(self, key: int) -> Session | None:
        """A session held for its person's login (identity.require): its identity again, now that
        a binding may exist.  Its root has not run an instruction yet, so freezing it now is
        still freezing it at the start."""
        s = self.sessions.get(key)
        if s is None or self.bindings is None:
            return s
        s.identity = identity.with_binding(s.identity, self.bindings.of(s.identity.uid, s.identity.login_uid))
        return s

    def seed(self, snap: procfs.ProcSnapshot, profile: Profile, descendants: list[procfs.ProcSnapshot],
             key: int) -> list[Event]:
        """A session whose agent was already running when the daemon started."""
        now = time.time_ns()
        out: list[Event] = []
        self.start_session(key, profile, snap, snap.pid, snap.uid, snap.exe, now, out)
        s = self.sessions[key]
        for d in descendants:
            self.procs[d.pid] = Proc(pid=d.pid, ppid=d.ppid, session=key, uid=d.uid, exe=d.exe,
                                     argv=d.argv, cwd=d.cwd)
            s.live.add(d.pid)
        return out

    def _end_if_empty(self, s: Session, ts_ns: int, out: list[Event]) -> None:
        if s.live:
            return
        out.append(self._event("session_end", s, s.root, ts_ns, Parts(exec=s.root_exit)))
        log.info("session %s ended (%d events)", s.id, s.events)
        del self.sessions[s.key]
        for listener in self.listeners:
            out += listener.session_ended(s)

    # ---- records ---------------------------------------------------------------

    def handle(self, raw: pr.RawEvent) -> list[Event]:
        out: list[Event] = []
        h = raw.h
        if h.session in self._rejected:
            return out
        if h.session not in self.sessions and not isinstance(raw, pr.SessionExec):
            # the directory and arguments read at a session root's exec come before its
            # session record: kept for it, not a session to adopt
            if isinstance(raw, pr.ExecArgs) or (isinstance(raw, pr.Chdir) and raw.absolute):
                self._early.setdefault(h.pid, []).append(raw)
                if len(self._early) > 1024:
                    self._early.pop(next(iter(self._early)))
                return out
            # a record of a session we never saw start (its record was lost): adopt it
            if not self._adopt(h, out):
                return out
        fail = self._fails.pop(h.tid, None)
        if fail is not None:
            same_search = (isinstance(raw, pr.ExecArgs) and fail.args is not None
                           and raw.argv == fail.args.argv)
            # the next $PATH candidate or a successful exec supersedes a held failure; the
            # directory read at an exec comes before its arguments and decides nothing yet;
            # anything else settles it
            if isinstance(raw, pr.Chdir) and raw.absolute:
                self._fails[h.tid] = fail
            elif not same_search and not isinstance(raw, pr.Exec):
                out.append(self._failed_exec(fail))

        if isinstance(raw, pr.SessionExec):
            self._on_session_exec(raw, out)
        elif isinstance(raw, pr.Fork):
            self._on_fork(raw)
        elif isinstance(raw, pr.ExecArgs):
            self._args[h.tid] = raw
        elif isinstance(raw, pr.Exec):
            self._on_exec(raw, out)
        elif isinstance(raw, pr.ExecFail):
            # no exec, so no directory read by the kernel: the process is still there to ask
            # (chdir is not traced; a shell's `cd` before a failed command must show)
            now = procfs.cwd(h.pid)
            if now:
                self._proc(h).cwd = now
            self._fails[h.tid] = _PendingFail(self._args.pop(h.tid, None), h, raw.errno, time.monotonic_ns())
            if raw.errno not in _SEARCH_ERRNOS:
                out.append(self._failed_exec(self._fails.pop(h.tid)))
        elif isinstance(raw, pr.Exit):
            self._on_exit(raw, out)
        elif isinstance(raw, pr.Chdir):
            self._on_chdir(raw)
        return out

    def _adopt(self, h: pr.RawHeader, out: list[Event]) -> bool:
        """Start a session from a mid-stream record (its session_start was lost)."""
        if h.profile >= len(self.profiles):
            return False
        root = h.pid
        snap = procfs.snapshot(root)
        self.start_session(h.session, self.profiles[h.profile], snap, root, h.uid,
                           snap.exe if snap else "", self._wall(h.ts_boot_ns), out)
        return True

    def _on_session_exec(self, raw: pr.SessionExec, out: list[Event]) -> None:
        h = raw.h
        snap = procfs.snapshot(h.pid)
        exe = snap.exe if snap and snap.exe else raw.filename
        argv = snap.argv if snap and snap.argv else [raw.filename]
        profile = None
        pod = self._pod(h.pid)
        if h.profile < len(self.profiles):
            candidate = self.profiles[h.profile]
            profile = (candidate if candidate.matches(h.comm, exe, argv, pod)
                       else self.profiles.match(h.comm, exe, argv, pod))
        if profile is None:
            # comm matched in the kernel, exe/cmdline did not: not an agent
            self._rejected.add(h.session)
            self._early.pop(h.pid, None)
            self._untrack_session(h.session)
            log.debug("pid %d (%s) matched an agent comm but not its profile", h.pid, h.comm)
            return
        self._args.pop(raw.old_pid, None)
        early = self._early.pop(h.pid, [])
        ev = self.start_session(h.session, profile, snap, h.pid, h.uid, raw.filename,
                                self._wall(h.ts_boot_ns), out, pod=pod)
        root = self.procs[h.pid]
        for r in early:   # what the kernel read at the exec: exact, where /proc may have moved on
            if isinstance(r, pr.ExecArgs) and r.argv:
                root.argv = list(r.argv)
                ev.process.argv = list(r.argv)
            elif isinstance(r, pr.Chdir) and r.path:
                root.cwd = ev.process.cwd = r.path

    def _on_fork(self, raw: pr.Fork) -> None:
        parent = self._proc(raw.h)
        snap = procfs.snapshot(raw.child) if raw.joined else None
        if snap is not None:   # a running process the agent attached to: it is what /proc says
            if snap.tgid != raw.child and self._track is not None:
                # ptrace and process_vm_writev take a thread id, and the kernel joined that number:
                # the process it belongs to is what runs on (a few ms later than the kernel's join)
                self._track(snap.tgid, parent.session, raw.h.profile)
                self.procs[snap.tgid] = Proc(pid=snap.tgid, ppid=snap.ppid, session=parent.session,
                                             uid=snap.uid, exe=snap.exe, argv=snap.argv, cwd=snap.cwd)
                self.sessions[parent.session].live.add(snap.tgid)
            self.procs[raw.child] = Proc(pid=raw.child, ppid=snap.ppid, session=parent.session, uid=snap.uid,
                                         exe=snap.exe, argv=snap.argv, cwd=snap.cwd)
        else:
            self.procs[raw.child] = Proc(pid=raw.child, ppid=parent.pid, session=parent.session,
                                         uid=raw.h.uid, exe=parent.exe, argv=list(parent.argv),
                                         cwd=parent.cwd)
        self.sessions[parent.session].live.add(raw.child)
        if snap is not None:
            for listener in self.listeners:
                listener.process_joined(snap.tgid)

    def _on_exec(self, raw: pr.Exec, out: list[Event]) -> None:
        h = raw.h
        args = self._args.pop(raw.old_pid, None) or self._args.pop(h.tid, None)
        if raw.old_pid != h.pid:   # a non-leader thread exec'd: it became the leader
            self._args.pop(h.pid, None)
        p = self._proc(h)
        filename = raw.filename
        if not os.path.isabs(filename) and p.cwd:
            filename = os.path.normpath(os.path.join(p.cwd, filename))
        p.exe = filename
        p.filename = raw.filename
        p.argv = list(args.argv) if args else [raw.filename]
        p.uid = h.uid
        p.execd = True
        p.exec_ns = self._wall(h.ts_boot_ns)
        s = self.sessions[p.session]
        out.append(self._event("exec", s, p, p.exec_ns, Parts(exec=ExecInfo(
            filename=raw.filename, argv_truncated=bool(args.truncated) if args else False))))

    def _failed_exec(self, f: _PendingFail) -> Event:
        p = self._proc(f.h)
        s = self.sessions[p.session]
        argv = list(f.args.argv) if f.args else []
        filename = f.args.filename if f.args else ""
        proc = Proc(pid=p.pid, ppid=p.ppid, session=p.session, uid=f.h.uid, exe=filename, argv=argv,
                    cwd=p.cwd)
        return self._event("exec", s, proc, self._wall(f.h.ts_boot_ns), Parts(exec=ExecInfo(
            filename=filename, argv_truncated=bool(f.args.truncated) if f.args else False, errno=f.errno)))

    def _on_exit(self, raw: pr.Exit, out: list[Event]) -> None:
        h = raw.h
        for tid in [t for t, f in self._fails.items() if f.h.pid == h.pid]:
            out.append(self._failed_exec(self._fails.pop(tid)))
        self._args.pop(h.tid, None)
        p = self.procs.pop(h.pid, None)
        s = self.sessions.get(h.session)
        if s is None:
            return
        s.live.discard(h.pid)
        ts = self._wall(h.ts_boot_ns)
        if p is not None and p.execd:
            info = ExecInfo(filename=p.filename, exit_code=raw.code, signal=raw.signal,
                            duration_ms=round((ts - p.exec_ns) / 1e6, 3) if p.exec_ns else None)
            if h.pid == s.root_pid:
                s.root_exit = info
            out.append(self._event("exit", s, p, ts, Parts(exec=info)))
        self._end_if_empty(s, ts, out)

    def refresh_cwd(self, pid: int) -> None:
        """Read a tracked process's directory now: chdir is not traced (no syscall
        tracepoints), so a connection's events show where the process was when it opened it."""
        p = self.procs.get(pid)
        now = procfs.cwd(pid) if p is not None else ""
        if p is not None and now:
            p.cwd = now

    def _on_chdir(self, raw: pr.Chdir) -> None:
        p = self._proc(raw.h)
        if raw.absolute:   # read by the kernel at exec: exact, even for a process gone by now
            p.cwd = raw.path or procfs.cwd(p.pid) or p.cwd
            return
        now = procfs.cwd(p.pid)
        if now:
            p.cwd = now
        elif raw.path is not None:
            p.cwd = os.path.normpath(os.path.join(p.cwd, raw.path))
        elif raw.fd is not None:
            p.cwd = procfs.fd_path(p.pid, raw.fd) or p.cwd

    # ---- housekeeping ----------------------------------------------------------

    def lost(self, count: int, reason: str) -> Event:
        """A `lost` event of the host: `count` records or events that did not make it (a kernel ring
        buffer, the store, a tail subscriber), and why.  This and lost_on() make every one."""
        return Event(kind="lost", ts_ns=time.time_ns(), host=self.host, lost=LostInfo(count, reason))

    def lost_on(self, h: pr.RawHeader, net: NetInfo, count: int, reason: str) -> Event | None:
        """A `lost` event of a tracked process's connection (a parser's desync: `count` bytes
        skipped), with its session and process; None for a process the tracker does not track
        (what it sent is not recorded, nor is its loss)."""
        ev = self.event_for("lost", h, net=net)
        if ev is not None:
            ev.lost = LostInfo(count, reason)
        return ev

    def tick(self) -> list[Event]:
        """Settle held failed execs and reap processes whose exit record was lost."""
        out: list[Event] = []
        now = time.monotonic_ns()
        for tid in [t for t, f in self._fails.items() if now - f.seen_ns > FAILED_EXEC_HOLD_NS]:
            out.append(self._failed_exec(self._fails.pop(tid)))
        # a process found dead twice in a row had its exit record lost; once
        # might just mean its record is still in the ring buffer
        dead = {pid for pid in self.procs if not procfs.alive(pid)}
        reap, self._suspects = dead & self._suspects, dead - self._suspects
        for pid in reap:
            p = self.procs.pop(pid)
            s = self.sessions.get(p.session)
            if s is not None:
                s.live.discard(pid)
                self._end_if_empty(s, time.time_ns(), out)
        return out

    def session_of(self, pid: int) -> Session | None:
        p = self.procs.get(pid)
        return self.sessions.get(p.session) if p else None

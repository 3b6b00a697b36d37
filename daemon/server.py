"""The daemon: load the probes, run the pipeline, serve the control socket."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agentwarden.core import identity, oidc, procfs
from agentwarden.core.events import Event, K8sInfo
from agentwarden.core.version import VERSION
from agentwarden.daemon import chain, export, k8s, secure, seed, sockets, tls_libs
from agentwarden.daemon import config as config_mod
from agentwarden.daemon.config import Config
from agentwarden.daemon.control import BadRequest, Call, ControlServer, Operation
from agentwarden.daemon.hub import Hub
from agentwarden.daemon.lineage import Lineage
from agentwarden.daemon.mask import Masker, load_key
from agentwarden.daemon.metrics import SAMPLE_EVERY, Metrics
from agentwarden.daemon.pipeline import Pipeline
from agentwarden.daemon.profiles import Profiles
from agentwarden.daemon.protocols import http as http_protocol
from agentwarden.daemon.query import EventQuery
from agentwarden.daemon.sdnotify import Notifier
from agentwarden.daemon.spool import Spool
from agentwarden.daemon.store import Store, StoreError, StoreWriter
from agentwarden.daemon.tracker import Tracker
from agentwarden.enforce import callers
from agentwarden.enforce import policy as pol
from agentwarden.enforce.approvals import ApprovalError, Approvals, Caller
from agentwarden.enforce.effects import HostEffects
from agentwarden.enforce.enforcer import Enforcer, prepare
from agentwarden.enforce.programs import PROGRAM_DIRS
from agentwarden.enforce.quarantine import Quarantine, QuarantineError
from agentwarden.enforce.webhook import Webhook
from agentwarden.probes import process as pr
from agentwarden.probes.loader import Probes

log = logging.getLogger(__name__)

CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
SSL_SWEEP_S = 10.0   # how often the TLS framing of processes that are gone is forgotten


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.profiles = Profiles(cfg.agents, cfg.builtin_agents)
        self.stop_event = threading.Event()
        self.hub = Hub()
        self.store = Store.from_config(cfg.store)
        cc = cfg.chain
        self.chain = chain.Chain(cfg.host, cc.state_file, chain.load_or_create_key(cc.key_file),
                                 cc.anchor_file, cc.checkpoint_every, cc.checkpoint_interval_s) \
            if cc.enabled else None
        self.writer = StoreWriter(self.store, Spool(cfg.store.spool_dir, cfg.store.spool_max_bytes),
                                  cfg.store.batch.size, cfg.store.batch.interval, cfg.store.queue_max,
                                  loss=self._writer_loss, chain=self.chain)
        self.probe: Probes | None = None
        self.tracker: Tracker | None = None
        self.pipeline: Pipeline | None = None
        self.control: ControlServer | None = None
        self.started_ns = time.time_ns()
        self.notifier = Notifier()
        self.metrics: Metrics | None = None
        self.policy = self._with_identity(load_policy(cfg.enforce.policy_file, cfg.enforce.webhook))
        self.bindings = identity.Bindings(cfg.host, cfg.identity.state_file, cfg.identity.max_age_s)
        self.oidc = oidc.Provider(cfg.identity.oidc) if cfg.identity.oidc.issuer else None
        self.pods: k8s.PodCache | None = None   # when running in a cluster (kubernetes.enabled)
        self.exporter: export.Exporter | None = None
        self.enforcer: Enforcer | None = None
        self.lineage = Lineage()
        self.webhook: Webhook | None = None
        self._reload = threading.Event()
        self._lost_seen = {pr.CNT_LOST: 0, pr.CNT_TRACK_FULL: 0}
        self._own_cgroups: set[int] = set()
        self._cg_root: str | None = None
        self._ssl_checked: set[int] = set()
        self._prepared: tuple[Any, Any] | None = None   # enforcer.prepare(policy), made during the compile

    # ---- lifecycle ---------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self.stop_event.set()

    def run(self) -> None:
        # signals are read by one thread that knows the sender: a tracked process
        # cannot stop the daemon or make it reload (SIGKILL/SIGSTOP are caught in the kernel)
        signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
        threading.Thread(target=self._signals, name="signals", daemon=True).start()
        try:
            os.setpriority(os.PRIO_PROCESS, 0, self.cfg.nice)   # threads started later inherit it
            self._nice: int | None = self.cfg.nice
        except OSError as e:
            self._nice = None
            log.warning("cannot set nice %d: %s", self.cfg.nice, e)
        self._autogroup = _own_autogroup(self.cfg.nice)
        self._limits = [(r, n, resource.getrlimit(r)) for r, n in (
            (resource.RLIMIT_NOFILE, "RLIMIT_NOFILE"), (resource.RLIMIT_NPROC, "RLIMIT_NPROC"),
            (resource.RLIMIT_AS, "RLIMIT_AS"), (resource.RLIMIT_DATA, "RLIMIT_DATA"),
            (resource.RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK"), (resource.RLIMIT_CPU, "RLIMIT_CPU"),
            (resource.RLIMIT_FSIZE, "RLIMIT_FSIZE"), (resource.RLIMIT_STACK, "RLIMIT_STACK"))]
        t0 = time.monotonic()
        # the policy's plan and program identities are read while bcc compiles (its compile
        # and the kernel's verification release the GIL): 0.75 s off the start
        # The store is opened before the start is declared.  Loading the embedded engine (a
        # dlopen of chdb, its static initialisers, its tables) holds the GIL for 2 to 12 s here:
        # done by the writer after the start, it stalled the capture of the first agent session
        # (pgbench -S: the capture thread 13 % of the time on CPU, 0.41 of the statements
        # captured, the rest lost in the ring).  Not while bcc compiles: done together, bcc's
        # compile lost its relative kernel-header paths and the daemon crashed (SIGSEGV; chdb
        # carries an LLVM of its own).  It opens once the compile is over, while the kernel
        # verifies the programs (their loads wait in the kernel, without the GIL).  A server DSN
        # is opened beside the loop: one that does not answer is the writer's to retry.
        store_open = threading.Thread(target=self._open_store, name="store-open", daemon=True)
        embedded = self.store.dsn.startswith("chdb://")
        with ThreadPoolExecutor(max_workers=1) as pool:
            prepared = pool.submit(prepare, self.policy)
            self.probe = Probes(self.cfg.probes, compiled=store_open.start if embedded else None)
            self._prepared = prepared.result()
        self.probe.set_agent_comms(self.profiles.comm_table())
        self.ahead = tls_libs.Ahead(self.probe.tls_wait)   # Node's binary, found before its first exec
        log.info("probes loaded in %.2fs (programs verified in %.2fs; compiler memory released: %.0f MiB); "
                 "agent profiles: %s", time.monotonic() - t0, self.probe.load_seconds,
                 self.probe.released_mib, ", ".join(p.name for p in self.profiles.items))
        if embedded:
            store_open.join()
        else:
            store_open.start()
        self._start_pods()
        http_protocol.configure_llm(self.cfg.llm.max_text, self.cfg.llm.hash_only)
        self.tracker = Tracker(self.cfg.host, self.profiles, self.probe.untrack_session,
                               track=self.probe.track, bindings=self.bindings,
                               pod_of=self._pod_of if self.pods is not None else None)
        masker = Masker(load_key(self.cfg.mask.key_file), self.cfg.mask.patterns, self.cfg.mask.headers)
        self.enforcer = enforcer = self._enforcer(masker)
        self.tracker.listeners.append(enforcer)
        self.pipeline = Pipeline(self.tracker, [self.writer.put, self.hub.publish],
                                 stages=[self.lineage.stage, enforcer.stage, masker.event],
                                 watch_socket=self.probe.watch_socket, forget_socket=self.probe.forget_socket,
                                 on_connect=self._openssl_of, on_exec=self._openssl_exe,
                                 on_fork=self.lineage.forked,
                                 on_guard=enforcer.on_guard,
                                 outbox=lambda: [*enforcer.drain(), *self.bindings.take()])
        # a login releases the sessions held for it (identity.require: hold)
        self.bindings.listeners.append(lambda b: enforcer.identity_bound(b.uid))
        for lib in tls_libs.system_libssl(self.cfg.host_root):
            self.probe.attach_openssl(lib)
        for lib in tls_libs.system_libc(self.cfg.host_root):
            self.probe.attach_exec_failures(lib)
        self.writer.start()
        self._start_export()
        self._seed()
        self.probe.succeed()   # earlier daemons' guards go only now: ours hold every library theirs did
        self.pipeline.emit(self.enforcer.readopt())
        self.control = ControlServer(self.cfg.control_socket, self.cfg.control_group, self._ops(),
                                     self._in_agent_session)
        self.control.start()
        self._previous_run()
        self._serve_metrics()
        self.notifier.ready(f"watching: {len(self.tracker.sessions)} agent sessions at start")
        self.ahead.scan(tls_libs.system_dirs(PROGRAM_DIRS, self.cfg.host_root))   # in its own thread
        collect_less()
        try:
            self._loop()
        finally:
            log.info("stopping")
            self.notifier.stopping()
            if self.metrics is not None:
                self.metrics.close()
            self.control.stop()
            if self.pods is not None:
                self.pods.stop()
            if self.exporter is not None:
                self.exporter.stop()
            self.writer.stop()
            if self.webhook is not None:
                self.webhook.close(2.0)
            # a clean stop takes the guards with it; a crash leaves them pinned (fail closed), and so
            # does a stop while agents run as root: one of them may have asked systemd for it
            root = self._root_warning()["root_sessions"] if self.tracker else []
            if root and self.stop_event.is_set():
                log.warning("stopping while %d agent session(s) run as root: the kernel guards stay pinned "
                            "in %s (remove them with rm -r %s/gen-*)", len(root), self.cfg.probes.pin_dir,
                            self.cfg.probes.pin_dir)
            self.probe.close(keep_guards=not self.stop_event.is_set() or bool(root))
            if self.stop_event.is_set():
                with contextlib.suppress(OSError):
                    os.unlink(self._marker)

    def _serve_metrics(self) -> None:
        """Prometheus /metrics and /healthz (metrics.listen); one that cannot bind is logged, and
        the daemon runs on: enforcement does not depend on being scraped."""
        if not self.cfg.metrics_listen:
            return
        assert self.pipeline
        self.metrics = Metrics(self.status, self.health)
        try:
            self.metrics.serve(self.cfg.metrics_listen)
        except (OSError, ValueError) as e:
            log.error("metrics: cannot listen on %s: %s", self.cfg.metrics_listen, e)
            self.metrics = None
            return
        self.pipeline.sample_every = SAMPLE_EVERY
        self.pipeline.timing = self.metrics.observe

    def _signals(self) -> None:
        while True:
            info = signal.sigwaitinfo(CONTROL_SIGNALS)
            if self._in_agent_session(info.si_pid) or (self.probe and self.probe.is_offender(info.si_pid)):
                log.warning("ignored %s from pid %d: it runs inside an agent session",
                            signal.Signals(info.si_signo).name, info.si_pid)
                continue
            if info.si_signo == signal.SIGHUP:
                self._reload.set()
            else:
                self.request_stop()

    def _enforcer(self, masker: Masker) -> Enforcer:
        assert self.probe and self.tracker
        quarantine: Quarantine | None = Quarantine()
        try:
            assert quarantine is not None
            quarantine.ensure()
        except QuarantineError as e:
            log.error("nftables quarantine unavailable: %s", e)
            quarantine = None
        if self.cfg.enforce.webhook:
            self.webhook = Webhook(self.cfg.enforce.webhook, host=self.cfg.host)
        approvals = Approvals(path=self.cfg.enforce.state_file)
        restored = approvals.load()
        if restored:
            log.info("%d approval requests still pending from before the restart: %s", len(restored),
                     ", ".join(r.id for r in restored))
        return Enforcer(HostEffects(self.probe), self.tracker, self.policy, approvals=approvals,
                        quarantine=quarantine, mask_text=masker.text,
                        notify=self.webhook.notify if self.webhook else None,
                        sql_approval_s=self.cfg.enforce.sql_approval_s, prepared=self._prepared,
                        cause_of=self.lineage.cause_of, attach_tls=self._attach_tls)

    def reload_policy(self) -> dict[str, Any]:
        """SIGHUP and `policy reload`: an invalid file is refused, the policy in force stays."""
        assert self.enforcer
        try:
            policy = self._with_identity(load_policy(self.cfg.enforce.policy_file, self.cfg.enforce.webhook))
        except pol.PolicyError as e:
            log.error("policy reload refused, the previous policy stays in force: %s", e)
            raise
        self.enforcer.load(policy)
        self.policy = policy
        return {"rules": len(policy.rules), "source": policy.source}

    def _open_store(self) -> None:
        """Connect the store ahead of the writer; a store that is down is the writer's to retry
        (it spools meanwhile)."""
        try:
            self.store.connect()
        except StoreError as e:
            log.warning("%s: spooling until it is back", e)

    def _loop(self) -> None:
        assert self.probe and self.pipeline and self.tracker and self.enforcer
        next_tick = time.monotonic() + 1.0
        next_sweep = time.monotonic() + SSL_SWEEP_S
        while not self.stop_event.is_set():
            self.notifier.watchdog(self.writer.alive)
            # a stopped exec waiting for one more read of the ring (enforcer.on_guard): read it now
            self.probe.poll(self.pipeline.on_record, 1 if self.enforcer.deferred else 100)
            self.pipeline.emit(self.enforcer.retry_deferred())
            self.pipeline.emit(self.enforcer.unstick())
            self.pipeline.flush_outbox()   # approvals decided on the control thread, tamper checks
            if self._reload.is_set():
                self._reload.clear()
                with contextlib.suppress(pol.PolicyError):   # logged; the old policy stays
                    self.reload_policy()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + 1.0
                self._check_lost()
                self.probe.release_predecessors()   # earlier daemons' guards whose connections closed
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SSL_SWEEP_S
                    self.probe.sweep_ssl_streams(procfs.alive)
                self._check_tamper()
                self._ssl_checked &= self.tracker.procs.keys()   # pids that ended (and may come back)
                self.pipeline.emit(self.enforcer.tick())
                self.pipeline.emit(self.tracker.tick())
                self.pipeline.emit(self.bindings.tick())
        self.probe.poll(self.pipeline.on_record, 0)   # drain what is left
        self._check_lost()

    @property
    def _marker(self) -> str:
        return os.path.join(os.path.dirname(self.cfg.enforce.state_file) or ".", "daemon.running")

    def _previous_run(self) -> None:
        """Did the last daemon stop cleanly, and were its pinned guards still there?  A marker next
        to the state file says a daemon runs (bpffs cannot hold plain files); a clean stop removes it."""
        assert self.enforcer and self.probe
        try:
            with open(self._marker) as f:
                prev = json.load(f)
        except FileNotFoundError:
            prev = None
        except (OSError, ValueError) as e:
            prev = {"pid": "?", "gen": "?", "error": str(e)}
        if prev is not None:
            found = self.probe.pins.found if self.probe.pins is not None else []
            who = f"the previous daemon (pid {prev.get('pid')}) ended without a clean stop"
            if prev.get("gen") in found:
                self.enforcer.tamper(f"{who} (killed or crashed); its pinned guards held until this start")
            else:
                self.enforcer.tamper(f"{who} and its pinned guards had been removed: nothing was enforced "
                                     "from then to this start")
        gen = os.path.basename(self.probe.pins.gen) if self.probe.pins is not None else ""
        try:
            os.makedirs(os.path.dirname(self._marker) or ".", mode=0o700, exist_ok=True)
            with open(self._marker, "w") as f:
                json.dump({"pid": os.getpid(), "gen": gen}, f)
        except OSError as e:
            log.warning("cannot write %s: %s", self._marker, e)

    def _check_tamper(self) -> None:
        """What a root agent can change without a syscall hook seeing it, undone and recorded:
        the daemon's priority and resource limits, its control socket, its nftables table."""
        assert self.enforcer and self.control and self.pipeline
        with contextlib.suppress(OSError):
            nice = os.getpriority(os.PRIO_PROCESS, 0)
            if self._nice is not None and nice != self._nice:
                os.setpriority(os.PRIO_PROCESS, 0, self._nice)
                self.enforcer.tamper(f"the daemon's priority was changed to {nice}: restored to {self._nice}")
        group_nice = _autogroup_nice() if self._autogroup is not None else None
        if group_nice is not None and group_nice != self._autogroup:
            try:
                Path(AUTOGROUP).write_text(str(self._autogroup))
                self.enforcer.tamper(f"the daemon's scheduling group priority was changed to {group_nice}: "
                                     f"restored to {self._autogroup}")
            except OSError as e:
                self.enforcer.tamper(f"the daemon's scheduling group priority was changed to {group_nice} "
                                     f"and cannot be restored to {self._autogroup}: {e}")
        for res, name, want in self._limits:
            now = resource.getrlimit(res)
            if now == want:
                continue
            try:
                resource.setrlimit(res, want)
                self.enforcer.tamper(f"the daemon's {name} was changed to {now}: restored to {want}")
            except (OSError, ValueError) as e:
                # raising a hard limit needs CAP_SYS_RESOURCE; without it the change stays
                self.enforcer.tamper(f"the daemon's {name} was changed to {now} and cannot be restored "
                                     f"to {want}: {e}")
                self._limits = [(r, n, now if r == res else w) for r, n, w in self._limits]
        try:
            what = self.control.check()
        except OSError as e:
            what = f"control socket {self.control.path} is gone and cannot be recreated: {e}"
        if what:
            self.enforcer.tamper(what)
        self.pipeline.emit(self.enforcer.check_quarantine())
        self._watch_own_cgroups()
        if self.probe and self.probe.pins is not None:
            gone = self.probe.pins.check()
            if gone:
                self.enforcer.tamper(f"{len(gone)} pinned kernel guard(s) were removed from "
                                     f"{self.probe.pins.gen}: pinned again ({', '.join(gone[:5])})")

    def _watch_own_cgroups(self) -> None:
        """Keep the kernel's set of the daemon's cgroup and its ancestors current (it may be moved)."""
        assert self.probe
        try:
            if self._cg_root is None:   # where cgroup2 is mounted does not change
                from agentwarden.probes.loader import cgroup2_root

                self._cg_root = cgroup2_root(self.cfg.probes.cgroup_root)
            root = self._cg_root
            with open("/proc/self/cgroup") as f:
                path = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), "")
        except OSError:
            return
        ids: set[int] = set()
        parts = [p for p in path.split("/") if p]
        for n in range(1, len(parts) + 1):   # below the root, which cannot be frozen
            with contextlib.suppress(OSError):
                ids.add(os.stat(os.path.join(root, *parts[:n])).st_ino)
        if ids != self._own_cgroups:
            self._own_cgroups = ids
            self.probe.set_daemon_cgroups(ids)

    def _check_lost(self) -> None:
        assert self.probe and self.pipeline and self.tracker
        for which, reason in ((pr.CNT_LOST, "ring buffer full"),
                              (pr.CNT_TRACK_FULL, "tracking map full: processes not tracked")):
            now = self.probe.counter(which)
            delta = now - self._lost_seen[which]
            if delta > 0:
                self._lost_seen[which] = now
                log.warning("%d kernel events lost: %s", delta, reason)
                self.pipeline.emit([self.tracker.lost(delta, reason)])

    def _seed(self) -> None:
        assert self.probe and self.pipeline and self.tracker
        agents = seed.running_agents(self.profiles, exclude={_self_pid()},
                                     pod_of=self._pod_of if self.pods is not None else None)
        for agent in agents:
            key = agent.key
            pids = [agent.root.pid] + [d.pid for d in agent.descendants]
            for pid in pids:
                self.probe.track(pid, key, agent.profile.index)
            # children forked between the scan and the map insert were not tracked by the kernel
            late = [d for d in seed.descendants(agent.root.pid) if d.pid not in pids]
            for d in late:
                self.probe.track(d.pid, key, agent.profile.index)
            self.pipeline.emit(self.tracker.seed(agent.root, agent.profile, agent.descendants + late, key))
            for pid in pids + [d.pid for d in late]:
                self._openssl_of(pid)   # its TLS guard, before an earlier daemon's goes (Probes.succeed)
            self._adopt_sockets(pids + [d.pid for d in late])
            assert self.enforcer
            self.enforcer.guard_existing(pids + [d.pid for d in late])
        if agents:
            log.info("seeded %d running agent sessions", len(agents))

    def _adopt_sockets(self, pids: list[int]) -> None:
        """Capture sockets the seeded processes already had (found via /proc and sock_diag)."""
        assert self.probe and self.pipeline
        for s in sockets.existing_sockets(pids):
            conn_id = time.monotonic_ns()
            self.probe.watch_socket(s.pid, s.fd, conn_id, s.sock_type)
            self.pipeline.emit(self.pipeline.conns.adopt(s.pid, s.fd, conn_id, s.net, time.time_ns(),
                                                         s.sock_type))

    def _openssl_of(self, pid: int) -> None:
        """Before a tracked process's first TLS bytes: uprobes on the libssl it maps."""
        assert self.probe
        if pid in self._ssl_checked:
            return
        libs = tls_libs.mapped_libssl(pid)
        if libs:   # a library loaded later (dlopen) is seen at the next process's connect; an exec
            self._ssl_checked.add(pid)   # (_openssl_exe) and the process's end forget it (_loop's tick)
        for link, name in libs.items():
            self.probe.attach_openssl(link, name)
        for link, name in tls_libs.mapped_libc(pid).items():   # a container's own glibc: its failed execs
            self.probe.attach_exec_failures(link, name)

    def _openssl_exe(self, pid: int) -> None:
        """At a tracked exec: uprobes on the program itself when it exports OpenSSL (Node), and the
        directories on its PATH read for other such programs (tls_libs.Ahead), so that their first
        exec waits for the uprobes (_attach_tls).  The new image's own libraries are read at its next
        connection (red team: a pid read once was never read again, whatever it exec'd)."""
        self._ssl_checked.discard(pid)
        self._attach_exe(pid)
        self.ahead.scan_path(pid)

    def _attach_exe(self, pid: int) -> str:
        """uprobes on the very file the process runs, through its /proc link when it exports OpenSSL:
        a path would be resolved in this daemon's mount namespace (red team: a bind mount in the
        agent's own namespace, or a hard link removed during the wait, resumed Node with no uprobes).
        Returns the link."""
        assert self.probe
        exe = f"/proc/{pid}/exe"
        if tls_libs.exports_openssl(exe):
            self.probe.attach_openssl(exe, tls_libs.exe_name(pid))
        return exe

    def _attach_tls(self, pid: int) -> None:
        """An exec the kernel stopped because its file exports OpenSSL and has no uprobes yet
        (guard_exec.bpf.c tls_unattached): attached before it resumes, and never stopped for
        again, attached or not."""
        assert self.probe
        exe = self._attach_exe(pid)
        with contextlib.suppress(OSError):
            self.probe.tls_unwait(os.stat(exe))

    def _in_agent_session(self, pid: int) -> bool:
        if self.probe is None:
            return False
        return self.probe.is_tracked(pid)

    # ---- control operations --------------------------------------------------------

    def _ops(self) -> dict[str, Operation]:
        return {
            "ping": Operation(lambda call: {"pid": _self_pid(), "version": VERSION,
                                                     "host": self.cfg.host}),
            "status": Operation(self._op_status),
            "sessions": Operation(self._op_sessions),
            "query": Operation(self._op_query),
            "count": Operation(self._op_count),
            "tail": Operation(self._op_tail),
            "pending": Operation(self._op_pending, public=True),
            # never from inside an agent session, whoever the caller is; the approvers of
            # the rule decide who else (enforce.approvals)
            "approve": Operation(self._op_decide, privileged=True, public=True),
            "deny": Operation(self._op_decide, privileged=True, public=True),
            "release": Operation(self._op_release, privileged=True),
            "policy_reload": Operation(lambda call: self.reload_policy(), privileged=True),
            # `agentwarden login`: any local person, never from inside (or beside) an agent
            "login_begin": Operation(self._op_login_begin, privileged=True, public=True),
            "login_finish": Operation(self._op_login_finish, privileged=True, public=True),
            "logout": Operation(self._op_logout, privileged=True, public=True),
            "whoami": Operation(self._op_whoami, public=True),
            "chain": Operation(self._op_chain),
        }

    # ---- identity --------------------------------------------------------------------

    def _with_identity(self, policy: pol.Policy) -> pol.Policy:
        ic = self.cfg.identity
        return pol.with_identity_rule(policy, ic.unverified, ic.hold_timeout_s) if ic.require else policy

    def _person(self, call: Call) -> tuple[int | None, int | None]:
        """The caller's person uid (its audit login uid) and that login uid, read while the caller
        is pinned: a pid reused meanwhile is refused, not taken for someone else."""
        login = procfs.login_uid(call.peer.pid)
        if call.peer.pidfd is not None and callers.pidfd_pid(call.peer.pidfd) != call.peer.pid:
            raise BadRequest(f"the caller (pid {call.peer.pid}) exited while it was read")
        return identity.person_uid(call.peer.uid, login), login

    def _login_caller(self, call: Call) -> tuple[int, int | None]:
        """Who is logging in, judged as strictly as an approver: a process inside an agent session,
        or sharing its terminal or session, never binds (an agent must not choose its own person).
        Only the agents of the same person and those running as root count (another user's agent
        over the same sshd is not this person's), and not a root held for this very login (it has
        not run an instruction)."""
        assert self.tracker and self.enforcer
        if self.oidc is None:
            raise BadRequest("no identity provider is configured (identity.oidc.issuer)")
        uid, login = self._person(call)
        if uid is None:
            raise BadRequest("login refused: this process has no audit login uid (it was not started from "
                             "a login: ssh, a console, a desktop session), so no person to bind")
        held = self.enforcer.login_waiting()
        roots = [s.root_pid for s in list(self.tracker.sessions.values())
                 if s.root_pid not in held and (s.identity.login_uid in (uid, None) or s.identity.uid == 0)]
        try:
            verdict = callers.judge(call.peer.pid, call.peer.pidfd, self._in_agent_session, roots, [])
        except callers.CallerGone as e:
            raise BadRequest(str(e)) from None
        if verdict.refused:
            self.bindings.refuse(uid, login, "caller_in_agent", verdict.refused)
            raise BadRequest(f"login refused: {verdict.refused}")
        return uid, login

    def _op_login_begin(self, call: Call) -> dict[str, Any]:
        uid, _ = self._login_caller(call)
        assert self.oidc is not None
        try:
            settings = self.oidc.settings()
        except oidc.OidcError as e:
            raise BadRequest(f"the identity provider is not usable ({e.reason}): {e}") from None
        nonce, expires = self.bindings.begin(uid)
        return {"provider": settings, "nonce": nonce, "expires_in": int(expires - time.time()), "uid": uid}

    def _op_login_finish(self, call: Call) -> dict[str, Any]:
        uid, login = self._login_caller(call)
        assert self.oidc is not None
        token = call.args.get("id_token")
        method = str(call.args.get("method") or "id_token")
        if method not in ("device", "code", "id_token"):
            raise BadRequest(f"unknown login method {method!r}")
        if not isinstance(token, str) or not token:
            raise BadRequest("login_finish needs an id_token")
        try:
            claims = self.oidc.verify(token.strip(), self.bindings.nonce_check(uid, token.strip()))
            self._same_person(uid, claims)
        except oidc.OidcError as e:
            self.bindings.refuse(uid, login, e.reason, str(e))
            raise BadRequest(f"login refused ({e.reason}): {e}") from None
        return {"binding": self.bindings.bind(uid, login, claims, method).to_json()}

    def _same_person(self, uid: int, claims: oidc.Claims) -> None:
        """The provider's account must be this Unix person's (oidc.user_claim, or identity.users):
        a valid login of someone else (a colleague who entered a phished device code, a bot
        account the agent found) does not make this uid that someone."""
        oc = self.cfg.identity.oidc
        if not oc.user_claim:
            return
        user = identity.user_name(uid)
        name = claims.username
        allowed = dict(self.cfg.identity.users).get(user, ())
        if name and (name.partition("@")[0] == user or name in allowed):
            return
        raise oidc.OidcError("wrong_person", f"the provider's {oc.user_claim} is {name[:80]!r}, which is not "
                             f"the Unix user {user!r} logging in (identity.users maps other names)")

    def _op_logout(self, call: Call) -> dict[str, Any]:
        uid, _ = self._person(call)
        b = self.bindings.logout(uid) if uid is not None else None
        return {"logged_out": b.to_json() if b is not None else None}

    def _op_whoami(self, call: Call) -> dict[str, Any]:
        person, login = self._person(call)
        b = self.bindings.get(person) if person is not None else None
        uid = person if person is not None else call.peer.uid
        return {"uid": uid, "user": identity.user_name(uid), "login_uid": login,
                "binding": b.to_json() if b is not None else None,
                "provider": self.cfg.identity.oidc.issuer, "require": self.cfg.identity.require}

    # ---- Kubernetes ------------------------------------------------------------------

    def _start_pods(self) -> None:
        """The pod watch (daemon/k8s.py), when enabled or running in a cluster (auto)."""
        kc = self.cfg.kubernetes
        if kc.enabled == "false":
            return
        try:
            if kc.api:
                token = kc.token_file if os.path.exists(kc.token_file) else ""
                ca = kc.ca_file if kc.api.startswith("https") and os.path.exists(kc.ca_file) else ""
                self.pods = k8s.PodCache(kc.api, self.cfg.host, token_file=token, ca_file=ca,
                                         keep_deleted_s=kc.keep_deleted_s)
            else:
                self.pods = k8s.PodCache.in_cluster(self.cfg.host, keep_deleted_s=kc.keep_deleted_s)
        except k8s.K8sError as e:
            # auto: not in a cluster, nothing to watch; true: said loudly, and the daemon runs on
            # (pod fields stay empty; status shows no kubernetes section)
            (log.error if kc.enabled == "true" else log.debug)("no pod identity: %s", e)
            return
        self.pods.start()
        log.info("watching the pods of node %s at %s", self.cfg.host, self.pods.api)
        # the agents running now are seeded next: a pod they run in must be known by then (a
        # pod-scoped profile would not match them; a namespace rule would not hold), for up to 10 s
        deadline = time.monotonic() + 10
        while not self.pods.status()["connected"] and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.pods.status()["connected"]:
            log.error("the API server did not answer in 10 s: sessions found running now have no pod")

    def _start_export(self) -> None:
        """The SIEM sinks (`export:`), each reading the store by its own cursor."""
        if not self.cfg.export:
            return
        host = self.cfg.host

        def fetch(seq: int, n: int) -> list[dict[str, Any]]:
            return self.store.events_after(host, seq, n) if self.store.connected else []

        def checkpoints(ts_ns: int) -> list[dict[str, Any]]:
            return self.store.checkpoints_after(host, ts_ns) if self.store.connected else []
        sinks = [export.make_sink(c) for c in self.cfg.export]
        self.exporter = export.Exporter(sinks, self.cfg.export_state_dir, fetch, checkpoints)
        self.exporter.start()
        log.info("exporting to %s", ", ".join(f"{c.name} ({c.type}, {c.format})" for c in self.cfg.export))

    def _pod_of(self, pid: int) -> K8sInfo | None:
        ref = k8s.container_of_pid(pid)    # hostPID: this /proc is the node's
        info = self.pods.lookup(ref) if ref is not None and self.pods is not None else None
        if info is not None and (len(info.labels) > 64 or any(len(v) > 256 for v in info.labels.values())):
            # labels are the tenant's, copied into every event of the session: bounded
            info.labels = {k[:128]: v[:256] for k, v in sorted(info.labels.items())[:64]}
        return info

    def _op_chain(self, call: Call) -> None:
        """The chain of a host as `agentwarden verify` reads it (the embedded store has one reader:
        this daemon): its checkpoints, then its rows in seq order (from `from_seq`, for a bundle);
        verification is the caller's."""
        host = str(call.args.get("host") or self.cfg.host)
        try:
            start = max(0, int(call.args.get("from_seq") or 0))
        except (TypeError, ValueError):
            raise BadRequest("from_seq must be a number") from None
        call.write({"ok": True, "retention_days": self.cfg.store.retention_days})
        # checkpoints first: the rows read after them include everything they sign
        for cp in self.store.checkpoints(host):
            call.write({"checkpoint": cp.to_json()})
        for seq, prev, h, values, kind, reason in self.store.chain_rows(host, start=start):
            call.write({"row": [seq, prev, h, values, kind, reason]})
        return None

    def _op_pending(self, call: Call) -> dict[str, Any]:
        """Everything for root and the control group; for anyone else, what they may decide."""
        assert self.enforcer
        pending = self.enforcer.approvals.pending()
        if call.peer.uid != 0 and not self._in_control_group(call):
            caller = self._caller(call)
            pending = [r for r in pending if self.enforcer.approvals.may_decide(r, caller)]
        return {"pending": [r.to_json() for r in pending]}

    def _in_control_group(self, call: Call) -> bool:
        gid = identity.group_gid(self.cfg.control_group)
        return gid is not None and gid in call.peer.groups

    def _caller(self, call: Call, request_id: str = "") -> Caller:
        """The person behind a control connection: login user (so sudo keeps the name), uid, groups,
        and whether that process may decide at all (enforce.callers: race-free, pinned by its pidfd)."""
        assert self.tracker
        peer = call.peer
        user = identity.caller(peer.pid, peer.uid)
        roots: list[int] = []
        for _ in range(3):   # the probe thread may change the dict meanwhile
            with contextlib.suppress(RuntimeError):
                roots = [s.root_pid for s in list(self.tracker.sessions.values())]
                break
        recorded = []
        if request_id and self.enforcer is not None:
            with contextlib.suppress(ApprovalError):
                recorded = [self.enforcer.approvals.get(request_id).target.get("lineage") or {}]
        try:
            verdict = callers.judge(peer.pid, peer.pidfd, self._in_agent_session, roots, recorded)
        except callers.CallerGone as e:
            raise ApprovalError(str(e)) from None
        # a verified login adds its provider's groups and email (approvers group:NAME, email:ADDRESS)
        bound = self.bindings.of(peer.uid, procfs.login_uid(peer.pid))
        if peer.pidfd is not None and callers.pidfd_pid(peer.pidfd) != peer.pid:
            raise ApprovalError(f"the caller (pid {peer.pid}) exited while it was judged")
        groups = identity.user_groups(user) | frozenset(bound.groups if bound else ())
        auth = f"{verdict.auth}; login user {user}"
        if bound is not None:
            auth += f"; verified {bound.email or bound.sub}"
        return Caller(uid=peer.uid, user=user, groups=groups, refused=verdict.refused, auth=auth,
                      email=bound.email if bound else "")

    def _op_decide(self, call: Call) -> dict[str, Any]:
        assert self.enforcer
        request_id = str(call.args.get("id") or "")
        caller = self._caller(call, request_id)
        try:
            if call.args.get("op") == "deny":
                req = self.enforcer.deny(request_id, caller)
            else:
                for_s = call.args.get("for_s")
                req = self.enforcer.approve(request_id, caller, int(for_s) if for_s else None,
                                            str(call.args.get("code") or ""))
        except ApprovalError as e:
            log.warning("approval refused to %s (uid %d, pid %d): %s", caller.user, caller.uid,
                        call.peer.pid, e)
            raise
        return {"request": req.to_json()}

    def _op_release(self, call: Call) -> dict[str, Any]:
        assert self.enforcer
        return {"released": self.enforcer.release(str(call.args.get("session") or ""))}

    def _op_status(self, call: Call) -> dict[str, Any]:
        return self.status()

    def health(self) -> tuple[bool, str]:
        """Can the daemon keep the trail: the writer runs and events go to the store or the spool."""
        w = self.writer
        if not w.alive:
            return False, "the store writer is not running"
        if not w.stats.last_error:
            return True, "ok"
        if w.spool.bytes < w.spool.max_bytes:
            return True, f"ok: events are spooled while the store is unreachable ({w.stats.last_error})"
        return False, (f"the store is unreachable ({w.stats.last_error}) and the spool is full "
                       f"({w.spool.bytes} bytes): events are dropped")

    def status(self) -> dict[str, Any]:
        """What `agentwarden status` and the Prometheus collector show."""
        assert self.probe and self.pipeline and self.tracker
        return {
            "version": VERSION,
            "host": self.cfg.host,
            "started": self.started_ns,
            "sessions": len(self.tracker.sessions),
            "tracked_processes": len(self.tracker.procs),
            "kernel_lost": self.probe.counter(pr.CNT_LOST),
            "kernel_track_full": self.probe.counter(pr.CNT_TRACK_FULL),
            "pipeline": vars(self.pipeline.stats),
            "pid": os.getpid(),
            "uptime_s": round((time.time_ns() - self.started_ns) / 1e9, 1),
            "parser_desyncs": self.pipeline.stats.desyncs,
            # the probes are attached before the control socket exists; what outlives the daemon:
            "pinned_links_and_maps": self.probe.pins.count if self.probe.pins is not None else 0,
            # earlier daemons' guards still holding connections they saw open; sockets of tracked
            # processes the daemon could not reach to put in the guard (pidfd_getfd refused)
            "predecessor_guards": sorted(self.probe.pins.predecessors) if self.probe.pins is not None else [],
            "guard_adoption_errors": self.probe.adoption_errors,
            "enforcer": dict(self.enforcer.stats) if self.enforcer is not None else {},
            "verdicts_by_action": dict(self.enforcer.verdicts_by_action) if self.enforcer is not None else {},
            "pending_approvals": len(self.enforcer.approvals.pending()) if self.enforcer is not None else 0,
            "store": {"dsn_connected": self.store.connected, "spool_batches": self.writer.spool.pending(),
                      "spool_bytes": self.writer.spool.bytes, "spool_max_bytes": self.writer.spool.max_bytes,
                      "queued": self.writer.queued,
                      **vars(self.writer.stats)},
            "tail_subscribers": len(self.hub),
            "identity": {"provider": self.cfg.identity.oidc.issuer, "require": self.cfg.identity.require,
                         "bindings": len(self.bindings.all())},
            "kubernetes": self.pods.status() if self.pods is not None else None,
            "export": self.exporter.stats if self.exporter is not None else {},
            **self._root_warning(),
        }

    def _writer_loss(self, count: int, reason: str) -> Event:
        """The writer's `lost` event (a full spool), made where every host-level loss is made."""
        assert self.tracker, "events reach the writer only once the tracker runs"
        return self.tracker.lost(count, reason)

    def _root_warning(self) -> dict[str, Any]:
        """Agents running as root can do what no hook here prevents (README: Known limits)."""
        assert self.tracker
        root = [s.id for s in list(self.tracker.sessions.values()) if s.root is not None and s.root.uid == 0]
        warnings = [f"{len(root)} agent session(s) run as root ({', '.join(root[:5])}): a root agent can "
                    "stop or kill this daemon, and what only the daemon enforces ends with it; refuse such "
                    "sessions with a `kind: session` rule (session: {as_root: true})"] if root else []
        return {"root_sessions": root, "warnings": warnings}

    def _op_sessions(self, call: Call) -> dict[str, Any]:
        assert self.tracker
        req = call.args
        live = [s.summary() for s in list(self.tracker.sessions.values())]
        stored: list[dict[str, Any]] = []
        error = ""
        try:
            self.store.connect()
            stored = self.store.sessions(int(req.get("limit") or 100))
        except StoreError as e:
            error = str(e)
        return {"live": live, "stored": stored, "store_error": error}

    def _op_query(self, call: Call) -> dict[str, Any]:
        q = EventQuery.from_request(call.args)
        self.store.connect()
        events = self.store.query(q)
        return {"events": [e.to_dict() for e in events], "spooled_batches": self.writer.spool.pending()}

    def _op_count(self, call: Call) -> dict[str, Any]:
        self.store.connect()
        return {"kinds": self.store.count(EventQuery.from_request(call.args)),
                "spooled_batches": self.writer.spool.pending()}

    def _op_tail(self, call: Call) -> None:
        req, write = call.args, call.write
        sub = self.hub.subscribe(EventQuery.from_request(req))
        sock = call.sock
        reported = 0
        try:
            write({"ok": True})
            while not self.stop_event.is_set():
                try:
                    ev = sub.queue.get(timeout=0.5)
                except Exception:
                    # nothing to send: notice a client that went away
                    r, _, _ = select.select([sock], [], [], 0)
                    if r and not sock.recv(1, socket.MSG_PEEK):
                        return
                    continue
                if sub.dropped > reported:
                    assert self.tracker
                    write(self.tracker.lost(sub.dropped - reported, "tail subscriber too slow").to_dict())
                    reported = sub.dropped
                write(ev.to_dict())
        finally:
            self.hub.unsubscribe(sub)


def _self_pid() -> int:
    return os.getpid()


def load_policy(path: str, webhook: str = "-") -> pol.Policy:
    """The policy file, or an empty policy (record only) when none is configured or installed.

    A rule whose approvals need a one-time code is refused without a webhook: the code
    would have no way to reach the approvers but through the agent's own machine."""
    if not path:
        return pol.Policy(source="")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        log.warning("no policy at %s: recording only, nothing is enforced", path)
        return pol.Policy(source=path)
    policy = pol.parse(text, path)
    for r in policy.rules:
        if r.code and not webhook:
            raise pol.PolicyError(r.name, "code", "a one-time code needs enforce.webhook to reach the "
                                  "approvers", r.line, path)
    return policy


# Python's cyclic collector at its defaults ran a collection every 700 allocations and, every
# hundred of those, walked every object the daemon holds (its modules, policy, bcc tables, the
# events queued for the store): 25 to 35 % of the CPU a statement costs, and most of the spread
# (bench/pipeline_bench.py: 131 to 159 µs a statement, 96 to 106 after).  Events are freed by
# reference counting; the collector only finds cycles, so it may run far less often.
GC_THRESHOLDS = (100_000, 50, 1000)


def collect_less() -> None:
    """Once started: what the daemon holds for good is frozen out of the collector's walks, and
    collections come at GC_THRESHOLDS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


AUTOGROUP = "/proc/self/autogroup"


def _autogroup_nice() -> int | None:
    """The nice of the daemon's scheduling autogroup ("/autogroup-25 nice 0"), None without one."""
    try:
        return int(Path(AUTOGROUP).read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_cgroup() -> str:
    """The daemon's cgroup where a CPU controller schedules it apart from the root ('' when none
    does: then autogroups apply)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(",") and path != "/":           # cgroup v1
            return path
        if controllers == "" and path != "/":                         # cgroup v2: is cpu enabled?
            with contextlib.suppress(OSError):
                if "cpu" in Path("/sys/fs/cgroup/cgroup.subtree_control").read_text().split():
                    return path
    return ""


def _own_autogroup(nice: int) -> int | None:
    """Give the daemon's autogroup its nice; the nice it keeps, or None where it cannot.

    With autogroup scheduling (kernel.sched_autogroup_enabled, on by default), each session is
    one scheduling entity and a thread's nice weighs only against the threads of its own
    session: a daemon in a session of its own (a systemd service, a container's init) at nice
    -10 gets no more CPU than an agent's session at 0.  Under pgbench -S, with the server in a
    session of its own, the capture thread waited on the run queue a quarter of the time while
    the ring overflowed (README, Postgres).  The autogroup's own nice weighs against other
    sessions.  Only where the session is the daemon's: in a shell's session it would raise the
    shell's processes too."""
    if _autogroup_nice() is None:
        return None
    group = _cpu_cgroup()
    if group:
        log.warning("the daemon is in CPU cgroup %s, where autogroups do not apply: its share of the CPU "
                    "against the agents is that cgroup's weight (systemd: CPUWeight=, a pod: its CPU "
                    "request), not its nice", group)
    if os.getsid(0) != os.getpid():
        log.warning("the daemon shares session %d (started from a shell?): its nice %d weighs only "
                    "against that session's processes; run it as a service, in a session of its own",
                    os.getsid(0), nice)
        return None
    try:
        Path(AUTOGROUP).write_text(str(nice))
    except OSError as e:
        log.warning("cannot set the nice of the daemon's scheduling group to %d: %s", nice, e)
        return None
    return nice


def run(cfg: Config) -> None:
    cfg = config_mod.resolve_dsn(cfg)       # store.dsn_file, which only root reads
    # subprocess's vfork leaves a child sharing the daemon's memory until its exec (ss -K, ldconfig):
    # a root agent that stopped that child could write the daemon through it (red team); fork copies
    subprocess._USE_VFORK = False   # type: ignore[misc]
    identity.use_host_root(cfg.host_root)   # the node's users and groups, in a container too
    secure.prepare(cfg)   # before anything is written: the trail and its secrets, root and group only
    Daemon(cfg).run()


"""The kernel's tracking state stays exact: every tracked tgid is counted once in
the fast pre-filter, and both are empty again when the agent's tree has exited."""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from agentwarden.probes import net
from agentwarden.probes.loader import Probes, decode, remove_pins
from agentwarden.probes.process import ProbeLimits
from conftest import need_root


@contextlib.contextmanager
def loaded(name: str) -> Iterator[tuple[Probes, str]]:
    """The probes at the default limits, pinned in a directory of this test's own (the default
    one is a production daemon's), removed after."""
    pin_dir = f"/sys/fs/bpf/aw-test-{name}-{os.getpid()}"
    probes = Probes(ProbeLimits(pin_dir=pin_dir))
    try:
        yield probes, pin_dir
    finally:
        probes.close()
        remove_pins(pin_dir)


def test_tracking_and_filter_balance(fake_agent: Path) -> None:
    need_root()
    with loaded("probes") as (probes, pin_dir):
        probes.set_agent_comms([(fake_agent.name, 0)])
        records: list[bytes] = []
        agent = subprocess.Popen([str(fake_agent), "-c",
                                  "for i in 1 2 3; do (sleep 0.05 &); done; sh -c 'true | cat'; sleep 0.3"])
        while agent.poll() is None:
            probes.poll(records.append, 50)
        time.sleep(0.5)
        probes.poll(records.append, 0)
        decoded = [decode(r) for r in records]
        assert decoded, "no records from the agent"
        assert not list(probes.bpf[b"tracked"].items())
        assert all(v.value == 0 for v in probes.bpf[b"track_filter"].values())
        # a process seeded from userspace counts too, and is forgotten with its session
        probes.track(agent.pid, 42, 0)
        assert probes.is_tracked(agent.pid)
        assert probes.bpf[b"track_filter"][ct.c_int(agent.pid & 0xFFFF)].value == 1
        assert probes.untrack_session(42) == [agent.pid]
        assert probes.bpf[b"track_filter"][ct.c_int(agent.pid & 0xFFFF)].value == 0
        assert not any(isinstance(d, net.Data) for d in decoded)   # no sockets, no payload
        # nothing hangs on a syscall tracepoint (each one taxes every task on the host): not the
        # process capture, not the socket capture (sock:* tracepoints), not a guard
        attached = {name for gen in os.listdir(pin_dir) if gen.startswith("gen-")
                    for name in os.listdir(os.path.join(pin_dir, gen))}
        assert "tp-sched-sched_process_exec" in attached
        assert not [n for n in attached if n.startswith("tp-syscalls-")], sorted(attached)
        assert not [n for n in attached if n in ("raw-sys_enter", "raw-sys_exit")], sorted(attached)
        assert {"raw-sock_send_length", "raw-sock_recv_length"} <= attached, sorted(attached)
        assert not probes.syscall_hook
        # the decision stop's guards: the signal and wakeup tracepoints, and (with no syscall
        # hook to kill at the first system call) the loader's entry
        assert {"tp-signal-signal_generate", "tp-sched-sched_waking"} <= attached, sorted(attached)
        assert probes.loaders and [n for n in attached if n.startswith("uprobe-loader-")]


PTRACE_TRACEME, PTRACE_CONT = 0, 7


def test_the_loader_entry_kills_a_process_resumed_while_it_waits() -> None:
    """The uprobe on ld.so's entry (guard.bpf.c aw_loader_entry) alone: a process stopped at its
    exec (PTRACE_TRACEME) is entered in exec_deciding as the exec guard does, and resumed by a
    waker the kernel takes for the daemon (so the sched_waking guard lets it go): it dies
    before the loader runs, and /usr/bin/true never exits 0.  Without the entry it does."""
    need_root()
    from agentwarden.probes import guard as g

    pin_dir = f"/sys/fs/bpf/aw-test-loader-{os.getpid()}"
    probes = Probes(ProbeLimits(pin_dir=pin_dir, loader_guard=True))
    libc = ct.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ct.c_long, ct.c_long, ct.c_void_p, ct.c_void_p]
    try:
        assert probes.loaders, "no dynamic loader found"
        probes.bpf[b"guard_cfg"][ct.c_int(g.CFG_DAEMON)] = ct.c_uint64(os.getpid())
        results = []
        for waiting in (False, True):
            child = subprocess.Popen(["/usr/bin/true"], preexec_fn=lambda: libc.ptrace(PTRACE_TRACEME, 0, None, None))
            _, status = os.waitpid(child.pid, 0)
            assert os.WIFSTOPPED(status), status      # stopped at its exec, before the loader's first instruction
            probes.track(child.pid, 4242, 0)
            if waiting:
                probes.bpf[b"exec_deciding"][ct.c_uint32(child.pid)] = ct.c_uint64(
                    time.clock_gettime_ns(time.CLOCK_BOOTTIME))
            assert libc.ptrace(PTRACE_CONT, child.pid, None, None) == 0
            _, status = os.waitpid(child.pid, 0)
            results.append(status)
            probes.untrack_session(4242)
        assert os.WIFEXITED(results[0]) and os.WEXITSTATUS(results[0]) == 0, results
        assert os.WIFSIGNALED(results[1]) and os.WTERMSIG(results[1]) == 9, results
        assert not list(probes.bpf[b"exec_deciding"].items())
    finally:
        probes.close()
        remove_pins(pin_dir)


def test_a_burst_is_read_to_its_last_record_without_waiting_for_the_timeout(fake_agent: Path) -> None:
    """The events ring wakes the daemon at most once per RING_WAKE_NS a CPU (process.bpf.c
    ring_wake): the records of a burst after its wakeup bring none of their own.  The poll after
    one that found records waits only RING_BUSY_POLL_MS, so the agent's last record (its exit)
    is read within a fraction of the 1 s poll timeout: without that shorter wait it lay in the
    ring until the timeout."""
    need_root()
    import threading

    from agentwarden.probes import process as pr

    with loaded("wake") as (probes, pin_dir):
        probes.set_agent_comms([(fake_agent.name, 0)])
        exited: list[float] = []
        seen: list[float] = []
        agent = subprocess.Popen([str(fake_agent), "-c", "for i in $(seq 150); do /bin/true; done"])
        waiter = threading.Thread(target=lambda: (agent.wait(), exited.append(time.monotonic())))
        waiter.start()

        def handler(raw: bytes) -> None:
            rec = decode(raw)
            if isinstance(rec, pr.Exit) and rec.h.pid == agent.pid and not seen:
                seen.append(time.monotonic())

        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            probes.poll(handler, 1000)
        waiter.join(10)
        assert seen and exited, "the agent's exit was not read"
        assert seen[0] - exited[0] < 0.3, f"the last record waited {seen[0] - exited[0]:.3f} s"


def test_every_program_is_loaded_at_start_in_parallel() -> None:
    """Probes.programs() names every program the daemon loads, so that all of them are verified
    on every CPU at once (_load_all) and none is left to load one after another later: after the
    start and the attachments made when a libssl and a libc are found, bcc knows no program that
    programs() does not list (one listed with the wrong type fails the start: the kernel refuses its
    attachment or its tail-call slot)."""
    need_root()
    from agentwarden.daemon import tls_libs

    with loaded("programs") as (probes, _):
        for lib in tls_libs.system_libssl("/"):
            probes.attach_openssl(lib)
        for lib in tls_libs.system_libc("/"):
            probes.attach_exec_failures(lib)
        listed = {name for name, _, _ in probes.programs()}
        assert set(probes.bpf.funcs) <= listed, sorted(set(probes.bpf.funcs) - listed)
        assert probes.load_seconds > 0


def test_the_tls_vouch_map_is_the_one_every_generation_shares() -> None:
    """tls_send's map (which threads are inside a watched OpenSSL call) is pinned at a fixed path
    and opened by each generation, not made anew: a connection an earlier daemon's sk_msg still
    holds is vouched for by the uprobes of the daemon that took over (test_guard_room's restart
    test is the end-to-end check)."""
    need_root()
    from agentwarden.probes import loader
    from agentwarden.probes.persist import _map_info

    with loaded("vouch") as (probes, pin_dir):
        lib = loader._libbpf()
        lib.bpf_obj_get.argtypes = [ct.c_char_p]
        pinned = int(lib.bpf_obj_get(os.path.join(pin_dir, loader.VOUCH_PIN).encode()))
        assert pinned >= 0
        try:
            theirs, ours = _map_info(lib, pinned), _map_info(lib, probes._table_fd(b"ssl_vouch"))
            assert theirs is not None and ours is not None
            assert theirs.id == ours.id
            assert (theirs.type, theirs.key_size, theirs.value_size) == loader.VOUCH_LAYOUT[:3]
        finally:
            os.close(pinned)

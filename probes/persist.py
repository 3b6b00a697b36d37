"""Kernel guards that outlive the daemon: every attachment a BPF link, pinned in bpffs.

bcc attaches tracepoints through perf events owned by the process, so a daemon killed
by a root agent took every guard with it.  Here each attachment becomes a BPF link
(tracepoints through a perf event of their own, `BPF_LINK_CREATE` with BPF_PERF_EVENT;
raw tracepoints and cgroup hooks are links already) pinned under a directory of this
daemon's generation, `<pin_dir>/gen-<pid>-<boot ns>`.  So are the maps whose entries the
kernel clears when the last user reference goes (program arrays for tail calls, and the
sockhash that holds the sk_msg program).

- The daemon dies (SIGKILL, a crash): the pins hold everything, so exact denials still
  kill, connects are still refused, SQL is still dropped, and execs that need a decision
  wait stopped in the pinned exec_deciding map (fail closed).
- The next daemon attaches its own programs first, then removes the older generations,
  so there is no moment without guards (for that moment both run; their verdicts agree).
- A clean stop (SIGTERM from outside the agents, `systemctl stop`) removes its own
  generation: stopping the service stops enforcement, on purpose.

The OpenSSL uprobes (the TLS guards) are linked and pinned the same way (uprobe()).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import logging
import os
import shutil
import time
from typing import Any

log = logging.getLogger(__name__)

BPF_PERF_EVENT = 41          # enum bpf_attach_type
PERF_TYPE_TRACEPOINT = 2
_SYS_PERF_EVENT_OPEN = 298   # x86-64
PERF_FLAG_FD_CLOEXEC = 8
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# maps whose entries go with the last user reference
PINNED_MAPS = (b"exec_progs", b"cwd_progs", b"msg_progs", b"ssl_progs", b"exit_progs", b"guard_socks")
# maps whose entries the next daemon takes over (hand_over): the TLS guard's framing per stream
HANDED_OVER = (b"ssl_streams",)
BPF_MAP_TYPE_SOCKHASH = 18
PRED = "map-pred-"    # an earlier generation's map, pinned again under this one (its original name after)


class PerfEventAttr(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
                ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64), ("read_format", ct.c_uint64),
                ("flags", ct.c_uint64), ("wakeup_events", ct.c_uint32), ("bp_type", ct.c_uint32),
                ("config1", ct.c_uint64), ("config2", ct.c_uint64), ("rest", ct.c_uint8 * 64)]


def _libs() -> tuple[ct.CDLL, ct.CDLL]:
    bpf = ct.CDLL("libbpf.so.1", use_errno=True)
    bpf.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
    bpf.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    bpf.bpf_obj_get.argtypes = [ct.c_char_p]
    bpf.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    bpf.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    bpf.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    bpf.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
    return bpf, ct.CDLL(None, use_errno=True)


def _tracepoint_id(category: str, name: str) -> int:
    for base in TRACEFS:
        with contextlib.suppress(OSError), open(f"{base}/events/{category}/{name}/id") as f:
            return int(f.read())
    raise OSError(f"no tracefs id for {category}:{name}")


class _LinkOpts(ct.Structure):   # libbpf's struct bpf_link_create_opts, up to perf_event.bpf_cookie
    _fields_ = [("sz", ct.c_size_t), ("flags", ct.c_uint32), ("iter_info", ct.c_void_p),
                ("iter_info_len", ct.c_uint32), ("target_btf_id", ct.c_uint32), ("bpf_cookie", ct.c_uint64)]


class _MapInfo(ct.Structure):   # the head of struct bpf_map_info
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("rest", ct.c_uint8 * 240)]


def _map_info(lib: ct.CDLL, fd: int) -> _MapInfo | None:
    info = _MapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    return info if lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) == 0 else None


def _map_type(lib: ct.CDLL, fd: int) -> int:
    info = _map_info(lib, fd)
    return info.type if info is not None else -1


def _check(fd: int, what: str) -> int:
    if fd < 0:
        err = ct.get_errno() or -fd
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return fd


class Pins:
    """This daemon's generation of pinned links and maps."""

    def __init__(self, pin_dir: str) -> None:
        self.pin_dir = pin_dir
        self.gen = os.path.join(pin_dir, f"gen-{os.getpid()}-{time.clock_gettime_ns(time.CLOCK_BOOTTIME)}")
        self.older = sorted(os.path.join(pin_dir, d) for d in os.listdir(pin_dir) if d.startswith("gen-"))
        os.makedirs(self.gen, mode=0o700)
        self._bpf, self._libc = _libs()
        self._libc.syscall.restype = ct.c_long
        self.count = 0
        self._uprobes = 0                 # attachments made (each uprobe's bpf_cookie)
        self._held: dict[str, int] = {}   # name -> an fd of our own: the guard lives while the daemon does
        self.found: list[str] = []        # generations earlier daemons left pinned (drop_older)
        # an earlier generation that still guards connections it saw open -> its maps' pins (as
        # pinned again here, so that a crash of this daemon does not free them) and the fds of its
        # sockhashes; released when every one of those is empty (release_predecessors)
        self.predecessors: dict[str, tuple[list[str], list[int]]] = {}

    def _pin(self, fd: int, name: str) -> None:
        path = os.path.join(self.gen, name).encode()
        if self._bpf.bpf_obj_pin(fd, path) != 0:
            err = ct.get_errno()
            raise OSError(err, f"bpf_obj_pin {name}: {os.strerror(err)}")
        if name not in self._held:
            self._held[name] = os.dup(fd)
            self.count += 1

    def check(self) -> list[str]:
        """Pins someone removed while the daemon runs: pinned again (the daemon's own fds kept the
        guards alive meanwhile).  Returns their names."""
        os.makedirs(self.gen, mode=0o700, exist_ok=True)
        gone = [n for n in self._held if not os.path.exists(os.path.join(self.gen, n))]
        for n in gone:
            with contextlib.suppress(OSError):
                self._pin(self._held[n], n)
        return gone

    def adopt(self, bpf: Any, cgroup_links: list[tuple[str, int]],
              named: dict[bytes, bytes] | None = None) -> None:
        """Re-make bcc's tracepoint attachments as pinned links; pin the rest.  `named`: tracepoints
        whose program is a named function (tracepoint -> function), not a TRACEPOINT_PROBE."""
        from bcc.libbcc import lib as libbcc

        for tp in list(bpf.tracepoint_fds):
            category, name = tp.decode().split(":")
            fn = bpf.funcs[(named or {}).get(tp) or f"tracepoint__{category}__{name}".encode()]
            # the same program cannot sit twice on one tracepoint (EEXIST): bcc's attachment goes
            # first (the daemon is still loading: no policy is in the maps yet)
            bpf.detach_tracepoint(tp)
            attr = PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=ct.sizeof(PerfEventAttr),
                                 config=_tracepoint_id(category, name), sample_period=1, wakeup_events=1)
            perf = _check(int(self._libc.syscall(_SYS_PERF_EVENT_OPEN, ct.byref(attr), -1, 0, -1,
                                                 PERF_FLAG_FD_CLOEXEC)), f"perf_event_open {tp.decode()}")
            try:
                link = _check(int(self._bpf.bpf_link_create(fn.fd, perf, BPF_PERF_EVENT, None)),
                              f"bpf_link_create {tp.decode()}")
            finally:
                os.close(perf)   # the link holds the perf event
            try:
                self._pin(link, f"tp-{category}-{name}")
            finally:
                os.close(link)   # the pin holds the link
        for tp, fd in bpf.raw_tracepoint_fds.items():
            self._pin(fd, f"raw-{tp.decode()}")
        for name, fd in cgroup_links:
            self._pin(fd, f"cgroup-{name}")
        for name in (*PINNED_MAPS, *HANDED_OVER, b"verdicts"):
            fd = int(libbcc.bpf_table_fd(bpf.module, name))
            if fd >= 0:
                self._pin(fd, f"map-{name.decode()}")

    def uprobe(self, prog_fd: int, path: str, offset: int, retprobe: bool, name: str) -> None:
        """A uprobe (the OpenSSL guards) through a perf event of the uprobe PMU, linked and pinned.
        Each attachment has a bpf_cookie of its own: one call seen through two attachments (a
        file reached through two overlay mounts) is told from two calls (tls.bpf.c ssl_enter)."""
        with open("/sys/bus/event_source/devices/uprobe/type") as f:
            pmu = int(f.read())
        buf = ct.create_string_buffer(path.encode())
        attr = PerfEventAttr(type=pmu, size=ct.sizeof(PerfEventAttr), config=1 if retprobe else 0,
                             sample_period=1, wakeup_events=1,
                             config1=ct.cast(buf, ct.c_void_p).value or 0, config2=offset)
        perf = _check(int(self._libc.syscall(_SYS_PERF_EVENT_OPEN, ct.byref(attr), -1, 0, -1,
                                             PERF_FLAG_FD_CLOEXEC)), f"perf_event_open uprobe {path}")
        self._uprobes += 1
        opts = _LinkOpts(sz=ct.sizeof(_LinkOpts), bpf_cookie=self._uprobes)
        try:
            link = _check(int(self._bpf.bpf_link_create(prog_fd, perf, BPF_PERF_EVENT, ct.byref(opts))),
                          f"bpf_link_create uprobe {path}")
        finally:
            os.close(perf)
        try:
            self._pin(link, name)
        finally:
            os.close(link)

    def hand_over(self, name: bytes, fd: int) -> int:
        """Copy the entries of the earlier generations' map `name` into ours (fd), before they go:
        the TLS guard's framing of each stream goes on where the predecessor's uprobes left it
        (they ran until now; both ran since ours were attached, so theirs is whole).  A map of
        another layout (another version) is left.  Returns how many entries came over."""
        ours = _map_info(self._bpf, fd)
        if ours is None:
            return 0
        key = ct.create_string_buffer(ours.key_size)
        value = ct.create_string_buffer(ours.value_size)
        copied = 0
        for d in self.older:
            old = int(self._bpf.bpf_obj_get(os.path.join(d, f"map-{name.decode()}").encode()))
            if old < 0:
                continue
            try:
                theirs = _map_info(self._bpf, old)
                if theirs is None or (theirs.key_size, theirs.value_size) != (ours.key_size, ours.value_size):
                    log.warning("%s of %s has another layout: not taken over", name.decode(), d)
                    continue
                prev: ct.Array[ct.c_char] | None = None
                while self._bpf.bpf_map_get_next_key(old, prev, key) == 0:
                    if (self._bpf.bpf_map_lookup_elem(old, key, value) == 0
                            and self._bpf.bpf_map_update_elem(fd, key, value, 0) == 0):
                        copied += 1
                    prev = ct.create_string_buffer(key.raw, ours.key_size)
            finally:
                os.close(old)
        if copied:
            log.info("took over %d entries of %s from earlier daemons", copied, name.decode())
        return copied

    def drop_older(self) -> int:
        """Remove what earlier daemons left pinned (after this one's guards are attached)."""
        self.found = [os.path.basename(d) for d in self.older]
        for d in self.older:
            self._succeed(d)
            shutil.rmtree(d, ignore_errors=True)   # unlinking the pins detaches their links
        if self.older:
            log.warning("replaced the kernel guards a previous daemon left pinned (%s)",
                        ", ".join(os.path.basename(d) for d in self.older))
        n, self.older = len(self.older), []
        return n

    def _succeed(self, old: str) -> None:
        """Every map an earlier generation pinned (whatever a version named them), held and pinned
        again under this generation before its own pins go: its sk_msg goes on judging the
        connections it saw open (its sockhash, its tail calls, its policy and framing state, which
        its programs hold), and its verdict ring stays readable.  An earlier generation's own
        predecessors come along under the names they had.  A generation with no sockhash left
        holding a connection is let go at once."""
        gen = os.path.basename(old)
        try:
            files = sorted(f for f in os.listdir(old) if f.startswith("map-"))
        except OSError:
            return
        made: dict[str, list[str]] = {}           # the generation that made it -> pins here
        for f in files:
            fd = int(self._bpf.bpf_obj_get(os.path.join(old, f).encode()))
            if fd < 0:
                continue
            name = f if f.startswith(PRED) else f"{PRED}{gen}-{f[len('map-'):]}"
            try:
                self._pin(fd, name)
            except OSError as e:
                log.warning("cannot keep %s of %s: %s", f, gen, e)
                continue
            finally:
                os.close(fd)
            origin = "-".join(name[len(PRED):].split("-")[:3])     # gen-<pid>-<boot ns>
            made.setdefault(origin, []).append(name)
        for origin, pins in made.items():
            socks = [self._held[n] for n in pins
                     if _map_type(self._bpf, self._held[n]) == BPF_MAP_TYPE_SOCKHASH]
            if socks:
                self.predecessors[origin] = (pins, socks)
            else:
                for n in pins:
                    self._unpin(n)

    def fd(self, name: str) -> int:
        """This daemon's own descriptor of one of its pins."""
        return self._held[name]

    def _unpin(self, name: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.gen, name))
        fd = self._held.pop(name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
            self.count -= 1

    def remove(self) -> None:
        """A clean stop: this generation's guards go with the daemon."""
        shutil.rmtree(self.gen, ignore_errors=True)
        self.release()

    def release_predecessors(self, force: bool = False) -> list[str]:
        """Let go of the earlier generations whose sockhashes are empty (their connections closed),
        or of all of them (force).  Returns the generations released."""
        gone = []
        for gen, (pins, socks) in list(self.predecessors.items()):
            key = ct.c_uint64()
            busy = any(self._bpf.bpf_map_get_next_key(fd, None, ct.byref(key)) == 0 for fd in socks)
            if busy and not force:
                continue                          # still guarding a connection
            for name in pins:
                self._unpin(name)
            del self.predecessors[gen]
            gone.append(gen)
        return gone

    def release(self) -> None:
        """This daemon's own references go (its pins stay, unless remove() took them)."""
        self.predecessors.clear()
        for fd in self._held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held.clear()

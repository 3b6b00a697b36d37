"""Compile and load the probes (one BPF object from one C file per concern).

process.bpf.c and net.bpf.c share the tracking map and the ring buffer, so they
are compiled as one unit; this module owns that object and its maps.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import hashlib
import logging
import os
import platform
import re
import select
import struct
import time
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any, TypeAlias

from agentwarden.probes import btf, guard, kfuncs, net
from agentwarden.probes import process as pr
from agentwarden.probes.persist import Pins

log = logging.getLogger(__name__)

# One translation unit, in this order: bcc rewrites map calls only in the text it is given, so
# the files are joined, not #included; each guard file's header names what it uses from before.
SOURCES = ("process.bpf.c", "net.bpf.c", "tls.bpf.c", "guard.bpf.c", "guard_exec.bpf.c",
           "guard_connect.bpf.c", "guard_stream.bpf.c", "guard_sql.bpf.c", "guard_http.bpf.c",
           "guard_msg.bpf.c", "guard_tls.bpf.c", "guard_task.bpf.c")
EXECVE_SYSCALL = bytes.fromhex("b83b0000000f05")     # mov $59 (execve), %eax; syscall
EXECVEAT_SYSCALL = bytes.fromhex("b8420100000f05")   # mov $322 (execveat), %eax; syscall
# OpenSSL's calls with uprobes: (symbol, entry program, return program)
SSL_PROBES = (("SSL_write", "aw_ssl_write", "aw_ssl_return"),
              ("SSL_write_ex", "aw_ssl_write_ex", "aw_ssl_return"),
              ("SSL_read", "aw_ssl_read", "aw_ssl_return"),
              ("SSL_read_ex", "aw_ssl_read_ex", "aw_ssl_return"),
              # the calls that send records of their own: only from inside these, SSL_read and
              # SSL_write may a Postgres TLS connection send (guard_msg.bpf.c tls_send)
              ("SSL_connect", "aw_ssl_hs", "aw_ssl_hs_done"),
              ("SSL_do_handshake", "aw_ssl_hs", "aw_ssl_hs_done"),
              ("SSL_shutdown", "aw_ssl_hs", "aw_ssl_hs_done"),
              ("SSL_peek", "aw_ssl_hs", "aw_ssl_hs_done"), ("SSL_peek_ex", "aw_ssl_hs", "aw_ssl_hs_done"))
# tls.bpf.c ssl_vouch: one map for every generation, at a fixed path under the pin directory
# (its layout in the name: a daemon of another layout makes its own)
VOUCH_PIN = "shared-ssl-vouch-v1"
VOUCH_LAYOUT = (1, 4, 16, 16384)   # BPF_MAP_TYPE_HASH, key and value sizes, entries


def bpf_source(limits: pr.ProbeLimits,
               kernel_functions: dict[str, int] | None = None) -> tuple[str, list[str]]:
    """The C text and the -D flags that size it (`kernel_functions`: kfuncs.ids(), which the
    loader patches in; None compiles without them)."""
    total = limits.argv_total_bytes
    if total & (total - 1) or total < 2 * limits.argv_arg_bytes:
        raise ValueError("argv_total_bytes must be a power of two and at least 2 * argv_arg_bytes")
    chunk = limits.data_chunk_bytes
    if chunk & (chunk - 1):
        raise ValueError("data_chunk_bytes must be a power of two")
    pkg = resources.files("agentwarden.probes")
    text = "\n".join(pkg.joinpath(name).read_text() for name in SOURCES)
    cflags = [
        f"-DAW_ARGV_MAX={limits.argv_max_args}",
        f"-DAW_ARG_LEN={limits.argv_arg_bytes}",
        f"-DAW_ARGS_SIZE={total}",
        f"-DAW_RINGBUF_PAGES={limits.ringbuf_pages}",
        f"-DAW_RING_WAKE_NS={pr.RING_WAKE_NS}",
        f"-DAW_MAX_TRACKED={limits.max_tracked}",
        f"-DAW_GUARD_SOCKS={limits.guard_connections}",
        f"-DAW_CHUNK={chunk}",
        f"-DAW_MAX_CHUNKS={limits.data_max_chunks}",
        f"-DAW_MAX_IOV={limits.data_max_iov}",
        f"-DAW_RAW_SYSCALLS={int(syscall_hook(limits))}",
        f'-DAW_PIN_DIR="{limits.pin_dir}"',
        f"-DAW_DFA_STATES={guard.DFA_STATES}",
        *btf.cflags(),
        *kfuncs.cflags(kernel_functions),
    ]
    return text, cflags


BPF_FS_MAGIC = 0xCAFE4A11


def ensure_pin_dir(path: str) -> None:
    """bpffs mounted at its parent (mounted here when it is not), and the directory, root only."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if not _is_bpffs(parent):
        os.makedirs(parent, exist_ok=True)
        libc = ct.CDLL(None, use_errno=True)
        if libc.mount(b"bpf", parent.encode(), b"bpf", 0, None) != 0:
            err = ct.get_errno()
            raise OSError(err, f"cannot mount bpffs at {parent}: {os.strerror(err)}")
        log.info("mounted bpffs at %s", parent)
    os.makedirs(path, mode=0o700, exist_ok=True)


def _is_bpffs(path: str) -> bool:
    class StatFs(ct.Structure):
        _fields_ = [("f_type", ct.c_long), ("rest", ct.c_long * 15)]

    buf = StatFs()
    libc = ct.CDLL(None, use_errno=True)
    return bool(libc.statfs(path.encode(), ct.byref(buf)) == 0 and (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC)


def remove_pins(path: str) -> None:
    """Unpin what a daemon left in its pin directory (tests; `agentwarden` never does this itself)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# tail-called by the raw sys_exit program, indexed by the AW_OP_* of net.bpf.c
EXIT_PROGRAMS = {1: "aw_exit_connect", 2: "aw_exit_accept", 3: "aw_exit_socket", 4: "aw_exit_buf",
                 5: "aw_exit_iov", 6: "aw_exit_msg", 7: "aw_exit_mmsg", 8: "aw_exit_taint"}


def raw_syscalls() -> bool:
    """The raw_tracepoint front end of net.bpf.c reads pt_regs, laid out for x86-64."""
    return platform.machine() == "x86_64"


def syscall_hook(limits: pr.ProbeLimits) -> bool:
    """Whether the raw sys_enter/sys_exit pair is attached: in the hardened mode, or where the
    socket tracepoints cannot capture (no BTF: the fd and buffers come from the syscall)."""
    return raw_syscalls() and (limits.hardened or "-DAW_BTF=1" not in btf.cflags())


# bcc's compiler: needed for the one compile at start, never again (programs load without it)
COMPILER_LIBS = re.compile(r"/lib(LLVM|clang)[^/]*\.so")
MADV_PAGEOUT = 21


def release_unused_pages(libraries: re.Pattern[str]) -> float:
    """Give back what the process no longer uses: the resident code of `libraries` (clean file
    pages: MADV_PAGEOUT, 5.4+; they fault back in if ever run again) and the C heap's free
    memory (malloc_trim).  Returns MiB released, as RSS tells.  Measured at start: libLLVM and
    libclang-cpp hold 73 MiB after bcc's compile, the heap 19 MiB."""
    libc = ct.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int]
    before = _rss_kib()
    try:
        with open("/proc/self/maps") as f:
            spans = [line.split()[0] for line in f if libraries.search(line)]
    except OSError:
        spans = []
    for span in spans:
        lo, hi = (int(x, 16) for x in span.split("-"))
        libc.madvise(lo, hi - lo, MADV_PAGEOUT)   # an old kernel says EINVAL: nothing lost
    libc.malloc_trim(0)
    return max(0.0, (before - _rss_kib()) / 1024)


def _rss_kib() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except OSError:
        return 0


def elf_entry_offset(path: str) -> int:
    """The file offset of an ELF file's entry point (64-bit, little-endian): where a uprobe on
    its first instruction goes.  Raises ValueError for anything else."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise ValueError("not a 64-bit little-endian ELF file")
        entry, phoff = struct.unpack_from("<QQ", head, 24)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, _fl, p_offset, p_vaddr, _pa, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        if p_type == 1 and p_vaddr <= entry < p_vaddr + p_filesz:   # PT_LOAD holding the entry
            return int(entry - p_vaddr + p_offset)
    raise ValueError("no loadable segment holds the entry point")


RawRecord: TypeAlias = pr.RawEvent | net.NetEvent | guard.Guard


def decode(buf: bytes) -> RawRecord:
    """Decode one ring buffer record of any probe.  Raises DecodeError."""
    if len(buf) < 4:
        raise pr.DecodeError(f"record of {len(buf)} bytes")
    kind = int.from_bytes(buf[:4], "little")
    if kind in net.KINDS:
        return net.decode(kind, buf)
    if kind == guard.EV_GUARD:
        return guard.decode(buf)
    return pr.decode(buf)


# tracepoint programs that are named functions, not TRACEPOINT_PROBEs (their kfunc calls are
# patched before they load): tracepoint -> function
NAMED_TRACEPOINTS = {b"signal:signal_generate": b"aw_signal_generate",
                     b"sched:sched_waking": b"aw_sched_waking"}
# where a dynamic loader may be (attach_loader_guards): every one found gets the entry uprobe
# (enforce.programs knows a loader by these too: `ld.so PROGRAM` runs PROGRAM)
LOADER_GLOBS = ("/lib64/ld-linux*.so*", "/lib/ld-linux*.so*", "/lib*/*-linux-gnu/ld-linux*.so*",
                "/usr/lib64/ld-linux*.so*", "/usr/lib*/*-linux-gnu/ld-linux*.so*", "/lib/ld-musl-*.so*",
                "/usr/lib/ld-musl-*.so*")

# guard.bpf.c's cgroup programs: (function, program type, attach type)
CGROUP_PROGRAMS = (("aw_connect4", 18, 10), ("aw_connect6", 18, 11), ("aw_sock_create", 9, 2),
                   ("aw_sockops", 13, 3), ("aw_sendmsg4", 18, 14), ("aw_sendmsg6", 18, 15),
                   ("aw_setsockopt", 25, 22))   # BPF_PROG_TYPE_CGROUP_SOCKOPT, BPF_CGROUP_SETSOCKOPT
SK_MSG_VERDICT = 7
_RB_CALLBACK = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


def _file_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def cgroup2_root(prefer: str = "") -> str:
    """Where the unified (v2) hierarchy is mounted: /sys/fs/cgroup, or .../unified on hybrid hosts.
    `prefer` (the node's, under a container's host root) when it is a cgroup2 mount itself: a
    pod's own /sys/fs/cgroup is its cgroup namespace's, where programs would see the pod only."""
    with open("/proc/self/mounts") as f:
        mounts = [(p[1], p[2]) for p in (line.split() for line in f) if len(p) > 2]
    if prefer:
        for path in (prefer, f"{prefer}/unified"):   # a hybrid (v1 + v2) node keeps v2 below
            if (path, "cgroup2") in mounts:
                return path
        raise OSError(f"{prefer} is not a cgroup2 mount: the node's cgroup hierarchy must be mounted "
                      "there (host_root)")
    for path, kind in mounts:
        if kind == "cgroup2":
            return path
    raise OSError("no cgroup2 hierarchy is mounted: the connect and SQL guards need one")


_SYS_PIDFD_OPEN, _SYS_PIDFD_GETFD = 434, 438
UNREACHABLE = ("", 0)     # Probes.guard_socket: a socket the daemon could not reach
_PIDFD_THREAD = os.O_EXCL
_SO_COOKIE = 57
_TCP_ESTABLISHED, _TCP_SYN_SENT = 1, 2
_BPF_ANY, _BPF_NOEXIST = 0, 1


def take_fd(pid: int, fd: int, thread: bool = False) -> int:
    """A descriptor of our own for another process's open file (pidfd_getfd): the same open
    file, never a reopen by path.  thread: pid is a thread (with a file table of its own).
    Raises OSError with the call's errno."""
    libc = ct.CDLL(None, use_errno=True)
    pidfd = libc.syscall(_SYS_PIDFD_OPEN, pid, _PIDFD_THREAD if thread else 0)
    if pidfd < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    try:
        dup = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        err = ct.get_errno()
    finally:
        os.close(pidfd)
    if dup < 0:
        raise OSError(err, os.strerror(err))
    return int(dup)


def _libbpf() -> ct.CDLL:
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
    lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
    lib.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                   ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]
    lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
    return lib


def shared_map(path: str, map_type: int, key_size: int, value_size: int, entries: int) -> None:
    """Make and pin a map that every daemon generation shares (bcc's BPF_TABLE_PINNED opens it,
    and does not make one), unless it is there."""
    if os.path.exists(path):
        return
    lib = _libbpf()
    lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_void_p]
    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    name = "".join(c if c.isalnum() else "_" for c in os.path.basename(path))[:15]   # [A-Za-z0-9_.]
    fd = int(lib.bpf_map_create(map_type, name.encode(), key_size, value_size,
                                entries, None))
    if fd < 0:
        err = ct.get_errno() or -fd
        raise OSError(err, f"bpf_map_create {path}: {os.strerror(err)}")
    try:
        if lib.bpf_obj_pin(fd, path.encode()) != 0 and not os.path.exists(path):
            err = ct.get_errno()
            raise OSError(err, f"bpf_obj_pin {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _link_create(lib: ct.CDLL, prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link: the attachment dies with the daemon, so a crash leaves nothing behind."""
    fd = int(lib.bpf_link_create(prog_fd, target_fd, attach_type, None))
    if fd < 0:
        err = ct.get_errno() or -fd
        raise OSError(err, f"bpf_link_create(attach type {attach_type}): {os.strerror(err)}")
    return fd


def detach_stale(lib: ct.CDLL, cg_fd: int, attach_type: int) -> int:
    """Detach our programs that an older daemon attached without a link (they outlive it)."""
    ids = (ct.c_uint32 * 64)()
    cnt, flags = ct.c_uint32(64), ct.c_uint32(0)
    if lib.bpf_prog_query(cg_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)) != 0:
        return 0
    gone = 0
    for prog_id in ids[: cnt.value]:
        fd = int(lib.bpf_prog_get_fd_by_id(prog_id))
        if fd < 0:
            continue
        try:
            info = ct.create_string_buffer(256)
            size = ct.c_uint32(256)
            if lib.bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) == 0:
                name = info.raw[64:80].split(b"\0", 1)[0]      # bpf_prog_info.name
                if name.startswith(b"aw_") and lib.bpf_prog_detach2(fd, cg_fd, attach_type) == 0:
                    gone += 1
        finally:
            os.close(fd)
    return gone


def _deferred_autoload() -> type:
    """bcc's BPF, but the programs it loads by their names (tracepoint__*, raw_tracepoint__*) are
    not loaded one after another inside its constructor: Probes._load_all loads them with every
    other program at once, then BPF._trace_autoload attaches them."""
    from bcc import BPF

    class DeferredAutoload(BPF):  # type: ignore[misc]
        def _trace_autoload(self) -> None:
            pass

    return DeferredAutoload


class Probes:
    """The loaded probes: ring buffer, tracking and connection maps, counters."""

    def __init__(self, limits: pr.ProbeLimits | None = None,
                 compiled: Callable[[], None] | None = None) -> None:
        """compiled: called once bcc's compile is over, while the kernel verifies the programs
        (the daemon opens its embedded store then)."""
        from bcc import BPF  # a system package (python3-bpfcc), reached through the venv

        self.limits = limits or pr.ProbeLimits()
        ensure_pin_dir(self.limits.pin_dir)
        shared_map(os.path.join(self.limits.pin_dir, VOUCH_PIN), *VOUCH_LAYOUT)
        self.kfuncs = kfuncs.ids() if "-DAW_BTF=1" in btf.cflags() else None
        text, cflags = bpf_source(self.limits, self.kfuncs)
        self.btf = "-DAW_BTF=1" in cflags   # exec, cwd and exit status without syscall tracepoints
        self.syscall_hook = syscall_hook(self.limits)
        self.bpf = _deferred_autoload()(text=text.encode(), cflags=cflags)
        if self.kfuncs is not None:   # before anything loads them (_load_all, attach_tracepoint)
            for name in kfuncs.PROGRAMS:
                kfuncs.patch(self.bpf, name, self.kfuncs)
        if compiled is not None:
            compiled()
        self.load_seconds = self._load_all()
        BPF._trace_autoload(self.bpf)   # attaches the tracepoint__* and raw_tracepoint__* _load_all loaded
        for tp, fn in NAMED_TRACEPOINTS.items():
            self.bpf.attach_tracepoint(tp=tp, fn_name=fn)
        self._adopt_lib: ct.CDLL | None = None
        self._guard_fds = (-1, -1)
        self.adoption_errors = 0        # sockets of tracked processes the daemon could not reach
        self._old_verdict_rings: list[tuple[str, int]] = []   # earlier generations' (Pins.predecessors)
        self._tracked = self.bpf[b"tracked"]
        self._comms = self.bpf[b"agent_comms"]
        self._counters = self.bpf[b"counters"]
        self._conns = self.bpf[b"conns"]
        self._filter = self.bpf[b"track_filter"]
        self._handler: Callable[[bytes], None] | None = None
        # files with uprobes, by (device, inode): one file reached by several paths (a container's
        # process maps it as /proc/PID/root/...) is attached once, or its calls would count twice
        self._ssl_libs: set[tuple[int, int]] = set()
        self._libc_libs: set[tuple[int, int]] = set()
        # the key of the TLS guard's retry digest (guard_tls.bpf.c): the agent must not know it
        key = self.bpf[b"digest_key"]
        for i, word in enumerate(struct.unpack("<QQ", os.urandom(16))):
            key[ct.c_int(i)] = ct.c_uint64(word)
        if self.syscall_hook:
            progs = self.bpf[b"exit_progs"]
            for op, exit_prog in EXIT_PROGRAMS.items():
                progs[ct.c_int(op)] = ct.c_int(self.bpf.load_func(exit_prog.encode(), BPF.RAW_TRACEPOINT).fd)
        # the argv scanner, tail-called from sched_process_exec (guard.bpf.c)
        for i, prog in enumerate(guard.EXEC_PROGRAMS):
            fn = self.bpf.load_func(prog.encode(), BPF.TRACEPOINT)
            self.bpf[b"exec_progs"][ct.c_int(i)] = ct.c_int(fn.fd)
        if self.btf:   # a working directory deeper than one program walks (process.bpf.c)
            more = self.bpf.load_func(b"aw_cwd_more", BPF.TRACEPOINT)
            self.bpf[b"cwd_progs"][ct.c_int(0)] = ct.c_int(more.fd)
        if self.btf and raw_syscalls():   # net.bpf.c AW_SOCK_CAPTURE: the socket tracepoints
            # a ClientHello ties an SSL object that encrypts into memory to its socket
            hello = self.bpf.load_func(b"aw_ssl_hello", BPF.RAW_TRACEPOINT)
            self.bpf[b"net_progs"][ct.c_int(0)] = ct.c_int(hello.fd)
        self._open_rings()
        self._links: list[int] = []
        self._link_names: list[str] = []
        self.cgroup_guards = True
        self.unix_connect_guard = False
        try:
            self._attach_guards()
        except OSError as e:   # no cgroup2 here: exec and TLS guards still work
            self.cgroup_guards = False
            log.error("connect, SQL and quarantine guards are off: %s", e)
        # every attachment pinned: the guards outlive a killed daemon (probes/persist.py)
        self.pins: Pins | None = None
        try:
            self.pins = Pins(self.limits.pin_dir)
            self.pins.adopt(self.bpf, list(zip(self._link_names, self._links, strict=True)),
                            NAMED_TRACEPOINTS)
        except OSError as e:
            log.error("kernel guards are not pinned, they end with the daemon: %s", e)
            self.pins = None
        self._succession()   # until succeed(): an earlier generation's sock_ops still runs
        loader_guard = self.limits.loader_guard
        if loader_guard is None:   # no syscall hook to kill at the first syscall: the loader guards
            loader_guard = not self.syscall_hook
        self.loaders = self.attach_loader_guards() if loader_guard else []
        self.released_mib = release_unused_pages(COMPILER_LIBS)   # compiled and loaded: never again

    def _attach_guards(self) -> None:
        """cgroup hooks on the root of the v2 hierarchy (they cost nothing for untracked processes)."""
        from bcc import BPF

        lib = _libbpf()
        cg = os.open(cgroup2_root(self.limits.cgroup_root), os.O_RDONLY | os.O_DIRECTORY)
        try:
            programs = list(CGROUP_PROGRAMS)
            unix = btf.unix_connect_attach_type()
            if unix is not None and self.btf:   # 6.7+: Postgres over Unix sockets (guard.bpf.c)
                programs.append(("aw_connect_unix", 18, unix))
            self.unix_connect_guard = unix is not None and self.btf
            for name, prog_type, attach_type in programs:
                if detach_stale(lib, cg, attach_type):
                    log.warning("detached a stale %s program left by an earlier run", name)
                fn = self.bpf.load_func(name.encode(), prog_type, attach_type=attach_type)
                self._links.append(_link_create(lib, fn.fd, cg, attach_type))
                self._link_names.append(name)
        finally:
            os.close(cg)
        classes = self.bpf[b"char_classes"]
        leaf = classes.Leaf()
        ct.memmove(ct.addressof(leaf), guard.char_classes(), 256)
        classes[ct.c_int(0)] = leaf
        for i, prog in enumerate(guard.MSG_PROGRAMS):
            self.bpf[b"msg_progs"][ct.c_int(i)] = ct.c_int(self.bpf.load_func(prog.encode(), BPF.SK_MSG).fd)
        for i, prog in enumerate(guard.SSL_PROGRAMS):
            self.bpf[b"ssl_progs"][ct.c_int(i)] = ct.c_int(self.bpf.load_func(prog.encode(), BPF.KPROBE).fd)
        msg = self.bpf.load_func(b"aw_sk_msg", BPF.SK_MSG)
        BPF.attach_func(msg, self._table_fd(b"guard_socks"), SK_MSG_VERDICT)

    def is_offender(self, pid: int) -> bool:
        """Did this process try to signal, ptrace or bpf() the daemon (guard.bpf.c)?"""
        try:
            self.bpf[b"offenders"][ct.c_uint32(pid)]
        except KeyError:
            return False
        return True

    def deciding(self) -> dict[int, int]:
        """Execs stopped for a decision (pid -> boot ns of the stop), also those a previous daemon left."""
        return {k.value: v.value for k, v in self.bpf[b"exec_deciding"].items()}

    def judge_transport(self, pid: int, since_boot_ns: int) -> None:
        """pid runs because an exec rule's parent_unless held (git's own helper, fed by a judged
        push): HTTP rules with unless_judged_transport let it through (guard.bpf.c)."""
        self.bpf[b"judged_transports"][ct.c_uint32(pid)] = ct.c_uint64(since_boot_ns)

    def judged_transport(self, pid: int) -> bool:
        try:
            self.bpf[b"judged_transports"][ct.c_uint32(pid)]
        except KeyError:
            return False
        return True

    def deciding_add(self, pid: int, since_boot_ns: int) -> None:
        """A process the kernel stopped that stays stopped for the daemon (a session held for its
        person's login): the decision stop's guards kill whoever resumes it, as for an exec."""
        self.bpf[b"exec_deciding"][ct.c_uint32(pid)] = ct.c_uint64(since_boot_ns)

    def decided(self, pid: int) -> None:
        """The daemon resumes or kills this exec now: a system call from it is no longer an escape."""
        with contextlib.suppress(KeyError):
            del self.bpf[b"exec_deciding"][ct.c_uint32(pid)]

    def set_daemon_cgroups(self, ids: set[int]) -> None:
        """The cgroups whose freezing freezes the daemon (guard.bpf.c cgroup_freeze)."""
        m = self.bpf[b"daemon_cgroups"]
        for k in list(m.keys()):
            if k.value not in ids:
                del m[k]
        for i in ids:
            m[ct.c_uint64(i)] = ct.c_uint8(1)

    def stopped_at(self, pid: int) -> int:
        """Boot ns of the last stop signal generated for a tracked process, 0 if none."""
        try:
            return int(self.bpf[b"stopped_at"][ct.c_uint32(pid)].value)
        except KeyError:
            return 0

    def guard_map(self, name: str) -> Any:
        """One of guard.bpf.c's maps, for enforce.kernel to program."""
        return self.bpf[name.encode()]

    def _open_rings(self) -> None:
        """Both ring buffers through libbpf, each drained on its own (bcc polls them together)."""
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
        lib.ring_buffer__new.restype = ct.c_void_p
        lib.ring_buffer__new.argtypes = [ct.c_int, _RB_CALLBACK, ct.c_void_p, ct.c_void_p]
        # consume through PyDLL: it keeps the GIL for the whole drain.  Through CDLL the GIL was
        # let go for the call and taken back for every record's callback, and a thread waiting
        # for it (the store writer) got it at each of those points and kept it up to a switch
        # interval (5 ms) before the next record.  Python still hands the GIL to other threads
        # every switch interval within the callbacks.
        consume = ct.PyDLL("libbpf.so.1").ring_buffer__consume
        consume.argtypes = [ct.c_void_p]
        consume.restype = ct.c_int
        self._consume = consume
        lib.ring_buffer__free.argtypes = [ct.c_void_p]
        lib.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
        self._rb_lib = lib
        # the callbacks must live as long as the rings
        self._callbacks = (_RB_CALLBACK(self._on_record), _RB_CALLBACK(self._on_verdict))
        self._rings: list[int] = []
        for name, cb in zip((b"events", b"verdicts"), self._callbacks, strict=True):
            rb = lib.ring_buffer__new(self.bpf[name].map_fd, cb, None, None)
            if not rb:
                raise OSError(ct.get_errno(), f"ring_buffer__new({name.decode()}) failed")
            self._rings.append(rb)
        self._epoll_fds = [lib.ring_buffer__epoll_fd(rb) for rb in self._rings]
        self._since_verdicts = 0
        self._busy_until = 0.0     # poll every RING_BUSY_POLL_MS until then

    def _on_verdict(self, _ctx: object, data: int, size: int) -> int:
        try:
            if self._handler is not None:
                self._handler(ct.string_at(data, size))
        except Exception:    # returned to libbpf as garbage, a negative value would stop the drain
            log.exception("a verdict record's handler failed")
        return 0

    def drain_verdicts(self) -> None:
        if self._rings:
            self._consume(self._rings[1])
            for _, rb in self._old_verdict_rings:
                self._consume(rb)

    def _on_record(self, _ctx: object, data: int, size: int) -> int:
        try:
            if self._handler is not None:
                self._handler(ct.string_at(data, size))
                self._since_verdicts += 1
                if self._since_verdicts >= 64:   # a capture backlog must not delay a decision
                    self._since_verdicts = 0
                    self.drain_verdicts()
        except Exception:    # returned to libbpf as garbage, a negative value would stop the drain
            log.exception("a record's handler failed")
        return 0

    def poll(self, handler: Callable[[bytes], None], timeout_ms: int = 100) -> None:
        """Hand every pending record (raw bytes) to handler, verdicts first; wait up to timeout_ms,
        or RING_BUSY_POLL_MS within RING_BUSY_WINDOW_S of a poll that was woken or found
        records: the events ring wakes the daemon at most once per RING_WAKE_NS a CPU
        (process.bpf.c ring_wake), so while records flow the ones after a wakeup are fetched
        by this shorter wait."""
        self._handler = handler
        if time.monotonic() < self._busy_until:
            timeout_ms = min(timeout_ms, pr.RING_BUSY_POLL_MS)
        woken, _, _ = select.select(self._epoll_fds, [], [], timeout_ms / 1000)
        self.drain_verdicts()
        # woken, even with nothing to read (a verdict; a record still being written on another
        # CPU, where the consume stops): a record without a wakeup may follow
        if self._consume(self._rings[0]) > 0 or woken:
            self._busy_until = time.monotonic() + pr.RING_BUSY_WINDOW_S
        self.drain_verdicts()

    def set_agent_comms(self, comms: Iterable[tuple[str, int]]) -> None:
        """Replace the comm -> profile table the kernel uses to start sessions."""
        self._comms.clear()
        for comm, profile in comms:
            key = pr.CommKey(comm.encode()[: pr.TASK_COMM_LEN - 1])
            self._comms[key] = ct.c_uint32(profile)

    def _filter_add(self, pid: int, delta: int) -> None:
        """Keep the kernel's track_filter count in step with `tracked` (see process.bpf.c)."""
        slot = ct.c_int(pid & 0xFFFF)
        self._filter[slot] = ct.c_uint32(max(0, self._filter[slot].value + delta))

    def track(self, pid: int, session: int, profile: int) -> None:
        """A process found running (the /proc scan): joined, so what it shares is not known."""
        new = not self.is_tracked(pid)
        self._tracked[ct.c_uint32(pid)] = pr.TrackInfo(session, profile, pr.TRACK_JOINED)
        if new:
            self._filter_add(pid, 1)

    def untrack_session(self, session: int) -> list[int]:
        """Forget every process of a session; returns their pids."""
        gone = [k.value for k, v in self._tracked.items() if v.session == session]
        for pid in gone:
            with contextlib.suppress(KeyError):
                del self._tracked[ct.c_uint32(pid)]
                self._filter_add(pid, -1)
        return gone

    def session_of(self, pid: int) -> int | None:
        try:
            return int(self._tracked[ct.c_uint32(pid)].session)
        except KeyError:
            return None

    def is_tracked(self, pid: int) -> bool:
        try:
            self._tracked[ct.c_uint32(pid)]
        except KeyError:
            return False
        return True

    def guard_socket(self, pid: int, fd: int, session: int, thread: bool = False,
                     servers: frozenset[int] = frozenset()) -> tuple[str, int] | None:
        """A connected TCP socket a tracked process already has that no guard holds (it was opened
        while no SQL or HTTP rule was loaded, or by a process that joined a session later): put in
        the sk_msg guard as AW_PG_JOINED, where every send is refused (where its messages start is
        unknown, and an agent can leave half a message in the server before the guard sees it), and
        then shut down (a client that saw its send refused may wait for the server's answer, as
        libpq does), so the client reconnects, under the guard.  A socket an earlier daemon's guard
        holds (EBUSY: a socket is in one sk_msg sockhash at most) stays with it (Pins.predecessors).
        The daemon takes its own descriptor of the socket (pidfd_getfd; thread: pid is a thread
        with a file table of its own) and closes it after.  servers: the local ports the process's
        network namespace listens on (a connection accepted on one is a server's, which the guard
        does not judge, and is left alone).  Returns the peer of a connection it closed, None when it
        left the socket alone, UNREACHABLE when the socket could not be reached (the caller fails
        closed)."""
        import socket

        lib = self._libs()
        try:
            dup = take_fd(pid, fd, thread)
        except OSError as e:
            if e.errno in (errno.EBADF, errno.ESRCH):
                return None                  # closed meanwhile, or gone
            self.adoption_errors += 1
            return UNREACHABLE               # EPERM: refused (an LSM, Yama's ptrace_scope 3); EINVAL:
        try:                                 # a thread's pidfd on a kernel before PIDFD_THREAD (6.9)
            sock = socket.socket(fileno=dup)
        except OSError:                      # no longer a socket: the fd was reused meanwhile
            os.close(dup)
            return None
        with sock:
            try:
                if (sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM
                        or sock.proto not in (0, socket.IPPROTO_TCP)):
                    return None             # not TCP (SCTP, MPTCP)
                cookie = ct.c_uint64(struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8))[0])
                tcp_state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                if tcp_state == _TCP_ESTABLISHED and sock.getsockname()[1] in servers:
                    return None              # accepted: a server's side (sock_ops guards clients only)
                if tcp_state == _TCP_SYN_SENT:
                    # connecting (its connect() ran while no stream rule was loaded): sock_ops puts
                    # it in the guard when it is established, as any other
                    try:
                        self.bpf[b"guard_conns"][cookie] = guard.GuardConn(session, 0, 0, 0, 0)
                    except Exception:        # bcc raises a bare Exception for a map update
                        self.adoption_errors += 1
                        return UNREACHABLE
                    tcp_state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                if tcp_state != _TCP_ESTABLISHED:
                    return None             # connecting (above), listening, closing
            except OSError:
                return None
            key = ct.c_int(dup)
            state = guard.GuardConn(session, guard.PG_JOINED, 0, 0, 0)
            if lib.bpf_map_update_elem(self._guard_fds[0], ct.byref(key), ct.byref(state), _BPF_NOEXIST) < 0:
                return None                 # EEXIST: this daemon's guard holds it already
            value = ct.c_uint32(dup)
            if lib.bpf_map_update_elem(self._guard_fds[1], ct.byref(cookie), ct.byref(value), _BPF_ANY) < 0:
                err = ct.get_errno()
                if err == errno.EBUSY:       # an earlier daemon's guard holds it, and goes on (the
                    return None              # state written above is never read: ours is not its map)
                lib.bpf_map_delete_elem(self._guard_fds[0], ct.byref(key))
                self.adoption_errors += 1
                log.warning("cannot put pid %d's socket %d in the guard: %s", pid, fd, os.strerror(err))
                return UNREACHABLE
            try:
                peer = sock.getpeername()
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:                  # closed meanwhile: nothing more can go out on it
                return None
        return str(peer[0]), int(peer[1])

    def _libs(self) -> ct.CDLL:
        if self._adopt_lib is None:
            self._adopt_lib = _libbpf()
            self._guard_fds = (self._table_fd(b"guard_sk"), self._table_fd(b"guard_socks"))
        return self._adopt_lib

    def succeed(self) -> None:
        """Take over from the guards earlier daemons left pinned, once this one guards everything
        they did: the caller has attached the TLS uprobes of the system's libssl and of every
        library a running agent maps (an earlier generation's uprobes on them go with it).  Their
        TLS framing comes over first (Pins.hand_over), so a stream goes on from where it was."""
        if self.pins is None:
            return
        self.pins.hand_over(b"ssl_streams", self._table_fd(b"ssl_streams"))
        self.pins.drop_older()
        self._succession()
        for gen, (pins, _) in self.pins.predecessors.items():   # their guards' verdicts are recorded too
            for pin in pins:
                if pin.endswith("-verdicts") and self._rings:
                    rb = self._rb_lib.ring_buffer__new(self.pins.fd(pin), self._callbacks[1], None, None)
                    if rb:
                        self._old_verdict_rings.append((gen, rb))

    def _succession(self) -> None:
        """Tell sock_ops whether an earlier daemon's guard may hold sockets (EBUSY at the sockhash
        is then its own; otherwise someone else's sk_msg, and the connection is reset)."""
        busy = self.pins is not None and bool(self.pins.older or self.pins.predecessors)
        self.bpf[b"succession"][ct.c_int(0)] = ct.c_uint64(int(busy))

    def _table_fd(self, name: bytes) -> int:
        """A map's fd (bcc 0.26's Table() does not know sockhash or sk storage)."""
        from bcc.libbcc import lib as libbcc

        return int(libbcc.bpf_table_fd(self.bpf.module, name))

    def sweep_ssl_streams(self, alive: Callable[[int, int | None], bool]) -> int:
        """Forget the TLS framing of processes that are gone (ssl_streams is no LRU, so that an agent
        cannot evict its own stream's framing; a full map kills the writer).  alive(pid, start in
        clock ticks since boot, None when unknown): a process whose number was reused is told apart
        by its start.  Returns how many went."""
        tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        n = 0
        for name in (b"ssl_streams", b"ssl_retry"):
            table = self.bpf[name]
            gone = [k for k in list(table) if not alive(k.tgid, k.start // tick_ns if k.start else None)]
            for k in gone:
                with contextlib.suppress(KeyError):
                    del table[k]
            n += len(gone)
        return n

    def release_predecessors(self) -> None:
        """Earlier daemons' generations whose last guarded connection closed: let them go."""
        if self.pins is None:
            return
        gone = set(self.pins.release_predecessors())
        self._succession()
        if gone:
            for gen, rb in self._old_verdict_rings:
                if gen in gone:
                    self._consume(rb)    # the last of its verdicts
                    self._rb_lib.ring_buffer__free(rb)
            self._old_verdict_rings = [(g, rb) for g, rb in self._old_verdict_rings if g not in gone]
            log.info("the guard of earlier daemons (%s) held its last connection", ", ".join(sorted(gone)))

    def watch_socket(self, pid: int, fd: int, conn_id: int, sock_type: int) -> None:
        """Capture a socket the process already had when it became tracked."""
        value = net.ConnVal(conn_id, (ct.c_uint64 * 2)(0, 0), sock_type, 0, (ct.c_uint64 * 2)(0, 0))
        self._conns[ct.c_uint64((pid << 32) | fd)] = value

    def forget_socket(self, pid: int, fd: int) -> None:
        """The process is gone: its sockets closed without a close() the kernel saw (a Unix
        socket, any socket at exit); without this their entries would fill `conns`."""
        with contextlib.suppress(KeyError):
            del self._conns[ct.c_uint64((pid << 32) | fd)]

    def tls_wait(self, st: os.stat_result) -> None:
        """A file that exports OpenSSL and has no uprobes yet (daemon/tls_libs.py found it ahead of
        its first exec): a tracked exec of it stops until attach_openssl has run for it
        (guard_exec.bpf.c tls_unattached)."""
        if (st.st_dev, st.st_ino) in self._ssl_libs:
            return
        try:
            self.bpf[b"tls_unattached"][guard.FileKey(guard.inode_key(st), 0)] = ct.c_uint8(1)
        except Exception as e:   # full (1,024 files): their first execs race the attach, as before
            log.warning("cannot hold the first exec of a file that exports OpenSSL: %s", e)

    def attach_openssl(self, library: str, name: str = "") -> None:
        """uprobes on one libssl file (every process mapping it shares them); its execs no longer
        stop for them (tls_wait).  `library` may be a /proc/PID/exe or map_files link (the file
        itself, in any mount namespace, deleted or not); `name` is what the log calls it."""
        try:
            st = os.stat(library)
        except OSError:
            return
        key = st.st_dev, st.st_ino
        try:
            if key in self._ssl_libs:
                return
            self._ssl_libs.add(key)
            self._attach_openssl(library, name or library)
        finally:
            self.tls_unwait(st)

    def tls_unwait(self, st: os.stat_result) -> None:
        """A file's execs no longer stop for its uprobes: attached, or tried."""
        with contextlib.suppress(KeyError):
            del self.bpf[b"tls_unattached"][guard.FileKey(guard.inode_key(st), 0)]

    def _attach_openssl(self, library: str, name: str) -> None:
        from bcc import BPF

        for sym, fn, fn_ret in SSL_PROBES:
            try:
                if self.pins is not None:   # linked and pinned: the TLS guards outlive the daemon too
                    path, off = BPF._check_path_symbol(library.encode(), sym.encode(), None, -1, 0)
                    tag = f"{hashlib.blake2b(path, digest_size=4).hexdigest()}-{sym}"
                    entry = self.bpf.load_func(fn.encode(), BPF.KPROBE)
                    ret = self.bpf.load_func(fn_ret.encode(), BPF.KPROBE)
                    self.pins.uprobe(entry.fd, path.decode(), off, False, f"uprobe-{tag}")
                    self.pins.uprobe(ret.fd, path.decode(), off, True, f"uretprobe-{tag}")
                    continue
                self.bpf.attach_uprobe(name=library.encode(), sym=sym.encode(), fn_name=fn.encode())
                self.bpf.attach_uretprobe(name=library.encode(), sym=sym.encode(), fn_name=fn_ret.encode())
            except Exception as e:   # an old libssl without the _ex variants
                if b"Failed to load" in str(e).encode():
                    raise                # our program, not the library: never hide that
                log.debug("no uprobe on %s:%s: %s", library, sym, e)
        # SSL_free and SSL_clear forget a connection's framing (guard_tls.bpf.c ssl_streams): its SSL *
        # may be reused, for another connection; SSL_sendfile and early data are refused
        for forget, prog in ((b"SSL_free", b"aw_ssl_free"), (b"SSL_clear", b"aw_ssl_free"),
                           (b"SSL_sendfile", b"aw_ssl_refuse"), (b"SSL_write_early_data", b"aw_ssl_refuse")):
            try:
                if self.pins is not None:
                    path, off = BPF._check_path_symbol(library.encode(), forget, None, -1, 0)
                    tag = f"{hashlib.blake2b(path, digest_size=4).hexdigest()}-{forget.decode()}"
                    entry = self.bpf.load_func(prog, BPF.KPROBE)
                    self.pins.uprobe(entry.fd, path.decode(), off, False, f"uprobe-{tag}")
                else:
                    self.bpf.attach_uprobe(name=library.encode(), sym=forget, fn_name=prog)
            except Exception as e:
                if b"Failed to load" in str(e).encode():
                    raise
                log.debug("no uprobe on %s:%s: %s", library, forget.decode(), e)
        log.info("OpenSSL uprobes attached to %s", name)

    def programs(self) -> list[tuple[bytes, int, int]]:
        """Every program this start loads, (name, program type, attach type): bcc's automatic ones
        (tracepoint__*, raw_tracepoint__*) and every one the code below asks for, the verifier's
        slowest first (0.5 to 1.1 s each on this VM: the SQL and HTTP matchers, the argv DFA, the
        socket tracepoints, the failed-exec uprobes)."""
        from bcc import BPF
        from bcc.libbcc import lib as libbcc

        heavy = [b"aw_http_msg", b"aw_exec_argv", b"aw_http_ssl", b"aw_sql_ssl", b"aw_sql_msg",
                 b"raw_tracepoint__sock_recv_length", b"raw_tracepoint__sock_send_length",
                 b"aw_exec_failed", b"aw_execat_failed", *(n.encode() for n in EXIT_PROGRAMS.values())]
        kinds: dict[bytes, tuple[int, int]] = {}
        for i in range(libbcc.bpf_num_functions(self.bpf.module)):
            name = libbcc.bpf_function_name(self.bpf.module, i)
            if name.startswith(b"tracepoint__"):
                kinds[name] = (BPF.TRACEPOINT, -1)
            elif name.startswith(b"raw_tracepoint__"):
                kinds[name] = (BPF.RAW_TRACEPOINT, -1)
        kinds.update({name: (BPF.TRACEPOINT, -1) for name in NAMED_TRACEPOINTS.values()})
        if self.syscall_hook:
            kinds.update({name.encode(): (BPF.RAW_TRACEPOINT, -1) for name in EXIT_PROGRAMS.values()})
        kinds.update({name.encode(): (BPF.TRACEPOINT, -1) for name in guard.EXEC_PROGRAMS})
        if self.btf:
            kinds[b"aw_cwd_more"] = (BPF.TRACEPOINT, -1)
            if raw_syscalls():
                kinds[b"aw_ssl_hello"] = (BPF.RAW_TRACEPOINT, -1)
            kinds.update({b"aw_exec_failed": (BPF.KPROBE, -1), b"aw_execat_failed": (BPF.KPROBE, -1)})
            unix = btf.unix_connect_attach_type()
            if unix is not None:
                kinds[b"aw_connect_unix"] = (18, unix)
        kinds.update({name.encode(): (prog_type, attach) for name, prog_type, attach in CGROUP_PROGRAMS})
        kinds.update({name.encode(): (BPF.SK_MSG, -1) for name in (*guard.MSG_PROGRAMS, "aw_sk_msg")})
        kinds.update({name.encode(): (BPF.KPROBE, -1) for name in guard.SSL_PROGRAMS})
        kinds.update({name.encode(): (BPF.KPROBE, -1)
                      for _, entry, ret in SSL_PROBES for name in (entry, ret)})
        kinds.update({name: (BPF.KPROBE, -1)
                      for name in (b"aw_ssl_free", b"aw_ssl_refuse", b"aw_loader_entry")})
        order = [n for n in heavy if n in kinds] + [n for n in kinds if n not in heavy]
        return [(name, *kinds[name]) for name in order]

    def _load_all(self) -> float:
        """Load every program on every CPU at once: the kernel verifies each in the loading thread
        (9.3 s of CPU in all on a 2-core VM), and bcc's load releases the GIL.  Loaded one after
        another, but for five of them, they took 6.9 s there; all at once, 4.9 s.  Later load_func
        calls find them loaded.  Returns the seconds it took."""
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for done in [pool.submit(self.bpf.load_func, name, kind, attach_type=attach)
                         for name, kind, attach in self.programs()]:
                done.result()
        return time.monotonic() - t0

    def attach_loader_guards(self) -> list[str]:
        """The entry-point uprobe of every dynamic loader on the host (guard.bpf.c
        aw_loader_entry): a process resumed while its exec waits for a decision dies before
        the loader's first instruction.  Returns the loaders guarded."""
        import glob

        from bcc import BPF

        fn = self.bpf.load_func(b"aw_loader_entry", BPF.KPROBE)
        seen: set[tuple[int, int]] = set()
        done: list[str] = []
        for path in sorted({os.path.realpath(p) for g in LOADER_GLOBS for p in glob.glob(g)}):
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                off = elf_entry_offset(path)
                if self.pins is not None:
                    self.pins.uprobe(fn.fd, path, off, False, f"uprobe-loader-{st.st_ino:x}")
                else:
                    self.bpf.attach_uprobe(name=path.encode(), addr=off, fn_name=b"aw_loader_entry")
                done.append(path)
            except (OSError, ValueError) as e:
                log.warning("no decision-stop guard on the loader %s: %s", path, e)
        log.info("decision-stop guard at the entry of %s", ", ".join(done) or "no loader")
        return done

    def attach_exec_failures(self, library: str, name: str = "") -> int:
        """uprobes just after the execve/execveat syscall instructions of one libc (with the
        kernel's BTF; process.bpf.c).  A successful exec never returns there, so they cost
        nothing but on failed execs.  `library` may be a /proc/PID/map_files link; `name` is
        what the log calls it.  Returns how many sites were found."""
        key = _file_key(library)
        if key is None or key in self._libc_libs or not self.btf:
            return 0
        self._libc_libs.add(key)
        from bcc import BPF

        sites: dict[int, str] = {}
        for sym in (b"execve", b"execveat", b"fexecve"):
            try:
                path, off = BPF._check_path_symbol(library.encode(), sym, None, -1, 0)
                with open(path, "rb") as f:
                    f.seek(off)
                    code = f.read(512)
            except Exception as e:   # noqa: BLE001 - a libc without the symbol (fexecve, execveat)
                log.debug("no %s in %s: %s", sym.decode(), library, e)
                continue
            # `mov $NR, %eax; syscall` of glibc's wrappers; the probe goes on the next instruction
            for pattern, fn in ((EXECVE_SYSCALL, "aw_exec_failed"), (EXECVEAT_SYSCALL, "aw_execat_failed")):
                at = code.find(pattern)
                while at >= 0:
                    sites.setdefault(off + at + len(pattern), fn)
                    at = code.find(pattern, at + 1)
        for addr, fn in sites.items():
            self.bpf.attach_uprobe(name=library.encode(), addr=addr, fn_name=fn.encode())
        log.info("failed-exec uprobes on %s: %d sites", name or library, len(sites))
        return len(sites)

    def counter(self, which: int) -> int:
        return int(self._counters[ct.c_int(which)].value)

    def close(self, keep_guards: bool = False) -> None:
        """keep_guards: leave the pinned guards in force (the daemon is going away uncleanly)."""
        if self.pins is not None:
            if keep_guards:
                self.pins.release()
            else:
                self.pins.remove()
        for rb in self._rings:
            self._rb_lib.ring_buffer__free(rb)
        self._rings = []
        for fd in self._links:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._links.clear()
        self.bpf.cleanup()

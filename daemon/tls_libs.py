"""Which libraries to put uprobes on: OpenSSL (plaintext) and libc (failed execs), the
system's and any a tracked process maps."""

from __future__ import annotations

import array
import logging
import os
import queue
import re
import struct
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

_LIBC = re.compile(r"/\S*libc\.so\.6$")
_CODE = re.compile(r"^(\S+)\s+r-xp\s+\S+\s+\S+\s+\d+\s+(/.*)$")   # an executable mapping of a file
SSL_EXPORTS = frozenset({b"SSL_write", b"SSL_read"})
_exports_seen: dict[tuple[int, int, int], bool] = {}     # (dev, inode, mtime) -> exports OpenSSL


def mapped_libssl(pid: int) -> dict[str, str]:
    """Files mapped by a process that export OpenSSL's SSL_write and SSL_read, whatever
    their name: a Python wheel's `libssl-1a2b3c4d.so.3`, a program that links OpenSSL in
    and exports it (Node).  Each file is read once (by inode and change time).  As
    _mapped_code: {link to the mapped file: its name in the process's maps}."""
    return {link: name for link, name in _mapped_code(pid).items() if _exports_openssl(link)}


class Ahead:
    """Files that export OpenSSL themselves (Node), found before their first exec in an agent
    session: each is handed to `found` (Probes.tls_wait), and a tracked exec of it then stops
    until its uprobes are on.  Attached at the exec record instead, they came about 0.1 s after
    the exec, and a script that connects at once lost its first connection's plaintext.

    Directories are read in a thread of their own, each once until it changes (by device, inode
    and modification time): the system's program directories at the start (1,336 files in
    0.45 s on this VM, Node the only exporter), then those on the PATH of every tracked exec
    (nvm's and a project's own `node` are not in /usr/bin).  An exporter elsewhere, not on a PATH
    (a copy run by its path), still has its first exec race the attach."""

    MAX_DIRS = 4096       # directories remembered; past them the oldest is forgotten (read again
                          # when a PATH names it again; red team: an agent filled a fixed table with
                          # empty directories, and a later PATH's Node was never read)
    MAX_FILES = 20_000    # entries read in one directory

    RECHECK_S = 2.0       # a PATH seen this recently is not stat()ed again

    def __init__(self, found: Callable[[os.stat_result], None]) -> None:
        self._found = found
        self._seen: OrderedDict[tuple[int, int], int] = OrderedDict()   # (dev, inode) -> mtime_ns read
        self._paths: dict[tuple[str, ...], float] = {}  # PATH dirs -> when last checked (monotonic)
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def scan_path(self, pid: int) -> None:
        """The directories on a tracked exec's PATH (about 18 µs for one seen in the last 2 s, 48 µs
        with eleven directories to stat)."""
        dirs = tuple(path_dirs(pid))
        now = time.monotonic()
        if not dirs or now - self._paths.get(dirs, -self.RECHECK_S) < self.RECHECK_S:
            return
        if len(self._paths) > 256:
            self._paths.clear()
        self._paths[dirs] = now
        self.scan(dirs)

    def scan(self, dirs: Iterable[str]) -> None:
        """Read these directories (in the background) unless read since they last changed."""
        for d in dirs:
            try:
                st = os.stat(d)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if self._seen.get(key) == st.st_mtime_ns:
                self._seen.move_to_end(key)
                continue
            self._seen[key] = st.st_mtime_ns
            self._seen.move_to_end(key)
            if len(self._seen) > self.MAX_DIRS:
                self._seen.popitem(last=False)
            self._queue.put(d)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tls-ahead", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            d = self._queue.get()
            try:
                with os.scandir(d) as it:
                    for n, entry in enumerate(it):
                        if n >= self.MAX_FILES:
                            break
                        self._look(entry.path)
            except OSError as e:
                log.debug("cannot read %s for OpenSSL exporters: %s", d, e)
            except Exception:   # one directory never ends the thread
                log.exception("reading %s for OpenSSL exporters", d)

    def _look(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        if st.st_mode & 0o170000 == 0o100000 and st.st_mode & 0o111 and st.st_size > 1 << 20 \
                and _exports_openssl(path):
            log.info("exports OpenSSL, found ahead of its first exec: %s (it waits for its uprobes)", path)
            self._found(st)


def system_dirs(dirs: Iterable[str], root: str = "") -> list[str]:
    """Program directories of the system at `root` (a DaemonSet's host root), as reached from here."""
    return [_under(root, d) for d in dirs]


def path_dirs(pid: int) -> list[str]:
    """The directories on a process's PATH (its environment at exec), as this daemon reaches them."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read(4 << 20)   # the kernel's limit for argv and environment together is below this
    except OSError:
        return []
    for var in env.split(b"\0"):
        if var.startswith(b"PATH="):
            root = "" if _same_root(pid) else f"/proc/{pid}/root"
            return [root + d for d in var[5:].decode(errors="replace").split(":")[:1024] if d.startswith("/")]
    return []


def exe_name(pid: int) -> str:
    """What a process's executable is called, for the log."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return f"/proc/{pid}/exe"


def exports_openssl(path: str) -> bool:
    """Whether a file exports OpenSSL's calls itself (Node), read once per file: a tracked exec's
    /proc/PID/exe, so that its uprobes are on before its first connection (the daemon's
    _attach_tls, while the exec waits; or at the exec record).  Not attached at the daemon's
    start, as the system's libssl is: every Node process of the host would pay for them
    (bench/host_cost_bench.py: 1.16 on 300 TLS connections from an untracked Node), where now
    they pay once a Node program ran in an agent session."""
    return _exports_openssl(path)


def _exports_openssl(path: str) -> bool:
    """Whether a file exports SSL_write and SSL_read, read once per file (by inode and change time)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    hit = _exports_seen.get(key)
    if hit is None:
        if len(_exports_seen) > 4096:
            _exports_seen.clear()
        hit = _exports_seen[key] = exports(path, SSL_EXPORTS) >= SSL_EXPORTS
    return hit


def _same_root(pid: int) -> bool:
    """Whether a process sees the file system the daemon sees (not a container's, nor the node's
    when the daemon is the one in a container)."""
    try:
        a, b = os.stat(f"/proc/{pid}/root"), os.stat("/")
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _mapped_code(pid: int) -> dict[str, str]:
    """The files a process maps executable: {/proc/PID/map_files/RANGE: the name its maps give}.
    The link is the mapped file itself, whatever its name means in the daemon's mount namespace
    (red team: a copy bind-mounted in a namespace of the agent's own over a file of the same
    name, whose uprobes by name went on the daemon's file) and when it is deleted (its name
    ends " (deleted)": it was skipped, and its calls went unread).  Reading the link takes
    CAP_SYS_ADMIN (deploy/: the daemon has it, for cgroup programs and pins)."""
    out: dict[str, str] = {}
    files: set[tuple[int, int]] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except OSError:
        return out
    for line in lines:
        m = _CODE.match(line.rstrip("\n"))
        if not m:
            continue
        # one entry a file, told by what the mapping is, not its name: two files can have one name
        # there (red team: a decoy mapped from a path, then a libssl copy bind-mounted over that path
        # in the agent's own mount namespace; the name's first mapping hid the copy)
        link = f"/proc/{pid}/map_files/{m.group(1)}"
        try:
            st = os.stat(link)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in files:
            files.add((st.st_dev, st.st_ino))
            out[link] = m.group(2)
    return out


# The most of a .dynsym and of its string table read (Node's are 1.8 and 5.3 MB): exports() runs on
# the capture thread at a tracked process's connect, for each file it maps, and reading is most of
# its cost (red team: sparse files shaped as ELF with a 64 MiB .dynsym, 0.35 s each, stalled capture;
# now about 10 ms each; a file past the bound is taken to export nothing, and logged).
MAX_DYNAMIC_TABLE = 16 << 20


def exports(path: str, names: frozenset[bytes]) -> set[bytes]:
    """Which of `names` an ELF file defines as dynamic function symbols (its .dynsym);
    an empty set for what is not a readable 64-bit little-endian ELF file.  Each name is found
    in the string table, then its symbols by their st_name, with bytes.find (no loop in Python
    over the symbols: Node has 75,000)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return set()
            shoff, = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
            if shentsize < 64 or not 0 < shnum < 4096:
                return set()
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [struct.unpack_from("<IIQQQQI", table, i * shentsize) for i in range(shnum)]
            found: set[bytes] = set()
            for _name, sh_type, _flags, _addr, offset, size, link in sections:
                if sh_type != 11 or link >= shnum:      # SHT_DYNSYM
                    continue
                _n, _t, _fl, _a, str_off, str_size, _l = sections[link]
                if size > MAX_DYNAMIC_TABLE or str_size > MAX_DYNAMIC_TABLE:
                    log.info("not read for OpenSSL's names: %s (a dynamic symbol table over %d MiB)", path,
                             MAX_DYNAMIC_TABLE >> 20)
                    continue
                f.seek(offset)
                syms = f.read(size)
                f.seek(str_off)
                strtab = f.read(str_size)
                for name in names - found:
                    if _defines_function(syms, strtab, name):
                        found.add(name)
            return found
    except (OSError, struct.error):
        return set()


def _defines_function(syms: bytes, strtab: bytes, name: bytes) -> bool:
    """Whether a symbol of the table is a defined function named `name`: each place the name
    stands whole in the string table (at most 16), then the symbols whose st_name is that place
    (at most 64 each), found as values of the array of every symbol's st_name."""
    st_names = array.array("I", memoryview(syms)[:len(syms) - len(syms) % 24].cast("I")[0::6].tobytes())
    at = strtab.find(b"\0" + name + b"\0")
    for _ in range(16):
        if at < 0:
            return False
        i = -1
        for _ in range(64):
            try:
                i = st_names.index(at + 1, i + 1)
            except ValueError:
                break
            _st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", syms, i * 24)
            if st_shndx != 0 and st_info & 0xF == 2:       # defined, STT_FUNC
                return True
        at = strtab.find(b"\0" + name + b"\0", at + 1)
    return False


def mapped_libc(pid: int) -> dict[str, str]:
    """The glibc a process maps (a container's own, for one), as _mapped_code."""
    return {link: name for link, name in _mapped_code(pid).items() if _LIBC.search(name)}


def system_libssl(root: str = "") -> set[str]:
    """The distribution's libssl files (ldconfig's cache), attached at start so a
    process's first TLS connection is not missed while its maps are read.  `root`: the
    node's / when the daemon runs in a container (its cache, its files)."""
    return _system("libssl.so", root)


def system_libc(root: str = "") -> set[str]:
    """The distribution's glibc (ldconfig's cache), for the failed-exec uprobes."""
    return _system("libc.so.6", root)


def _system(name: str, root: str = "") -> set[str]:
    cmd = ["ldconfig", "-p"] + (["-C", os.path.join(root, "etc/ld.so.cache")] if root else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    found = (line.split("=>")[-1].strip() for line in out.splitlines() if name in line and "=>" in line)
    return {_under(root, path) for path in found}


def _under(root: str, path: str) -> str:
    """`path` of the system at `root`, its symlinks followed inside that root (an absolute link
    target means root's /, not ours)."""
    if not root:
        return os.path.realpath(path)
    parts, seen = [p for p in path.split("/") if p], 0
    done = ""
    while parts and seen < 40:
        part = parts.pop(0)
        here = os.path.join(root, done.lstrip("/"), part)
        if os.path.islink(here):
            seen += 1
            target = os.readlink(here)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                done = ""
            continue
        done = os.path.normpath(f"{done}/{part}") if part != ".." else os.path.dirname(done)
    return os.path.join(root, done.lstrip("/"))

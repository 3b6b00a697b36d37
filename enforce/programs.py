"""What a program file is: the exec rules whose path it is, by identity and content, not name.

A rule `path: ["*/rm"]` means the program rm, however it is reached.  At policy load every
exec rule's path globs are resolved to the files they name on this host (a basename glob
`*/NAME` in the system's program directories, an absolute glob on the file system); the
sha256 digests of those files are the protected programs.  Every file in the program
directories is then classified: the rules whose globs match its real path, plus the rules
of a protected program whose digest it shares (only files of the same size are read).  The
result goes to the kernel's exec_files map, keyed by inode and change time, so a known
program is decided in the kernel with no stop.

A file executed for the first time elsewhere (a copy, a hard link made since, a memfd, a new
build) is not in the map: its exec stops once, and classify() reads it through
/proc/PID/exe (the very image, also when deleted or anonymous) and adds it.  Two kinds of
file are never cached, because what they run is in their arguments: the dynamic loader
(`ld.so /usr/bin/rm ...` runs rm) and multi-call binaries (busybox, toybox: the applet is
argv[0] or argv[1]).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import logging
import os
import re
import stat
import struct
from dataclasses import dataclass, field

from agentwarden.enforce.callers import euid
from agentwarden.enforce.policy import ANY_PROGRAM, Policy
from agentwarden.probes.guard import file_key, inode_key
from agentwarden.probes.loader import LOADER_GLOBS

log = logging.getLogger(__name__)

PROGRAM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
MULTI_CALL = ("busybox", "toybox")
# where the programs a parent_unless names may live besides PROGRAM_DIRS (git's own helpers)
PARENT_DIRS = ("/usr/lib/git-core", "/usr/libexec/git-core")
# ld.so options that take a value (glibc 2.36)
_LOADER_VALUE_OPTS = {"--library-path", "--preload", "--audit", "--argv0", "--inhibit-rpath",
                      "--glibc-hwcaps-prefix", "--glibc-hwcaps-mask"}
_BASENAME_GLOB = re.compile(r"^\*/([^*?\[\]/]+)$")
MAX_KNOWN = 60_000   # exec_files holds 65,536


def elf_segments(path: str) -> list[tuple[int, int]] | None:
    """(offset, size) of an ELF file's executable PT_LOAD segments (its code), from the headers
    alone; None for what is not a 64-bit little-endian ELF file (scripts)."""
    try:
        with open(path, "rb") as f:
            hdr = f.read(64)
            if len(hdr) < 64 or hdr[:4] != b"\x7fELF" or hdr[4] != 2 or hdr[5] != 1:
                return None
            phoff, = struct.unpack_from("<Q", hdr, 32)
            phentsize, phnum = struct.unpack_from("<HH", hdr, 54)
            if phentsize < 56 or phnum > 256:
                return None
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return None
    out = []
    try:
        for i in range(phnum):
            p_type, p_flags, p_offset = struct.unpack_from("<IIQ", table, i * phentsize)
            p_filesz, = struct.unpack_from("<Q", table, i * phentsize + 32)
            if p_type == 1 and p_flags & 1 and p_filesz:   # PT_LOAD, PF_X
                out.append((p_offset, p_filesz))
    except struct.error:
        return None
    return out or None


def elf_code(path: str, segments: list[tuple[int, int]] | None = None) -> tuple[int, str] | None:
    """(size, sha256) of an ELF file's code: bytes appended to a copy, or edits outside its code
    (data, notes, section names), leave it the same program."""
    segs = segments if segments is not None else elf_segments(path)
    if not segs:
        return None
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for off, size in segs:
                f.seek(off)
                h.update(f.read(size))
    except OSError:
        return None
    return sum(size for _, size in segs), h.hexdigest()



def changeable(path: str, uid: int) -> bool:
    """Could a process of uid change what path names: a symlink on the way, or the file or a
    directory above it that uid owns or may write (root may change anything)."""
    if uid == 0:
        return True
    cur = "/"
    for part in [p for p in os.path.normpath(path).split("/") if p]:
        parent, cur = cur, os.path.join(cur, part)
        if os.path.islink(cur):
            return True
        st = os.stat(parent)
        if st.st_uid == uid or st.st_mode & 0o002 or (st.st_mode & 0o020 and uid in _group_uids(st.st_gid)):
            return True
    st = os.stat(cur)
    return st.st_uid == uid or bool(st.st_mode & 0o022)


def _group_uids(gid: int) -> set[int]:
    import grp
    import pwd

    try:
        members = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return set()
    return {u.pw_uid for u in pwd.getpwall() if u.pw_name in members or u.pw_gid == gid}


_MULTI_CALL_MARKS = (b"BusyBox v", b"toybox")


def _multi_call_content(path: str) -> bool:
    """A multi-call binary by what it contains (busybox's version banner, toybox's name)."""
    try:
        with open(path, "rb") as f:
            data = f.read(8 << 20)
    except OSError:
        return False
    return any(m in data for m in _MULTI_CALL_MARKS)


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Program:
    """What an exec runs: the paths that name it for policy purposes, and its rule bits."""

    aliases: tuple[str, ...]
    bits: int
    exe: str = ""                 # the program (for a loader, the file it was asked to run)
    argv: tuple[str, ...] = ()    # the program's own argv (for a loader, without the loader's part)
    cacheable: bool = True
    changeable: bool = False      # a loader's target the agent could swap after the decision
    key: tuple[int, int] | None = None   # file_key() of the executed file, when cacheable


@dataclass
class Programs:
    policy: Policy
    dirs: tuple[str, ...] = PROGRAM_DIRS
    protected: dict[str, set[str]] = field(default_factory=dict)   # digest -> real paths it is
    sizes: set[int] = field(default_factory=set)
    code: dict[str, set[str]] = field(default_factory=dict)        # ELF code digest -> real paths
    code_sizes: set[int] = field(default_factory=set)
    known: dict[tuple[int, int], int] = field(default_factory=dict)
    loaders: set[int] = field(default_factory=set)                 # inode keys of ld.so files
    rules: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)   # (bit, path globs)
    parents: set[str] = field(default_factory=set)          # digests of the programs parent_unless names
    _parent_seen: dict[tuple[int, int], bool] = field(default_factory=dict)

    @classmethod
    def load(cls, policy: Policy, dirs: tuple[str, ...] = PROGRAM_DIRS, max_rules: int = 64) -> Programs:
        p = cls(policy, dirs)
        p.rules = [(1 << i, r.exec_path) for i, r in enumerate(policy.rules[:max_rules])
                   if r.exec_path and r.kind in ("exec", "")]
        for pattern in LOADER_GLOBS:
            for path in glob.glob(pattern):
                with contextlib.suppress(OSError):
                    p.loaders.add(inode_key(os.stat(path)))
        parent_names = {m.group(1) for r in policy.rules for g in r.exec_parent_path
                        if (m := _BASENAME_GLOB.match(g))}
        for name in parent_names:
            for d in (*dirs, *PARENT_DIRS):
                with contextlib.suppress(OSError):
                    p.parents.add(_digest(os.path.join(d, name)))
        if not p.rules:
            return p
        for path in p._named_files():
            try:
                st = os.stat(path)
                if stat.S_ISREG(st.st_mode):
                    p.protected.setdefault(_digest(path), set()).add(os.path.realpath(path))
                    p.sizes.add(st.st_size)
                    code = elf_code(path)
                    if code is not None:
                        p.code.setdefault(code[1], set()).add(os.path.realpath(path))
                        p.code_sizes.add(code[0])
            except OSError:
                continue
        for d in dict.fromkeys(os.path.realpath(d) for d in dirs):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if len(p.known) >= MAX_KNOWN:
                    break
                path = os.path.join(d, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111 or inode_key(st) in p.loaders:
                    continue
                if os.path.basename(os.path.realpath(path)) in MULTI_CALL:
                    continue
                p.known[file_key(st)] = p._bits(p._aliases(os.path.realpath(path), st))
        log.info("program identities: %d protected files, %d known files",
                 sum(map(len, p.protected.values())), len(p.known))
        return p

    def is_named_parent(self, path: str) -> bool:
        """Is this file the code of a program a parent_unless names (as installed when the
        policy was loaded)?  A copy of git is git; a copy of bash named git is not."""
        try:
            key = file_key(os.stat(path))
            if key not in self._parent_seen:
                self._parent_seen[key] = _digest(path) in self.parents
            return self._parent_seen[key]
        except OSError:
            return False

    def _named_files(self) -> set[str]:
        out: set[str] = set()
        for _, globs in self.rules:
            for g in globs:
                m = _BASENAME_GLOB.match(g)
                if m:
                    out.update(os.path.join(d, m.group(1)) for d in self.dirs
                               if os.path.exists(os.path.join(d, m.group(1))))
                elif g.startswith("/"):
                    out.update(glob.glob(g))
        return out

    def _aliases(self, real: str, st: os.stat_result, path_for_digest: str = "") -> tuple[str, ...]:
        """The file's real path, and every protected program's path whose code (ELF) or content
        (anything else) it has.  Only files of a protected program's code size, or size, are read."""
        path = path_for_digest or real
        out = [real]
        segs = elf_segments(path)
        if segs is not None:
            if sum(size for _, size in segs) in self.code_sizes:
                code = elf_code(path, segs)
                out.extend(sorted(self.code.get(code[1], ()) if code else ()))
        elif st.st_size in self.sizes:
            try:
                digest = _digest(path)
            except OSError:
                digest = ""
            out.extend(sorted(self.protected.get(digest, ())))
        return tuple(dict.fromkeys(out))

    def _bits(self, aliases: tuple[str, ...]) -> int:
        bits = 0
        for bit, globs in self.rules:
            if any(fnmatch.fnmatchcase(a, g) for a in aliases for g in globs):
                bits |= bit
        return bits

    def _applet_aliases(self, applet: str) -> tuple[str, ...]:
        """A multi-call binary's applet is the program of that name: every protected path called so."""
        same = [p for paths in self.protected.values() for p in paths if os.path.basename(p) == applet]
        return tuple(sorted(same)) + (f"/{applet}",)

    def classify(self, pid: int, argv: list[str]) -> Program | None:
        """What the stopped process `pid` runs (None when /proc no longer has it)."""
        exe_link = f"/proc/{pid}/exe"
        try:
            st = os.stat(exe_link)
            real = os.readlink(exe_link)
        except OSError:
            return None
        if inode_key(st) in self.loaders:
            return self._loaded(pid, argv)
        base = os.path.basename(real.removesuffix(" (deleted)"))
        if base in MULTI_CALL or _multi_call_content(exe_link):
            # busybox and toybox run the applet argv[0] names, or argv[1] when argv[0] starts with
            # their own name (busybox-x touch ...); a renamed copy is found by its content
            applet = os.path.basename(argv[0]) if argv else ""
            rest = argv
            if applet.startswith(MULTI_CALL) and len(argv) > 1:
                applet, rest = os.path.basename(argv[1]), argv[1:]
            aliases = (real, *self._applet_aliases(applet))
            return Program(aliases, self._bits(aliases), real, tuple(rest), cacheable=False)
        aliases = self._aliases(real, st, exe_link)
        program = Program(aliases, self._bits(aliases), real, tuple(argv), key=file_key(st))
        if len(self.known) < MAX_KNOWN:
            self.known[file_key(st)] = program.bits
        return program

    def _loaded(self, pid: int, argv: list[str]) -> Program:
        """`ld.so [options] PROGRAM args...`: the program is what runs."""
        i = 1
        argv0 = ""
        while i < len(argv) and argv[i].startswith("--"):
            opt = argv[i]
            if opt == "--":
                i += 1
                break
            name = opt.split("=", 1)[0]
            if name == "--argv0":
                argv0 = opt.split("=", 1)[1] if "=" in opt else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in opt or name not in _LOADER_VALUE_OPTS else 2
        if i >= len(argv):
            return Program((), 0, "", tuple(argv), cacheable=False)
        target = argv[i]
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            joined = os.path.join(cwd, target)
            path = os.path.realpath(joined)
            st = os.stat(path)
            raceable = changeable(joined, euid(pid) or 0)
        except OSError:
            raceable = True
        if raceable:
            # the loader opens the target again after the decision: a target the agent can change
            # (a symlink, or a file or directory its uid may write) is every program (fails closed)
            return Program((target, ANY_PROGRAM), sum(b for b, _ in self.rules), target, tuple(argv[i:]),
                           cacheable=False, changeable=True)
        aliases = self._aliases(path, st)
        args = (argv0 or target, *argv[i + 1:])
        return Program(aliases, self._bits(aliases), path, args, cacheable=False)

"""Decode guard.bpf.c's verdict records, and the constants its maps share with userspace.

Kernel side: guard.bpf.c.  What a verdict means (events, approvals, kills) is
agentwarden.enforce's business; this module only knows the wire format.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
from dataclasses import dataclass

from agentwarden.probes.process import DecodeError, Hdr, RawHeader, header

EV_GUARD = 30
SCAN = 4096
PATH_LEN = 256      # AW_PATH_LEN: an exec record's path, then its command line
MAX_RULES = 64

# enum aw_action
ACTIONS = {"allow": 1, "audit": 2, "deny": 3, "kill": 4, "quarantine": 5, "hold": 6}
ACTION_NAMES = {v: k for k, v in ACTIONS.items()}

# enum aw_guard_what
G_EXEC, G_CONNECT, G_SQL, G_SQL_TLS, G_SESSION, G_SELF, G_HTTP, G_HTTP_TLS = 1, 2, 3, 4, 5, 6, 7, 8
G_RESUME, G_ESCAPED, G_DGRAM, G_UNIX, G_FDGRAB, G_UNJUDGED, G_UNIX_SHARED = 9, 10, 11, 12, 13, 14, 15
# guard_event.target of a G_UNJUDGED record (#define AW_UNJUDGED_*)
UNJUDGED_OOB, UNJUDGED_FASTOPEN, UNJUDGED_UNREAD, UNJUDGED_JOINED = 1, 2, 3, 4
UNJUDGED_FULL, UNJUDGED_PARTIAL, UNJUDGED_NESTED, UNJUDGED_EARLY, UNJUDGED_RETRY = 5, 6, 7, 8, 9
UNJUDGED_HUGE, UNJUDGED_HANDSHAKE, UNJUDGED_SENDFILE, UNJUDGED_HELD = 10, 11, 12, 13
UNJUDGED_TLS, UNJUDGED_GSS, UNJUDGED_DEPTH, UNJUDGED_CUT, UNJUDGED_HELLO = 14, 15, 16, 17, 18
UNJUDGED_METHOD, UNJUDGED_HTTP2 = 19, 20
# guard_event.hash of a G_UNIX_SHARED record that killed (#define AW_UNIX_*)
UNIX_FORKED, UNIX_PASSED = 1, 2
# the socket mark of a connection the guard had no room for (AW_UNGUARDED_MARK): nftables resets it
UNGUARDED_MARK = 0x6177FFFF
# enum aw_guard_done
DONE_STOPPED, DONE_KILLED, DONE_REFUSED, DONE_SEEN, DONE_APPROVED = 1, 2, 3, 4, 5

# enum aw_cfg (indexes of guard_cfg)
CFG_EXEC_ANY, CFG_CONNECT_ANY, CFG_SQL_ANY, CFG_FLAGS, CFG_DAEMON = 0, 1, 2, 3, 4
CFG_EXACT, CFG_SOFT, CFG_PORTS = 5, 6, 7
CFG_HTTP_ANY_METHOD, CFG_HTTP_ANY_HOST, CFG_HTTP_ANY_PATH, CFG_HTTP_EXACT, CFG_HTTP_INEXACT = 8, 9, 10, 11, 12
CFG_ARGV = 13
CFG_SQL_OPAQUE = 14
CFG_EXEC_IDENT = 15
CFG_DAEMON_UID = 16
CFG_SQL_DENY = 17
CFG_HTTP_SUFFIXES = 18
CFG_HTTP_TRANSPORT_OK = 19
CFG_HTTP_DENY = 20
SELF_FREEZE = 2000   # AW_SELF_FREEZE
ESCAPE_LOADER = 1    # AW_ESCAPE_LOADER
ESCAPE_PTRACE = 2    # AW_ESCAPE_PTRACE
FLAG_IDENTITY = 8
FLAG_TLS_WAIT = 16   # AW_FLAG_TLS_WAIT: a tracked exec of a file in tls_unattached stops for its uprobes
EXEC_TLS = 2         # AW_EXEC_TLS: a stopped exec's target bit: its TLS uprobes to attach
H_COPY, H_PROGRAM = 0x2011C49C7CE10124, 0xBDD0373600E34F6B   # guard.bpf.c AW_H_COPY, AW_H_PROGRAM
# The programs in each tail-call slot of guard.bpf.c's prog arrays, in slot order: enum aw_msg_prog
# (msg_progs, sk_msg), aw_ssl_prog (ssl_progs, the SSL_write uprobe), aw_exec_prog (exec_progs).
MSG_PROGRAMS = ("aw_sql_msg", "aw_http_msg", "aw_msg_route", "aw_msg_beyond", "aw_msg_ambig", "aw_http_next",
                "aw_http_copy", "aw_http_length", "aw_http_body", "aw_msg_hello",
                "aw_msg_tlsrec", "aw_msg_alpn", "aw_http_unread")
SSL_PROGRAMS = ("aw_sql_ssl", "aw_http_ssl", "aw_ssl_ambig", "aw_ssl_digest", "aw_ssl_frame", "aw_ssl_unread")
EXEC_PROGRAMS = ("aw_exec_argv", "aw_exec_env")

DFA_STATES = 4096   # argv_dfa rows (every rule's DFA together)
DFA_SYMBOLS = 257
FLAG_HOLD_SESSIONS = 1
FLAG_ENFORCE = 2
FLAG_SQL = 4
PG_JOINED = 5       # guard_conn.state AW_PG_JOINED: a connection no guard saw open; every send refused
PG_TLS_ASKED, PG_GSS_ASKED, PG_TLS = 6, 7, 8   # AW_PG_*: after an SSLRequest, a GSSENCRequest; in TLS
TLS_HELLO = 9        # AW_TLS_HELLO: TLS whose ClientHello offered no "postgresql", until its first data


# guard_http.bpf.c char_classes: what each byte is to unread_request
CH_BLANK, CH_TCHAR, CH_UPPER, CH_SYM, CH_NL = 1, 2, 4, 8, 16


def char_classes() -> bytes:
    """The 256 bytes of guard_http.bpf.c's char_classes: whitespace to Python's str.split() on a
    latin-1 line (but CR and LF), RFC 9110's tchar, a method's capital letters, '-' and '_'."""
    out = bytearray(256)
    for c in range(256):
        ch = chr(c)
        if ch.isspace() and ch not in "\r\n":
            out[c] |= CH_BLANK
        if ch.isascii() and (ch.isalnum() or ch in "!#$%&'*+-.^_`|~"):
            out[c] |= CH_TCHAR
        if "A" <= ch <= "Z" or ch in "-_":
            out[c] |= CH_UPPER
        if ch in "-_":
            out[c] |= CH_SYM
        if ch == "\n":
            out[c] |= CH_NL
    return bytes(out)


def inode_key(st: os.stat_result) -> int:
    """guard.bpf.c inode_key(): (kernel dev_t << 32) ^ inode number."""
    kdev = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
    return ((kdev << 32) ^ st.st_ino) & ((1 << 64) - 1)


def file_key(st: os.stat_result) -> tuple[int, int]:
    """struct file_key (guard_exec.bpf.c exe_file()): the inode key and the change time in ns."""
    return inode_key(st), st.st_ctime_ns


class GuardHead(ct.Structure):
    _fields_ = [
        ("h", Hdr),
        ("what", ct.c_uint32),
        ("done", ct.c_uint32),
        ("rule", ct.c_int32),
        ("action", ct.c_uint32),
        ("hash", ct.c_uint64),
        ("target", ct.c_uint64),
        ("addr", ct.c_uint8 * 16),
        ("len", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


class GuardRule(ct.Structure):
    _fields_ = [("action", ct.c_uint32), ("_pad", ct.c_uint32)]


class NameKey(ct.Structure):
    _fields_ = [("name", ct.c_char * 16)]


class LpmV6(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


class FileKey(ct.Structure):
    _fields_ = [("inode", ct.c_uint64), ("ctime", ct.c_uint64)]


class ExecAllowKey(ct.Structure):
    _fields_ = [("session", ct.c_uint64), ("ident", ct.c_uint64)]


class ExecAllowVal(ct.Structure):
    _fields_ = [("until", ct.c_uint64), ("left", ct.c_int64), ("unlimited", ct.c_uint32),
                ("_pad", ct.c_uint32)]


class GuardConn(ct.Structure):
    """struct guard_conn: a guarded TCP socket's framing state (guard_sk, sk storage)."""
    _fields_ = [("session", ct.c_uint64), ("state", ct.c_uint32), ("skip", ct.c_uint32),
                ("cork", ct.c_uint32), ("_pad", ct.c_uint32)]


class SslKey(ct.Structure):
    """struct ssl_key: a TLS stream the guard frames (ssl_streams): the SSL *, its process's start
    (boot ns) and tgid."""
    _fields_ = [("ssl", ct.c_uint64), ("start", ct.c_uint64), ("tgid", ct.c_uint32), ("_pad", ct.c_uint32)]


class AllowKey(ct.Structure):
    _fields_ = [("session", ct.c_uint64), ("hash", ct.c_uint64)]


@dataclass(frozen=True)
class Guard:
    """The kernel acted on (or stopped for userspace) one operation."""

    h: RawHeader
    what: int
    done: int
    rule: int          # policy index, -1 for none
    action: str
    hash: int          # SQL: the normalised statement's hash
    target: int        # connect: the port; self-protection: the syscall number
    addr: str          # connect: the destination
    text: bytes        # exec: the path; SQL: the start of the send (Postgres messages)
    argv: tuple[str, ...] = ()   # exec: the command line the kernel read (its first 2 KiB)


def decode(buf: bytes) -> Guard:
    head = ct.sizeof(GuardHead)
    if len(buf) < head:
        raise DecodeError(f"guard record of {len(buf)} bytes, need {head}")
    g = GuardHead.from_buffer_copy(buf[:head])
    if g.len > SCAN or head + g.len > len(buf):
        raise DecodeError(f"guard record claims {g.len} bytes of text, has {len(buf) - head}")
    addr = ""
    raw = bytes(g.addr)
    if any(raw):
        ip = ipaddress.IPv6Address(raw)
        addr = str(ip.ipv4_mapped or ip)
    text = buf[head:head + g.len]
    argv: tuple[str, ...] = ()
    if g.what == G_EXEC:
        if len(text) > PATH_LEN:
            argv = tuple(a.decode(errors="replace") for a in text[PATH_LEN:].rstrip(b"\0").split(b"\0"))
        text = text[:PATH_LEN].split(b"\0", 1)[0]
    return Guard(header(g.h), g.what, g.done, g.rule, ACTION_NAMES.get(g.action, ""), g.hash, g.target,
                 addr, text, argv)

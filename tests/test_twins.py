"""The kernel half and its Python twin agree: enums, flags, constants and record layouts.

guard.bpf.c's enums and #defines are read from the C source and compared with
probes/guard.py; the record layouts are compiled by bcc (root: the same compiler and
flags the daemon uses) and their sizes and offsets compared with the ctypes structs.
"""

from __future__ import annotations

import ctypes as ct
import re
from pathlib import Path

import pytest
from agentwarden.enforce import argvdfa
from agentwarden.enforce.sqlnorm import fnv
from agentwarden.probes import guard as g
from agentwarden.probes.loader import SOURCES
from conftest import need_root

SRC = "\n".join((Path(__file__).resolve().parents[1] / "probes" / name).read_text()
                for name in SOURCES if name.startswith("guard"))


def c_enum(name: str) -> dict[str, int]:
    body = re.search(r"enum " + name + r"\s*\{(.*?)\};", SRC, re.S)
    assert body, name
    return {k: int(v, 0) for k, v in re.findall(r"(AW_\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)", body.group(1))}


def c_define(name: str) -> int:
    m = re.search(r"#define " + name + r"\s+(0x[0-9a-fA-F]+|\d+)", SRC)
    assert m, name
    return int(m.group(1), 0)


def test_enums_match() -> None:
    what = c_enum("aw_guard_what")
    assert {k.removeprefix("AW_G_"): v for k, v in what.items()} == {
        k.removeprefix("G_"): v for k, v in vars(g).items() if re.fullmatch(r"G_[A-Z_]+", k)}
    done = c_enum("aw_guard_done")
    assert {k.removeprefix("AW_DONE_"): v for k, v in done.items()} == {
        k.removeprefix("DONE_"): v for k, v in vars(g).items() if k.startswith("DONE_")}
    cfg = {k.removeprefix("AW_CFG_"): v for k, v in c_enum("aw_cfg").items() if k != "AW_CFG_MAX"}
    assert cfg == {k.removeprefix("CFG_"): v for k, v in vars(g).items() if k.startswith("CFG_")}
    actions = {k.removeprefix("AW_ACT_").lower(): v for k, v in c_enum("aw_action").items() if v}
    assert actions == g.ACTIONS


@pytest.mark.parametrize("enum, programs", [("aw_msg_prog", g.MSG_PROGRAMS), ("aw_ssl_prog", g.SSL_PROGRAMS),
                                            ("aw_exec_prog", g.EXEC_PROGRAMS)])
def test_tail_call_slots_hold_the_programs_the_kernel_calls(enum: str, programs: tuple[str, ...]) -> None:
    # the C calls a slot by the enum's name; the loader fills slot i with programs[i]
    assert c_enum(enum) == {"AW_PROG_" + p.removeprefix("aw_").upper(): i for i, p in enumerate(programs)}
    for p in programs:
        assert re.search(rf"^int {p}\(", SRC, re.M), p
    assert not re.search(r"_progs\.call\(\w+, \d", SRC), "a tail call by number, not by slot name"


def test_constants_match() -> None:
    for c_name, py in (("AW_FLAG_HOLD_SESSIONS", g.FLAG_HOLD_SESSIONS), ("AW_FLAG_ENFORCE", g.FLAG_ENFORCE),
                       ("AW_FLAG_SQL", g.FLAG_SQL), ("AW_FLAG_IDENTITY", g.FLAG_IDENTITY),
                       ("AW_FLAG_TLS_WAIT", g.FLAG_TLS_WAIT), ("AW_EXEC_TLS", g.EXEC_TLS),
                       ("AW_EV_GUARD", g.EV_GUARD), ("AW_SCAN", g.SCAN), ("AW_GUARD_RULES", g.MAX_RULES),
                       ("AW_DFA_SYMS", argvdfa.SYMBOLS), ("AW_DFA_END", argvdfa.END),
                       ("AW_SELF_FREEZE", g.SELF_FREEZE), ("AW_PG_JOINED", g.PG_JOINED),
                       ("AW_UNJUDGED_OOB", g.UNJUDGED_OOB), ("AW_UNJUDGED_FASTOPEN", g.UNJUDGED_FASTOPEN),
                       ("AW_UNJUDGED_UNREAD", g.UNJUDGED_UNREAD), ("AW_UNJUDGED_JOINED", g.UNJUDGED_JOINED),
                       ("AW_UNJUDGED_FULL", g.UNJUDGED_FULL), ("AW_UNJUDGED_PARTIAL", g.UNJUDGED_PARTIAL),
                       ("AW_UNJUDGED_NESTED", g.UNJUDGED_NESTED), ("AW_UNJUDGED_EARLY", g.UNJUDGED_EARLY),
                       ("AW_UNJUDGED_RETRY", g.UNJUDGED_RETRY), ("AW_UNJUDGED_HUGE", g.UNJUDGED_HUGE),
                       ("AW_UNJUDGED_HANDSHAKE", g.UNJUDGED_HANDSHAKE), ("AW_UNJUDGED_SENDFILE", g.UNJUDGED_SENDFILE),
                       ("AW_UNJUDGED_HELD", g.UNJUDGED_HELD), ("AW_UNJUDGED_TLS", g.UNJUDGED_TLS),
                       ("AW_UNJUDGED_GSS", g.UNJUDGED_GSS), ("AW_UNJUDGED_DEPTH", g.UNJUDGED_DEPTH),
                       ("AW_UNJUDGED_CUT", g.UNJUDGED_CUT), ("AW_UNJUDGED_HELLO", g.UNJUDGED_HELLO),
                       ("AW_UNJUDGED_METHOD", g.UNJUDGED_METHOD), ("AW_UNJUDGED_HTTP2", g.UNJUDGED_HTTP2), ("AW_CH_BLANK", g.CH_BLANK),
                       ("AW_CH_TCHAR", g.CH_TCHAR), ("AW_CH_UPPER", g.CH_UPPER), ("AW_CH_SYM", g.CH_SYM),
                       ("AW_CH_NL", g.CH_NL),
                       ("AW_PG_TLS_ASKED", g.PG_TLS_ASKED),
                       ("AW_PG_GSS_ASKED", g.PG_GSS_ASKED), ("AW_PG_TLS", g.PG_TLS), ("AW_TLS_HELLO", g.TLS_HELLO),
                       ("AW_UNGUARDED_MARK", g.UNGUARDED_MARK), ("AW_ESCAPE_LOADER", g.ESCAPE_LOADER),
                       ("AW_ESCAPE_PTRACE", g.ESCAPE_PTRACE)):
        assert c_define(c_name) == py, c_name
    assert c_define("AW_H_COPY") == g.H_COPY == fnv(b"COPY")
    assert c_define("AW_H_PROGRAM") == g.H_PROGRAM == fnv(b"PROGRAM")
    from agentwarden.enforce.enforcer import ENV_CHUNK
    assert c_define("AW_ENV_CHUNK") == ENV_CHUNK
    assert "#define AW_PATH_LEN 256" in (Path(__file__).resolve().parents[1] / "probes" / "process.bpf.c").read_text()
    assert g.PATH_LEN == 256


LAYOUTS = {
    "struct guard_event": (g.GuardHead, ["what", "done", "rule", "action", "hash", "target", "addr", "len"]),
    "struct exec_allow_key": (g.ExecAllowKey, ["session", "ident"]),
    "struct exec_allow_val": (g.ExecAllowVal, ["until", "left", "unlimited"]),
    "struct file_key": (g.FileKey, ["inode", "ctime"]),
    "struct allow_key": (g.AllowKey, ["session", "hash"]),
    "struct lpm_v6": (g.LpmV6, ["prefixlen", "addr"]),
    "struct guard_conn": (g.GuardConn, ["session", "state", "skip", "cork"]),
    "struct ssl_key": (g.SslKey, ["ssl", "start", "tgid"]),
}


@pytest.mark.bpf
def test_layouts_match_what_the_compiler_makes() -> None:
    """Sizes and offsets of the ctypes structs, asserted at compile time by clang (through bcc,
    with the daemon's own flags) on the struct definitions the daemon compiles."""
    need_root()
    from agentwarden.probes.loader import bpf_source
    from agentwarden.probes.process import ProbeLimits
    from bcc import BPF

    text, cflags = bpf_source(ProbeLimits(pin_dir="/sys/fs/bpf/aw-twins"))
    # the struct definitions as the daemon compiles them, and one program that records layouts
    structs = [m.group(0) for name in ("hdr", *(c.split()[1] for c in LAYOUTS))
               for m in [re.search(r"struct " + name + r" \{.*?\n\};", text, re.S)] if m]
    assert len(structs) == len(LAYOUTS) + 1
    asserts = []
    for cname, (ctype, fields) in LAYOUTS.items():
        # GuardHead is the record without its text
        size = "__builtin_offsetof(struct guard_event, text)" if cname == "struct guard_event" else f"sizeof({cname})"
        asserts.append(f'_Static_assert({size} == {ct.sizeof(ctype)}, "sizeof {cname}");')
        for f in fields:
            off = getattr(ctype, f).offset
            asserts.append(f'_Static_assert(__builtin_offsetof({cname}, {f}) == {off}, "{cname}.{f}");')
    src = "\n".join(["#define AW_SCAN 4096", *structs, *asserts, "int unused(void *ctx) { return 0; }"])
    from agentwarden.probes.loader import remove_pins

    try:
        BPF(text=src.encode(), cflags=cflags)   # compiles only if every assertion holds
    finally:
        remove_pins("/sys/fs/bpf/aw-twins")

"""Decode and track stages: garbage never stops the pipeline; execvp's $PATH probing
collapses into one failed exec."""

from __future__ import annotations

import ctypes as ct
import errno
import struct

from agentwarden.core.events import Event, NetInfo
from agentwarden.daemon.config import parse
from agentwarden.daemon.pipeline import Pipeline
from agentwarden.daemon.profiles import Profiles
from agentwarden.daemon.tracker import Tracker
from agentwarden.probes import net
from agentwarden.probes import process as pr
from hypothesis import given, settings
from hypothesis import strategies as st


def tracker() -> Tracker:
    cfg = parse("agents:\n  - {name: t, match: {comm: [aw-unit-agent]}}\n")
    return Tracker("h", Profiles(cfg.agents, builtin=False), untrack_session=lambda key: None,
                   clock_offset_ns=0)


def hdr(pid: int, ts: int, comm: str = "x") -> pr.RawHeader:
    return pr.RawHeader(pid=pid, tid=pid, uid=0, gid=0, profile=0, ts_boot_ns=ts, session=7, cgroup=1, comm=comm)


def record(kind: int, struct: type[ct.Structure], **fields: object) -> bytes:
    h = pr.Hdr(type=kind, pid=10, tid=10, uid=0, gid=0, profile=0, ts=1, session=7, cgroup=1, comm=b"x")
    return bytes(struct(h=h, **fields))


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_garbage_records_never_raise(data: bytes) -> None:
    out: list[Event] = []
    p = Pipeline(tracker(), [out.append])
    p.on_record(data)
    p.on_record(record(pr.EV_FORK, pr.ForkRec, child=11))
    assert p.stats.records == 2


def test_truncated_and_unknown_records_are_counted() -> None:
    p = Pipeline(tracker(), [])
    p.on_record(record(pr.EV_EXEC, pr.ExecRec, old_pid=10, filename=b"/bin/ls")[:50])
    p.on_record(b"\x63\x00\x00\x00" + bytes(200))
    assert p.stats.malformed == 2


def test_exec_args_decode() -> None:
    head = pr.ExecArgsHead(h=pr.Hdr(type=pr.EV_EXEC_ARGS, pid=5, tid=5), argc=3, args_len=12, truncated=2,
                           filename=b"/bin/ls")
    ev = pr.decode(bytes(head) + b"ls\0-la\0/tmp\0")
    assert isinstance(ev, pr.ExecArgs) and ev.argv == ("ls", "-la", "/tmp") and ev.truncated == pr.TRUNC_ARG


def test_path_search_gives_one_failed_exec() -> None:
    t = tracker()
    out = t.handle(pr.SessionExec(hdr(10, 1, "aw-unit-agent"), 10, "/tmp/aw-unit-agent"))
    assert [e.kind for e in out] == ["session_start"]
    t.handle(pr.Fork(hdr(10, 2), 11))
    argv = ("nosuchcmd", "--flag")
    out = []
    for i, d in enumerate(["/usr/local/bin", "/usr/bin", "/bin"]):
        out += t.handle(pr.ExecArgs(hdr(11, 3 + i), f"{d}/nosuchcmd", argv, 0))
        out += t.handle(pr.ExecFail(hdr(11, 3 + i), errno.ENOENT))
    assert out == []
    out = t.handle(pr.Exit(hdr(11, 9), 127, None))
    assert [(e.kind, e.exec.errno if e.exec else None) for e in out] == [("exec", errno.ENOENT)]
    assert out[0].process.argv == list(argv) and out[0].process.ppid == 10


def _sh_missed_in_path() -> tuple[Tracker, tuple[str, ...], list[Event]]:
    """An agent's child whose $PATH search for sh failed once (/root/bin/sh: ENOENT)."""
    t = tracker()
    t.handle(pr.SessionExec(hdr(10, 1, "aw-unit-agent"), 10, "/tmp/aw-unit-agent"))
    t.handle(pr.Fork(hdr(10, 2), 11))
    argv = ("sh", "-c", "true")
    out = t.handle(pr.ExecArgs(hdr(11, 3), "/root/bin/sh", argv, 0))
    out += t.handle(pr.ExecFail(hdr(11, 4), errno.ENOENT))
    return t, argv, out


def test_path_search_that_succeeds_gives_one_exec() -> None:
    t, argv, out = _sh_missed_in_path()
    out += t.handle(pr.ExecArgs(hdr(11, 5), "/usr/bin/sh", argv, 0))
    out += t.handle(pr.Exec(hdr(11, 6, "sh"), 11, "/usr/bin/sh"))
    assert [(e.kind, e.exec.errno, e.process.exe) for e in out if e.exec] == [("exec", None, "/usr/bin/sh")]
    out = t.handle(pr.Exit(hdr(11, 1_000_006), 0, None))
    out += t.handle(pr.Exit(hdr(10, 1_000_007), None, 15))
    kinds = [e.kind for e in out]
    assert kinds == ["exit", "exit", "session_end"]
    assert out[0].exec and out[0].exec.duration_ms == 1.0
    assert out[2].exec and out[2].exec.signal == 15


def test_session_failing_profile_check_is_dropped() -> None:
    dropped: list[int] = []
    cfg = parse("agents:\n  - {name: t, match: {comm: [aw-unit-agent], exe: ['/opt/real/*']}}\n")
    t = Tracker("h", Profiles(cfg.agents, builtin=False), untrack_session=dropped.append, clock_offset_ns=0)
    assert t.handle(pr.SessionExec(hdr(999_999_999, 1, "aw-unit-agent"), 1, "/tmp/aw-unit-agent")) == []
    assert dropped == [7]
    assert t.handle(pr.Fork(hdr(999_999_999, 2), 12)) == []


def test_raw_argument_area_decode() -> None:
    """With BTF the kernel sends the new image's argument area whole; userspace splits it."""
    area = b"ls\0-la\0/tmp x\0"
    head = pr.ExecArgsHead(h=pr.Hdr(type=pr.EV_EXEC_ARGS, pid=5, tid=5), argc=128, args_len=len(area),
                           truncated=pr.ARGS_RAW, filename=b"/bin/ls")
    ev = pr.decode(bytes(head) + area)
    assert isinstance(ev, pr.ExecArgs) and ev.argv == ("ls", "-la", "/tmp x") and ev.truncated == 0
    # cut at the buffer: the last argument is partial, and more than argc arguments are cut and flagged
    many = b"".join(b"a%d\0" % i for i in range(200))[:700]
    head = pr.ExecArgsHead(h=pr.Hdr(type=pr.EV_EXEC_ARGS, pid=5, tid=5), argc=128, args_len=len(many),
                           truncated=pr.ARGS_RAW | pr.TRUNC_TOTAL, filename=b"/bin/true")
    ev = pr.decode(bytes(head) + many)
    assert isinstance(ev, pr.ExecArgs) and len(ev.argv) == 128 and ev.argv[:2] == ("a0", "a1")
    assert ev.truncated == pr.TRUNC_TOTAL | pr.TRUNC_ARGC


def cwd_record(names: list[bytes], cut: int = 0) -> bytes:
    head = pr.CwdHead(h=pr.Hdr(type=pr.EV_CWD, pid=11, tid=11), n=len(names), cut=cut)
    return bytes(head) + b"".join(n.ljust(pr.PATH_LEN, b"\0") for n in names)


def test_kernel_cwd_record_decode() -> None:
    ev = pr.decode(cwd_record([b"proj x", b"home", b""][:2]))
    assert isinstance(ev, pr.Chdir) and ev.absolute and ev.path == "/home/proj x"
    root = pr.decode(cwd_record([]))
    assert isinstance(root, pr.Chdir) and root.path == "/"
    cut = pr.decode(cwd_record([b"deep"], cut=1))
    assert isinstance(cut, pr.Chdir) and cut.absolute and cut.path is None   # userspace reads /proc
    try:
        pr.decode(cwd_record([b"a", b"b"])[:-300])
    except pr.DecodeError:
        pass
    else:
        raise AssertionError("a cwd record shorter than its names must not decode")


def test_exec_records_in_kernel_order() -> None:
    """At exec the kernel sends the directory, then the arguments, then the exec: a held $PATH
    failure is not settled by the directory, and the exec carries both."""
    t, argv, out = _sh_missed_in_path()
    out += t.handle(pr.Chdir(hdr(11, 5), "/srv/work", None, absolute=True))
    out += t.handle(pr.ExecArgs(hdr(11, 5), "sh", argv, 0))
    out += t.handle(pr.Exec(hdr(11, 6, "sh"), 11, "sh"))
    assert [(e.kind, e.exec.errno if e.exec else None) for e in out] == [("exec", None)]
    assert out[0].process.cwd == "/srv/work" and out[0].process.exe == "/srv/work/sh"
    # a failure, then a different program: the failure is still reported
    out = t.handle(pr.ExecArgs(hdr(11, 7), "/nope", ("/nope",), 0))
    out += t.handle(pr.ExecFail(hdr(11, 8), errno.EACCES))
    out += t.handle(pr.Chdir(hdr(11, 9), "/srv", None, absolute=True))
    out += t.handle(pr.ExecArgs(hdr(11, 9), "/bin/true", ("true",), 0))
    out += t.handle(pr.Exec(hdr(11, 10, "true"), 11, "/bin/true"))
    assert [(e.kind, e.exec.errno if e.exec else None) for e in out] == [("exec", errno.EACCES), ("exec", None)]


def _pg_session(n: int, answered: int) -> tuple[list[Event], Pipeline, list[bytes]]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import pipeline_bench as pb

    cfg = parse(f"agents:\n  - {{name: bench, match: {{comm: [{pb.AGENT}]}}}}\n")
    t = Tracker("h", Profiles(cfg.agents, builtin=False), untrack_session=lambda key: None, clock_offset_ns=0)
    out: list[Event] = []
    p = Pipeline(t, [out.append])
    recs = pb.records(n)
    return out, p, recs[: len(recs) - (n - answered)]   # the last replies never come


def test_statements_of_a_connection_closed_or_a_process_gone_before_the_answer() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import pipeline_bench as pb

    # closed without reading the reply
    out, p, recs = _pg_session(3, 2)
    for r in recs:
        p.on_record(r)
    p.on_record(bytes(net.ConnRec(h=pb.hdr(net.EV_CLOSE), conn_id=7, fd=5)))
    sql = [e.sql for e in out if e.kind == "sql" and e.sql]
    assert [s.query.endswith(f"= {i}") for i, s in enumerate(sql, 1)] == [True, True, True]
    assert [s.duration_ms is None for s in sql] == [False, False, True] and sql[2].tag == ""
    # the process exited (killed): no close() for the kernel to report, the statement stays
    out, p, recs = _pg_session(1, 0)
    for r in recs:
        p.on_record(r)
    forgotten: list[tuple[int, int]] = []
    p.conns.forget = lambda pid, fd: forgotten.append((pid, fd))
    p.on_record(bytes(pr.ExitRec(h=pb.hdr(pr.EV_EXIT), code=0, signal=9, has_code=0)))
    assert [e.kind for e in out if e.kind in ("sql", "exit")] == ["sql", "exit"]
    # and the kernel's entry for its socket goes with it (no close() was seen to remove it)
    assert forgotten == [(pb.hdr(pr.EV_EXIT).pid, 5)]


def test_a_session_root_starts_once_with_what_the_kernel_read_at_its_exec() -> None:
    """The directory and arguments read at a root's exec come before its session record: they
    are its, not a session whose start was lost (red team: every session started twice)."""
    t = tracker()
    out = t.handle(pr.Chdir(hdr(10, 1), "/srv/proj", None, absolute=True))
    out += t.handle(pr.ExecArgs(hdr(10, 1), "/tmp/aw-unit-agent", ("aw-unit-agent", "--x"), 0))
    out += t.handle(pr.SessionExec(hdr(10, 1, "aw-unit-agent"), 10, "/tmp/aw-unit-agent"))
    assert [e.kind for e in out] == ["session_start"]
    assert out[0].process.cwd == "/srv/proj" and out[0].process.argv == ["aw-unit-agent", "--x"]


def test_a_startup_with_user_late_is_postgres() -> None:
    """Go's drivers write startup parameters in map order: `user` may come after 64 bytes."""
    from agentwarden.daemon.l7 import postgres as pg

    params = b"application_name\0" + b"x" * 60 + b"\0client_encoding\0UTF8\0user\0bench\0database\0b\0\0"
    startup = struct.pack("!II", len(params) + 8, pg.PROTOCOL_V3) + params
    assert pg.startup_incomplete(startup[:64]) and not pg.looks_like_postgres(startup[:64])
    assert pg.looks_like_postgres(startup) and not pg.startup_incomplete(startup)


def test_a_reused_fd_keeps_what_its_previous_socket_carried() -> None:
    """close_range() or dup2() over a socket: no close() seen; the next connect on that fd
    number must not drop the statement still waiting for its answer (red team)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import pipeline_bench as pb

    out, p, recs = _pg_session(2, 1)
    for r in recs:
        p.on_record(r)
    reopen = bytes(net.ConnRec(h=pb.hdr(net.EV_CONNECT), conn_id=8, fd=5, ret=0, type=net.SOCK_STREAM))
    p.on_record(reopen)
    sql = [e.sql for e in out if e.kind == "sql" and e.sql]
    assert len(sql) == 2 and sql[1].duration_ms is None and sql[1].query.endswith("= 2")


def test_what_a_stage_gives_rise_to_passes_only_the_stages_after_it_and_follows_its_event() -> None:
    seen: list[tuple[str, str]] = []

    def first(ev: Event) -> list[Event]:
        seen.append(("first", ev.kind))
        if ev.kind == "sql":   # the enforcer's shape: the event, then a verdict of it
            return [ev, Event(kind="verdict", ts_ns=ev.ts_ns, host=ev.host)]
        return [ev]

    def second(ev: Event) -> Event:
        seen.append(("second", ev.kind))
        return ev

    p = Pipeline(tracker(), [lambda ev: seen.append(("sink", ev.kind))], stages=[first, second])
    p.emit([Event(kind="sql", ts_ns=1, host="h"), Event(kind="exec", ts_ns=2, host="h")])
    assert seen == [("first", "sql"), ("second", "sql"), ("sink", "sql"),
                    ("second", "verdict"), ("sink", "verdict"),
                    ("first", "exec"), ("second", "exec"), ("sink", "exec")]
    assert p.stats.events == 3


def test_a_desync_on_a_process_not_tracked_records_nothing_of_it() -> None:
    t = tracker()
    assert t.lost_on(hdr(4321, 1), NetInfo(transport="tcp", dst_ip="10.0.0.9", dst_port=5432), 10, "desync") is None
    host = t.lost(3, "ring buffer full")
    assert host.kind == "lost" and host.lost is not None and host.lost.count == 3 and host.net is None

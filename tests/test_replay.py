"""`agentwarden replay`: golden renders of a session (fixed width, no colour, UTC), its filters,
its pacing, and the chain status in its header."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentwarden.cli import replay
from agentwarden.core.events import (
    ApprovalInfo,
    Event,
    ExecInfo,
    HttpInfo,
    Identity,
    NetInfo,
    Process,
    SqlInfo,
    VerdictInfo,
)
from agentwarden.daemon import chain

T0 = 1_795_000_000_000_000_000        # 2026-11-18T11:06:40Z


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def session(tmp_path: Path) -> list[dict[str, Any]]:
    ident = Identity(1000, "alice", 1000, "alice", "pts/1", source="oidc", verified=True,
                     issuer="https://idp.example", email="alice@example.com", groups=["dev"])
    agent = Process(100, 1, 1000, "/usr/bin/cursor-agent", ["cursor-agent"], "/src")
    psql = Process(101, 100, 1000, "/usr/bin/psql", ["psql", "-c", "drop table users"], "/src")
    curl = Process(102, 100, 1000, "/usr/bin/curl", ["curl", "https://api/v1"], "/src")

    def ev(kind: str, ms: float, proc: Process, **parts: Any) -> Event:
        return Event(kind=kind, ts_ns=T0 + int(ms * 1e6), host="vm", session_id="s-1", agent="cursor",  # type: ignore[arg-type]
                     identity=ident, process=proc, **parts)
    pg = NetInfo("tcp", "10.0.0.5", 5432, protocol="postgres")
    drop = SqlInfo("drop table users", "DROP TABLE", ["users"], database="app", db_user="alice")
    events = [
        ev("session_start", 0, agent, exec=ExecInfo(filename="/usr/bin/cursor-agent")),
        ev("exec", 4.5, psql, exec=ExecInfo(filename="/usr/bin/psql")),
        ev("verdict", 9, psql, net=pg, sql=drop,
           verdict=VerdictInfo("deny", "no-drop-table", "sql", "sk_msg drop (EACCES)", True)),
        ev("exit", 17, psql, exec=ExecInfo(exit_code=1, duration_ms=12.5)),
        ev("exec", 1200, curl, exec=ExecInfo(filename="/usr/bin/curl")),
        ev("http", 1310, curl, net=NetInfo("tcp", "10.0.0.9", 443, tls=True),
           http=HttpInfo("GET", "https", "api", "/v1", status=200, duration_ms=80.0)),
        ev("approval", 1400, curl, approval=ApprovalInfo("r-1", "approved", "hold-x", "exec", "rm -rf build",
                                                         decided_by="bob", auth="pidfd")),
        ev("exit", 1500, curl, exec=ExecInfo(signal=9, duration_ms=300.0)),
        ev("session_end", 6000, agent, exec=ExecInfo(exit_code=0)),
    ]
    c = chain.Chain("vm", str(tmp_path / "c.json"), chain.load_or_create_key(str(tmp_path / "k")))
    c.seal(events)
    return [e.to_dict() for e in events]


GOLDEN = """\
session s-1  agent cursor  host vm
person  alice (uid 1000; verified alice@example.com from https://idp.example, groups dev)  tty pts/1
time    2026-11-18 11:06:40.000 to 2026-11-18 11:06:46.000 (6.0 s)
events  approval 1, exec 2, exit 2, http 1, session_end 1, session_start 1, verdict 1 (9 in all)
chain   9 events, seq 1-9, each hashes to its record (agentwarden verify checks the links and signatures)

+    0.000s > cursor-agent  [exit 0]
+    0.004s   > psql -c 'drop table users'  [exit 1, 12.5 ms]
+    0.009s   !! DENY by rule no-drop-table [sql; sk_msg drop (EACCES); prevented]: [alice@app] drop table users
+    1.200s   > curl https://api/v1  [signal 9, 300.0 ms]
+    1.310s   http: GET https://api/v1  -> 200 (80.0 ms)
+    1.400s   ?? request r-1 approved: rm -rf build (rule hold-x; approved by bob via pidfd)"""


def test_a_session_reads_as_a_timeline(tmp_path: Path) -> None:
    assert "\n".join(replay.timeline(session(tmp_path))) == GOLDEN


def test_a_changed_event_shows_in_the_header(tmp_path: Path) -> None:
    events = session(tmp_path)
    events[4]["process"]["argv"] = ["curl", "https://elsewhere/"]
    assert "1 do NOT hash to their record (first seq 5)" in replay.header(events)[4]


def test_filters_and_pacing(tmp_path: Path) -> None:
    events = session(tmp_path)
    assert [e["kind"] for e in replay.keep(events, verdict="deny")] == ["verdict"]
    assert {e["process"]["pid"] for e in replay.keep(events, pid=102)} == {102}
    assert [e["kind"] for e in replay.keep(events, kinds=("http", "exit"))] == ["exit", "http", "exit"]
    offsets = [off for off, _ in replay.body(events)]
    assert replay.pacing(offsets, speed=2.0, max_idle_s=0.5) == [0.0, 0.00225, 0.00225, 0.5, 0.055, 0.045]


# ---- the session's other formats (export SESSION --format asciicast|csv|pcap) ----------------------


def test_asciicast_is_the_replay_at_its_offsets(tmp_path: Path) -> None:
    import json

    lines = [json.loads(x) for x in replay.asciicast(session(tmp_path))]
    assert lines[0]["version"] == 2 and lines[0]["title"] == "agentwarden session s-1 on vm"
    frames = lines[1:]
    assert "".join(f[2] for f in frames).replace("\r\n", "\n").rstrip("\n") == GOLDEN
    assert [f[0] for f in frames][-6:] == [0.0, 0.0045, 0.009, 1.2, 1.31, 1.4]


def test_csv_cells_are_neither_formulas_nor_escapes(tmp_path: Path) -> None:
    events = session(tmp_path)
    events[1]["process"]["argv"] = ["=HYPERLINK(\"http://x\")", "\x1b[2Jclear", "-1+1"]
    rows = list(replay.csv_rows(events))
    assert rows[0][:3] == ["ts", "seq", "kind"] and len(rows) == len(events) + 1
    cell = rows[2][6]
    assert cell.startswith("'=HYPERLINK") and "\x1b" not in cell and "\\x1b[2Jclear" in cell
    assert not any(c[:1] in "=+-@" and c for r in rows[1:] for c in r)


def test_pcap_of_whatever_the_agent_named(tmp_path: Path) -> None:
    """A socket named `.s.PGSQL.99999999` and escapes in its path: the capture is still written,
    on the protocol's own port, the comment shows the escape as text."""
    from agentwarden.cli import pcap
    from scapy.all import TCP, rdpcap

    ev = {"kind": "sql", "ts": "2026-11-18T11:06:40Z", "event_id": "e1", "process": {"pid": 5},
          "net": {"transport": "unix", "path": "/tmp/\x1b]0;pwned\x07/.s.PGSQL.99999999"},
          "sql": {"query": "select 1", "tag": "SELECT 1", "duration_ms": 1.0, "database": "d", "db_user": "u"}}
    path = tmp_path / "x.pcapng"
    assert pcap.write([ev], str(path)) == 7
    pkts = rdpcap(str(path))
    assert {p[TCP].dport for p in pkts if p[TCP].sport != 5432} == {5432}
    assert all(b"\x1b" not in p.comment and b"\\x1b]0;pwned" in p.comment for p in pkts)


def test_an_export_file_is_new_and_private(tmp_path: Path) -> None:
    """Never through a symlink, never into a file someone else made and still holds open."""
    from agentwarden.cli.main import _private_output

    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "out-link"
    link.symlink_to(victim)
    with _private_output(str(link)) as f:
        f.write("trail")
    assert victim.read_text() == "keep" and not link.is_symlink() and link.read_text() == "trail"
    planted = tmp_path / "planted"
    planted.write_text("")
    planted.chmod(0o666)
    with open(planted) as held:              # the planter's descriptor, opened before the export
        with _private_output(str(planted)) as f:
            f.write("secret")
        assert held.read() == "" and planted.read_text() == "secret"
    assert planted.stat().st_mode & 0o777 == 0o600

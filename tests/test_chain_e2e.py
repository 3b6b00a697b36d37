"""The trail's chain end to end: a real daemon records more than 10,000 events of an agent,
`agentwarden verify` (through the daemon) finds the chain intact, across a clean restart and a
SIGKILL in the middle of a burst (declared, never silent); then, the daemon stopped, one field
changed in the table is found by `verify --direct` with the anchor file, naming its seq."""

from __future__ import annotations

import csv
import io
import json
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agentwarden.daemon import chain as chain_mod
from conftest import Daemon, make_agent, need_root, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pgserver import PgServer

COMM = "aw-chain-agent"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    need_root()
    root = tmp_path_factory.mktemp("chain")
    d = Daemon(root, [{"name": "chainagent", "match": {"comm": [COMM]}}])
    cfg = json.loads(d.config.read_text())
    cfg["export"] = [{"name": "siem-file", "type": "file", "format": "ocsf", "path": str(root / "siem.ndjson")}]
    cfg["export_state_dir"] = str(root / "export")
    cfg["chain"]["checkpoint_interval_s"] = 2        # a session's bundle is sealed within seconds
    d.config.write_text(json.dumps(cfg))
    d.start()
    yield d
    d.stop()


def verify(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentwarden.cli.main", "verify", "--json", *args,
                           "--config", str(d.config)], capture_output=True, text=True, timeout=300)


def burst(agent: Path, n: int) -> subprocess.Popen[str]:
    return subprocess.Popen([str(agent), "-c", f"for i in $(seq {n}); do /bin/true $i; /bin/false; done; "
                                               "echo done"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def stored(d: Daemon) -> int:
    return int(sum(d.request("count")["kinds"].values()))


def test_the_chain_of_a_real_run(daemon: Daemon, tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "bin", COMM)
    p = burst(agent, 2600)                          # exec and exit of 5,200 commands: >10k events
    assert "done" in p.communicate(timeout=300)[0]
    wait_for(lambda: stored(daemon) >= 10_000, 120, what="10,000 events stored")
    time.sleep(2)
    res = verify(daemon)
    rep = json.loads(res.stdout)
    assert res.returncode == 0 and rep["events"] >= 10_000 and not rep["tampered"], (res.stderr, rep)
    assert rep["checkpoints"] >= 10, rep           # one every 1000 events
    # the session as a timeline: its header checks each of its events against the chain
    sid = next(e["session_id"] for e in daemon.events(kinds=["session_start"]))
    out = subprocess.run([sys.executable, "-m", "agentwarden.cli.main", "replay", sid, "--color", "never",
                          "--config", str(daemon.config)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"session {sid}  agent chainagent") and "each hashes to its record" in lines[4], lines[:6]
    assert sum("> /bin/true" in x and "[exit 0" in x for x in lines) == 2600, lines[:20]
    assert sum("> /bin/false  [exit 1" in x for x in lines) == 2600

    # the SIEM file sink: every stored event, in seq order, as OCSF, and the checkpoints
    siem = Path(json.loads(daemon.config.read_text())["export"][0]["path"])

    def exported() -> list[dict[str, Any]]:
        return [json.loads(x) for x in siem.read_text().splitlines()] if siem.exists() else []
    wait_for(lambda: len([r for r in exported() if "class_uid" in r]) >= rep["events"], 120, what="the export")
    records = exported()
    seqs = [r["unmapped"]["chain"]["seq"] for r in records if "class_uid" in r]
    assert seqs[:rep["events"]] == list(range(1, rep["events"] + 1))
    assert any(r.get("kind") == "checkpoint" for r in records)
    assert {r["class_uid"] for r in records if "class_uid" in r} >= {1007}

    # a clean restart: the chain goes on
    daemon.stop(keep_pins=True)
    daemon.start()
    assert burst(agent, 50).communicate(timeout=60)[0]
    time.sleep(2)
    rep = json.loads(verify(daemon).stdout)
    assert not rep["tampered"] and rep["first_bad_seq"] is None, rep

    # SIGKILL in the middle of a burst: what was in flight is declared lost, or arrived (duplicates)
    p = burst(agent, 3000)
    time.sleep(1.5)
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait()
    p.communicate(timeout=120)
    daemon.stop(keep_pins=True)
    daemon.start()
    time.sleep(3)
    res = verify(daemon)
    rep = json.loads(res.stdout)
    assert res.returncode == 0 and not rep["tampered"], rep
    kinds = {f["kind"] for f in rep["findings"]}
    assert kinds <= {"declared_loss", "duplicate", "unsealed"}, rep["findings"]

    # the daemon stopped: one field changed in the table, found with its seq
    daemon.stop()
    store = json.loads(daemon.config.read_text())["store"]["dsn"][len("chdb://"):]
    subprocess.run([sys.executable, "-c",
                    "import clickhouse_connect, sys; c = clickhouse_connect.get_client(dsn='chdb://' + sys.argv[1]); "
                    "c.command(\"ALTER TABLE agentwarden.events UPDATE process_argv = ['/bin/true', 'nothing'] "
                    "WHERE chain_seq = 777\", settings={'mutations_sync': 2})", store], check=True, timeout=120)
    anchor = json.loads(daemon.config.read_text())["chain"]["anchor_file"]
    res = verify(daemon, "--direct", "--anchor", anchor)
    rep = json.loads(res.stdout)
    assert res.returncode == 1 and rep["tampered"] and rep["first_bad_seq"] == 777, (res.stderr, rep)
    assert [f["kind"] for f in rep["findings"] if f["severity"] == "tamper"] == ["modified"], rep["findings"]
    daemon.start()


def cli_out(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentwarden.cli.main", *args, "--config", str(d.config)],
                          capture_output=True, text=True, timeout=300)


def client_payloads(path: Path, *ports: int) -> dict[tuple[Any, ...], bytes]:
    """Each reconstructed connection's client-to-server bytes, reassembled by TCP sequence number."""
    from scapy.all import TCP, Raw, rdpcap

    flows: dict[tuple[Any, ...], list[tuple[int, bytes]]] = {}
    for p in rdpcap(str(path)):
        assert b"reconstructed by agentwarden" in (p.comment or b""), p.summary()
        if Raw in p and p[TCP].dport in (5432, PG_PORT[0], *ports):
            flows.setdefault((p[TCP].sport, p[TCP].dport), []).append((p[TCP].seq, bytes(p[Raw].load)))
    return {k: b"".join(b for _, b in sorted(v)) for k, v in flows.items()}


PG_PORT = [0]


def test_a_session_exported_for_auditors(daemon: Daemon, tmp_path: Path) -> None:
    """One session with Postgres over TCP and a Unix socket and an HTTP request, exported four ways:
    the bundle verifies with the public key alone and names a changed statement; the asciicast, CSV
    and pcap read back (the pcap's Query messages are exactly the statements the server logged, its
    request the one the web server saw, and Wireshark's dissectors read both)."""
    pg = PgServer()
    pg.start()
    seen: list[str] = []

    class Web(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = b"audited"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass
    web = ThreadingHTTPServer(("127.0.0.1", 0), Web)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        PG_PORT[0] = pg.port
        agent = make_agent(tmp_path / "bin", COMM)
        script = (f"PGAPPNAME=aw-export psql -X -h 127.0.0.1 -p {pg.port} -U postgres -d awtest "
                  "-c 'create table t (a int)' -c 'insert into t values (1), (2)' -c 'select * from nope'; "
                  f"PGAPPNAME=aw-export psql -X -h {pg.sockdir} -p {pg.port} -U postgres -d awtest "
                  "-c 'select count(*) from t'; (exec -a '=HYPERLINK(1)' /bin/true); "
                  f"curl -s 'http://127.0.0.1:{web.server_address[1]}/audit/path?x=1' > /dev/null")
        proc = subprocess.Popen([str(agent), "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        proc.communicate(timeout=120)
        logged = [s.text for s in pg.logged()["aw-export"]]
        assert len(logged) == 4, logged

        def session() -> list[dict[str, Any]]:
            evs = [e for e in daemon.events() if e["process"]["pid"] == proc.pid
                   and e["kind"] in ("session_start", "session_end")]
            if len(evs) < 2:
                return []
            sid = evs[0]["session_id"]
            got = [e for e in daemon.events() if e["session_id"] == sid]
            return got if len([e for e in got if e["kind"] == "sql"]) >= 4 and any(
                e["kind"] == "http" for e in got) else []
        events = wait_for(session, 60, what="the session recorded")
        sid = events[0]["session_id"]
        top = max(e["chain"]["seq"] for e in events)
        wait_for(lambda: any(cp["seq"] >= top for cp in map(json.loads, Path(
            json.loads(daemon.config.read_text())["chain"]["anchor_file"]).read_text().splitlines())),
            30, what="a checkpoint after the session")

        # the bundle: verified with the public key alone
        out = tmp_path / "s.jsonl"
        res = cli_out(daemon, "export", sid, "--format", "jsonl", "-o", str(out))
        assert res.returncode == 0, res.stderr
        assert out.stat().st_mode & 0o777 == 0o600
        pub = tmp_path / "host.pub"
        pub.write_text(cli_out(daemon, "key", "show").stdout)
        res = cli_out(daemon, "verify", "--bundle", str(out), "--key", str(pub), "--json")
        rep = json.loads(res.stdout)
        assert res.returncode == 0 and rep["complete"] and rep["events"] == len(events), (res.stderr, rep)
        # a statement changed in the file is named
        recs = [json.loads(x) for x in out.read_text().splitlines()]
        col = chain_mod.CHAIN_COLUMNS.index("sql_query")
        bad = next(r for r in recs if "event" in r and r["event"]["values"][col] == "insert into t values (1), (2)")
        bad["event"]["values"][col] = "select 1"
        forged = tmp_path / "forged.jsonl"
        forged.write_text("".join(json.dumps(r) + "\n" for r in recs))
        res = cli_out(daemon, "verify", "--bundle", str(forged), "--key", str(pub), "--json")
        rep = json.loads(res.stdout)
        assert res.returncode == 1 and rep["first_bad_seq"] == bad["event"]["seq"], rep
        # a key that is not the host's vouches for nothing
        other = tmp_path / "other.pub"
        other.write_text(chain_mod.public_pem(Ed25519PrivateKey.generate().public_key()))
        assert cli_out(daemon, "verify", "--bundle", str(out), "--key", str(other)).returncode == 1

        # asciicast v2: a header, then [time, "o", text] in order
        res = cli_out(daemon, "export", sid, "--format", "asciicast")
        lines = [json.loads(x) for x in res.stdout.splitlines()]
        assert lines[0]["version"] == 2 and lines[0]["width"] > 0
        frames = lines[1:]
        assert all(f[1] == "o" for f in frames) and [f[0] for f in frames] == sorted(f[0] for f in frames)
        assert any("create table t" in f[2] for f in frames)

        # CSV: one row an event; the agent's text never starts a formula
        res = cli_out(daemon, "export", sid, "--format", "csv")
        rows = list(csv.reader(io.StringIO(res.stdout)))
        assert rows[0][:3] == ["ts", "seq", "kind"] and len(rows) == len(events) + 1
        assert not any(c[:1] in "=+-@" and c for r in rows[1:] for c in r)
        assert any(c.startswith("'=HYPERLINK") for r in rows[1:] for c in r), rows     # argv[0] of the exec

        # pcap: the client's bytes per connection carry exactly the statements the server logged
        cap = tmp_path / "s.pcapng"
        res = cli_out(daemon, "export", sid, "--format", "pcap", "-o", str(cap))
        assert res.returncode == 0, res.stderr
        sent = client_payloads(cap)
        queries = [m[5:-1].decode() for data in sent.values() for m in _messages(data) if m[:1] == b"Q"]
        assert sorted(queries) == sorted(logged), (queries, logged)
        # and Wireshark's own Postgres dissector reads the same statements (deploy/setup.sh installs it)
        shark = subprocess.run(["tshark", "-r", str(cap), "-d", f"tcp.port=={pg.port},pgsql", "-T", "fields",
                                "-e", "pgsql.query", "-Y", "pgsql.query"], capture_output=True, text=True,
                               timeout=120)
        assert shark.returncode == 0, shark.stderr
        assert sorted(x for x in shark.stdout.splitlines() if x) == sorted(logged), shark.stdout
        assert seen == ["/audit/path?x=1"]
        web_port = web.server_address[1]
        requests = [p for (_, dport), p in client_payloads(cap, web_port).items() if dport == web_port]
        assert len(requests) == 1 and requests[0].startswith(b"GET /audit/path?x=1 HTTP/1.1\r\n"), requests
        shark = subprocess.run(["tshark", "-r", str(cap), "-d", f"tcp.port=={web_port},http", "-T", "fields",
                                "-e", "http.request.uri", "-e", "http.response.code", "-Y", "http"],
                               capture_output=True, text=True, timeout=120)
        assert [x.strip() for x in shark.stdout.splitlines()] == ["/audit/path?x=1", "200"], shark.stdout
        assert cli_out(daemon, "export", sid, "--format", "pcap").returncode == 2      # binary: -o FILE
    finally:
        web.shutdown()
        pg.stop()


def _messages(data: bytes) -> Iterator[bytes]:
    """Postgres frontend messages after the startup packet."""
    n = struct.unpack("!I", data[:4])[0]
    i = n
    while i + 5 <= len(data):
        size = struct.unpack("!I", data[i + 1:i + 5])[0]
        yield data[i:i + 1 + size]
        i += 1 + size

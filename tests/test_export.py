"""SIEM export (daemon/export.py): formats, sinks against real servers on loopback (syslog over
UDP, TCP and TLS; a Splunk-HEC-like HTTP collector with an outage), the on-disk cursor across a
restart, the file sink's rotation, and gaps that are waited for, not skipped."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agentwarden.core.events import (
    ChainInfo,
    Event,
    ExecInfo,
    HttpInfo,
    Identity,
    NetInfo,
    Process,
    SqlInfo,
    VerdictInfo,
)
from agentwarden.daemon import export
from hypothesis import given, settings
from hypothesis import strategies as st


def ev(seq: int, kind: str = "exec", **parts: Any) -> dict[str, Any]:
    e = Event(kind=kind, ts_ns=time.time_ns(), host="h1", session_id="s-1", agent="cursor",  # type: ignore[arg-type]
              identity=Identity(1000, "alice", 1000, "alice", email="alice@example.com", verified=True),
              process=Process(4242, 1, 1000, "/usr/bin/psql", ["psql", "-c", f"select {seq}"], "/src"),
              chain=ChainInfo(seq, "0" * 64, f"{seq:064x}"), **parts)
    return e.to_dict()


def trail(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(1, n + 1):
        if i % 4 == 0:
            out.append(ev(i, "verdict", sql=SqlInfo("drop table t", "DROP TABLE"), net=NetInfo("tcp", "10.0.0.1", 5432),
                          verdict=VerdictInfo("deny", "no-drop", "sql", "sk_msg", True)))
        elif i % 4 == 1:
            out.append(ev(i, "http", http=HttpInfo("POST", "https", "api", "/v1", status=201),
                          net=NetInfo("tcp", "10.0.0.2", 443)))
        else:
            out.append(ev(i, "exec", exec=ExecInfo(filename="/usr/bin/psql")))
    return out


def exporter(tmp_path: Path, sink: export.Sink, events: list[dict[str, Any]],
             cps: list[dict[str, Any]] | None = None) -> export.Exporter:
    def fetch(after: int, n: int) -> list[dict[str, Any]]:
        return [e for e in events if e["chain"]["seq"] > after][:n]

    def checkpoints(after_ts: int) -> list[dict[str, Any]]:
        return [c for c in cps or [] if c["ts_ns"] > after_ts]
    return export.Exporter([sink], str(tmp_path / "cursors"), fetch, checkpoints, poll_s=0.05)


# ---- formats -----------------------------------------------------------------------------------

# the attributes OCSF 1.1.0 requires of each class we emit (pinned from the schema's class
# definitions: base event + the class's own required attributes)
OCSF_REQUIRED = {
    0: {"class_uid", "category_uid", "activity_id", "type_uid", "time", "severity_id", "metadata"},
    1007: {"class_uid", "category_uid", "activity_id", "type_uid", "time", "severity_id", "metadata", "actor",
           "device", "process"},
    4001: {"class_uid", "category_uid", "activity_id", "type_uid", "time", "severity_id", "metadata",
           "dst_endpoint"},
    4002: {"class_uid", "category_uid", "activity_id", "type_uid", "time", "severity_id", "metadata",
           "http_request"},
    6005: {"class_uid", "category_uid", "activity_id", "type_uid", "time", "severity_id", "metadata", "actor",
           "database"},
}


def test_ocsf_classes_carry_their_required_attributes() -> None:
    for e in trail(8) + [ev(99, "connect", net=NetInfo("tcp", "10.1.1.1", 22)),
                         ev(98, "sql", sql=SqlInfo("select 1", "SELECT"), net=NetInfo("tcp", "10.1.1.1", 5432))]:
        o = export.to_ocsf(e)
        assert OCSF_REQUIRED[o["class_uid"]] <= set(o), (o["class_uid"], set(OCSF_REQUIRED[o["class_uid"]]) - set(o))
        assert o["type_uid"] == o["class_uid"] * 100 + o["activity_id"]
        assert o["metadata"]["version"] == "1.1.0" and o["unmapped"]["event_id"] == e["event_id"]
    denied = export.to_ocsf(trail(4)[3])
    assert (denied["class_uid"], denied["action"], denied["disposition"], denied["severity_id"]) == \
        (6005, "Denied", "Blocked", 4)
    assert export.to_ocsf(trail(1)[0])["activity_id"] == 6      # HTTP POST


CEF_HEADER = re.compile(r"^CEF:0\|((?:[^|\\]|\\.)*)\|((?:[^|\\]|\\.)*)\|((?:[^|\\]|\\.)*)\|((?:[^|\\]|\\.)*)\|"
                        r"((?:[^|\\]|\\.)*)\|((?:[^|\\]|\\.)*)\|(.*)$", re.S)


def cef_parse(line: str) -> tuple[list[str], dict[str, str]]:
    m = CEF_HEADER.match(line)
    assert m, line
    header = [re.sub(r"\\(.)", r"\1", g) for g in m.groups()[:6]]
    ext: dict[str, str] = {}
    for k, v in re.findall(r"(\w+)=((?:[^=\\]|\\.)*?)(?= \w+=|$)", m.group(7)):
        ext[k] = re.sub(r"\\(.)", lambda x: {"n": "\n", "r": "\r"}.get(x.group(1), x.group(1)), v)
    return header, ext


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60))
def test_cef_escaping_round_trips_any_text(text: str) -> None:
    e = ev(1, "exec", exec=ExecInfo(filename="/x"))
    e["process"]["argv"] = ["sh", "-c", text]
    e["session_id"] = text
    line = export.to_cef(e)
    assert "\n" not in line and "\r" not in line
    _, ext = cef_parse(line)
    def controls(s: str) -> str:
        return "".join(f"\\u{ord(c):04x}" if (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0) and c not in "\t\n\r"
                       else c for c in s)
    want = controls(f"sh -c {text}")
    assert ext["cs3"] == want, (line, ext)


def test_cef_header_escapes_pipes_and_backslashes() -> None:
    e = ev(1, "verdict", verdict=VerdictInfo("deny", "a|b\\c", "exec", "SIGKILL", True))
    header, ext = cef_parse(export.to_cef(e))
    assert header[3:6] == ["verdict", "verdict deny", "8"] and ext["cs4"] == "a|b\\c"


# ---- sinks -----------------------------------------------------------------------------------


class Collector(BaseHTTPRequestHandler):
    lines: list[dict[str, Any]] = []
    fail: int = 0
    auth: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        Collector.auth.append(self.headers.get("Authorization") or "")
        if Collector.fail > 0:
            Collector.fail -= 1
            self.send_response(503)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        Collector.lines += [json.loads(x) for x in body.splitlines() if x]
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def hec() -> Iterator[str]:
    Collector.lines, Collector.fail, Collector.auth = [], 0, []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/services/collector/event"
    srv.shutdown()


def test_hec_outage_keeps_the_cursor_then_delivers_in_order(tmp_path: Path, hec: str) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    events = trail(40)
    sink = export.make_sink(export.SinkConfig("hec", "http", "ocsf", url=hec, preset="hec", token_file=str(token)))
    x = exporter(tmp_path, sink, events)
    x.BATCH = 15
    Collector.fail = 2
    assert x.step(sink) == 0 and x.cursor("hec")["seq"] == 0          # 503: nothing moves
    assert x.step(sink) == 0, "Retry-After: 1 is honoured (no retry before it)"
    time.sleep(1.1)
    assert x.step(sink) == 0 and x.cursor("hec")["seq"] == 0          # the second 503
    time.sleep(2.1)
    while x.step(sink):
        pass
    assert x.cursor("hec")["seq"] == 40
    got = [line["event"]["unmapped"]["chain"]["seq"] for line in Collector.lines]
    assert got == list(range(1, 41)) and Collector.auth[-1] == "Splunk s3cret"
    assert Collector.lines[0]["sourcetype"] == "agentwarden:ocsf"


def test_a_restart_in_the_middle_of_an_export_loses_nothing(tmp_path: Path, hec: str) -> None:
    events = trail(30)
    cfg = export.SinkConfig("plain", "http", "json", url=hec)
    a = exporter(tmp_path, export.make_sink(cfg), events)
    a.BATCH = 10
    a.step(a.sinks[0])                               # the daemon stops after one batch
    b = exporter(tmp_path, export.make_sink(cfg), events)
    b.start()
    deadline = time.monotonic() + 10
    while b.cursor("plain")["seq"] < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    b.stop()
    assert [e["chain"]["seq"] for e in Collector.lines] == list(range(1, 31))


def test_kind_and_severity_filters_and_checkpoints(tmp_path: Path, hec: str) -> None:
    events = trail(12)
    cps = [{"host": "h1", "seq": 12, "hash": "ab", "ts_ns": 5, "reason": "every", "key_id": "k", "signature": "00"}]
    sink = export.make_sink(export.SinkConfig("high", "http", "json", url=hec, min_severity="high"))
    x = exporter(tmp_path, sink, events, cps)
    x.step(sink)
    assert [e["kind"] for e in Collector.lines] == ["verdict", "verdict", "verdict", "checkpoint"]
    assert x.cursor("high") == {"seq": 12, "checkpoint_ts": 5}


class _Syslog(socketserver.BaseRequestHandler):
    got: list[bytes] = []

    def handle(self) -> None:
        if isinstance(self.request, tuple):
            _Syslog.got.append(self.request[0])
            return
        buf = b""
        while True:
            try:
                chunk = self.request.recv(65536)
            except (OSError, ssl.SSLError):
                chunk = b""
            buf += chunk
            while b" " in buf:   # octet counting: LEN SP MSG
                n, _, rest = buf.partition(b" ")
                if len(rest) < int(n):
                    break
                _Syslog.got.append(rest[:int(n)])
                buf = rest[int(n):]
            if not chunk:
                break


def _cert(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "c.pem", tmp_path / "k.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


@pytest.mark.parametrize("protocol", ["udp", "tcp", "tls"])
def test_syslog_rfc5424_over_each_transport(tmp_path: Path, protocol: str) -> None:
    _Syslog.got = []
    if protocol == "udp":
        srv: socketserver.BaseServer = socketserver.ThreadingUDPServer(("127.0.0.1", 0), _Syslog)
    else:
        srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Syslog)
        if protocol == "tls":
            crt, key = _cert(tmp_path)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(crt, key)
            srv.socket = ctx.wrap_socket(srv.socket, server_side=True)  # type: ignore[attr-defined]
    srv.daemon_threads = True  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]  # type: ignore[attr-defined]
    cfg = export.SinkConfig("sl", "syslog", "cef", address=f"127.0.0.1:{port}", protocol=protocol,
                            ca_file=str(tmp_path / "c.pem") if protocol == "tls" else "")
    sink = export.make_sink(cfg)
    x = exporter(tmp_path, sink, trail(8))
    assert x.step(sink)
    sink.close()
    deadline = time.monotonic() + 5
    while len(_Syslog.got) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.shutdown()
    assert len(_Syslog.got) == 8, _Syslog.got
    first = _Syslog.got[0].decode()
    assert re.match(r"^<1(0[89]|10)>1 \d{4}-\d\d-\d\dT[\d:.]+Z \S+ agentwarden \d+ CEF - CEF:0\|agentwarden\|", first), first
    assert any(m.startswith(b"<108>") for m in _Syslog.got)    # a deny: facility 13, warning


def test_the_file_sink_rotates(tmp_path: Path) -> None:
    path = tmp_path / "out" / "events.ndjson"
    path.parent.mkdir()
    sink = export.make_sink(export.SinkConfig("f", "file", "json", path=str(path), max_bytes=4000, keep=2))
    x = exporter(tmp_path, sink, trail(60))
    x.BATCH = 5
    while x.step(sink):
        pass
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["events.ndjson", "events.ndjson.1", "events.ndjson.2"], files
    seqs = [json.loads(line)["chain"]["seq"] for line in path.read_text().splitlines()]
    assert seqs and seqs[-1] == 60 and all(b == a + 1 for a, b in zip(seqs, seqs[1:], strict=False))


def test_a_gap_is_waited_for_then_passed(tmp_path: Path, hec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """seq 3 is still on its way (a spooled batch): 1-2 go out, 4 waits; after the grace, on."""
    events = [e for e in trail(5) if e["chain"]["seq"] != 3]
    sink = export.make_sink(export.SinkConfig("g", "http", "json", url=hec))
    x = exporter(tmp_path, sink, events)
    monkeypatch.setattr(x, "GAP_GRACE_S", 0.3)
    x.step(sink)
    x.step(sink)
    assert x.cursor("g")["seq"] == 2
    time.sleep(0.4)
    x.step(sink)
    x.step(sink)
    assert x.cursor("g")["seq"] == 5 and [e["chain"]["seq"] for e in Collector.lines] == [1, 2, 4, 5]



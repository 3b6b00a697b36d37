"""SIEM export: the stored trail, in order, to the tools a SOC already runs.

Formats (pure functions of the public event JSON): the native event, OCSF 1.1 (Process Activity
for commands, Network Activity for connects and TLS, HTTP Activity for requests, Datastore
Activity for SQL, Authentication for logins; verdicts in `action`/`disposition`, agentwarden's
own fields under `unmapped`), and CEF.  Sinks: a rotating NDJSON file, syslog (RFC 5424 over UDP,
TCP with octet counting, or TLS), and HTTP (JSON lines, or the Splunk HEC preset).

Each sink reads the store by its own `(host, seq)` cursor, kept on disk and advanced only after a
batch was accepted: delivery is at least once and in seq order, survives daemon restarts and
store or sink outages, and backs off (honouring `Retry-After`).  Checkpoints go out too (as
`checkpoint` records), so the SIEM holds an anchor of the chain off the box.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agentwarden.core.events import parse_ts
from agentwarden.core.files import write_atomic
from agentwarden.core.version import VERSION

log = logging.getLogger(__name__)

OCSF_VERSION = "1.1.0"
SEVERITIES = ("info", "medium", "high")
# verdict actions by severity: what stopped something is high, what waits for a person medium
_HIGH = {"deny", "kill", "quarantine"}
_MEDIUM = {"hold"}


def severity(ev: dict[str, Any]) -> str:
    action = (ev.get("verdict") or {}).get("action") or ""
    refused_login = ev.get("kind") == "identity" and (ev.get("binding") or {}).get("state") == "refused"
    if action in _HIGH or refused_login:
        return "high"
    if action in _MEDIUM or ev.get("kind") in ("lost", "approval"):
        return "medium"
    return "info"


# ---- OCSF ------------------------------------------------------------------------------------

_HTTP_ACTIVITY = {"CONNECT": 1, "DELETE": 2, "GET": 3, "HEAD": 4, "OPTIONS": 5, "POST": 6, "PUT": 7,
                  "TRACE": 8}
_OCSF_SEVERITY = {"info": 1, "medium": 3, "high": 4}
# subject of a verdict -> the class of the operation it judged
_CLASS_OF = {"exec": 1007, "session": 1007, "self": 1007, "connect": 4001, "http": 4002, "sql": 6005}
_CATEGORY = {1007: 1, 4001: 4, 4002: 4, 6005: 6, 3002: 3, 0: 0}


def _ms(ts: str) -> int:
    return parse_ts(ts) // 1_000_000


def to_ocsf(ev: dict[str, Any]) -> dict[str, Any]:
    kind = ev.get("kind", "")
    verdict = ev.get("verdict") or {}
    proc = ev.get("process") or {}
    ident = ev.get("identity") or {}
    if kind in ("exec", "exit", "session_start", "session_end"):
        cls, activity = 1007, 2 if kind in ("exit", "session_end") else 1
    elif kind in ("connect", "tls"):
        cls, activity = 4001, 1
    elif kind == "http":
        cls, activity = 4002, _HTTP_ACTIVITY.get(((ev.get("http") or {}).get("method") or "").upper(), 99)
    elif kind == "sql":
        cls, activity = 6005, 4           # Query
    elif kind == "identity":
        state = (ev.get("binding") or {}).get("state")
        cls, activity = 3002, {"bound": 1, "logged_out": 2}.get(state or "", 99)
    elif kind == "verdict":
        cls, activity = _CLASS_OF.get(verdict.get("subject", ""), 0), 99
    else:
        cls, activity = 0, 99             # approvals, losses: Base Event
    sev = severity(ev)
    out: dict[str, Any] = {
        "class_uid": cls, "category_uid": _CATEGORY.get(cls, 0), "activity_id": activity,
        "type_uid": cls * 100 + activity, "time": _ms(ev.get("ts", "")), "severity_id": _OCSF_SEVERITY[sev],
        "status_id": 1,
        "metadata": {"version": OCSF_VERSION, "uid": ev.get("event_id", ""), "log_name": kind,
                     "product": {"name": "agentwarden", "vendor_name": "agentwarden", "version": VERSION}},
        "device": {"hostname": ev.get("host", ""), "type_id": 0},
        "actor": {"user": {"name": ident.get("login_user") or ident.get("user") or "",
                           "uid": str(ident.get("uid")),
                           **({"email_addr": ident["email"]} if ident.get("email") else {})},
                  "session": {"uid": ev.get("session_id", "")},
                  "app_name": ev.get("agent", "")},
        "process": {"pid": proc.get("pid", 0), "name": os.path.basename(proc.get("exe", "") or ""),
                    "cmd_line": " ".join(proc.get("argv") or []), "file": {"path": proc.get("exe", "")},
                    "parent_process": {"pid": proc.get("ppid", 0)}},
        "unmapped": {k: v for k, v in ev.items() if v is not None},
    }
    net = ev.get("net") or {}
    if net:
        out["dst_endpoint"] = {"ip": net.get("dst_ip") or None, "port": net.get("dst_port") or None,
                               **({"hostname": net["sni"]} if net.get("sni") else {})}
        out["connection_info"] = {"protocol_name": net.get("transport") or "", "direction_id": 2}
    if kind == "http" or (ev.get("http") and kind == "verdict"):
        h = ev.get("http") or {}
        out["http_request"] = {"http_method": h.get("method", ""), "url": {"hostname": h.get("host", ""),
                               "path": h.get("path", ""), "query_string": h.get("query", ""),
                               "scheme": h.get("scheme", "")}, "version": h.get("version", "")}
        if h.get("status") is not None:
            out["http_response"] = {"code": h["status"]}
    if ev.get("sql"):
        s = ev["sql"]
        out["database"] = {"name": s.get("database", ""), "type_id": 99, "type": "PostgreSQL"}
        out["query_info"] = {"query_string": s.get("query", "")}
    if verdict:
        refused = verdict.get("action") in _HIGH | _MEDIUM
        out["action_id"] = 2 if refused else 1
        out["action"] = "Denied" if refused else "Allowed"
        out["disposition_id"] = 2 if verdict.get("action") in _HIGH else 1
        out["disposition"] = "Blocked" if verdict.get("action") in _HIGH else (
            "Pending" if verdict.get("action") in _MEDIUM else "Allowed")
        out["status_detail"] = f"rule {verdict.get('rule') or '-'}: {verdict.get('mechanism') or ''}"
    return out


# ---- CEF ---------------------------------------------------------------------------------------


def _cef_header(text: str) -> str:
    return _controls(str(text).replace("\\", "\\\\").replace("|", "\\|"))


def _cef_value(text: Any) -> str:
    # \r and \n each escaped on its own: a CRLF comes back as a CRLF (Hypothesis found "\r\n" lost its \r)
    return _controls(str(text).replace("\\", "\\\\").replace("=", "\\=").replace("\n", "\\n")
                     .replace("\r", "\\r"))


def _controls(text: str) -> str:
    """C0, DEL and C1 characters (other than those escaped above) as the text \\uXXXX, its backslash
    escaped as CEF escapes one (a reader gets six visible characters; a line stays a line)."""
    return "".join(f"\\\\u{ord(c):04x}" if (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0) and c != "\t" else c
                   for c in text)


_CEF_SEVERITY = {"info": 3, "medium": 6, "high": 8}


def to_cef(ev: dict[str, Any]) -> str:
    kind = ev.get("kind", "")
    verdict = ev.get("verdict") or {}
    proc = ev.get("process") or {}
    ident = ev.get("identity") or {}
    name = f"{kind} {verdict.get('action', '')}".strip()
    ext: dict[str, Any] = {
        "rt": _ms(ev.get("ts", "")), "dvchost": ev.get("host", ""),
        "suser": ident.get("login_user") or ident.get("user") or "", "suid": ident.get("uid"),
        "spid": proc.get("pid"), "sproc": proc.get("exe", ""),
        "cs1Label": "session", "cs1": ev.get("session_id", ""),
        "cs2Label": "agent", "cs2": ev.get("agent", ""),
        "externalId": ev.get("event_id", ""),
    }
    if ident.get("email"):
        ext["suser"] = ident["email"]
    if proc.get("argv"):
        ext["cs3Label"], ext["cs3"] = "cmdline", " ".join(proc["argv"])
    if verdict:
        ext["act"] = verdict.get("action", "")
        ext["cs4Label"], ext["cs4"] = "rule", verdict.get("rule", "")
        ext["outcome"] = "prevented" if verdict.get("prevented") else "after the fact"
    net = ev.get("net") or {}
    if net.get("dst_ip"):
        ext["dst"], ext["dpt"] = net["dst_ip"], net.get("dst_port")
    if ev.get("sql"):
        ext["cs5Label"], ext["cs5"] = "sql", ev["sql"].get("query", "")
    if ev.get("http"):
        h = ev["http"]
        ext["requestMethod"], ext["request"] = h.get("method", ""), f"{h.get('scheme')}://{h.get('host')}{h.get('path')}"
    body = " ".join(f"{k}={_cef_value(v)}" for k, v in ext.items() if v not in (None, ""))
    return (f"CEF:0|agentwarden|agentwarden|{_cef_header(VERSION)}|{_cef_header(kind)}|{_cef_header(name)}|"
            f"{_CEF_SEVERITY[severity(ev)]}|{body}")


def render(fmt: str, ev: dict[str, Any]) -> str:
    if fmt == "cef":
        return to_cef(ev)
    obj = to_ocsf(ev) if fmt == "ocsf" else ev
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def checkpoint_record(cp: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint as an exported record (every format carries it as JSON)."""
    return {"kind": "checkpoint", **cp}


# ---- sinks -----------------------------------------------------------------------------------


class SinkError(RuntimeError):
    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class SinkConfig:
    name: str
    type: str                          # file | syslog | http
    format: str = "json"               # json | ocsf | cef
    kinds: tuple[str, ...] = ()        # none: every kind
    min_severity: str = "info"
    path: str = ""                     # file
    max_bytes: int = 100 << 20
    keep: int = 5
    address: str = ""                  # syslog: host:port
    protocol: str = "udp"              # udp | tcp | tls
    ca_file: str = ""
    url: str = ""                      # http
    preset: str = ""                   # "" (JSON lines) | hec
    token_file: str = ""
    token_env: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def wants(self, ev: dict[str, Any]) -> bool:
        if self.kinds and ev.get("kind") not in self.kinds and ev.get("kind") != "checkpoint":
            return False
        return SEVERITIES.index(severity(ev)) >= SEVERITIES.index(self.min_severity) or \
            ev.get("kind") == "checkpoint"


class Sink:
    def __init__(self, cfg: SinkConfig) -> None:
        self.cfg = cfg

    def send(self, lines: list[str], severities: list[str]) -> None:
        """Deliver the rendered records (and each one's severity), or raise SinkError."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileSink(Sink):
    """NDJSON (or CEF lines) appended to a file, rotated at max_bytes into .1 … .keep."""

    def send(self, lines: list[str], severities: list[str]) -> None:
        path = self.cfg.path
        data = "".join(x + "\n" for x in lines).encode()
        try:
            if os.path.exists(path) and os.path.getsize(path) + len(data) > self.cfg.max_bytes:
                for i in range(self.cfg.keep - 1, 0, -1):
                    if os.path.exists(f"{path}.{i}"):
                        os.replace(f"{path}.{i}", f"{path}.{i + 1}")
                os.replace(path, f"{path}.1")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
            with os.fdopen(fd, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise SinkError(f"{path}: {e}") from None


class SyslogSink(Sink):
    """RFC 5424 messages: UDP one a datagram, TCP and TLS with octet counting (RFC 6587)."""

    FACILITY = 13        # log audit

    def __init__(self, cfg: SinkConfig) -> None:
        super().__init__(cfg)
        self._sock: socket.socket | None = None
        host, _, port = cfg.address.rpartition(":")
        self.addr = (host.strip("[]"), int(port))

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        if self.cfg.protocol == "udp":
            s = socket.socket(socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(self.addr)
        else:
            s = socket.create_connection(self.addr, timeout=10)
            if self.cfg.protocol == "tls":
                ctx = ssl.create_default_context(cafile=self.cfg.ca_file or None)
                s = ctx.wrap_socket(s, server_hostname=self.addr[0])
        self._sock = s
        return s

    def _message(self, line: str, sev: str) -> bytes:
        pri = self.FACILITY * 8 + {"high": 4, "medium": 5, "info": 6}[sev]
        ts = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        msgid = "CEF" if self.cfg.format == "cef" else "EVENT"
        return f"<{pri}>1 {ts} {socket.gethostname()} agentwarden {os.getpid()} {msgid} - {line}".encode()

    def send(self, lines: list[str], severities: list[str]) -> None:
        try:
            s = self._connect()
            for line, sev in zip(lines, severities, strict=True):
                msg = self._message(line, sev)
                if self.cfg.protocol == "udp":
                    s.send(msg[:65000])
                else:
                    s.sendall(f"{len(msg)} ".encode() + msg)
        except (OSError, ValueError) as e:
            self.close()
            raise SinkError(f"syslog {self.cfg.address} ({self.cfg.protocol}): {e}") from None

    def close(self) -> None:
        if self._sock is not None:
            try:
                if isinstance(self._sock, ssl.SSLSocket):
                    with contextlib.suppress(OSError, ValueError):
                        self._sock.unwrap()   # a clean close_notify: the collector keeps the last bytes
                self._sock.close()
            finally:
                self._sock = None


class HttpSink(Sink):
    """POST batches: JSON lines, or Splunk's HTTP Event Collector (`preset: hec`)."""

    def _token(self) -> str:
        if self.cfg.token_file:
            with open(self.cfg.token_file, encoding="utf-8") as f:
                return f.read().strip()
        return os.environ.get(self.cfg.token_env, "") if self.cfg.token_env else ""

    def send(self, lines: list[str], severities: list[str]) -> None:
        headers = {"Content-Type": "application/json"}
        try:
            token = self._token()
        except OSError as e:
            raise SinkError(f"token for {self.cfg.url}: {e}") from None
        if self.cfg.preset == "hec":
            headers["Authorization"] = f"Splunk {token}"
            kind = f"agentwarden:{self.cfg.format}"
            body = "".join(json.dumps({"event": json.loads(x) if self.cfg.format != "cef" else x,
                                       "source": "agentwarden", "sourcetype": kind},
                                      separators=(",", ":")) + "\n" for x in lines)
        else:
            if token:
                headers["Authorization"] = f"Bearer {token}"
            body = "".join(x + "\n" for x in lines)
        req = urllib.request.Request(self.cfg.url, data=body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:   # noqa: S310 (configured URL)
                resp.read()
        except urllib.error.HTTPError as e:
            retry = e.headers.get("Retry-After") if e.headers else None
            raise SinkError(f"{self.cfg.url}: HTTP {e.code}",
                            float(retry) if retry and retry.isdigit() else 0.0) from None
        except OSError as e:
            raise SinkError(f"{self.cfg.url}: {e}") from None


def make_sink(cfg: SinkConfig) -> Sink:
    return {"file": FileSink, "syslog": SyslogSink, "http": HttpSink}[cfg.type](cfg)


# ---- the exporter ----------------------------------------------------------------------------


class Exporter:
    """One thread; per sink a cursor `{seq, checkpoint_ts}` in `state_dir/<name>.cursor`.

    `fetch(after_seq, limit)` gives the next stored events of this host in seq order (dicts);
    `checkpoints(after_ts)` the checkpoints made after a time.  A batch is rendered, filtered and
    sent; the cursor moves past it only when the sink took it."""

    BATCH = 500

    def __init__(self, sinks: list[Sink], state_dir: str,
                 fetch: Callable[[int, int], list[dict[str, Any]]],
                 checkpoints: Callable[[int], list[dict[str, Any]]], poll_s: float = 1.0) -> None:
        self.sinks = sinks
        self.state_dir = state_dir
        self.fetch = fetch
        self.checkpoints = checkpoints
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._gap_since: dict[tuple[str, int], float] = {}
        self.stats: dict[str, dict[str, Any]] = {s.cfg.name: {"sent": 0, "errors": 0, "last_error": "",
                                                              "seq": 0} for s in sinks}
        os.makedirs(state_dir, exist_ok=True)

    def cursor(self, name: str) -> dict[str, int]:
        try:
            with open(os.path.join(self.state_dir, f"{name}.cursor"), encoding="utf-8") as f:
                d = json.load(f)
            return {"seq": int(d.get("seq", 0)), "checkpoint_ts": int(d.get("checkpoint_ts", 0))}
        except (OSError, ValueError):
            return {"seq": 0, "checkpoint_ts": 0}

    def _save(self, name: str, cur: dict[str, int]) -> None:
        write_atomic(os.path.join(self.state_dir, f"{name}.cursor"), json.dumps(cur))

    def step(self, sink: Sink) -> int:
        """One batch to one sink; how many records it took (0: nothing new, or it is backing off)."""
        name = sink.cfg.name
        now = time.monotonic()
        if self._retry_at.get(name, 0) > now:
            return 0
        cur = self.cursor(name)
        events = self._contiguous(name, cur["seq"], self.fetch(cur["seq"], self.BATCH), now)
        cps = self.checkpoints(cur["checkpoint_ts"])
        records: list[tuple[str, str]] = []
        for ev in events:
            if sink.cfg.wants(ev):
                records.append((render(sink.cfg.format, ev), severity(ev)))
        for cp in cps:
            records.append((json.dumps(checkpoint_record(cp), separators=(",", ":")), "info"))
        if not events and not cps:
            return 0
        try:
            if records:
                sink.send([line for line, _ in records], [sev for _, sev in records])
        except SinkError as e:
            st = self.stats[name]
            st["errors"] += 1
            st["last_error"] = str(e)
            back = min(max(self._backoff.get(name, 0.5) * 2, 1.0), 60.0)
            self._backoff[name] = back
            self._retry_at[name] = now + max(back, e.retry_after)
            log.warning("export to %s failed (retrying in %.0f s): %s", name, max(back, e.retry_after), e)
            return 0
        self._backoff[name] = 0.5
        new = {"seq": max([cur["seq"], *[int((e.get("chain") or {}).get("seq") or 0) for e in events]]),
               "checkpoint_ts": max([cur["checkpoint_ts"], *[int(c["ts_ns"]) for c in cps]])}
        self._save(name, new)
        self.stats[name]["sent"] += len(records)
        self.stats[name]["seq"] = new["seq"]
        return len(records) or 1

    GAP_GRACE_S = 60.0

    def _contiguous(self, name: str, after: int, events: list[dict[str, Any]],
                    now: float) -> list[dict[str, Any]]:
        """The events that follow the cursor without a gap: a batch still on its way to the store
        (a spooled one, replayed later) must not be passed over.  A gap that stays GAP_GRACE_S is
        passed (a loss the trail declares, or a deletion `verify` names)."""
        out: list[dict[str, Any]] = []
        expected = after + 1
        for ev in events:
            seq = int((ev.get("chain") or {}).get("seq") or 0)
            if seq != expected:
                if out:
                    break
                first_seen = self._gap_since.setdefault((name, expected), now)
                if now - first_seen < self.GAP_GRACE_S:
                    break
                log.warning("export to %s: seq %d-%d never arrived; going on", name, expected, seq - 1)
            out.append(ev)
            expected = seq + 1
        return out

    def run(self) -> None:
        while not self._stop.is_set():
            busy = False
            for sink in self.sinks:
                try:
                    busy |= self.step(sink) > 0
                except Exception:   # never dies: the next round tries again
                    log.exception("export to %s", sink.cfg.name)
            if not busy:
                self._stop.wait(self.poll_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="export", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for s in self.sinks:
            s.close()

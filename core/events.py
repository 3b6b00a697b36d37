"""The one event schema every output shares (store, tail, query, logs).

JSON is the public contract; `Event.to_json()` is that JSON and the ClickHouse
columns are derived from the same dataclasses (agentwarden.daemon.schema).
"""

from __future__ import annotations

import itertools
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

# Every kind of event, and where it is born (one place each; ARCHITECTURE.md):
#   session_start, session_end, exec, exit   daemon/tracker.py (from probes/process.bpf.c records)
#   connect                                  daemon/conns.py (probes/net.bpf.c connect records)
#   sql, http, tls, llm                      daemon/conns.py (daemon/l7 parsers' messages; llm: an http
#                                            exchange whose path and body are an LLM API's)
#   lost                                     Tracker.lost and lost_on (kernel ring buffers, parsers'
#                                            desyncs, the store, tail subscribers)
#   verdict, approval                        enforce/enforcer.py
#   identity                                 core/identity.py Bindings (login, refusal, expiry, logout)
Kind = Literal["session_start", "session_end", "exec", "exit", "lost", "connect", "sql", "http", "tls",
               "verdict", "approval", "identity", "llm"]
KINDS: tuple[Kind, ...] = get_args(Kind)
# what a policy rule does, and so a verdict's action (VerdictInfo.action)
ACTIONS = ("allow", "audit", "deny", "kill", "quarantine", "hold")


def as_kind(text: str) -> Kind:
    """A kind read from outside (the store, a request): refused by name when it is not one."""
    if text not in KINDS:
        raise ValueError(f"unknown event kind {text!r} (one of: {', '.join(KINDS)})")
    return text   # narrowed to Kind by the test above


@dataclass
class Identity:
    """The person who launched the agent; fixed for the whole session (frozen at its start).

    The Unix fields always; the OIDC fields when that person had bound an identity-provider
    login (`agentwarden login`) before the session started: then `verified` is true and
    `source` is "oidc".  `groups_unknown`: the provider did not list the groups (an Entra
    ID overage), so group-gated `allow` rules do not match and refusing ones do."""

    uid: int = -1
    user: str = ""
    login_uid: int | None = None
    login_user: str = ""
    tty: str = ""
    source: str = "unix"               # unix | oidc
    verified: bool = False
    issuer: str = ""
    sub: str = ""
    email: str = ""
    name: str = ""
    groups: list[str] = field(default_factory=list)    # the provider's groups (Unix ones are not listed)
    groups_unknown: bool = False


@dataclass
class K8sInfo:
    """The Kubernetes pod and container a session's process runs in (from its cgroup and the
    API server's pods of this node)."""

    namespace: str = ""
    pod: str = ""
    container: str = ""
    image: str = ""
    service_account: str = ""
    node: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    pod_uid: str = ""
    container_id: str = ""


@dataclass
class Process:
    pid: int = 0
    ppid: int = 0
    uid: int = 0
    exe: str = ""
    argv: list[str] = field(default_factory=list)
    cwd: str = ""


@dataclass
class ExecInfo:
    """exec: the image and how argv was captured; exit: how the process ended."""

    filename: str = ""
    argv_truncated: bool = False
    errno: int | None = None           # failed exec
    exit_code: int | None = None       # exit kind: status passed to exit()
    signal: int | None = None          # exit kind: killed by this signal
    duration_ms: float | None = None   # exit kind: since the process's last exec


@dataclass
class NetInfo:
    """The connection an event happened on, seen from the tracked process."""

    transport: str = ""                # tcp, udp, unix, or "" when unknown
    dst_ip: str = ""
    dst_port: int = 0
    path: str = ""                     # Unix socket path ("@name" for abstract)
    direction: str = "connect"         # connect (outgoing) or accept (incoming)
    protocol: str = ""                 # detected from content: postgres, http, ...
    tls: bool = False                  # TLS; what was recorded is OpenSSL's plaintext
    sni: str = ""                      # server name from the TLS ClientHello

    def copy(self) -> NetInfo:
        """A copy for one event (every field is immutable): 0.3 µs, dataclasses.replace 2."""
        new = object.__new__(NetInfo)
        new.__dict__.update(self.__dict__)
        return new


@dataclass
class SqlInfo:
    """One statement the client sent and what the server answered."""

    query: str = ""
    command: str = ""                  # from PostgreSQL's parser: DROP TABLE, SELECT, ...
    tables: list[str] = field(default_factory=list)
    parsed: bool = True                # False: the text did not parse, command is a guess
    database: str = ""
    db_user: str = ""
    params: int = 0                    # bind parameters (values are not recorded)
    prepared_name: str | None = None   # None: simple query protocol
    rows: int | None = None
    tag: str = ""                      # the server's CommandComplete tag
    sqlstate: str = ""
    error: str = ""
    duration_ms: float | None = None
    encrypted: bool = False            # the connection switched to TLS: statements unreadable


@dataclass
class HttpInfo:
    """One HTTP request and its response (or the connection's switch to HTTP/2)."""

    method: str = ""
    scheme: str = "http"
    host: str = ""
    path: str = ""
    query: str = ""
    version: str = "1.1"               # "2": HTTP/2 (prior knowledge or an accepted h2c upgrade)
    status: int | None = None          # None: no response before the connection ended
    req_bytes: int = 0                 # headers and body
    resp_bytes: int = 0
    duration_ms: float | None = None
    tls: bool = False
    headers: dict[str, str] = field(default_factory=dict)            # request headers
    response_headers: dict[str, str] = field(default_factory=dict)
    req_body: str = ""                 # first bytes of a text or JSON body
    resp_body: str = ""
    upgrade: str = ""                  # the protocol a 101 response switched to
    # gRPC or Connect over HTTP/2: system, service, method, status, message, req_/resp_messages,
    # req_/resp_sizes, req_/resp_strings (printable strings of the first message, no schema needed)
    rpc: dict[str, str] = field(default_factory=dict)


@dataclass
class LlmInfo:
    """One call of an LLM API (Anthropic Messages, OpenAI Chat Completions and Responses, Gemini, and
    anything that speaks them), read from its request and reply; its `http` part is the exchange."""

    provider: str = ""                 # anthropic, openai, gemini (by the API's shape, not the host)
    model: str = ""
    endpoint: str = ""                 # messages, chat.completions, responses, generateContent
    prompt: str = ""                   # the latest user turn with text, up to llm.max_text characters
    prompt_hash: str = ""              # of the whole of it: HMAC-SHA256 with the masking key of its SHA-256
    system_hash: str = ""              # of the system prompt, the same way
    messages: int = 0                  # turns the request carried
    tool_calls: list[dict[str, str]] = field(default_factory=list)   # [{id, name, arguments}]
    text: str = ""                     # the reply's text, up to llm.max_text characters
    stop_reason: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    duration_ms: float | None = None
    stream: bool = False
    complete: bool = True              # False: the reply was cut (or never came)


# CauseInfo.match of an exec decided while the LLM replies before it may still have been unread
# (enforce.enforcer: the main ring not read again within DEFER_S): no tool call is known, and
# whether one asked for it is not either.
CAUSE_UNKNOWN = "unknown"


@dataclass
class CauseInfo:
    """The tool call of an LLM reply that asked for what this event is (daemon/lineage.py)."""

    llm_event_id: str = ""
    tool_call_id: str = ""
    tool: str = ""                     # the tool's name
    match: str = ""                    # "command": its text is the tool call's; "parent": its process's is;
    #                                    CAUSE_UNKNOWN: the capture was behind when it was decided
    model: str = ""                    # the model of the reply that made the tool call
    provider: str = ""                 # that call's API (anthropic, openai, gemini)


@dataclass
class VerdictInfo:
    """What the policy did to one operation (the event carries the operation's own fields too)."""

    action: str = ""                   # allow audit deny kill quarantine hold (+ resume after an approval)
    rule: str = ""
    subject: str = ""                  # exec connect sql http session self
    mechanism: str = ""                # what acted: "sk_msg", "cgroup connect4", "SIGSTOP at exec", ...
    prevented: bool = False            # True: it acted before the operation reached its target
    approval_id: str = ""
    latency_us: int | None = None      # from the kernel's timestamp to the decision


@dataclass
class ApprovalInfo:
    """A held operation's request and its fate: every state is one event."""

    id: str = ""
    state: str = ""                    # pending approved denied expired
    rule: str = ""
    subject: str = ""
    summary: str = ""
    approvers: list[str] = field(default_factory=list)
    decided_by: str = ""
    approved_for_s: int = 0
    expires: str = ""
    auth: str = ""                     # how the decider was authenticated (pidfd, code, ...)


@dataclass
class BindingInfo:
    """An `identity` event: a person's identity-provider login bound to a Unix user, refused,
    expired or ended (`agentwarden login`, `logout`)."""

    state: str = ""                    # bound | refused | expired | logged_out
    reason: str = ""                   # refused: the precise reason; otherwise how (device, code, id_token)
    uid: int = -1                      # the Unix person the binding is for (login uid, else uid)
    login_uid: int | None = None
    issuer: str = ""
    sub: str = ""
    email: str = ""
    name: str = ""
    groups: list[str] = field(default_factory=list)
    groups_unknown: bool = False
    expires: str = ""                  # RFC 3339


@dataclass
class ChainInfo:
    """The event's place in its host's hash chain (daemon/chain.py), given when it is stored."""

    seq: int = 0
    prev_hash: str = ""
    hash: str = ""


@dataclass
class LostInfo:
    count: int = 0
    reason: str = ""


@dataclass
class Event:
    kind: Kind
    ts_ns: int
    host: str
    session_id: str = ""
    agent: str = ""
    identity: Identity = field(default_factory=Identity)
    process: Process = field(default_factory=Process)
    exec: ExecInfo | None = None
    lost: LostInfo | None = None
    net: NetInfo | None = None
    sql: SqlInfo | None = None
    http: HttpInfo | None = None
    verdict: VerdictInfo | None = None
    approval: ApprovalInfo | None = None
    k8s: K8sInfo | None = None
    binding: BindingInfo | None = None
    chain: ChainInfo | None = None
    llm: LlmInfo | None = None
    cause: CauseInfo | None = None
    event_id: str = field(default_factory=lambda: new_event_id())

    def to_dict(self) -> dict[str, Any]:
        # flat dataclasses: a shallow copy of each (lists copied) is what asdict()
        # would give, at a fraction of its cost on the per-statement hot path
        d: dict[str, Any] = {
            "kind": self.kind,
            "ts": format_ts(self.ts_ns),
            "host": self.host,
            "session_id": self.session_id,
            "agent": self.agent,
            "identity": _flat(self.identity),
            "process": _flat(self.process),
            "event_id": self.event_id,
        }
        for name in ("exec", "lost", "net", "sql", "http", "verdict", "approval", "k8s", "binding", "chain",
                     "llm", "cause"):
            obj = getattr(self, name)
            if obj is not None:
                d[name] = _flat(obj)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        ex = d.get("exec")
        lo = d.get("lost")
        ne = d.get("net")
        sq = d.get("sql")
        ht = d.get("http")
        ve = d.get("verdict")
        ap = d.get("approval")
        k8 = d.get("k8s")
        bi = d.get("binding")
        ch = d.get("chain")
        ll = d.get("llm")
        ca = d.get("cause")
        return cls(
            kind=as_kind(d["kind"]),
            ts_ns=parse_ts(d["ts"]),
            host=d.get("host", ""),
            session_id=d.get("session_id", ""),
            agent=d.get("agent", ""),
            identity=Identity(**d.get("identity", {})),
            process=Process(**d.get("process", {})),
            exec=ExecInfo(**ex) if ex is not None else None,
            lost=LostInfo(**lo) if lo is not None else None,
            net=NetInfo(**ne) if ne is not None else None,
            sql=SqlInfo(**sq) if sq is not None else None,
            http=HttpInfo(**ht) if ht is not None else None,
            verdict=VerdictInfo(**ve) if ve is not None else None,
            approval=ApprovalInfo(**ap) if ap is not None else None,
            k8s=K8sInfo(**k8) if k8 is not None else None,
            binding=BindingInfo(**bi) if bi is not None else None,
            chain=ChainInfo(**ch) if ch is not None else None,
            llm=_llm(ll) if ll is not None else None,
            cause=CauseInfo(**ca) if ca is not None else None,
            event_id=d.get("event_id") or str(uuid.uuid4()),
        )


def _llm(d: dict[str, Any]) -> LlmInfo:
    info = LlmInfo(**d)
    info.tool_calls = [dict(t) for t in info.tool_calls]     # maps the store gives back as other types
    return info


def _flat(obj: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
            for k, v in vars(obj).items()}


_ID_PREFIX = uuid.uuid4().int >> 64
_ID_HEAD = str(uuid.UUID(int=_ID_PREFIX << 64))[:19]     # "xxxxxxxx-xxxx-xxxx-": the prefix's 16 digits
_id_counter = itertools.count()


def new_event_id() -> str:
    """Unique without a syscall per event: a random per-process prefix and a counter, in
    UUID text form (written out directly: uuid.UUID and str() took 2 µs an event)."""
    c = next(_id_counter) & 0xFFFF_FFFF_FFFF_FFFF
    return f"{_ID_HEAD}{c >> 48:04x}-{c & 0xFFFF_FFFF_FFFF:012x}"


def format_ts(ts_ns: int) -> str:
    """RFC 3339 UTC with nanoseconds: 2026-11-23T22:02:37.123456789Z."""
    secs, ns = divmod(ts_ns, 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"


def parse_ts(text: str) -> int:
    """Inverse of format_ts; also takes fewer fraction digits and +00:00."""
    t = text.strip().replace("Z", "+00:00")
    frac_ns = 0
    if "." in t:
        head, rest = t.split(".", 1)
        digits = ""
        i = 0
        while i < len(rest) and rest[i].isdigit():
            digits += rest[i]
            i += 1
        frac_ns = int((digits + "000000000")[:9])
        t = head + rest[i:]
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000_000 + frac_ns

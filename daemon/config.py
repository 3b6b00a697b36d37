"""Daemon configuration: YAML in, a validated frozen `Config` out.

Every error names the field (`store.batch.size`) and its line, and nothing is
started half-configured: `load()` either returns a whole Config or raises
ConfigError.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

import yaml
from agentwarden.core.oidc import ASYMMETRIC, OidcConfig, OidcError, check_url
from agentwarden.core.yamlkeys import key_lines
from agentwarden.daemon.export import SEVERITIES, SinkConfig
from agentwarden.probes.process import ProbeLimits

DEFAULT_PATH = "/etc/agentwarden/config.yaml"
ENV_VAR = "AGENTWARDEN_CONFIG"


class ConfigError(ValueError):
    def __init__(self, field: str, message: str, line: int | None = None, source: str = "") -> None:
        self.field = field
        self.message = message
        self.line = line
        self.source = source
        where = f"{source}:{line}: " if source and line else (f"{source}: " if source else "")
        super().__init__(f"{where}{field}: {message}" if field else f"{where}{message}")


TASK_COMM_LEN = 16
_WILDCARDS = set("*?[")


@dataclass(frozen=True)
class AgentMatch:
    comm: tuple[str, ...] = ()
    exe: tuple[str, ...] = ()
    cmdline: tuple[str, ...] = ()
    # Kubernetes: only processes in a pod of these namespaces (globs), with all these labels
    namespaces: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def kernel_comms(self) -> set[str]:
        """comm values the kernel must look for: `comm`, plus literal exe file names."""
        out = {c.encode()[: TASK_COMM_LEN - 1].decode(errors="ignore") for c in self.comm}
        if not self.comm:
            for glob in self.exe:
                base = os.path.basename(glob)
                if base and not (_WILDCARDS & set(base)):
                    out.add(base.encode()[: TASK_COMM_LEN - 1].decode(errors="ignore"))
        return out


@dataclass(frozen=True)
class AgentProfileConfig:
    name: str
    match: AgentMatch


@dataclass(frozen=True)
class BatchConfig:
    # each insert costs the embedded engine a fixed ~25 ms (a new part, fsynced): 41 µs an event
    # in batches of 1,000, about 20 in batches of 5,000 (bench/pipeline_bench.py); past about
    # 10 MB (10,000 events) a batch is written as a wide part, a file per column, and costs more
    # again.  Below 5,000 events a second the interval decides, so the latency is the same.
    size: int = 5_000
    interval: float = 1.0


@dataclass(frozen=True)
class StoreConfig:
    dsn: str = "chdb:///var/lib/agentwarden/audit"
    database: str = "agentwarden"
    table: str = "events"
    cluster: str = ""
    retention_days: int = 90
    batch: BatchConfig = BatchConfig()
    queue_max: int = 50_000
    spool_dir: str = "/var/lib/agentwarden/spool"
    spool_max_bytes: int = 1 << 30     # past it, events are dropped and counted (lost: spool_full)
    dsn_file: str = ""                 # the DSN was read from this file (a Secret): secure.py guards it


@dataclass(frozen=True)
class MaskConfig:
    key_file: str = "/var/lib/agentwarden/mask.key"
    patterns: tuple[str, ...] = ()      # extra regexes; group 1, if any, is the secret
    headers: tuple[str, ...] = ()       # extra header names whose whole value is a secret


@dataclass(frozen=True)
class LlmConfig:
    """What an `llm` event keeps of a call's text (daemon/protocols/http.py)."""
    max_text: int = 4096                # characters of the prompt, the reply and each tool call's arguments
    hash_only: bool = False             # the prompt and the reply's text as their SHA-256 only


@dataclass(frozen=True)
class EnforceConfig:
    policy_file: str = "/etc/agentwarden/policy.yaml"   # "" records only: no policy
    webhook: str = ""                   # Slack-compatible URL, POSTed on every pending approval
    # pending approvals and approved retries, kept across daemon restarts (root only, 0600)
    state_file: str = "/var/lib/agentwarden/approvals.json"
    sql_approval_s: int = 600           # how long an approved SQL statement may be retried


@dataclass(frozen=True)
class IdentityConfig:
    """`agentwarden login`: the identity provider, the bindings, and what an unverified session
    meets (`require`)."""

    oidc: OidcConfig = OidcConfig()
    state_file: str = "/var/lib/agentwarden/identity.json"   # bindings across restarts (root, 0600)
    max_age_s: int = 12 * 3600          # a login binds its person this long
    require: bool = False               # sessions of a person with no binding are held or denied
    unverified: str = "hold"            # hold: the agent waits at its first instruction for a login
    hold_timeout_s: int = 300           # ...this long, then it is killed
    # Unix user -> the oidc.user_claim values that may log in as them, besides their own name
    users: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class KubernetesConfig:
    """Pod identity from the API server (daemon/k8s.py); `auto`: when running in a cluster."""

    enabled: str = "auto"               # auto | true | false
    api: str = ""                       # default: the in-cluster service (KUBERNETES_SERVICE_HOST)
    token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ca_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    keep_deleted_s: int = 300


@dataclass(frozen=True)
class ChainConfig:
    """Tamper evidence (daemon/chain.py): the hash chain's key, state and anchor, checkpoints."""

    enabled: bool = True
    key_file: str = "/var/lib/agentwarden/chain.key"      # Ed25519, root 0600; .pub beside it
    state_file: str = "/var/lib/agentwarden/chain.json"   # the head, written ahead of every batch
    anchor_file: str = "/var/lib/agentwarden/anchor.jsonl"   # every checkpoint, appended: ship it off the box
    checkpoint_every: int = 1000
    checkpoint_interval_s: int = 60


@dataclass(frozen=True)
class Config:
    host: str = field(default_factory=socket.gethostname)
    agents: tuple[AgentProfileConfig, ...] = ()
    builtin_agents: bool = True
    store: StoreConfig = StoreConfig()
    control_socket: str = "/run/agentwarden/agentwarden.sock"
    control_group: str = "agentwarden"
    probes: ProbeLimits = ProbeLimits()
    mask: MaskConfig = MaskConfig()
    enforce: EnforceConfig = EnforceConfig()
    llm: LlmConfig = LlmConfig()
    log_level: str = "info"
    # Scheduling priority of the daemon.  Under a saturating workload a fair share
    # of the CPU is not enough to read the ring buffer as fast as agents fill it.
    nice: int = -10
    # Prometheus /metrics and /healthz (daemon/metrics.py): host:port, "" for none
    metrics_listen: str = "127.0.0.1:9464"
    # where the host's / is mounted when the daemon runs in a container ("" or "/": its own):
    # the host's libssl and glibc, cgroup2 root, users and groups are read through it
    host_root: str = ""
    identity: IdentityConfig = IdentityConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    chain: ChainConfig = ChainConfig()
    export: tuple[SinkConfig, ...] = ()
    export_state_dir: str = "/var/lib/agentwarden/export"
    source: str = ""


# ---- YAML with line numbers --------------------------------------------------


class _Reader:
    """Typed access to a parsed mapping that reports dotted field names."""

    def __init__(self, lines: dict[tuple[str, ...], int], source: str) -> None:
        self.lines = lines
        self.source = source

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        name = ".".join(p if not p.isdigit() else f"[{p}]" for p in path).replace(".[", "[")
        line = None
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                line = self.lines[path[:n]]
                break
        return ConfigError(name, message, line, self.source)

    def mapping(self, value: Any, path: tuple[str, ...], allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                raise self.error((*path, str(key)), f"unknown field (allowed: {', '.join(sorted(allowed))})")
        return value

    def string(self, m: dict[str, Any], key: str, path: tuple[str, ...], default: str) -> str:
        v = m.get(key, default)
        if not isinstance(v, str):
            raise self.error((*path, key), f"expected a string, got {v!r}")
        return v

    def integer(self, m: dict[str, Any], key: str, path: tuple[str, ...], default: int,
                minimum: int = 0) -> int:
        v = m.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.error((*path, key), f"expected an integer >= {minimum}, got {v!r}")
        return v

    def number(self, m: dict[str, Any], key: str, path: tuple[str, ...], default: float) -> float:
        v = m.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise self.error((*path, key), f"expected a positive number, got {v!r}")
        return float(v)

    def boolean(self, m: dict[str, Any], key: str, path: tuple[str, ...], default: bool) -> bool:
        v = m.get(key, default)
        if not isinstance(v, bool):
            raise self.error((*path, key), f"expected true or false, got {v!r}")
        return v

    def strings(self, m: dict[str, Any], key: str, path: tuple[str, ...]) -> tuple[str, ...]:
        v = m.get(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise self.error((*path, key), f"expected a list of non-empty strings, got {v!r}")
        return tuple(v)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DSN = re.compile(r"^(chdb://.*|https?://.+)$")


def _agents(r: _Reader, raw: Any) -> tuple[AgentProfileConfig, ...]:
    path = ("agents",)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise r.error(path, "expected a list of agent profiles")
    out: list[AgentProfileConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        p = (*path, str(i))
        m = r.mapping(item, p, {"name", "match"})
        name = m.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise r.error((*p, "name"), f"expected a name of letters, digits, '_', '.', '-', got {name!r}")
        if name in seen:
            raise r.error((*p, "name"), f"duplicate agent profile {name!r}")
        seen.add(name)
        mm = r.mapping(m.get("match"), (*p, "match"), {"comm", "exe", "cmdline", "namespaces", "labels"})
        labels = r.mapping(mm.get("labels"), (*p, "match", "labels"), set(mm.get("labels") or {}))
        for k, v in labels.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise r.error((*p, "match", "labels", str(k)), f"expected a string label value, got {v!r}")
        match = AgentMatch(
            comm=r.strings(mm, "comm", (*p, "match")),
            exe=r.strings(mm, "exe", (*p, "match")),
            cmdline=r.strings(mm, "cmdline", (*p, "match")),
            namespaces=r.strings(mm, "namespaces", (*p, "match")),
            labels=tuple(sorted(labels.items())),
        )
        for j, rx in enumerate(match.cmdline):
            try:
                re.compile(rx)
            except re.error as e:
                raise r.error((*p, "match", "cmdline", str(j)), f"invalid regex {rx!r}: {e}") from None
        for j, comm in enumerate(match.comm):
            if len(comm.encode()) > 15:
                raise r.error((*p, "match", "comm", str(j)),
                              f"{comm!r} is longer than 15 bytes; the kernel truncates comm to 15")
        if not match.kernel_comms():
            raise r.error((*p, "match"),
                          "needs `comm`, or an `exe` glob whose file name has no wildcard: the kernel "
                          "starts sessions by comm, then exe and cmdline are checked")
        out.append(AgentProfileConfig(name, match))
    return tuple(out)


def parse(text: str, source: str = "") -> Config:
    try:
        lines = key_lines(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError("", f"not valid YAML: {e}", mark.line + 1 if mark else None, source) from None
    r = _Reader(lines, source)
    top = r.mapping(data, (), {"host", "agents", "builtin_agents", "store", "control_socket",
                               "control_group", "probes", "log_level", "nice", "mask", "enforce",
                               "metrics", "host_root", "identity", "kubernetes", "chain", "export",
                               "export_state_dir", "llm"})

    st = r.mapping(top.get("store"), ("store",), {"dsn", "database", "table", "cluster", "retention_days",
                                                   "batch", "queue_max", "spool_dir", "spool_max_bytes",
                                                   "dsn_file"})
    sp = ("store",)
    d = StoreConfig()
    dsn = r.string(st, "dsn", sp, d.dsn)
    # a Secret's file (the DSN holds the ClickHouse password): it replaces `dsn` when the daemon
    # starts (resolve_dsn); the CLI of the control group, who may not read it, never needs it
    dsn_file = r.string(st, "dsn_file", sp, "")
    if dsn_file and not os.path.isabs(dsn_file):
        raise r.error((*sp, "dsn_file"), f"expected an absolute path, got {dsn_file!r}")
    if not _DSN.match(dsn):
        raise r.error((*sp, "dsn"), f"expected chdb:///path or http(s)://user:pass@host:8123/db, got {dsn!r}")
    database = r.string(st, "database", sp, _dsn_database(dsn) or d.database)
    table = r.string(st, "table", sp, d.table)
    for key, val in (("database", database), ("table", table)):
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", val):
            raise r.error((*sp, key), f"expected an identifier, got {val!r}")
    bt = r.mapping(st.get("batch"), (*sp, "batch"), {"size", "interval"})
    batch = BatchConfig(
        size=r.integer(bt, "size", (*sp, "batch"), d.batch.size, minimum=1),
        interval=r.number(bt, "interval", (*sp, "batch"), d.batch.interval),
    )
    store = StoreConfig(
        dsn=dsn,
        database=database,
        table=table,
        cluster=r.string(st, "cluster", sp, d.cluster),
        retention_days=r.integer(st, "retention_days", sp, d.retention_days),
        batch=batch,
        queue_max=r.integer(st, "queue_max", sp, d.queue_max, minimum=100),
        spool_dir=r.string(st, "spool_dir", sp, d.spool_dir),
        spool_max_bytes=r.integer(st, "spool_max_bytes", sp, d.spool_max_bytes, minimum=1 << 20),
        dsn_file=dsn_file,
    )
    if store.queue_max < 2 * batch.size:   # else no batch fills before the queue overflows to the spool
        raise r.error((*sp, "queue_max"), f"expected at least twice store.batch.size ({2 * batch.size}), "
                                          f"got {store.queue_max}")

    pr = r.mapping(top.get("probes"), ("probes",), {"argv_max_args", "argv_arg_bytes", "argv_total_bytes",
                                                    "ringbuf_pages", "max_tracked", "pin_dir",
                                                    "loader_guard", "hardened", "guard_connections"})
    dp = ProbeLimits()
    probes = ProbeLimits(
        argv_max_args=r.integer(pr, "argv_max_args", ("probes",), dp.argv_max_args, minimum=1),
        argv_arg_bytes=r.integer(pr, "argv_arg_bytes", ("probes",), dp.argv_arg_bytes, minimum=64),
        argv_total_bytes=r.integer(pr, "argv_total_bytes", ("probes",), dp.argv_total_bytes, minimum=128),
        ringbuf_pages=r.integer(pr, "ringbuf_pages", ("probes",), dp.ringbuf_pages, minimum=1),
        max_tracked=r.integer(pr, "max_tracked", ("probes",), dp.max_tracked, minimum=64),
        guard_connections=r.integer(pr, "guard_connections", ("probes",), dp.guard_connections, minimum=2),
        pin_dir=r.string(pr, "pin_dir", ("probes",), dp.pin_dir),
        loader_guard=r.boolean(pr, "loader_guard", ("probes",), False) if "loader_guard" in pr else None,
        hardened=r.boolean(pr, "hardened", ("probes",), dp.hardened),
    )
    if not os.path.isabs(probes.pin_dir) or '"' in probes.pin_dir or "\\" in probes.pin_dir:
        raise r.error(("probes", "pin_dir"), f"expected an absolute path in bpffs, got {probes.pin_dir!r}")
    for key in ("argv_total_bytes", "ringbuf_pages"):
        v = getattr(probes, key)
        if v & (v - 1):
            raise r.error(("probes", key), f"must be a power of two, got {v}")
    if probes.argv_total_bytes < 2 * probes.argv_arg_bytes:
        raise r.error(("probes", "argv_total_bytes"), "must be at least twice probes.argv_arg_bytes")

    log_level = r.string(top, "log_level", (), "info").lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise r.error(("log_level",), f"expected debug, info, warning or error, got {log_level!r}")
    control_socket = r.string(top, "control_socket", (), Config.control_socket)
    if not os.path.isabs(control_socket):
        raise r.error(("control_socket",), f"expected an absolute path, got {control_socket!r}")

    mk = r.mapping(top.get("mask"), ("mask",), {"key_file", "patterns", "headers"})
    mask = MaskConfig(key_file=r.string(mk, "key_file", ("mask",), MaskConfig.key_file),
                      patterns=r.strings(mk, "patterns", ("mask",)),
                      headers=tuple(h.lower() for h in r.strings(mk, "headers", ("mask",))))
    for j, rx in enumerate(mask.patterns):
        try:
            re.compile(rx)
        except re.error as e:
            raise r.error(("mask", "patterns", str(j)), f"invalid regex {rx!r}: {e}") from None
    en = r.mapping(top.get("enforce"), ("enforce",),
                   {"policy_file", "webhook", "sql_approval_s", "state_file"})
    enforce = EnforceConfig(
        policy_file=r.string(en, "policy_file", ("enforce",), EnforceConfig.policy_file),
        webhook=r.string(en, "webhook", ("enforce",), ""),
        state_file=r.string(en, "state_file", ("enforce",), EnforceConfig.state_file),
        sql_approval_s=r.integer(en, "sql_approval_s", ("enforce",), EnforceConfig.sql_approval_s, 1))
    if enforce.webhook and not enforce.webhook.startswith(("http://", "https://")):
        raise r.error(("enforce", "webhook"), f"expected an http(s) URL, got {enforce.webhook!r}")
    lm = r.mapping(top.get("llm"), ("llm",), {"max_text", "hash_only"})
    llm = LlmConfig(max_text=r.integer(lm, "max_text", ("llm",), LlmConfig.max_text, 0),
                    hash_only=r.boolean(lm, "hash_only", ("llm",), LlmConfig.hash_only))
    nice = top.get("nice", Config.nice)
    if isinstance(nice, bool) or not isinstance(nice, int) or not -20 <= nice <= 19:
        raise r.error(("nice",), f"expected an integer from -20 to 19, got {nice!r}")
    me = r.mapping(top.get("metrics"), ("metrics",), {"listen"})
    listen = r.string(me, "listen", ("metrics",), Config.metrics_listen)
    port = listen.rpartition(":")[2]
    if listen and (":" not in listen or not port.isdigit() or not 0 <= int(port) <= 65535):
        raise r.error(("metrics", "listen"), f"expected host:port (127.0.0.1:9464) or \"\", got {listen!r}")
    host_root = r.string(top, "host_root", (), "").rstrip("/")
    if host_root and not os.path.isabs(host_root):
        raise r.error(("host_root",), f"expected an absolute path, got {host_root!r}")
    if host_root:   # the node's cgroup hierarchy, not the pod's namespace of it
        probes = dataclasses.replace(probes, cgroup_root=f"{host_root}/sys/fs/cgroup")
    return Config(
        identity=_identity(r, top.get("identity")),
        kubernetes=_kubernetes(r, top.get("kubernetes")),
        chain=_chain(r, top.get("chain")),
        export=_export(r, top.get("export")),
        export_state_dir=r.string(top, "export_state_dir", (), Config.export_state_dir),
        metrics_listen=listen,
        host_root=host_root,
        enforce=enforce,
        llm=llm,
        nice=nice,
        mask=mask,
        # a DaemonSet sets AGENTWARDEN_HOST from spec.nodeName: the node, not the pod's name
        host=r.string(top, "host", (), "") or os.environ.get("AGENTWARDEN_HOST", "") or socket.gethostname(),
        agents=_agents(r, top.get("agents")),
        builtin_agents=r.boolean(top, "builtin_agents", (), True),
        store=store,
        control_socket=control_socket,
        control_group=r.string(top, "control_group", (), Config.control_group),
        probes=probes,
        log_level=log_level,
        source=source,
    )


def _identity(r: _Reader, raw: Any) -> IdentityConfig:
    p = ("identity",)
    m = r.mapping(raw, p, {"oidc", "state_file", "max_age_s", "require", "unverified", "hold_timeout_s",
                           "users"})
    users_raw = r.mapping(m.get("users"), (*p, "users"), set(m.get("users") or {}))
    users = tuple((str(u), r.strings(users_raw, u, (*p, "users"))) for u in users_raw)
    d = IdentityConfig()
    op = (*p, "oidc")
    o = r.mapping(m.get("oidc"), op, {"issuer", "client_id", "audiences", "algorithms", "jwks_uri",
                                      "jwks_file", "scopes", "email_claim", "name_claim", "groups_claim",
                                      "require_email_verified", "require_nonce", "skew_s", "max_token_age_s",
                                      "ca_file", "user_claim"})
    od = OidcConfig()
    algorithms = r.strings(o, "algorithms", op) or od.algorithms
    for i, alg in enumerate(algorithms):
        if alg not in ASYMMETRIC:
            raise r.error((*op, "algorithms", str(i)),
                          f"{alg!r} is not a public-key algorithm ({', '.join(ASYMMETRIC)}): none and HS* "
                          "would let anyone holding the provider's public key make tokens")
    oidc = OidcConfig(
        issuer=r.string(o, "issuer", op, ""),   # exactly as the provider writes it (a trailing / too)
        client_id=r.string(o, "client_id", op, ""),
        audiences=r.strings(o, "audiences", op),
        algorithms=algorithms,
        jwks_uri=r.string(o, "jwks_uri", op, ""),
        jwks_file=r.string(o, "jwks_file", op, ""),
        scopes=r.strings(o, "scopes", op) or od.scopes,
        email_claim=r.string(o, "email_claim", op, od.email_claim),
        name_claim=r.string(o, "name_claim", op, od.name_claim),
        groups_claim=r.string(o, "groups_claim", op, od.groups_claim),
        user_claim=r.string(o, "user_claim", op, od.user_claim),
        require_email_verified=r.boolean(o, "require_email_verified", op, od.require_email_verified),
        require_nonce=r.boolean(o, "require_nonce", op, od.require_nonce),
        skew_s=r.integer(o, "skew_s", op, od.skew_s),
        max_token_age_s=r.integer(o, "max_token_age_s", op, od.max_token_age_s, minimum=1),
        ca_file=r.string(o, "ca_file", op, ""),
    )
    if oidc.issuer:
        if not oidc.client_id:
            raise r.error((*op, "client_id"), "required with an issuer: the OAuth client the CLI logs in as")
        for key in ("issuer", "jwks_uri"):
            value = getattr(oidc, key)
            try:
                if value:
                    check_url(value, key)
            except OidcError as e:
                raise r.error((*op, key), str(e)) from None
        if "openid" not in oidc.scopes:
            raise r.error((*op, "scopes"), "must include openid (an ID token is what the daemon verifies)")
    if oidc.skew_s > 300:
        raise r.error((*op, "skew_s"), f"at most 300 s of clock skew, got {oidc.skew_s}")
    for key in ("jwks_file", "ca_file"):
        if getattr(oidc, key) and not os.path.isabs(getattr(oidc, key)):
            raise r.error((*op, key), f"expected an absolute path, got {getattr(oidc, key)!r}")
    unverified = r.string(m, "unverified", p, d.unverified)
    if unverified not in ("hold", "deny"):
        raise r.error((*p, "unverified"), f"expected hold or deny, got {unverified!r}")
    require = r.boolean(m, "require", p, d.require)
    if require and not oidc.issuer:
        raise r.error((*p, "require"), "needs identity.oidc.issuer: nobody could log in to satisfy it")
    state_file = r.string(m, "state_file", p, d.state_file)
    if not os.path.isabs(state_file):
        raise r.error((*p, "state_file"), f"expected an absolute path, got {state_file!r}")
    return IdentityConfig(oidc=oidc, state_file=state_file, users=users,
                          max_age_s=r.integer(m, "max_age_s", p, d.max_age_s, minimum=60),
                          require=require, unverified=unverified,
                          hold_timeout_s=r.integer(m, "hold_timeout_s", p, d.hold_timeout_s, minimum=1))


def _kubernetes(r: _Reader, raw: Any) -> KubernetesConfig:
    p = ("kubernetes",)
    m = r.mapping(raw, p, {"enabled", "api", "token_file", "ca_file", "keep_deleted_s"})
    d = KubernetesConfig()
    enabled = m.get("enabled", d.enabled)
    if isinstance(enabled, bool):
        enabled = "true" if enabled else "false"
    if enabled not in ("auto", "true", "false"):
        raise r.error((*p, "enabled"), f"expected auto, true or false, got {enabled!r}")
    api = r.string(m, "api", p, "")
    if api and not api.startswith(("https://", "http://")):
        raise r.error((*p, "api"), f"expected an http(s) URL, got {api!r}")
    return KubernetesConfig(enabled=enabled, api=api, token_file=r.string(m, "token_file", p, d.token_file),
                            ca_file=r.string(m, "ca_file", p, d.ca_file),
                            keep_deleted_s=r.integer(m, "keep_deleted_s", p, d.keep_deleted_s))


def _chain(r: _Reader, raw: Any) -> ChainConfig:
    p = ("chain",)
    m = r.mapping(raw, p, {"enabled", "key_file", "state_file", "anchor_file", "checkpoint_every",
                           "checkpoint_interval_s"})
    d = ChainConfig()
    cc = ChainConfig(enabled=r.boolean(m, "enabled", p, d.enabled),
                     key_file=r.string(m, "key_file", p, d.key_file),
                     state_file=r.string(m, "state_file", p, d.state_file),
                     anchor_file=r.string(m, "anchor_file", p, d.anchor_file),
                     checkpoint_every=r.integer(m, "checkpoint_every", p, d.checkpoint_every, minimum=1),
                     checkpoint_interval_s=r.integer(m, "checkpoint_interval_s", p, d.checkpoint_interval_s,
                                                     minimum=1))
    for key in ("key_file", "state_file", "anchor_file"):
        value = getattr(cc, key)
        if (value or key != "anchor_file") and not os.path.isabs(value):
            raise r.error((*p, key), f"expected an absolute path, got {value!r}")
    return cc


def _export(r: _Reader, raw: Any) -> tuple[SinkConfig, ...]:
    """`export:` a list of SIEM sinks (daemon/export.py), each named (its cursor's file)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise r.error(("export",), "expected a list of sinks")
    out: list[SinkConfig] = []
    for i, item in enumerate(raw):
        p = ("export", str(i))
        m = r.mapping(item, p, {"name", "type", "format", "kinds", "min_severity", "path", "max_bytes",
                                "keep", "address", "protocol", "ca_file", "url", "preset", "token_file",
                                "token_env"})
        name = m.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or any(s.name == name for s in out):
            raise r.error((*p, "name"), f"expected a unique name of letters, digits, '_', '.', '-', "
                          f"got {name!r}")
        kind = r.string(m, "type", p, "")
        if kind not in ("file", "syslog", "http"):
            raise r.error((*p, "type"), f"expected file, syslog or http, got {kind!r}")
        fmt = r.string(m, "format", p, "json")
        if fmt not in ("json", "ocsf", "cef"):
            raise r.error((*p, "format"), f"expected json, ocsf or cef, got {fmt!r}")
        sev = r.string(m, "min_severity", p, "info")
        if sev not in SEVERITIES:
            raise r.error((*p, "min_severity"), f"expected one of {', '.join(SEVERITIES)}, got {sev!r}")
        kinds = r.strings(m, "kinds", p)
        from agentwarden.core.events import KINDS

        for j, k in enumerate(kinds):
            if k not in KINDS:
                raise r.error((*p, "kinds", str(j)), f"unknown event kind {k!r}")
        sc = SinkConfig(name=name, type=kind, format=fmt, kinds=kinds, min_severity=sev,
                        path=r.string(m, "path", p, ""),
                        max_bytes=r.integer(m, "max_bytes", p, 100 << 20, minimum=1 << 16),
                        keep=r.integer(m, "keep", p, 5, minimum=1),
                        address=r.string(m, "address", p, ""), protocol=r.string(m, "protocol", p, "udp"),
                        ca_file=r.string(m, "ca_file", p, ""), url=r.string(m, "url", p, ""),
                        preset=r.string(m, "preset", p, ""), token_file=r.string(m, "token_file", p, ""),
                        token_env=r.string(m, "token_env", p, ""))
        if kind == "file" and not os.path.isabs(sc.path):
            raise r.error((*p, "path"), f"expected an absolute path, got {sc.path!r}")
        if kind == "syslog":
            if sc.protocol not in ("udp", "tcp", "tls"):
                raise r.error((*p, "protocol"), f"expected udp, tcp or tls, got {sc.protocol!r}")
            port = sc.address.rpartition(":")[2]
            if ":" not in sc.address or not port.isdigit():
                raise r.error((*p, "address"), f"expected host:port, got {sc.address!r}")
        if kind == "http":
            if not sc.url.startswith(("http://", "https://")):
                raise r.error((*p, "url"), f"expected an http(s) URL, got {sc.url!r}")
            if sc.preset not in ("", "hec"):
                raise r.error((*p, "preset"), f"expected hec or nothing, got {sc.preset!r}")
        out.append(sc)
    return tuple(out)


def resolve_dsn(cfg: Config) -> Config:
    """The configuration with `store.dsn` read from `store.dsn_file` (the daemon, root); a file
    that cannot be read, or holds no DSN, is an error naming the field."""
    path = cfg.store.dsn_file
    if not path:
        return cfg
    where = f"{cfg.source}: " if cfg.source else ""
    try:
        with open(path, encoding="utf-8") as f:
            dsn = f.read().strip()
    except OSError as e:
        raise ConfigError("store.dsn_file", f"cannot read {path}: {e.strerror}", None, cfg.source) from None
    if not _DSN.match(dsn):
        raise ConfigError("store.dsn_file", f"{where}{path} holds no chdb:///path or "
                          "http(s)://user:pass@host:8123/db DSN", None, "")
    database = cfg.store.database
    if database == StoreConfig.database and _dsn_database(dsn):
        database = _dsn_database(dsn)
    return dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, dsn=dsn, database=database))


def _dsn_database(dsn: str) -> str:
    if dsn.startswith("http"):
        from urllib.parse import urlparse

        return urlparse(dsn).path.strip("/")
    return ""


def load(path: str | None = None) -> Config:
    """Load from path, $AGENTWARDEN_CONFIG, or /etc/agentwarden/config.yaml (defaults if absent)."""
    explicit = path or os.environ.get(ENV_VAR)
    target = explicit or DEFAULT_PATH
    try:
        with open(target, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError("", "file not found", None, target) from None
        return Config()
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror}", None, target) from None
    return parse(text, target)

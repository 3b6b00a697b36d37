"""ClickHouse schema of the audit trail, derived from the event contract.

A column is named after its JSON path with `_` for `.` (`identity.user` ->
`identity_user`).  Optional objects (`exec`, `lost`) are Nullable columns; an
object is present in JSON when any of its columns is not NULL.  The daemon
creates and migrates the table from `COLUMNS`; `deploy/clickhouse/schema.sql`
is rendered from the same list (`python -m agentwarden.daemon.schema`).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agentwarden.core.events import Event, format_ts


@dataclass(frozen=True)
class Column:
    name: str
    type: str


COLUMNS: tuple[Column, ...] = (
    Column("event_id", "UUID"),
    Column("ts", "DateTime64(9, 'UTC')"),
    Column("kind", "LowCardinality(String)"),
    Column("host", "LowCardinality(String)"),
    Column("session_id", "String"),
    Column("agent", "LowCardinality(String)"),
    Column("identity_uid", "Int64"),
    Column("identity_user", "LowCardinality(String)"),
    Column("identity_login_uid", "Nullable(Int64)"),
    Column("identity_login_user", "LowCardinality(String)"),
    Column("identity_tty", "String"),
    Column("process_pid", "UInt32"),
    Column("process_ppid", "UInt32"),
    Column("process_uid", "Int64"),
    Column("process_exe", "String"),
    Column("process_argv", "Array(String)"),
    Column("process_cwd", "String"),
    Column("exec_filename", "Nullable(String)"),
    Column("exec_argv_truncated", "Nullable(Bool)"),
    Column("exec_errno", "Nullable(Int32)"),
    Column("exec_exit_code", "Nullable(Int32)"),
    Column("exec_signal", "Nullable(Int32)"),
    Column("exec_duration_ms", "Nullable(Float64)"),
    Column("lost_count", "Nullable(UInt64)"),
    Column("lost_reason", "Nullable(String)"),
    Column("net_transport", "Nullable(String)"),
    Column("net_dst_ip", "Nullable(String)"),
    Column("net_dst_port", "Nullable(UInt16)"),
    Column("net_path", "Nullable(String)"),
    Column("net_direction", "Nullable(String)"),
    Column("net_protocol", "Nullable(String)"),
    Column("net_tls", "Nullable(Bool)"),
    Column("net_sni", "Nullable(String)"),
    Column("sql_query", "Nullable(String)"),
    Column("sql_command", "Nullable(String)"),
    Column("sql_tables", "Array(String)"),
    Column("sql_parsed", "Nullable(Bool)"),
    Column("sql_database", "Nullable(String)"),
    Column("sql_db_user", "Nullable(String)"),
    Column("sql_params", "Nullable(UInt32)"),
    Column("sql_prepared_name", "Nullable(String)"),
    Column("sql_rows", "Nullable(Int64)"),
    Column("sql_tag", "Nullable(String)"),
    Column("sql_sqlstate", "Nullable(String)"),
    Column("sql_error", "Nullable(String)"),
    Column("sql_duration_ms", "Nullable(Float64)"),
    Column("sql_encrypted", "Nullable(Bool)"),
    Column("http_method", "Nullable(String)"),
    Column("http_scheme", "Nullable(String)"),
    Column("http_host", "Nullable(String)"),
    Column("http_path", "Nullable(String)"),
    Column("http_query", "Nullable(String)"),
    Column("http_version", "Nullable(String)"),
    Column("http_status", "Nullable(UInt16)"),
    Column("http_req_bytes", "Nullable(UInt64)"),
    Column("http_resp_bytes", "Nullable(UInt64)"),
    Column("http_duration_ms", "Nullable(Float64)"),
    Column("http_tls", "Nullable(Bool)"),
    Column("http_headers", "Map(String, String)"),
    Column("http_response_headers", "Map(String, String)"),
    Column("http_req_body", "Nullable(String)"),
    Column("http_resp_body", "Nullable(String)"),
    Column("http_upgrade", "Nullable(String)"),
    Column("verdict_action", "Nullable(String)"),
    Column("verdict_rule", "Nullable(String)"),
    Column("verdict_subject", "Nullable(String)"),
    Column("verdict_mechanism", "Nullable(String)"),
    Column("verdict_prevented", "Nullable(Bool)"),
    Column("verdict_approval_id", "Nullable(String)"),
    Column("verdict_latency_us", "Nullable(Int64)"),
    Column("approval_id", "Nullable(String)"),
    Column("approval_state", "Nullable(String)"),
    Column("approval_rule", "Nullable(String)"),
    Column("approval_subject", "Nullable(String)"),
    Column("approval_summary", "Nullable(String)"),
    Column("approval_approvers", "Array(String)"),
    Column("approval_decided_by", "Nullable(String)"),
    Column("approval_approved_for_s", "Nullable(Int64)"),
    Column("approval_expires", "Nullable(String)"),
    Column("approval_auth", "Nullable(String)"),
    # issue 13: the verified person (OIDC), the pod, and identity events; appended (migrations add
    # columns at the end)
    Column("identity_source", "LowCardinality(String)"),
    Column("identity_verified", "Bool"),
    Column("identity_issuer", "LowCardinality(String)"),
    Column("identity_sub", "String"),
    Column("identity_email", "LowCardinality(String)"),
    Column("identity_name", "String"),
    Column("identity_groups", "Array(String)"),
    Column("identity_groups_unknown", "Bool"),
    Column("k8s_namespace", "Nullable(String)"),
    Column("k8s_pod", "Nullable(String)"),
    Column("k8s_container", "Nullable(String)"),
    Column("k8s_image", "Nullable(String)"),
    Column("k8s_service_account", "Nullable(String)"),
    Column("k8s_node", "Nullable(String)"),
    Column("k8s_labels", "Map(String, String)"),
    Column("k8s_pod_uid", "Nullable(String)"),
    Column("k8s_container_id", "Nullable(String)"),
    Column("binding_state", "Nullable(String)"),
    Column("binding_reason", "Nullable(String)"),
    Column("binding_uid", "Nullable(Int64)"),
    Column("binding_login_uid", "Nullable(Int64)"),
    Column("binding_issuer", "Nullable(String)"),
    Column("binding_sub", "Nullable(String)"),
    Column("binding_email", "Nullable(String)"),
    Column("binding_name", "Nullable(String)"),
    Column("binding_groups", "Array(String)"),
    Column("binding_groups_unknown", "Nullable(Bool)"),
    Column("binding_expires", "Nullable(String)"),
    # issue 15: LLM calls and what caused an event; before the chain's columns, and left out of an
    # event's chained values while all of them are empty (daemon/chain.py: trails sealed before them
    # verify as they were)
    Column("llm_provider", "Nullable(String)"),
    Column("llm_model", "Nullable(String)"),
    Column("llm_endpoint", "Nullable(String)"),
    Column("llm_prompt", "Nullable(String)"),
    Column("llm_prompt_hash", "Nullable(String)"),
    Column("llm_system_hash", "Nullable(String)"),
    Column("llm_messages", "Nullable(UInt32)"),
    Column("llm_tool_calls", "Array(Map(String, String))"),
    Column("llm_text", "Nullable(String)"),
    Column("llm_stop_reason", "Nullable(String)"),
    Column("llm_input_tokens", "Nullable(Int64)"),
    Column("llm_output_tokens", "Nullable(Int64)"),
    Column("llm_duration_ms", "Nullable(Float64)"),
    Column("llm_stream", "Nullable(Bool)"),
    Column("llm_complete", "Nullable(Bool)"),
    Column("cause_llm_event_id", "Nullable(String)"),
    Column("cause_tool_call_id", "Nullable(String)"),
    Column("cause_tool", "Nullable(String)"),
    Column("cause_match", "Nullable(String)"),
    Column("http_rpc", "Map(String, String)"),
    # the model and API behind a cause (policy matches them: enforce/policy.py when.cause); a later
    # generation of columns still, left out of the chained values while empty (daemon/chain.py)
    Column("cause_model", "Nullable(String)"),
    Column("cause_provider", "Nullable(String)"),
    # issue 14: the hash chain (daemon/chain.py); last, and not covered by the chain's own hash
    Column("chain_seq", "Nullable(UInt64)"),
    Column("chain_prev_hash", "Nullable(String)"),
    Column("chain_hash", "Nullable(String)"),
)

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
OPTIONAL_OBJECTS: tuple[str, ...] = ("exec", "lost", "net", "sql", "http", "verdict", "approval", "k8s",
                                      "binding", "chain", "llm", "cause")
FIRST_LATER_COLUMN = "llm_provider"     # the first column added after the chain was (daemon/chain.py)
# the first column of each generation added since, in order: the same rule, one generation at a time
LATER_GENERATIONS: tuple[str, ...] = (FIRST_LATER_COLUMN, "cause_model")

# Users look at one person's sessions over time; partition pruning by day,
# then the primary key narrows to a user and a session.
ORDER_BY = "(identity_user, session_id, ts)"
PARTITION_BY = "toDate(ts)"
INDEXES = (
    "INDEX idx_session session_id TYPE bloom_filter GRANULARITY 4",
    "INDEX idx_kind kind TYPE set(32) GRANULARITY 4",
)


_OBJECTS = ("identity", "process", *OPTIONAL_OBJECTS)


def _plan(col: Column) -> tuple[str | None, str, str]:
    """(object, attribute, container type): Array and Map columns cannot be NULL."""
    head, _, tail = col.name.partition("_")
    container = col.type.split("(")[0] if col.type.startswith(("Array", "Map")) else ""
    if head in _OBJECTS:
        return head, tail, container
    return None, col.name, ""


_PLAN = tuple(_plan(c) for c in COLUMNS)


def _segments() -> tuple[tuple[str | None, Callable[[Any], Any], tuple[str, ...]], ...]:
    """Runs of consecutive columns read from one object: (object, one attrgetter for the run,
    the container type of each column, for a missing object's empty values)."""
    runs: list[tuple[str | None, list[str], list[str]]] = []
    for obj_name, attr, container in _PLAN:
        attr = "ts_ns" if obj_name is None and attr == "ts" else attr
        if runs and runs[-1][0] == obj_name:
            runs[-1][1].append(attr)
            runs[-1][2].append(container)
        else:
            runs.append((obj_name, [attr], [container]))
    out = []
    for obj_name, attrs, containers in runs:
        get: Callable[[Any], Any] = operator.attrgetter(*attrs)
        if len(attrs) == 1:   # one name: attrgetter returns the value, not a tuple
            get = (lambda g: lambda o: (g(o),))(get)
        out.append((obj_name, get, tuple(containers)))
    return tuple(out)


_SEGMENTS = _segments()


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _safe_text(s: str) -> str:
    r"""A string every encoder takes: lone surrogates (undecodable bytes kept by surrogateescape,
    or a \ud800 from JSON) become the text \xNN or \uNNNN."""
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c for c in s)


def _safe(value: Any) -> tuple[bool, Any]:
    """(changed, value) for one field: strings made encodable, integers bounded to Int64."""
    if isinstance(value, str):
        if value.isascii():
            return False, value
        try:
            value.encode("utf-8")
            return False, value
        except UnicodeEncodeError:
            return True, _safe_text(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return (False, value) if _INT64[0] <= value <= _INT64[1] else (True, None)
    if isinstance(value, list):
        fixed = [_safe(v) for v in value]
        return (True, [v for _, v in fixed]) if any(c for c, _ in fixed) else (False, value)
    if isinstance(value, dict):
        pairs = [(_safe(k), _safe(v)) for k, v in value.items()]
        if any(ck or cv for (ck, _), (cv, _) in pairs):
            return True, {k: v for (_, k), (_, v) in pairs}
    return False, value


def clean(ev: Event) -> None:
    r"""Make an event storable whatever an agent put in it: every string encodable (an argv byte
    0xff arrives as a lone surrogate and would fail the insert, the spool and the chain's hash,
    losing the whole batch: red team), every integer within Int64 (a row count a fake server
    sent).  In place, so the tail, the spool and the store see the same event.

    Runs on the store writer's thread for every event, on the capture's GIL: the common values
    (ASCII text, small integers, lists and maps of ASCII text) are passed with one C-level check
    each, a whole list or map joined and tested at once (10 to 11 µs an event before, 8 after,
    on the pipeline bench's events); anything else goes through _safe."""
    lo, hi = _INT64
    for part in (ev, ev.identity, ev.process, ev.exec, ev.lost, ev.net, ev.sql, ev.http, ev.verdict,
                 ev.approval, ev.k8s, ev.binding, ev.llm, ev.cause):
        if part is None:
            continue
        for name, value in vars(part).items():
            t = type(value)
            if t is str:
                if value.isascii():
                    continue
            elif t is int:
                if lo <= value <= hi:
                    continue
            elif t is list or t is dict:
                try:     # TypeError: not all of them text; _safe looks at each
                    if "".join(value).isascii() and (t is list or "".join(value.values()).isascii()):
                        continue
                except TypeError:
                    pass
            elif value is None or t is bool or not isinstance(value, (str, int, list, dict)):
                continue
            changed, fixed = _safe(value)
            if changed:
                setattr(part, name, fixed)


def event_to_row(ev: Event) -> list[Any]:
    """One insert row, in COLUMNS order.  ts goes in as integer nanoseconds.

    Read straight from the dataclasses (no JSON round trip), one attrgetter per run of
    columns of one object: this runs once per stored event (26 µs a statement with a
    getattr per column, 120 of them; bench/pipeline_bench.py).
    """
    row: list[Any] = []
    for obj_name, get, containers in _SEGMENTS:
        obj = ev if obj_name is None else getattr(ev, obj_name)
        if obj is None:
            row.extend([[] if c == "Array" else {} if c == "Map" else None for c in containers])
        else:
            row.extend(get(obj))
    return row


def select_list() -> str:
    """SELECT expressions that row_to_event() understands.

    ts and event_id are read under other names: an alias named like a column
    would shadow that column in WHERE.
    """
    special = {"ts": "toUnixTimestamp64Nano(ts) AS ts_ns", "event_id": "toString(event_id) AS event_id_str"}
    return ", ".join(special.get(c.name, c.name) for c in COLUMNS)


def row_to_event(row: dict[str, Any]) -> Event:
    d: dict[str, Any] = {}
    for col in COLUMNS:
        value = row.get(col.name)
        if col.name == "ts":
            d["ts"] = format_ts(int(row.get("ts_ns", value) or 0))
            continue
        if col.name == "event_id":
            d["event_id"] = str(row.get("event_id_str", value) or "")
            continue
        head, _, tail = col.name.partition("_")
        if head in ("identity", "process") or head in OPTIONAL_OBJECTS:
            if isinstance(value, (list, tuple)):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            d.setdefault(head, {})[tail] = value
        else:
            d[col.name] = str(value) if value is not None else ""
    for obj in OPTIONAL_OBJECTS:
        if all(v is None or v == [] or v == {} for v in d[obj].values()):
            d[obj] = None
    return Event.from_dict(d)


def _ttl(retention_days: int) -> str:
    return f"\nTTL toDateTime(ts) + INTERVAL {retention_days} DAY" if retention_days > 0 else ""


def _columns_sql() -> str:
    lines = [f"    {c.name} {c.type}" for c in COLUMNS] + [f"    {i}" for i in INDEXES]
    return ",\n".join(lines)


CHECKPOINT_COLUMNS = ("host LowCardinality(String), seq UInt64, hash String, ts_ns Int64, "
                      "reason LowCardinality(String), key_id String, signature String")


def checkpoint_statements(database: str, table: str, cluster: str = "") -> list[str]:
    """The signed checkpoints of the chain (daemon/chain.py): `{table}_checkpoints`, kept forever
    (they are small: one every 1000 events or a minute)."""
    name = f"{table}_checkpoints"
    if not cluster:
        return [f"CREATE TABLE IF NOT EXISTS {database}.{name} ({CHECKPOINT_COLUMNS}) "
                "ENGINE = MergeTree ORDER BY (host, seq, ts_ns)"]
    on = f" ON CLUSTER '{cluster}'"
    zk = f"/clickhouse/tables/{{shard}}/{database}/{name}_local"
    return [f"CREATE TABLE IF NOT EXISTS {database}.{name}_local{on} ({CHECKPOINT_COLUMNS}) "
            f"ENGINE = ReplicatedMergeTree('{zk}', '{{replica}}') ORDER BY (host, seq, ts_ns)",
            f"CREATE TABLE IF NOT EXISTS {database}.{name}{on} AS {database}.{name}_local "
            f"ENGINE = Distributed('{cluster}', {database}, {name}_local, cityHash64(host))"]


# an insert the writer counts as durable is on disk: the chain removes its seqs from the pending
# ones on that word, and a part lost to a power cut would be an undeclared gap (red team)
DURABLE = "fsync_after_insert = 1, fsync_part_directory = 1"


def create_statements(database: str, table: str, retention_days: int, cluster: str = "") -> list[str]:
    """DDL for one server (MergeTree) or a cluster (ReplicatedMergeTree + Distributed)."""
    if not cluster:
        return [
            f"CREATE DATABASE IF NOT EXISTS {database}",
            f"CREATE TABLE IF NOT EXISTS {database}.{table}\n(\n{_columns_sql()}\n)\n"
            f"ENGINE = MergeTree\nPARTITION BY {PARTITION_BY}\nORDER BY {ORDER_BY}{_ttl(retention_days)}\n"
            # lets a spooled batch be replayed after a crash without duplicating it
            "SETTINGS non_replicated_deduplication_window = 10000, " + DURABLE,
        ]
    on = f" ON CLUSTER '{cluster}'"
    local = f"{table}_local"
    return [
        f"CREATE DATABASE IF NOT EXISTS {database}{on}",
        f"CREATE TABLE IF NOT EXISTS {database}.{local}{on}\n(\n{_columns_sql()}\n)\n"
        f"ENGINE = ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{database}/{local}', '{{replica}}')\n"
        f"PARTITION BY {PARTITION_BY}\nORDER BY {ORDER_BY}{_ttl(retention_days)}\nSETTINGS {DURABLE}",
        f"CREATE TABLE IF NOT EXISTS {database}.{table}{on} AS {database}.{local}\n"
        f"ENGINE = Distributed('{cluster}', {database}, {local}, cityHash64(session_id))",
    ]


def migrate_statements(
    database: str, table: str, existing: dict[str, str], retention_days: int, cluster: str = ""
) -> list[str]:
    """ALTERs that bring an existing table up to COLUMNS (new columns are appended)."""
    on = f" ON CLUSTER '{cluster}'" if cluster else ""
    targets = [f"{table}_local", table] if cluster else [table]
    out: list[str] = []
    for col in COLUMNS:
        if col.name not in existing:
            out.extend(
                f"ALTER TABLE {database}.{t}{on} ADD COLUMN IF NOT EXISTS {col.name} {col.type}"
                for t in targets
            )
    storage = targets[0]
    out.append(f"ALTER TABLE {database}.{storage}{on} MODIFY SETTING {DURABLE}")
    if retention_days > 0:
        out.append(
            f"ALTER TABLE {database}.{storage}{on} MODIFY TTL toDateTime(ts) + INTERVAL {retention_days} DAY"
        )
    return out


def render_schema_sql(retention_days: int = 90) -> str:
    head = (
        "-- Generated by `python -m agentwarden.daemon.schema` from daemon/schema.py; do not edit.\n"
        "-- The daemon creates and migrates this schema itself; this file is for review and for\n"
        "-- provisioning a server or cluster ahead of time.\n\n"
    )
    single = ";\n\n".join(create_statements("agentwarden", "events", retention_days)) + ";\n"
    cluster = ";\n\n".join(create_statements("agentwarden", "events", retention_days, "{cluster}")) + ";\n"
    return (
        head
        + f"-- Single server (and the embedded chdb store), retention {retention_days} days.\n\n"
        + single
        + "\n-- Fleet: a cluster named by the `{cluster}` macro, one ReplicatedMergeTree per shard and a\n"
        + "-- Distributed table in front.  Set store.cluster in the config to make the daemon use it.\n\n"
        + cluster
    )


if __name__ == "__main__":
    sys.stdout.write(render_schema_sql())

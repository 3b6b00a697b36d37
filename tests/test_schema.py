"""Event encoding: JSON contract <-> ClickHouse row; the generated schema file is current."""

from __future__ import annotations

from pathlib import Path

from agentwarden.core.events import (
    ApprovalInfo,
    BindingInfo,
    CauseInfo,
    ChainInfo,
    Event,
    ExecInfo,
    HttpInfo,
    Identity,
    K8sInfo,
    LlmInfo,
    LostInfo,
    NetInfo,
    Process,
    SqlInfo,
    VerdictInfo,
    format_ts,
    parse_ts,
)
from agentwarden.daemon import schema
from hypothesis import given
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]


def sample() -> Event:
    return Event(kind="exit", ts_ns=1_795_471_691_838_614_038, host="h1", session_id="abc", agent="cursor",
                 identity=Identity(0, "root", 1000, "alice", "pts/3"),
                 process=Process(42, 1, 1000, "/usr/bin/psql", ["psql", "-c", "select 1"], "/home/alice"),
                 exec=ExecInfo("/usr/bin/psql", False, None, 0, None, 12.5),
                 event_id="0b9f5c2e-0000-4000-8000-000000000001")


def test_json_contract_fields() -> None:
    d = sample().to_dict()
    assert d["ts"] == "2026-11-23T22:08:11.838614038Z"
    assert set(d) >= {"kind", "ts", "host", "session_id", "agent", "identity", "process"}
    assert set(d["identity"]) >= {"uid", "user", "login_uid", "login_user"}
    assert set(d["process"]) == {"pid", "ppid", "uid", "exe", "argv", "cwd"}
    assert Event.from_dict(d) == sample()


def test_row_roundtrip() -> None:
    ev = sample()
    row = dict(zip(schema.COLUMN_NAMES, schema.event_to_row(ev), strict=True))
    assert row["identity_login_user"] == "alice" and row["process_argv"] == ["psql", "-c", "select 1"]
    assert schema.row_to_event(row) == ev
    lost = Event(kind="lost", ts_ns=1, host="h", lost=LostInfo(5, "ring buffer full"),
                 event_id="0b9f5c2e-0000-4000-8000-000000000002")
    assert schema.row_to_event(dict(zip(schema.COLUMN_NAMES, schema.event_to_row(lost), strict=True))) == lost


@given(st.integers(min_value=0, max_value=2**62))
def test_timestamps_roundtrip_to_the_nanosecond(ns: int) -> None:
    assert parse_ts(format_ts(ns)) == ns


def full() -> Event:
    ev = sample()
    ev.lost = LostInfo(1, "x")
    ev.net = NetInfo("tcp", "127.0.0.1", 5432, "", "connect", "postgres", True, "db.example")
    ev.sql = SqlInfo("drop table t", "DROP TABLE", ["t"], True, "db", "u", 2, "s1", 0, "DROP TABLE", "",
                     "", 1.5, False)
    ev.http = HttpInfo("GET", "http", "h", "/p", "q=1", "1.1", 200, 10, 20, 1.0, False, {"host": "h"},
                       {"content-type": "text/plain"}, "", "ok", "")
    ev.verdict = VerdictInfo("deny", "no-drop", "sql", "sk_msg drop (EACCES)", True, "ab12cd34", 850)
    ev.approval = ApprovalInfo("ab12cd34", "approved", "hold-x", "sql", "DROP INDEX I", ["self"], "alice", 600,
                               "2026-11-24T02:00:00.000000000Z")
    ev.k8s = K8sInfo("team-a", "web-1", "app", "repo/app:1", "builder", "node-1", {"app": "web"}, "uid-1", "c0ffee")
    ev.binding = BindingInfo("bound", "device", 1000, 1000, "https://idp.example.com", "u-1", "a@example.com",
                             "A", ["dev"], False, "2026-11-24T02:00:00.000000000Z")
    ev.identity.groups = ["dev"]
    ev.chain = ChainInfo(7, "0" * 64, "f" * 64)
    ev.llm = LlmInfo("anthropic", "claude-x", "messages", "list files", "a" * 64, "b" * 64, 3,
                     [{"id": "toolu_1", "name": "bash", "arguments": '{"command":"ls"}'}], "ok", "tool_use",
                     12, 34, 56.5, True, True)
    ev.cause = CauseInfo("00000000-0000-0000-0000-000000000009", "toolu_1", "bash", "command")
    return ev


def test_every_contract_field_has_a_column() -> None:
    flat = set()
    for key, value in full().to_dict().items():
        if isinstance(value, dict):
            flat |= {f"{key}_{k}" for k in value}
        else:
            flat.add(key)
    assert flat == set(schema.COLUMN_NAMES)


def test_sql_event_roundtrip() -> None:
    ev = full()
    assert schema.row_to_event(dict(zip(schema.COLUMN_NAMES, schema.event_to_row(ev), strict=True))) == ev


def test_ddl_single_and_cluster() -> None:
    single = "\n".join(schema.create_statements("agentwarden", "events", 30))
    assert "ENGINE = MergeTree" in single and "PARTITION BY toDate(ts)" in single
    assert "ORDER BY (identity_user, session_id, ts)" in single and "INTERVAL 30 DAY" in single
    cluster = "\n".join(schema.create_statements("agentwarden", "events", 30, "prod"))
    assert "ON CLUSTER 'prod'" in cluster and "ReplicatedMergeTree(" in cluster and "Distributed('prod'" in cluster
    assert "TTL" not in "\n".join(schema.create_statements("agentwarden", "events", 0))


def test_migration_adds_missing_columns() -> None:
    existing = {c.name: c.type for c in schema.COLUMNS if c.name != "exec_signal"}
    stmts = schema.migrate_statements("agentwarden", "events", existing, 7)
    assert "ALTER TABLE agentwarden.events ADD COLUMN IF NOT EXISTS exec_signal Nullable(Int32)" in stmts
    assert any("MODIFY TTL" in s and "7 DAY" in s for s in stmts)


def test_generated_schema_file_is_current() -> None:
    assert (REPO / "deploy/clickhouse/schema.sql").read_text() == schema.render_schema_sql()


def test_event_ids_are_uuids_of_prefix_and_counter() -> None:
    import itertools
    import uuid

    from agentwarden.core import events

    saved = events._id_counter
    try:
        for c in (0, 1, 0xFFFF, 0x1234_5678_9ABC_DEF0, 2**64 - 1):
            events._id_counter = itertools.count(c)
            assert events.new_event_id() == str(uuid.UUID(int=(events._ID_PREFIX << 64) | c))
    finally:
        events._id_counter = saved


def _reference_clean(ev: Event) -> None:
    """clean as it was before its fast path: every value through _safe (the slow, plain rule)."""
    for part in (ev, ev.process, ev.sql, ev.http):
        if part is None:
            continue
        for name, value in vars(part).items():
            changed, fixed = schema._safe(value)
            if changed:
                setattr(part, name, fixed)


_ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=6)   # lone surrogates too
_VALUE_INT = st.one_of(st.integers(-5, 5), st.integers(min_value=2**63 - 2, max_value=2**70),
                       st.integers(max_value=-(2**63) + 1, min_value=-(2**70)))


@given(argv=st.lists(st.one_of(_ANY_TEXT, st.text(max_size=4)), max_size=4), cwd=_ANY_TEXT,
       rows=st.one_of(st.none(), _VALUE_INT),
       headers=st.dictionaries(_ANY_TEXT, _ANY_TEXT, max_size=3), query=_ANY_TEXT)
def test_clean_fast_path_matches_the_per_value_rule(argv: list[str], cwd: str, rows: int | None,
                                                     headers: dict[str, str], query: str) -> None:
    """schema.clean checks whole lists and maps at once; whatever it passes or fixes must be what
    the per-value rule (_safe) would, and the result must be storable (UTF-8, Int64)."""
    def make() -> Event:
        ev = sample()
        ev.process.argv, ev.process.cwd = list(argv), cwd
        ev.sql = SqlInfo(query, "SELECT", rows=rows)
        ev.http = HttpInfo(method="GET", headers=dict(headers))
        return ev

    fast, slow = make(), make()
    schema.clean(fast)
    _reference_clean(slow)
    assert fast == slow
    for s in (*fast.process.argv, fast.process.cwd, fast.sql.query, *fast.http.headers, *fast.http.headers.values()):
        s.encode("utf-8")
    assert fast.sql.rows is None or -(2**63) <= fast.sql.rows < 2**63

"""What `tail` and `query` print for a person: every kind says what happened, and bad
arguments get a clear error and a non-zero exit (no daemon needed)."""

from __future__ import annotations

import json
import time

import click
import pytest
from agentwarden.cli import render
from agentwarden.cli.main import main
from agentwarden.core.events import (
    KINDS,
    ApprovalInfo,
    BindingInfo,
    CauseInfo,
    Event,
    ExecInfo,
    HttpInfo,
    Identity,
    LlmInfo,
    LostInfo,
    NetInfo,
    Process,
    SqlInfo,
    VerdictInfo,
)
from click.testing import CliRunner

NOW = time.time_ns()


def _ev(kind: str, **parts: object) -> dict[str, object]:
    e = Event(kind=kind, ts_ns=NOW, host="h1", session_id="s-1", agent="cursor",  # type: ignore[arg-type]
              identity=Identity(1000, "alice", 1000, "alice", "pts/1"),
              process=Process(4242, 1, 1000, "/usr/bin/psql", ["psql", "-h", "db"], "/src"), **parts)
    return e.to_dict()


PG = NetInfo(transport="tcp", dst_ip="10.0.0.5", dst_port=5432, protocol="postgres")
DROP = SqlInfo(query="DROP TABLE users", command="DROP TABLE", database="app", db_user="alice",
               sqlstate="42501", error="permission denied")
# kind -> (its parts, what its line must say)
CASES: dict[str, tuple[dict[str, object], list[str]]] = {
    "session_start": ({}, ["session s-1 started", "psql -h db"]),
    "session_end": ({}, ["session s-1 ended"]),
    "exec": ({"exec": ExecInfo(filename="/usr/bin/psql")}, ["psql -h db"]),
    "exit": ({"exec": ExecInfo(exit_code=3, duration_ms=12.5)}, ["exit 3", "12.5 ms"]),
    "lost": ({"lost": LostInfo(count=7, reason="ring buffer full")}, ["7 events lost", "ring buffer full"]),
    "connect": ({"net": PG}, ["-> 10.0.0.5:5432", "tcp", "postgres"]),
    "tls": ({"net": NetInfo(transport="tcp", dst_ip="2001:db8::1", dst_port=443, sni="api.example.com")},
            ["TLS -> [2001:db8::1]:443", "sni=api.example.com"]),
    "sql": ({"net": PG, "sql": SqlInfo(query="SELECT *\n  FROM t", command="SELECT", database="app",
                                       db_user="alice", tag="SELECT 3", rows=3, duration_ms=0.42)},
            ["[alice@app] SELECT * FROM t", "-> SELECT 3", "0.4 ms"]),
    "http": ({"http": HttpInfo(method="DELETE", scheme="https", host="api.internal", path="/v1/users/7",
                               query="force=1", status=204, duration_ms=3.0)},
             ["DELETE https://api.internal/v1/users/7?force=1", "-> 204"]),
    "verdict": ({"net": PG, "sql": DROP, "verdict": VerdictInfo(action="deny", rule="no-drop-table", subject="sql",
                                                                 mechanism="sk_msg", prevented=True)},
                ["DENY by rule no-drop-table", "sk_msg", "prevented", "DROP TABLE users"]),
    "approval": ({"sql": DROP, "approval": ApprovalInfo(id="r-9", state="approved", rule="hold-ddl",
                                                         summary="DROP TABLE users on app", decided_by="bob",
                                                         auth="pidfd")},
                 ["request r-9 approved", "DROP TABLE users on app", "rule hold-ddl", "approved by bob", "pidfd"]),
    "identity": ({"binding": BindingInfo(state="bound", reason="device", uid=1000, email="alice@example.com",
                                         groups=["dev", "ops"], expires="2026-11-27T06:00:00.000000000Z")},
                 ["alice@example.com bound for uid 1000 by device", "groups dev, ops", "until 2026-11-27"]),
    "llm": ({"llm": LlmInfo(provider="anthropic", model="claude-x", prompt="tidy the repo",
                            tool_calls=[{"id": "t1", "name": "bash", "arguments": '{"command":"git clean -fd"}'}],
                            input_tokens=10, output_tokens=5)},
            ["anthropic claude-x", '"tidy the repo"', 'bash({"command":"git clean -fd"})', "[10/5 tokens]"]),
}


def test_a_caused_command_names_its_tool_call() -> None:
    text = render.line(_ev("exec", cause=CauseInfo("00000000-0000-0000-0000-000000000001", "toolu_7", "bash",
                                                   "command")), colour=False)
    assert "<- tool call toolu_7" in text


def test_every_kind_has_a_case() -> None:
    assert set(CASES) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_says_what_happened(kind: str) -> None:
    parts, says = CASES[kind]
    text = render.line(_ev(kind, **parts), colour=False)
    for s in says:
        assert s in text, (s, text)
    assert "alice" in text and "4242" in text and kind in text


def test_a_pending_approval_names_its_approvers_and_expiry() -> None:
    text = render.detail(_ev("approval", approval=ApprovalInfo(
        id="r-1", state="pending", rule="hold-push", summary="git push --force", approvers=["group:leads"],
        expires="2026-11-26T18:00:00Z")))
    assert "request r-1 pending: git push --force" in text and "approvers group:leads" in text
    assert "expires 2026-11-26T18:00:00Z" in text


def test_a_verdict_after_the_fact_says_so() -> None:
    text = render.detail(_ev("verdict", exec=ExecInfo(), verdict=VerdictInfo(
        action="kill", rule="no-rm", subject="exec", mechanism="SIGKILL (userspace)", prevented=False)))
    assert text.startswith("KILL by rule no-rm [exec; SIGKILL (userspace); after the fact]: psql -h db")


def test_dates_appear_when_the_events_span_days() -> None:
    today = _ev("exec", exec=ExecInfo())
    old = dict(today, ts="2020-01-02T03:04:05.000000006Z")
    assert not render.spans_days([today])
    assert render.spans_days([today, old]) and render.spans_days([old])
    assert render.line(old, colour=False, with_date=True).startswith("2020-01-0")


def test_colour_follows_the_choice_and_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert render.use_colour("auto", True) and not render.use_colour("auto", False)
    assert render.use_colour("always", False) and not render.use_colour("never", True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not render.use_colour("auto", True) and render.use_colour("always", True)
    deny = _ev("verdict", sql=DROP, verdict=VerdictInfo(action="deny", rule="r", mechanism="sk_msg"))
    assert "\x1b[" in render.line(deny, colour=True) and "\x1b[" not in render.line(deny, colour=False)
    assert click.unstyle(render.line(deny, colour=True)) == render.line(deny, colour=False)


def test_what_an_agent_wrote_cannot_drive_the_terminal() -> None:
    """An argv, statement or path with escape sequences and newlines prints them as text."""
    nasty = "\x1b[2K\rsession s-1 ended\n\x9b31m"
    for parts in ({"exec": ExecInfo()}, {"sql": SqlInfo(query=nasty)},
                  {"http": HttpInfo(method="GET", host="h", path="/" + nasty, status=200)}):
        ev = _ev("exec" if "exec" in parts else "sql" if "sql" in parts else "http", **parts)
        ev["process"]["argv"] = ["echo", nasty]
        text = render.line(ev, colour=False)
        assert "\x1b" not in text and "\r" not in text and "\n" not in text and "\x9b" not in text
        assert "\\x1b[2K" in text


def test_compact_drops_the_empty_fields_only() -> None:
    full = _ev("sql", net=PG, sql=SqlInfo(query="SELECT 1", command="SELECT", rows=0))
    small = json.loads(render.compact(full))
    assert small["sql"]["rows"] == 0 and small["sql"]["parsed"] is True   # a zero is a value, not an empty field
    assert "tables" not in small["sql"] and "encrypted" not in small["sql"] and "duration_ms" not in small["sql"]
    assert "error" not in small["sql"] and "verdict" not in small and small["net"]["dst_port"] == 5432


@pytest.mark.parametrize("args", [
    ["query", "--limit", "-5"], ["query", "--limit", "0"], ["query", "--pid", "x"], ["tail", "--action", "nuke"],
    ["query", "-o", "yaml"], ["query", "--color", "sometimes"], ["query", "--kind", "nope"],
    ["query", "--since", "whenever"],
])
def test_bad_arguments_are_refused_with_a_clear_error(args: list[str], tmp_path: object) -> None:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "Error" in res.output and "Traceback" not in res.output


def test_the_daemon_log_in_json_is_one_object_a_line() -> None:
    import subprocess
    import sys

    code = ("import logging; from agentwarden.daemon import logs; logs.configure('info', 'json')\n"
            "log = logging.getLogger('agentwarden.x'); log.debug('hidden'); log.warning('store %s down', 'ch1')\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('failed')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    lines = [json.loads(x) for x in err.splitlines()]
    assert [(x["level"], x["logger"], x["msg"]) for x in lines] == [
        ("warning", "agentwarden.x", "store ch1 down"), ("error", "agentwarden.x", "failed")]
    assert "ZeroDivisionError" in lines[1]["exc"] and lines[0]["ts"].endswith("Z") and "exc" not in lines[0]


def test_an_unknown_log_format_is_refused() -> None:
    res = CliRunner().invoke(main, ["daemon", "--log-format", "yaml"])
    assert res.exit_code == 2 and "--log-format" in res.output

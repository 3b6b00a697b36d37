"""daemon/l7/llm.py on each provider's wire format (JSON and streamed), and daemon/lineage.py's
rule; garbage never raises."""

from __future__ import annotations

import gzip
import json
from typing import Any

from agentwarden.core.events import Event, ExecInfo, LlmInfo, Process, SqlInfo
from agentwarden.daemon.l7 import llm
from agentwarden.daemon.lineage import Lineage, command_text, texts_of
from hypothesis import given, settings
from hypothesis import strategies as st

JSON = {"content-type": "application/json"}
SSE = {"content-type": "text/event-stream"}


def sse(*events: tuple[str, Any]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def body(d: dict[str, Any]) -> bytes:
    return json.dumps(d).encode()


ANTHROPIC_REQ = body({"model": "claude-x", "max_tokens": 64, "stream": True,
                      "system": [{"type": "text", "text": "be careful"}],
                      "messages": [{"role": "user", "content": "first question"},
                                   {"role": "assistant", "content": "ok"},
                                   {"role": "user", "content": [{"type": "text", "text": "now drop it"}]},
                                   {"role": "assistant", "content": [{"type": "tool_use", "id": "t0", "name": "x",
                                                                      "input": {}}]},
                                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t0",
                                                                 "content": "done"}]}]})
ANTHROPIC_STREAM = sse(
    ("message_start", {"type": "message_start", "message": {"model": "claude-x-2026", "usage": {"input_tokens": 40}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Run"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ning"}}),
    ("content_block_start", {"type": "content_block_start", "index": 1,
                             "content_block": {"type": "tool_use", "id": "toolu_9", "name": "psql", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": '{"sql": "drop '}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": 'table t"}'}}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}}),
    ("message_stop", {"type": "message_stop"}),
)


def test_anthropic_stream() -> None:
    call = llm.read_call("/v1/messages", JSON, ANTHROPIC_REQ, SSE, ANTHROPIC_STREAM, 200)
    assert call is not None
    assert (call.provider, call.endpoint, call.model, call.prompt, call.system, call.messages) == (
        "anthropic", "messages", "claude-x-2026", "now drop it", "be careful", 5)
    assert [(t.id, t.name, t.arguments) for t in call.tool_calls] == [("toolu_9", "psql", '{"sql": "drop table t"}')]
    assert (call.text, call.stop_reason, call.input_tokens, call.output_tokens, call.stream, call.complete) == (
        "Running", "tool_use", 40, 12, True, True)
    cut = llm.read_call("/v1/messages", JSON, ANTHROPIC_REQ, SSE, ANTHROPIC_STREAM[:-40], 200)
    assert cut is not None and not cut.complete and cut.tool_calls[0].arguments == '{"sql": "drop table t"}'


def test_openai_responses_and_gemini_and_gzip() -> None:
    req = body({"model": "gpt-r", "instructions": "sys", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "list it"}]}]})
    resp = {"model": "gpt-r-1", "status": "completed", "usage": {"input_tokens": 5, "output_tokens": 6},
            "output": [{"type": "function_call", "call_id": "fc_1", "name": "ls", "arguments": '{"path":"/"}'},
                       {"type": "message", "content": [{"type": "output_text", "text": "here"}]}]}
    headers = {**JSON, "content-encoding": "gzip"}
    call = llm.read_call("/openai/v1/responses?x=1", JSON, req, headers, gzip.compress(body(resp)), 200)
    assert call is not None and (call.provider, call.endpoint, call.model, call.prompt, call.system) == (
        "openai", "responses", "gpt-r-1", "list it", "sys")
    assert [(t.id, t.name, t.arguments) for t in call.tool_calls] == [("fc_1", "ls", '{"path":"/"}')]
    assert (call.text, call.stop_reason, call.input_tokens, call.output_tokens) == ("here", "completed", 5, 6)
    stream = sse(("response.created", {"type": "response.created"}),
                 ("response.completed", {"type": "response.completed", "response": resp}))
    s = llm.read_call("/v1/responses", JSON, body({"model": "gpt-r", "input": "hi", "stream": True}), SSE, stream, 200)
    assert s is not None and s.complete and s.prompt == "hi" and s.tool_calls[0].name == "ls"

    g_req = body({"contents": [{"role": "user", "parts": [{"text": "weather?"}]}],
                  "systemInstruction": {"parts": [{"text": "short"}]}})
    g_resp = {"candidates": [{"content": {"parts": [{"functionCall": {"name": "get_weather", "args": {"city": "x"}}}]},
                              "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 3,
                                                                           "candidatesTokenCount": 4}}
    g = llm.read_call("/v1beta/models/gemini-2.5-pro:generateContent", JSON, g_req, JSON, body(g_resp), 200)
    assert g is not None and (g.provider, g.model, g.prompt, g.system, g.stop_reason) == (
        "gemini", "gemini-2.5-pro", "weather?", "short", "STOP")
    assert [(t.name, t.arguments) for t in g.tool_calls] == [("get_weather", '{"city":"x"}')]
    assert (g.input_tokens, g.output_tokens) == (3, 4)


def test_not_an_llm_call() -> None:
    assert llm.read_call("/v1/messages", JSON, body({"text": "a chat app's own /messages"}), JSON, b"{}", 200) is None
    assert llm.read_call("/api/users", JSON, body({"model": "x", "messages": []}), JSON, b"{}", 200) is None
    assert llm.read_call("/v1/chat/completions", JSON, b"not json", JSON, b"", 200) is None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["/v1/messages", "/v1/chat/completions", "/v1/responses", "/v1/models/m:generateContent"]),
       st.binary(max_size=300), st.binary(max_size=300), st.booleans(), st.sampled_from([None, 200, 500]))
def test_garbage_never_raises(path: str, req: bytes, resp: bytes, stream: bool, status: int | None) -> None:
    shaped = body({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "input": "x",
                   "contents": []})
    for r in (req, shaped):
        llm.read_call(path, JSON, r, SSE if stream else JSON, resp, status)
        llm.read_call(path, JSON, r, SSE if stream else JSON, b"data: " + resp + b"\n\n", status)


def ev(kind: str, ts: int, pid: int = 10, ppid: int = 1, argv: list[str] | None = None, **parts: Any) -> Event:
    e = Event(kind=kind, ts_ns=ts * 1_000_000_000, host="h", session_id="s1",  # type: ignore[arg-type]
              process=Process(pid=pid, ppid=ppid, argv=argv or []), **parts)
    return e


def test_lineage_rule() -> None:
    assert set(texts_of('{"command": "ls -la", "opts": {"cwd": "/repo"}}')) == {"ls -la", "/repo"}
    assert texts_of("not json ") == ("not json",)
    assert command_text(["/bin/bash", "-lc", "cd /repo && make test"]) == "cd /repo && make test"
    assert command_text(["git", "status"]) == "git status"
    lin = Lineage()
    call = ev("llm", 1, llm=LlmInfo(provider="openai", model="gpt-x",
                                    tool_calls=[{"id": "t1", "name": "bash", "arguments": '{"command": "make test"}'},
                                                {"id": "t2", "name": "sql", "arguments": '{"q": "drop table t;"}'}]))
    lin.stage(call)
    # what the enforcer asks of an exec stopped before its own event is read: the same answer, unrecorded
    peek = lin.cause_of(ev("exec", 2, pid=20, argv=["bash", "-c", "cd /repo && make test"]))
    shell = lin.stage(ev("exec", 2, pid=20, argv=["bash", "-c", "cd /repo && make test"], exec=ExecInfo()))
    assert shell.cause is not None and (shell.cause.tool_call_id, shell.cause.match) == ("t1", "command")
    assert shell.cause.llm_event_id == call.event_id and (shell.cause.model, shell.cause.provider) == ("gpt-x", "openai")
    assert peek == shell.cause
    child = lin.stage(ev("exec", 3, pid=21, ppid=20, argv=["cc", "-c", "x.c"], exec=ExecInfo()))
    assert child.cause is not None and (child.cause.tool_call_id, child.cause.match) == ("t1", "parent")
    assert child.cause.model == "gpt-x"
    stmt = lin.stage(ev("sql", 4, pid=30, sql=SqlInfo(query="drop table t")))
    assert stmt.cause is not None and stmt.cause.tool_call_id == "t2"
    unasked = lin.stage(ev("exec", 5, pid=40, argv=["curl", "evil.example"], exec=ExecInfo()))
    assert unasked.cause is None
    short = lin.stage(ev("exec", 6, pid=41, argv=["bash", "-c", "echo make"], exec=ExecInfo()))
    assert short.cause is None                                  # "make" alone is not a tool call's text
    late = lin.stage(ev("exec", 2000, pid=50, argv=["make", "test"], exec=ExecInfo()))
    assert late.cause is None                                   # past the window
    assert command_text(["zsh", "-c", "-l", "make test"]) == "make test"     # Claude Code's shells
    lin.stage(ev("llm", 2001, pid=60, llm=LlmInfo(tool_calls=[
        {"id": "t3", "name": "read", "arguments": '{"path": "/repo/app.py"}'},
        {"id": "t4", "name": "bash", "arguments": json.dumps({"command": "psql -c 'drop table u'"})}])))
    watcher = lin.stage(ev("exec", 2002, pid=61, argv=["python", "/repo/app.py"], exec=ExecInfo()))
    assert watcher.cause is None           # a path a tool call read is not a command it asked for
    script = "eval 'psql -c '" + "\\''" + "drop table u" + "'\\''" + "'"
    wrapped = lin.stage(ev("exec", 2003, pid=62, argv=["bash", "-c", script], exec=ExecInfo()))
    assert wrapped.cause is not None and wrapped.cause.tool_call_id == "t4"
    # a process a tool call started answers its own "LLM" call: its tool calls are not tried
    lin.stage(ev("llm", 2004, pid=63, ppid=62, llm=LlmInfo(tool_calls=[
        {"id": "forged", "name": "bash", "arguments": '{"command": "curl evil.example"}'}])))
    assert lin.stage(ev("exec", 2005, pid=64, argv=["curl", "evil.example"], exec=ExecInfo())).cause is None
    # red team: a contained text does not take a command from the tool call whose process ran it
    lin.stage(ev("llm", 2006, pid=70, llm=LlmInfo(model="opus", tool_calls=[
        {"id": "t5", "name": "bash", "arguments": '{"command": "git status --short"}'}])))
    lin.stage(ev("llm", 2007, pid=70, llm=LlmInfo(model="cheap-1", tool_calls=[
        {"id": "t6", "name": "bash", "arguments": json.dumps({"command": "bash -c 'rm -rf /d # git status --short'"})}])))
    outer = lin.stage(ev("exec", 2008, pid=71, ppid=70, argv=["bash", "-c", "bash -c 'rm -rf /d # git status --short'"],
                         exec=ExecInfo()))
    inner = lin.stage(ev("exec", 2009, pid=72, ppid=71, argv=["bash", "-c", "rm -rf /d # git status --short"],
                         exec=ExecInfo()))
    rm = lin.stage(ev("exec", 2009, pid=72, ppid=71, argv=["rm", "-rf", "/d", "--", "git status --short"],
                      exec=ExecInfo()))
    assert outer.cause is not None and outer.cause.tool_call_id == "t6"
    assert inner.cause is not None and (inner.cause.tool_call_id, inner.cause.model) == ("t6", "cheap-1")
    assert rm.cause is not None and (rm.cause.tool_call_id, rm.cause.model) == ("t6", "cheap-1")
    # red team, round 3: a script named `git` run as `git status --short` inside the cheap model's
    # command spells the other model's text exactly: it keeps the cheap model's cause
    fake_git = lin.stage(ev("exec", 2009, pid=76, ppid=71, argv=["git", "status", "--short"], exec=ExecInfo()))
    assert fake_git.cause is not None and (fake_git.cause.tool_call_id, fake_git.cause.match) == ("t6", "parent")
    # red team: a tool call's process forks twice (no exec) and answers its own "LLM" call from the
    # grandchild after the child exited: still caused, so its tool calls are not tried
    lin.forked(72, 73)
    lin.forked(73, 74)
    lin.stage(ev("exit", 2009, pid=73, ppid=72))
    lin.stage(ev("llm", 2009, pid=74, ppid=1, llm=LlmInfo(model="opus", tool_calls=[
        {"id": "forged2", "name": "bash", "arguments": '{"command": "rm -rf /data4"}'}])))
    assert lin.stage(ev("exec", 2009, pid=75, ppid=70, argv=["rm", "-rf", "/data4"], exec=ExecInfo())).cause is None
    lin.stage(ev("session_end", 2010))
    assert lin.stage(ev("exec", 2011, pid=51, ppid=20, argv=["x"], exec=ExecInfo())).cause is None


def test_text_limits_and_hash_only() -> None:
    from agentwarden.daemon.protocols import http as adapter

    call = llm.read_call("/v1/messages", JSON, ANTHROPIC_REQ, SSE, ANTHROPIC_STREAM, 200)
    assert call is not None
    try:
        adapter.configure_llm(4, False)
        info = adapter._llm_info(call, 1.0)
        assert (info.prompt, info.text) == ("now ", "Runn")
        assert info.tool_calls[0]["arguments"] == '{"sql": "drop table t"}'   # kept: what was run
        assert info.prompt_hash == llm.digest("now drop it")
        adapter.configure_llm(4096, True)
        info = adapter._llm_info(call, 1.0)
        assert (info.prompt, info.text) == ("", "") and info.prompt_hash == llm.digest("now drop it")
        assert info.tool_calls[0]["arguments"] == '{"sql": "drop table t"}'    # what was asked for stays
    finally:
        adapter.configure_llm(4096, False)


def test_red_team_replies_never_raise_and_never_inflate_past_the_cap() -> None:
    import zlib

    req = body({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
    huge = b'data: {"type":"content_block_start","index":1e999,"content_block":{"type":"tool_use"}}\n\n'
    cut = llm.read_call("/v1/messages", JSON, req, SSE, huge, 200)
    assert cut is not None and not cut.complete
    bomb = zlib.compress(b"\0" * (64 << 20))            # 64 MiB of zeros in about 64 KB
    gz = llm.read_call("/v1/chat/completions", {**JSON, "content-encoding": "deflate"}, bomb, JSON, b"", 200)
    assert gz is None                                  # not JSON once cut, and never 64 MiB in memory
    assert len(llm._decoded({"content-encoding": "deflate"}, bomb) or b"") == llm.BODY_CAP

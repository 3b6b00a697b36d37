"""From prompt to command: an agent loop on the providers' own client libraries (anthropic, openai)
against a local server that speaks their wire formats (JSON and streamed server-sent events, with
tool calls); the loop runs each tool call as a command.  The daemon records each call as an `llm`
event and ties each command to the tool call that asked for it (`cause`)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import brotli
import pytest
from agentwarden.daemon.l7 import coding
from agentwarden.daemon.mask import Masker, load_key
from conftest import Daemon, ended, make_agent, need_root, self_signed

ANTHROPIC_TOOL = {"command": "cat /etc/hostname"}
OPENAI_TOOL = {"cmd": "head -c 5 /etc/os-release"}


# What the server answers in, among the codings a client accepts, first first (API fronts answer
# Node's fetch over HTTPS in br, and any client that asks for it in zstd): Anthropic's path
# prefers br, OpenAI's zstd, so that the Python loop (httpx: gzip, deflate, br, zstd) reads one
# reply in each, and Node's fetch over plain HTTP (gzip, deflate) gets gzip.
PREFERS = {"/v1/messages": ("br", "gzip"), "/chat/completions": ("zstd", "br", "gzip")}
ENCODERS = {"br": brotli.compress, "zstd": coding.zstd.compress, "gzip": gzip.compress}


class LlmServer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    codings: list[tuple[str, str]] = []   # (path, coding) of every reply sent

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, ctype: str) -> None:
        accepts = {c.split(";")[0].strip() for c in self.headers.get("Accept-Encoding", "").split(",")}
        prefers = next(v for k, v in PREFERS.items() if self.path.endswith(k))
        chosen = next((c for c in prefers if c in accepts), "")
        self.codings.append((self.path, chosen))
        if chosen:
            body = ENCODERS[chosen](body)
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        if chosen:
            self.send_header("Content-Encoding", chosen)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/v1/messages"):
            self._anthropic(req)
        elif self.path.endswith("/chat/completions"):
            self._openai(req)
        else:
            self.send_error(404)

    def _anthropic(self, req: dict[str, Any]) -> None:
        asked = req["messages"][-1]["content"]   # "run: CMD" asks for CMD (the policy test's agent)
        command = {"command": asked[5:]} if asked.startswith("run: ") else ANTHROPIC_TOOL
        tool = {"type": "tool_use", "id": f"toolu_{abs(hash(asked)) % 10**6:06d}", "name": "bash", "input": command}
        if not asked.startswith("run: "):
            tool["id"] = "toolu_01"
        msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": req["model"],
               "content": [{"type": "text", "text": "Let me look."}, tool], "stop_reason": "tool_use",
               "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 7}}
        self._send(json.dumps(msg).encode(), "application/json")

    def _openai(self, req: dict[str, Any]) -> None:
        args = json.dumps(OPENAI_TOOL)
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": req["model"]}
        chunks = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "shell", "arguments": ""}}]},
                "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": args[:9]}}]},
                          "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": args[9:]}}]},
                          "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            {"choices": [], "usage": {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}},
        ]
        body = "".join(f"data: {json.dumps({**base, **c})}\n\n" for c in chunks) + "data: [DONE]\n\n"
        self._send(body.encode(), "text/event-stream")


AGENT_LOOP = r"""
import json, subprocess, sys
import anthropic, openai
base = sys.argv[1]
a = anthropic.Anthropic(base_url=base, api_key="sk-ant-SECRET-key-1", max_retries=0)
m = a.messages.create(model="claude-test-1", max_tokens=100, system="You are careful.",
                      tools=[{"name": "bash", "description": "run a command",
                              "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}],
                      messages=[{"role": "user", "content": "what is this host called?"}])
(use,) = [b for b in m.content if b.type == "tool_use"]
subprocess.run(["bash", "-c", use.input["command"]], check=True, stdout=subprocess.DEVNULL)
o = openai.OpenAI(base_url=base + "/v1", api_key="sk-openai-SECRET-key-2", max_retries=0)
args = ""
for chunk in o.chat.completions.create(
        model="gpt-test-2", stream=True, stream_options={"include_usage": True},
        tools=[{"type": "function", "function": {"name": "shell", "parameters": {
            "type": "object", "properties": {"cmd": {"type": "string"}}}}}],
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "which OS is this?"}]):
    for c in chunk.choices:
        for tc in c.delta.tool_calls or []:
            args += tc.function.arguments or ""
subprocess.run(["bash", "-c", json.loads(args)["cmd"]], check=True, stdout=subprocess.DEVNULL)
subprocess.run(["uname", "-s"], check=True, stdout=subprocess.DEVNULL)   # no tool call asked for this
print("done")
"""


@pytest.fixture(scope="module")
def llm_server() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), LlmServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def llm_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The same server over TLS (a certificate made here): its URL and the certificate."""
    d = tmp_path_factory.mktemp("llm-tls")
    self_signed(d)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "c.pem", d / "k.pem")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), LlmServer)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{srv.server_address[1]}", d / "c.pem"
    srv.shutdown()


def test_llm_calls_and_the_commands_their_tool_calls_asked_for(daemon: Daemon, fake_agent: Path, llm_server: str,
                                                                tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    (tmp_path / "loop.py").write_text(AGENT_LOOP)
    first = len(LlmServer.codings)
    agent = subprocess.Popen([str(fake_agent), "-c", f"{sys.executable} {tmp_path}/loop.py {llm_server}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0 and "done" in out, err
    assert [c for _, c in LlmServer.codings[first:]] == ["br", "zstd"]   # each reply compressed (l7/coding.py)
    events = daemon.session_events(agent.pid, lambda evs: ended(evs) and sum(e["kind"] == "llm" for e in evs) >= 2)
    calls = [e for e in events if e["kind"] == "llm"]
    assert [c["llm"]["provider"] for c in calls] == ["anthropic", "openai"]
    claude, gpt = (c["llm"] for c in calls)
    assert (claude["model"], claude["endpoint"], claude["prompt"], claude["messages"], claude["stream"]) == (
        "claude-test-1", "messages", "what is this host called?", 1, False)
    # keyed with the masking key: equal prompts compare equal, a guess cannot be hashed to confirm it
    masker = Masker(load_key(str(daemon.root / "mask.key")))
    assert claude["system_hash"] == masker.keyed(hashlib.sha256(b"You are careful.").hexdigest())
    assert claude["prompt_hash"] == masker.keyed(hashlib.sha256(b"what is this host called?").hexdigest())
    assert claude["prompt_hash"] != hashlib.sha256(b"what is this host called?").hexdigest()
    assert claude["tool_calls"] == [{"id": "toolu_01", "name": "bash",
                                     "arguments": json.dumps(ANTHROPIC_TOOL, separators=(",", ":"))}]
    assert (claude["stop_reason"], claude["input_tokens"], claude["output_tokens"], claude["text"]) == (
        "tool_use", 11, 7, "Let me look.")
    assert (gpt["model"], gpt["endpoint"], gpt["prompt"], gpt["messages"], gpt["stream"], gpt["complete"]) == (
        "gpt-test-2", "chat.completions", "which OS is this?", 2, True, True)
    assert gpt["tool_calls"] == [{"id": "call_1", "name": "shell", "arguments": json.dumps(OPENAI_TOOL)}]
    assert (gpt["stop_reason"], gpt["input_tokens"], gpt["output_tokens"]) == ("tool_calls", 21, 9)
    for c in calls:     # the key (a bearer token for both clients here; x-api-key is masked the same way)
        assert c["http"]["headers"]["authorization"].startswith("[MASKED:header:")
    stored = json.dumps(events)
    assert "SECRET-key" not in stored

    execs = {" ".join(e["process"]["argv"]): e for e in events if e["kind"] == "exec"}
    asked = execs["bash -c cat /etc/hostname"]
    assert asked["cause"] == {"llm_event_id": calls[0]["event_id"], "tool_call_id": "toolu_01", "tool": "bash",
                              "match": "command", "model": "claude-test-1", "provider": "anthropic"}
    assert execs["bash -c head -c 5 /etc/os-release"]["cause"]["tool_call_id"] == "call_1"
    assert execs["bash -c head -c 5 /etc/os-release"]["cause"]["llm_event_id"] == calls[1]["event_id"]
    assert "cause" not in execs["uname -s"]                       # no tool call asked for it
    # what the shell ran for the tool call (bash runs a lone command in its own process, or forks)
    for argv, ev in execs.items():
        if argv.startswith(("cat ", "head ")):
            assert ev["cause"]["tool_call_id"] in ("toolu_01", "call_1"), ev


CAUSE_POLICY = """version: 1
rules:
  - name: unasked-touch
    when: {kind: exec, exec: {path: ["*/touch"]}, cause: {asked: false}}
    action: deny
  - name: no-rm-from-cheap-models
    when: {kind: exec, exec: {path: ["*/rm"]}, cause: {model: ["cheap-*"]}}
    action: deny
"""

CAUSE_LOOP = r"""
import subprocess, sys
import anthropic
base, d = sys.argv[1], sys.argv[2]
a = anthropic.Anthropic(base_url=base, api_key="sk-ant-SECRET-key-3", max_retries=0)
def ask(model, command):
    m = a.messages.create(model=model, max_tokens=100, messages=[{"role": "user", "content": "run: " + command}],
                          tools=[{"name": "bash", "description": "run a command", "input_schema": {
                              "type": "object", "properties": {"command": {"type": "string"}}}}])
    (use,) = [b for b in m.content if b.type == "tool_use"]
    return subprocess.run(["bash", "-c", use.input["command"]]).returncode
print("asked", ask("claude-test-1", f"touch {d}/asked"))
print("unasked", subprocess.run(["touch", f"{d}/unasked"]).returncode)
print("cheap", ask("cheap-1", f"rm -f {d}/asked"))
print("other", ask("claude-test-1", f"rm -f {d}/other"))
"""


@pytest.fixture(scope="module")
def cause_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    need_root()
    d = Daemon(tmp_path_factory.mktemp("cause"), [{"name": "caused", "match": {"comm": ["aw-cause-agent"]}}],
               policy=CAUSE_POLICY)
    d.start()
    yield d
    d.stop()


def test_policy_on_cause_lets_through_what_a_tool_call_asked_for_and_refuses_the_rest(
        cause_daemon: Daemon, llm_server: str, tmp_path: Path) -> None:
    """`when.cause`: a touch no tool call asked for is refused at its exec, one a tool call asked for
    runs; an rm that a model named cheap-* asked for is refused, the same rm asked by another model
    runs.  Decided while the exec waits stopped, from the LLM reply the agent read before it."""
    tmp_path.chmod(0o777)
    (tmp_path / "other").write_text("x")
    (tmp_path / "loop.py").write_text(CAUSE_LOOP)
    agent = make_agent(tmp_path / "agent", "aw-cause-agent")
    proc = subprocess.Popen([str(agent), "-c", f"{sys.executable} {tmp_path}/loop.py {llm_server} {tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    codes = dict(line.split() for line in out.splitlines() if line.count(" ") == 1)
    assert codes.keys() == {"asked", "unasked", "cheap", "other"}, (out, err)
    assert (codes["asked"], codes["other"]) == ("0", "0") and "0" not in (codes["unasked"], codes["cheap"]), (out, err)
    assert (tmp_path / "asked").exists() and not (tmp_path / "unasked").exists()
    assert not (tmp_path / "other").exists()
    events = cause_daemon.session_events(
        proc.pid,
        lambda evs: ended(evs) and sum(e["kind"] == "verdict" and e["verdict"]["action"] == "deny" for e in evs) >= 2)
    denied = {e["verdict"]["rule"]: e for e in events if e["kind"] == "verdict" and e["verdict"]["action"] == "deny"}
    assert set(denied) == {"unasked-touch", "no-rm-from-cheap-models"}, denied
    assert all(e["verdict"]["prevented"] for e in denied.values())
    ran = [e for e in events if e["kind"] == "exec" and e["process"]["argv"][:1] == ["rm"] and "cause" in e]
    assert {e["cause"]["model"] for e in ran} >= {"cheap-1", "claude-test-1"}, ran
    assert all(e["cause"]["provider"] == "anthropic" for e in ran)


NODE_LOOP = r"""
// An agent loop on the providers' npm client libraries (fetch, undici): each tool call run as a command.
const Anthropic = require("@anthropic-ai/sdk").default;
const OpenAI = require("openai").default;
const { execFileSync } = require("child_process");
const base = process.argv[2];
(async () => {
  const a = new Anthropic({ baseURL: base, apiKey: "sk-ant-SECRET-key-9", maxRetries: 0 });
  const m = await a.messages.create({
    model: "claude-node-1", max_tokens: 100,
    tools: [{ name: "bash", description: "run a command",
              input_schema: { type: "object", properties: { command: { type: "string" } } } }],
    messages: [{ role: "user", content: "run: echo from-node" }] });
  const use = m.content.find((b) => b.type === "tool_use");
  execFileSync("bash", ["-c", use.input.command], { stdio: "ignore" });
  const o = new OpenAI({ baseURL: base + "/v1", apiKey: "sk-openai-SECRET-key-8", maxRetries: 0 });
  let args = "";
  const stream = await o.chat.completions.create({
    model: "gpt-node-2", stream: true, stream_options: { include_usage: true },
    tools: [{ type: "function", function: { name: "shell", parameters: {
      type: "object", properties: { cmd: { type: "string" } } } } }],
    messages: [{ role: "user", content: "which OS is this?" }] });
  for await (const chunk of stream)
    for (const c of chunk.choices) for (const tc of c.delta.tool_calls || []) args += tc.function.arguments || "";
  execFileSync("bash", ["-c", JSON.parse(args).cmd], { stdio: "ignore" });
  console.log("done");
})().catch((e) => { console.error(e); process.exit(1); });
"""
NODE_MODULES = Path(sys.prefix) / "npm" / "node_modules"   # deploy/setup.sh npm_test_packages


@pytest.mark.skipif(shutil.which("node") is None or not (NODE_MODULES / "openai").is_dir(),
                    reason="needs node and the npm client libraries (deploy/setup.sh test installs both)")
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_npm_client_libraries_calls_and_the_commands_they_asked_for(
        daemon: Daemon, fake_agent: Path, llm_server: str, llm_tls_server: tuple[str, Path], tmp_path: Path,
        scheme: str) -> None:
    """The same with the providers' npm libraries (`@anthropic-ai/sdk`, `openai`) in a Node loop; over
    TLS (Node's OpenSSL, read by uprobes on the `node` binary) fetch asks for br, and gets it."""
    tmp_path.chmod(0o755)
    (tmp_path / "loop.js").write_text(NODE_LOOP)
    first = len(LlmServer.codings)
    url, cert = (llm_server, None) if scheme == "http" else llm_tls_server
    agent = subprocess.Popen([str(fake_agent), "-c", f"node {tmp_path}/loop.js {url}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "NODE_PATH": str(NODE_MODULES),
                                  **({"NODE_EXTRA_CA_CERTS": str(cert)} if cert else {})})
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0 and "done" in out, err
    # fetch's: gzip over plain HTTP, br first over HTTPS (undici)
    assert [c for _, c in LlmServer.codings[first:]] == (["gzip", "gzip"] if scheme == "http" else ["br", "br"])
    events = daemon.session_events(agent.pid, lambda evs: ended(evs) and sum(e["kind"] == "llm" for e in evs) >= 2)
    calls = [e for e in events if e["kind"] == "llm"]
    assert [(c["llm"]["provider"], c["llm"]["model"]) for c in calls] == [("anthropic", "claude-node-1"),
                                                                          ("openai", "gpt-node-2")]
    claude, gpt = (c["llm"] for c in calls)
    assert claude["prompt"] == "run: echo from-node" and claude["tool_calls"][0]["name"] == "bash"
    assert json.loads(claude["tool_calls"][0]["arguments"]) == {"command": "echo from-node"}
    assert (gpt["stream"], gpt["complete"], gpt["input_tokens"], gpt["output_tokens"]) == (True, True, 21, 9)
    assert gpt["tool_calls"] == [{"id": "call_1", "name": "shell", "arguments": json.dumps(OPENAI_TOOL)}]
    assert all(c["process"]["exe"].endswith("node") for c in calls)
    assert all(c["http"]["tls"] == (scheme == "https") for c in calls)
    assert "SECRET-key" not in json.dumps(events)
    execs = {" ".join(e["process"]["argv"]): e for e in events if e["kind"] == "exec"}
    assert execs["bash -c echo from-node"]["cause"]["llm_event_id"] == calls[0]["event_id"]
    assert execs["bash -c head -c 5 /etc/os-release"]["cause"]["llm_event_id"] == calls[1]["event_id"]
    assert execs["bash -c head -c 5 /etc/os-release"]["cause"]["model"] == "gpt-node-2"

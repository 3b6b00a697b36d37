"""LLM API calls read from an HTTP exchange: bytes in, one `LlmCall` (or None) out.

Recognised by the request's shape, not its host: the endpoint's path (`/v1/messages`, `/chat/completions`,
`/responses`, Gemini's `:generateContent`) and a JSON body with the fields that API requires. So a
local server, a proxy, Azure OpenAI or any compatible endpoint is read like the provider's own.
Streaming replies (server-sent events) are reassembled: text, tool calls (their arguments arrive in
pieces), the stop reason and the token counts.

Never raises on input: a body that is not what its endpoint speaks gives None (the exchange stays
an `http` event), and a reply that is cut gives what was read, `complete` False.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from . import coding

# paths (query string removed) of the endpoints read, whatever comes before them
_ENDPOINTS = (
    (re.compile(r"/messages$"), "anthropic", "messages"),
    (re.compile(r"/chat/completions$"), "openai", "chat.completions"),
    (re.compile(r"/responses$"), "openai", "responses"),
    (re.compile(r"/models/[^/:]+:(?:stream)?[gG]enerateContent$"), "gemini", "generateContent"),
)
BODY_CAP = 8 << 20            # bytes of an LLM call's request and reply kept for reading (the HTTP parsers)


@dataclass
class ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""       # JSON text, as the model gave it


@dataclass
class LlmCall:
    provider: str = ""
    model: str = ""
    endpoint: str = ""
    prompt: str = ""          # the latest user turn with text
    system: str = ""          # the system prompt (its hash is what is kept)
    messages: int = 0         # turns in the request
    tool_calls: list[ToolCall] = field(default_factory=list)
    text: str = ""            # the reply's text
    stop_reason: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    stream: bool = False
    complete: bool = True     # the reply was read to its end


def endpoint_of(path: str) -> tuple[str, str] | None:
    """(provider, endpoint) for a path an LLM API serves, else None."""
    path = path.partition("?")[0]
    for pattern, provider, endpoint in _ENDPOINTS:
        if pattern.search(path):
            return provider, endpoint
    return None


def read_call(path: str, req_headers: dict[str, str], req_body: bytes, resp_headers: dict[str, str],
              resp_body: bytes, status: int | None) -> LlmCall | None:
    """The call an exchange was, when its path and request body are an LLM API's."""
    where = endpoint_of(path)
    if where is None:
        return None
    try:
        req = _json(_decoded(req_headers, req_body) or b"")
    except Exception:
        return None
    if not isinstance(req, dict) or not _shaped(where, req):
        return None
    provider, endpoint = where
    call = LlmCall(provider=provider, endpoint=endpoint, model=str(req.get("model") or ""))
    try:
        _request(call, req, path)
        body = _decoded(resp_headers, resp_body)
        stream = "text/event-stream" in resp_headers.get("content-type", "") or req.get("stream") is True \
            or ":streamGenerateContent" in path
        call.stream = bool(stream)
        if status is None or body is None:   # no reply, or one in a coding not read
            call.complete = False
        elif stream:
            _stream(call, body)
        else:
            _reply(call, _json(body))
    except Exception:   # whatever a reply holds (red team: an index of 1e999 overflowed int())
        call.complete = False
    return call


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() if text else ""


# ---- requests ------------------------------------------------------------------------------


def _shaped(where: tuple[str, str], req: dict[str, Any]) -> bool:
    provider, endpoint = where
    if provider == "gemini":
        return isinstance(req.get("contents"), list)
    if endpoint == "responses":
        return "model" in req and "input" in req
    if provider == "anthropic":     # its API requires max_tokens: `/messages` alone is too common a path
        return "model" in req and "max_tokens" in req and isinstance(req.get("messages"), list)
    return "model" in req and isinstance(req.get("messages"), list)


_TEXT_BLOCKS = ("text", "input_text")


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and "text" in block and block.get("type", "text") in _TEXT_BLOCKS:
                parts.append(str(block["text"]))      # a text block (Gemini's parts have no type)
        return "\n".join(parts)
    return ""


def _request(call: LlmCall, req: dict[str, Any], path: str) -> None:
    if call.provider == "gemini":
        turns = [t for t in req.get("contents") or [] if isinstance(t, dict)]
        call.model = call.model or path.rpartition("/models/")[2].partition(":")[0]
        call.messages = len(turns)
        call.prompt = next((_text_of(t.get("parts")) for t in reversed(turns)
                            if t.get("role", "user") == "user" and _text_of(t.get("parts"))), "")
        sys_inst = req.get("systemInstruction") or req.get("system_instruction")
        call.system = _text_of(sys_inst.get("parts")) if isinstance(sys_inst, dict) else ""
        return
    if call.endpoint == "responses":
        items = req.get("input")
        if isinstance(items, str):
            call.prompt, call.messages = items, 1
        elif isinstance(items, list):
            turns = [t for t in items if isinstance(t, dict)]
            call.messages = len(turns)
            call.prompt = next((_text_of(t.get("content")) for t in reversed(turns)
                                if t.get("role") == "user" and _text_of(t.get("content"))), "")
        call.system = str(req.get("instructions") or "")
        return
    turns = [t for t in req.get("messages") or [] if isinstance(t, dict)]
    call.messages = len(turns)
    call.prompt = next((_text_of(t.get("content")) for t in reversed(turns)
                        if t.get("role") == "user" and _text_of(t.get("content"))), "")
    if call.provider == "anthropic":
        call.system = _text_of(req.get("system"))
    else:
        call.system = "\n".join(_text_of(t.get("content")) for t in turns
                                if t.get("role") in ("system", "developer"))


# ---- replies ---------------------------------------------------------------------------------


def _args(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _reply(call: LlmCall, resp: Any) -> None:
    if not isinstance(resp, dict):
        call.complete = False
        return
    if call.provider == "anthropic":
        for block in resp.get("content") or []:
            if block.get("type") == "tool_use":
                call.tool_calls.append(ToolCall(str(block.get("id", "")), str(block.get("name", "")),
                                                _args(block.get("input", {}))))
            elif block.get("type") == "text":
                call.text += str(block.get("text", ""))
        call.stop_reason = str(resp.get("stop_reason") or "")
        usage = resp.get("usage") or {}
        call.input_tokens, call.output_tokens = usage.get("input_tokens"), usage.get("output_tokens")
        call.model = str(resp.get("model") or call.model)
    elif call.provider == "gemini":
        _gemini(call, resp)
    elif call.endpoint == "responses":
        _responses_output(call, resp)
    else:
        choice = (resp.get("choices") or [{}])[0]
        msg = choice.get("message") or {}
        call.text = str(msg.get("content") or "")
        for tc in msg.get("tool_calls") or []:
            fn = tc.get("function") or {}
            call.tool_calls.append(ToolCall(str(tc.get("id", "")), str(fn.get("name", "")),
                                            _args(fn.get("arguments", ""))))
        call.stop_reason = str(choice.get("finish_reason") or "")
        usage = resp.get("usage") or {}
        call.input_tokens, call.output_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        call.model = str(resp.get("model") or call.model)


def _responses_output(call: LlmCall, resp: dict[str, Any]) -> None:
    for item in resp.get("output") or []:
        if item.get("type") == "function_call":
            call.tool_calls.append(ToolCall(str(item.get("call_id") or item.get("id", "")),
                                            str(item.get("name", "")), _args(item.get("arguments", ""))))
        elif item.get("type") == "message":
            call.text += "".join(str(c.get("text", "")) for c in item.get("content") or []
                                 if c.get("type") == "output_text")
    call.stop_reason = str(resp.get("status") or "")
    usage = resp.get("usage") or {}
    call.input_tokens, call.output_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    call.model = str(resp.get("model") or call.model)


def _gemini(call: LlmCall, resp: dict[str, Any]) -> None:
    cand = (resp.get("candidates") or [{}])[0]
    for part in (cand.get("content") or {}).get("parts") or []:
        if "functionCall" in part:
            fc = part["functionCall"]
            call.tool_calls.append(ToolCall(str(fc.get("id", "")), str(fc.get("name", "")),
                                            _args(fc.get("args", {}))))
        elif "text" in part:
            call.text += str(part["text"])
    if cand.get("finishReason"):
        call.stop_reason = str(cand["finishReason"])
    usage = resp.get("usageMetadata") or {}
    if "promptTokenCount" in usage:
        call.input_tokens = usage.get("promptTokenCount")
    if "candidatesTokenCount" in usage:
        call.output_tokens = usage.get("candidatesTokenCount")
    call.model = str(resp.get("modelVersion") or call.model)


def _events(body: bytes) -> list[tuple[str, Any]]:
    """(event name, JSON data) of each complete server-sent event; `[DONE]` as ("done", None)."""
    out: list[tuple[str, Any]] = []
    text = body.decode("utf-8", "replace").replace("\r\n", "\n")
    for block in text.split("\n\n"):
        name, data = "", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if not data:
            continue
        joined = "\n".join(data)
        if joined.strip() == "[DONE]":
            out.append(("done", None))
            continue
        value = _json(joined.encode())
        if value is not None:
            out.append((name, value))
    return out


def _stream(call: LlmCall, body: bytes) -> None:
    events = _events(body)
    call.complete = False
    if call.provider == "anthropic":
        blocks: dict[int, ToolCall] = {}
        text: list[str] = []
        args: dict[int, list[str]] = {}
        for _, ev in events:
            kind = ev.get("type")
            if kind == "message_start":
                msg = ev.get("message") or {}
                call.model = str(msg.get("model") or call.model)
                call.input_tokens = (msg.get("usage") or {}).get("input_tokens")
            elif kind == "content_block_start":
                block = ev.get("content_block") or {}
                if block.get("type") == "tool_use":
                    at = int(ev.get("index", 0))
                    blocks[at] = ToolCall(str(block.get("id", "")), str(block.get("name", "")))
            elif kind == "content_block_delta":
                delta = ev.get("delta") or {}
                if delta.get("type") == "text_delta":
                    text.append(str(delta.get("text", "")))   # joined once: += on a str was quadratic
                elif delta.get("type") == "input_json_delta" and int(ev.get("index", 0)) in blocks:
                    args.setdefault(int(ev.get("index", 0)), []).append(str(delta.get("partial_json", "")))
            elif kind == "message_delta":
                call.stop_reason = str((ev.get("delta") or {}).get("stop_reason") or call.stop_reason)
                usage = ev.get("usage") or {}
                call.output_tokens = usage.get("output_tokens", call.output_tokens)
            elif kind == "message_stop":
                call.complete = True
        call.text += "".join(text)
        for i, parts in args.items():
            blocks[i].arguments += "".join(parts)
        call.tool_calls = [blocks[i] for i in sorted(blocks)]
    elif call.provider == "gemini":
        texts: list[str] = []
        for _, ev in events:
            call.text = ""
            _gemini(call, ev)
            texts.append(call.text)          # joined once (+= on a str was quadratic)
        call.text = "".join(texts)
        call.complete = bool(call.stop_reason)
    elif call.endpoint == "responses":
        for _, ev in events:
            if ev.get("type") in ("response.completed", "response.incomplete", "response.failed"):
                _responses_output(call, ev.get("response") or {})
                call.complete = True
    else:
        calls: dict[int, ToolCall] = {}
        pieces: list[str] = []
        pieces_of: dict[int, list[str]] = {}
        for name, ev in events:
            if name == "done":
                call.complete = True
                continue
            call.model = str(ev.get("model") or call.model)
            for choice in ev.get("choices") or []:
                delta = choice.get("delta") or {}
                pieces.append(str(delta.get("content") or ""))
                for tc in delta.get("tool_calls") or []:
                    fn = tc.get("function") or {}
                    at = int(tc.get("index", 0))
                    got = calls.setdefault(at, ToolCall())
                    got.id = got.id or str(tc.get("id") or "")
                    got.name = got.name or str(fn.get("name") or "")
                    pieces_of.setdefault(at, []).append(str(fn.get("arguments") or ""))
                if choice.get("finish_reason"):
                    call.stop_reason = str(choice["finish_reason"])
            usage = ev.get("usage") or {}
            if usage:
                call.input_tokens = usage.get("prompt_tokens")
                call.output_tokens = usage.get("completion_tokens")
        call.text += "".join(pieces)
        for at, got in calls.items():
            got.arguments += "".join(pieces_of.get(at, []))
        call.tool_calls = [calls[i] for i in sorted(calls)]


# ---- bytes -----------------------------------------------------------------------------------


def _decoded(headers: dict[str, str], body: bytes) -> bytes | None:
    """The body without its content codings (l7/coding.py), at most BODY_CAP bytes of it; None
    when a coding is unknown or the bytes are not what the header says."""
    codings = headers.get("content-encoding", "")
    return coding.decode(codings, body, BODY_CAP) if codings else body


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None

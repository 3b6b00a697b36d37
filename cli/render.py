"""Human rendering of events: one aligned line each, every kind saying what happened.

`line()` is what `tail` and `query` print; `compact()` is the JSON form without empty fields.
Colour follows `--color` (auto: a terminal, and no NO_COLOR in the environment).
"""

from __future__ import annotations

import json
import os
import shlex
from datetime import datetime
from typing import Any

import click

KIND_COLOURS = {
    "session_start": "green",
    "session_end": "green",
    "exec": "cyan",
    "exit": "blue",
    "lost": "red",
    "connect": "white",
    "sql": "yellow",
    "http": "yellow",
    "tls": "white",
    "verdict": "red",
    "approval": "magenta",
    "identity": "magenta",
    "llm": "magenta",
}
# verdict actions that stopped something, in bold; the others (allow, audit, resume) plain
STOPPING = frozenset({"deny", "kill", "quarantine", "hold"})


_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c != 0x09}


def visible(text: str) -> str:
    """Control characters (C0, DEL, C1) as \\xNN: an agent's argv, SQL, HTTP path or approval
    summary must not move the cursor, recolour or forge lines on the person's terminal."""
    return text.translate(_CONTROLS)


def use_colour(choice: str, stream_is_tty: bool) -> bool:
    """--color auto|always|never; auto honours NO_COLOR (https://no-color.org) and a terminal."""
    if choice == "always":
        return True
    if choice == "never":
        return False
    return stream_is_tty and not os.environ.get("NO_COLOR")


def _when(ts: str) -> datetime | None:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")[:26] + "+00:00"
                                      if "." in ts else ts.replace("Z", "+00:00")).astimezone()
    except ValueError:
        return None


def spans_days(events: list[dict[str, Any]]) -> bool:
    """Whether the events' local dates differ from each other or from today (then lines carry dates)."""
    days = {d.date() for d in (_when(ev.get("ts", "")) for ev in events) if d is not None}
    return len(days | {datetime.now().astimezone().date()}) > 1


def _local_time(ts: str, with_date: bool = False) -> str:
    dt = _when(ts)
    if dt is None:
        return ts[11:23]
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f" if with_date else "%H:%M:%S.%f")[:-3]


def _dest(net: dict[str, Any]) -> str:
    if net.get("path"):
        return str(net["path"])
    ip = str(net.get("dst_ip") or "")
    if not ip:
        return "?"
    return f"[{ip}]:{net.get('dst_port', 0)}" if ":" in ip else f"{ip}:{net.get('dst_port', 0)}"


def _net(net: dict[str, Any]) -> str:
    arrow = {"accept": "<-", "sendto": "=>"}.get(net.get("direction", "connect"), "->")
    extra = [x for x in (net.get("transport"), net.get("protocol")) if x]
    if net.get("tls"):
        extra.append("tls" + (f" sni={net['sni']}" if net.get("sni") else ""))
    return f"{arrow} {_dest(net)}" + (f" ({', '.join(extra)})" if extra else "")


def _sql(sql: dict[str, Any]) -> str:
    if sql.get("encrypted"):
        return f"{sql.get('command') or 'TLS'}: statements unreadable" + (
            f" [db {sql['database']}]" if sql.get("database") else "")
    who = "@".join(x for x in (sql.get("db_user"), sql.get("database")) if x)
    text = " ".join((sql.get("query") or "").split())
    out = (f"[{who}] " if who else "") + (text or sql.get("command") or "?")
    if sql.get("sqlstate") or sql.get("error"):
        out += f"  -> ERROR {sql.get('sqlstate', '')} {sql.get('error', '')}".rstrip()
    elif sql.get("tag"):
        out += f"  -> {sql['tag']}"
    if sql.get("duration_ms") is not None:
        out += f" ({sql['duration_ms']:.1f} ms)"
    return out


def _http(http: dict[str, Any]) -> str:
    target = (f"{http.get('scheme', 'http')}://{http.get('host') or '?'}{http.get('path') or '/'}"
              + (f"?{http['query']}" if http.get("query") else ""))
    out = f"{http.get('method') or '?'} {target}"
    if http.get("version") == "2":
        out += " HTTP/2"
    status = http.get("status")
    out += f"  -> {status}" if status is not None else "  -> no response"
    if http.get("upgrade"):
        out += f" (upgrade to {http['upgrade']})"
    if http.get("duration_ms") is not None:
        out += f" ({http['duration_ms']:.1f} ms)"
    return out


def _llm(call: dict[str, Any]) -> str:
    """An LLM call: model, the prompt's start, the tool calls it asked for, the token counts."""
    prompt = (call.get("prompt") or "").replace("\n", " ")
    out = f"{call.get('provider') or '?'} {call.get('model') or '?'}"
    out += f' "{prompt[:60]}{"..." if len(prompt) > 60 else ""}"' if prompt else " (prompt hashed)"
    for tc in call.get("tool_calls") or []:
        out += f"  -> {tc.get('name') or '?'}({(tc.get('arguments') or '')[:80]})"
    if not call.get("tool_calls") and call.get("stop_reason"):
        out += f"  -> {call['stop_reason']}"
    if call.get("input_tokens") is not None or call.get("output_tokens") is not None:
        out += f" [{call.get('input_tokens')}/{call.get('output_tokens')} tokens]"
    if call.get("complete") is False:
        out += " [reply cut]"
    return out


def _subject(ev: dict[str, Any]) -> str:
    """What a verdict or approval was about: the statement, request, destination or command."""
    if ev.get("sql"):
        return _sql(ev["sql"])
    if ev.get("http"):
        return _http(ev["http"])
    if ev.get("net"):
        return _net(ev["net"])
    return _cmd(ev)


def _cmd(ev: dict[str, Any]) -> str:
    proc = ev.get("process") or {}
    argv = proc.get("argv") or []
    return shlex.join(argv) if argv else proc.get("exe", "")


def detail(ev: dict[str, Any]) -> str:
    kind = ev.get("kind")
    ex = ev.get("exec") or {}
    cmd = _cmd(ev)
    if kind == "exec":
        if ex.get("errno") is not None:
            return f"{cmd}  [exec failed: errno {ex['errno']}]"
        return cmd + ("  [argv truncated]" if ex.get("argv_truncated") else "")
    if kind == "exit":
        how = f"signal {ex['signal']}" if ex.get("signal") else f"exit {ex.get('exit_code')}"
        dur = f" after {ex['duration_ms']:.1f} ms" if ex.get("duration_ms") is not None else ""
        return f"{how}{dur}  {cmd}"
    if kind == "session_start":
        ident = ev.get("identity") or {}
        login = f" (login {ident['login_user']})" if ident.get("login_user") else ""
        verified = (f" as {ident.get('email') or ident.get('sub')} (verified)" if ident.get("verified")
                    else " (unverified)")
        pod = ev.get("k8s") or {}
        where = f" in pod {pod.get('namespace')}/{pod.get('pod')}" if pod.get("pod") else ""
        return f"session {ev.get('session_id')} started{login}{verified}{where}: {cmd}"
    if kind == "identity":
        b = ev.get("binding") or {}
        who = b.get("email") or b.get("sub") or f"uid {b.get('uid')}"
        state = b.get("state") or "?"
        if state == "refused":
            return f"login refused for uid {b.get('uid')}: {b.get('reason')}"
        groups = ", ".join(b.get("groups") or []) or ("unknown" if b.get("groups_unknown") else "none")
        tail = f" by {b['reason']}" if state == "bound" and b.get("reason") else ""
        until = f" until {b['expires']}" if state == "bound" and b.get("expires") else ""
        return f"{who} {state.replace('_', ' ')} for uid {b.get('uid')}{tail} (groups {groups}){until}"
    if kind == "session_end":
        return f"session {ev.get('session_id')} ended"
    if kind == "lost":
        lost = ev.get("lost") or {}
        return f"{lost.get('count')} events lost: {lost.get('reason')}"
    if kind == "connect":
        return _net(ev.get("net") or {}) + f"  {cmd}"
    if kind == "tls":
        net = ev.get("net") or {}
        return f"TLS -> {_dest(net)}" + (f" sni={net['sni']}" if net.get("sni") else "") + f"  {cmd}"
    if kind == "sql":
        return _sql(ev.get("sql") or {})
    if kind == "http":
        return _http(ev.get("http") or {})
    if kind == "llm":
        return _llm(ev.get("llm") or {})
    if kind == "verdict":
        v = ev.get("verdict") or {}
        how = v.get("mechanism") or "?"
        when = "prevented" if v.get("prevented") else "after the fact"
        approval = f", request {v['approval_id']}" if v.get("approval_id") else ""
        return (f"{(v.get('action') or '?').upper()} by rule {v.get('rule') or '?'} "
                f"[{v.get('subject') or '?'}; {how}; {when}{approval}]: {_subject(ev)}")
    if kind == "approval":
        a = ev.get("approval") or {}
        state = a.get("state") or "?"
        out = (f"request {a.get('id') or '?'} {state}: {a.get('summary') or _subject(ev)} "
               f"(rule {a.get('rule') or '?'}")
        if a.get("decided_by"):
            out += f"; {state} by {a['decided_by']}" + (f" via {a['auth']}" if a.get("auth") else "")
        elif state == "pending":
            out += "; approvers " + (", ".join(a.get("approvers") or []) or "none")
            if a.get("expires"):
                out += f"; expires {a['expires']}"
        if a.get("approved_for_s"):
            out += f"; for {a['approved_for_s']} s"
        return out + ")"
    return cmd


def line(ev: dict[str, Any], colour: bool = True, with_date: bool = False) -> str:
    ident = ev.get("identity") or {}
    user = ident.get("user") or "-"
    if ident.get("login_user") and ident.get("login_user") != user:
        user = f"{ident['login_user']}>{user}"
    proc = ev.get("process") or {}
    kind = ev.get("kind", "?")
    cols = [
        _local_time(ev.get("ts", ""), with_date),
        f"{user:<14.14}",
        f"{(ev.get('agent') or '-'):<10.10}",
        f"{proc.get('pid', 0):>7}",
        f"{kind:<13}",
    ]
    text = visible(detail(ev))
    cause = ev.get("cause") or {}
    if cause.get("tool_call_id"):    # which tool call of which LLM reply asked for it
        text += f"  <- tool call {visible(str(cause['tool_call_id']))}"
    cols[1], cols[2] = visible(cols[1]), visible(cols[2])
    if colour:
        cols[0] = click.style(cols[0], dim=True)
        action = (ev.get("verdict") or {}).get("action", "")
        loud = kind in ("lost", "session_start") or (kind == "verdict" and action in STOPPING)
        fg = KIND_COLOURS.get(kind) if kind != "verdict" or action in STOPPING else None
        cols[4] = click.style(cols[4], fg=fg, bold=loud)
        if kind == "verdict" and action in STOPPING:
            text = click.style(text, fg="red")
    return " ".join(cols) + " " + text


def _pruned(value: Any) -> Any:
    if isinstance(value, dict):
        out = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if not (v is None or v is False or v in ("", [], {}))}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def compact(ev: dict[str, Any]) -> str:
    """The event as JSON without its empty fields (no nulls, empty strings, lists or false flags)."""
    return json.dumps(_pruned(ev), ensure_ascii=False, separators=(",", ":"))

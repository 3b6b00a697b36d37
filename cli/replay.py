"""`agentwarden replay SESSION`: what an agent did, as a timeline an auditor reads top to bottom.

Sans-IO: event dicts (the public JSON contract) in, lines out.  A header (the person, agent,
host, time range, counts and the chain's status), then every event at its offset from the
session's start, indented by its process's depth in the session's process tree: commands with
their exit status and duration (read ahead from their `exit`), SQL with its rows or error, HTTP
with its status, each verdict and approval inline with its rule and who decided.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import click
from agentwarden.cli import render
from agentwarden.core.events import parse_ts


def _ns(ts: str) -> int:
    try:
        return parse_ts(ts)
    except ValueError:
        return 0


def _depths(events: list[dict[str, Any]]) -> dict[int, int]:
    """pid -> depth in the session's tree (the root 0), from the processes' parents."""
    parent: dict[int, int] = {}
    for ev in events:
        p = ev.get("process") or {}
        if p.get("pid"):
            parent.setdefault(int(p["pid"]), int(p.get("ppid") or 0))
    depth: dict[int, int] = {}

    def of(pid: int, hops: int = 0) -> int:
        if pid in depth:
            return depth[pid]
        up = parent.get(pid)
        d = 0 if up is None or up not in parent or hops > 64 else of(up, hops + 1) + 1
        depth[pid] = d
        return d
    for pid in parent:
        of(pid)
    return depth


def _exits(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """An exec's event id -> the exit that ended what it ran (the next exit of the same pid)."""
    out: dict[str, dict[str, Any]] = {}
    running: dict[int, str] = {}
    for ev in events:
        pid = int((ev.get("process") or {}).get("pid") or 0)
        if ev.get("kind") in ("exec", "session_start") and not (ev.get("exec") or {}).get("errno"):
            running[pid] = ev.get("event_id", "")
        elif ev.get("kind") in ("exit", "session_end") and pid in running:
            out[running.pop(pid)] = ev
    return out


def _ended(ex: dict[str, Any] | None) -> str:
    if ex is None:
        return "  (still running, or its end not recorded)"
    e = ex.get("exec") or {}
    how = f"signal {e['signal']}" if e.get("signal") else f"exit {e.get('exit_code')}"
    dur = f", {e['duration_ms']:.1f} ms" if e.get("duration_ms") is not None else ""
    return f"  [{how}{dur}]"


def chain_status(events: list[dict[str, Any]]) -> str:
    """Each event against its recorded hash (the session's part of the chain; `agentwarden verify`
    checks the whole chain, its links and its signatures)."""
    from agentwarden.core.events import Event
    from agentwarden.daemon import chain

    chained = [e for e in events if e.get("chain")]
    if not chained:
        return "not chained (recorded before the chain, or chain.enabled is false)"
    bad = []
    for d in chained:
        c = d["chain"]
        if chain.link(c["prev_hash"], chain.event_values(Event.from_dict(d))) != c["hash"]:
            bad.append(c["seq"])
    seqs = sorted(int(e["chain"]["seq"]) for e in chained)
    head = f"{len(chained)} events, seq {seqs[0]}-{seqs[-1]}"
    if bad:
        return f"{head}: {len(bad)} do NOT hash to their record (first seq {min(bad)}): run verify"
    return f"{head}, each hashes to its record (agentwarden verify checks the links and signatures)"


def header(events: list[dict[str, Any]], colour: bool = False) -> list[str]:
    if not events:
        return ["no events for this session"]
    first = events[0]
    ident = first.get("identity") or {}
    person = ident.get("login_user") or ident.get("user") or "?"
    who = f"{person} (uid {ident.get('uid')}"
    if ident.get("user") and ident.get("login_user") and ident["user"] != ident["login_user"]:
        who += f", running as {ident['user']}"
    if ident.get("verified"):
        groups = ", ".join(ident.get("groups") or []) or ("unknown" if ident.get("groups_unknown")
                                                          else "none")
        email = ident.get("email") or ident.get("sub")
        who += f"; verified {email} from {ident.get('issuer')}, groups {groups}"
    else:
        who += "; not verified"
    who += ")"
    pod = first.get("k8s") or {}
    start = render._local_time(first.get("ts", ""), True)
    end = render._local_time(events[-1].get("ts", ""), True)
    span = (_ns(events[-1].get("ts", "")) - _ns(first.get("ts", ""))) / 1e9
    counts = Counter(e.get("kind") for e in events)
    lines = [
        f"session {first.get('session_id')}  agent {first.get('agent')}  host {first.get('host')}",
        f"person  {who}" + (f"  tty {ident['tty']}" if ident.get("tty") else ""),
    ]
    if pod.get("pod"):
        lines.append(f"pod     {pod.get('namespace')}/{pod.get('pod')} container {pod.get('container')} "
                     f"image {pod.get('image')} service account {pod.get('service_account')}")
    lines += [
        f"time    {start} to {end} ({span:.1f} s)",
        "events  " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) + f" ({len(events)} in all)",
        f"chain   {chain_status(events)}",
        "",
    ]
    return [render.visible(x) for x in lines]


def body(events: list[dict[str, Any]], colour: bool = False) -> Iterator[tuple[int, str]]:
    """(ns since the session's start, line) for each event worth a line; exits fold into their exec."""
    if not events:
        return
    t0 = _ns(events[0].get("ts", ""))
    depth = _depths(events)
    exits = _exits(events)
    folded = {id(x) for x in exits.values()}
    for ev in events:
        if id(ev) in folded:
            continue
        kind = ev.get("kind", "")
        pid = int((ev.get("process") or {}).get("pid") or 0)
        off = _ns(ev.get("ts", "")) - t0
        pad = "  " * depth.get(pid, 0)
        argv = (ev.get("process") or {}).get("argv") or []
        cmd = shlex.join(argv) if argv else (ev.get("process") or {}).get("exe", "")
        if kind in ("exec", "session_start"):
            ex = ev.get("exec") or {}
            if ex.get("errno") is not None:
                text = f"x {cmd}  [exec failed: errno {ex['errno']}]"
            else:
                text = f"> {cmd}{_ended(exits.get(ev.get('event_id', '')))}"
        elif kind in ("exit", "session_end"):
            text = render.detail(ev)
        elif kind == "verdict":
            v = ev.get("verdict") or {}
            text = "!! " + render.detail(ev)
            if colour and v.get("action") in render.STOPPING:
                text = click.style(text, fg="red", bold=True)
        elif kind == "approval":
            text = "?? " + render.detail(ev)
        else:
            text = f"{kind}: {render.detail(ev)}"
        yield off, f"{_offset(off)} {pad}{render.visible(text) if not colour else text}"


def _offset(ns: int) -> str:
    s = ns / 1e9
    return f"+{s:9.3f}s" if s < 100_000 else f"+{int(s):>9d}s"


def timeline(events: list[dict[str, Any]], colour: bool = False) -> list[str]:
    return header(events, colour) + [line for _, line in body(events, colour)]


def keep(events: Iterable[dict[str, Any]], kinds: tuple[str, ...] = (), verdict: str = "",
         pid: int = 0) -> list[dict[str, Any]]:
    out = []
    for ev in events:
        if kinds and ev.get("kind") not in kinds:
            continue
        if verdict and (ev.get("verdict") or {}).get("action") != verdict:
            continue
        if pid and int((ev.get("process") or {}).get("pid") or 0) != pid:
            continue
        out.append(ev)
    return out


def pacing(offsets: list[int], speed: float, max_idle_s: float) -> list[float]:
    """Seconds to wait before each line when played: the real gaps, divided by speed, none longer
    than max_idle_s."""
    waits, last = [], offsets[0] if offsets else 0
    for off in offsets:
        waits.append(min(max(0, off - last) / 1e9 / speed, max_idle_s))
        last = off
    return waits


# ---- the session in other formats (agentwarden export SESSION --format ...) ------------------


def asciicast(events: list[dict[str, Any]], width: int = 160, height: int = 48) -> Iterator[str]:
    """asciicast v2 (asciinema's format): the replay as terminal output at the events' real offsets,
    one JSON line each, so any asciinema player plays the session (idle gaps capped at 2 s by the
    player: `idle_time_limit`)."""
    first = events[0] if events else {}
    title = render.visible(f"agentwarden session {first.get('session_id', '')} on {first.get('host', '')}")
    yield json.dumps({"version": 2, "width": width, "height": height,
                      "timestamp": _ns(first.get("ts", "")) // 10**9, "idle_time_limit": 2.0, "title": title,
                      "env": {"TERM": "xterm-256color", "SHELL": "/bin/sh"}})
    for line in header(events):
        yield json.dumps([0.0, "o", line + "\r\n"], ensure_ascii=False)
    for off, line in body(events):
        yield json.dumps([round(off / 1e9, 6), "o", line + "\r\n"], ensure_ascii=False)


CSV_COLUMNS = ("ts", "seq", "kind", "pid", "ppid", "user", "command", "detail", "action", "rule",
               "event_id")


def _cell(value: Any) -> str:
    """A spreadsheet runs a cell that starts with = + - @ (or a tab or CR before one) as a formula:
    an agent's argv must not become one (CSV injection), so such a cell gets a leading '.  Control
    characters are shown as \\xNN, as on a terminal (`cat` of the file must not run escapes)."""
    text = render.visible("" if value is None else str(value))
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def csv_rows(events: list[dict[str, Any]]) -> Iterator[list[str]]:
    """One row per event, the columns above (a header first), for a spreadsheet."""
    yield list(CSV_COLUMNS)
    for ev in events:
        p = ev.get("process") or {}
        v = ev.get("verdict") or {}
        argv = p.get("argv") or []
        yield [_cell(x) for x in (
            ev.get("ts", ""), (ev.get("chain") or {}).get("seq", ""), ev.get("kind", ""), p.get("pid", ""),
            p.get("ppid", ""), (ev.get("identity") or {}).get("user", ""),
            shlex.join(argv) if argv else p.get("exe", ""), render.detail(ev), v.get("action", ""),
            v.get("rule", ""), ev.get("event_id", ""))]

"""Human rendering of events: one aligned, coloured line each."""

from __future__ import annotations

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
}


def _local_time(ts: str) -> str:
    try:
        dt = datetime.fromisoformat(ts.replace("Z", "+00:00")[:26] + "+00:00"
                                    if "." in ts else ts.replace("Z", "+00:00"))
    except ValueError:
        return ts[11:23]
    return dt.astimezone().strftime("%H:%M:%S.%f")[:-3]


def detail(ev: dict[str, Any]) -> str:
    kind = ev.get("kind")
    proc = ev.get("process") or {}
    ex = ev.get("exec") or {}
    argv = proc.get("argv") or []
    cmd = shlex.join(argv) if argv else proc.get("exe", "")
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
        return f"session {ev.get('session_id')} started{login}: {cmd}"
    if kind == "session_end":
        return f"session {ev.get('session_id')} ended"
    if kind == "lost":
        lost = ev.get("lost") or {}
        return f"{lost.get('count')} events lost: {lost.get('reason')}"
    return cmd


def line(ev: dict[str, Any], colour: bool = True) -> str:
    ident = ev.get("identity") or {}
    user = ident.get("user") or "-"
    if ident.get("login_user") and ident.get("login_user") != user:
        user = f"{ident['login_user']}>{user}"
    proc = ev.get("process") or {}
    kind = ev.get("kind", "?")
    cols = [
        _local_time(ev.get("ts", "")),
        f"{user:<14.14}",
        f"{(ev.get('agent') or '-'):<10.10}",
        f"{proc.get('pid', 0):>7}",
        f"{kind:<13}",
    ]
    if colour:
        cols[0] = click.style(cols[0], dim=True)
        cols[4] = click.style(cols[4], fg=KIND_COLOURS.get(kind), bold=kind in ("lost", "session_start"))
    return " ".join(cols) + " " + detail(ev)

"""From prompt to command: which tool call of an LLM reply asked for an exec, a statement or a request.

A pipeline stage, before the enforcer (so that policy can match on `cause`) and before masking (so
that the texts compared are the ones sent and run).  Per session it keeps the tool calls of the
session's recent `llm` events, and gives an event of the same session `cause{llm_event_id,
tool_call_id, tool, match}` by this rule, documented in the README ("From prompt to command"):

- a tool call's texts are the string values of its arguments (`{"command": "ls -la"}` gives
  "ls -la"), or the arguments themselves when they are not JSON;
- an event of a process that carries a cause, or whose parent does, has that cause (a command the
  shell ran for the tool call, the statement psql sent for it; a process carries its cause through
  forks): `match` is "parent" ("command" when its text is that tool call's too).  First, so that a
  tool call's process tree cannot take another tool call's cause by what it spells (red team);
- otherwise an `exec` matches when what it ran is one of those texts, after trimming: its `-c`
  script when it is a shell (`sh`, `bash`, `dash`, `zsh`, `ksh` with `-c` in its flags), else its
  argv joined by blanks.  The latest tool call that matches wins; `match` is "command";
- a `sql` event matches on its statement text the same way;
- otherwise an exec whose script contains a tool call's text of 8 characters or more with a blank
  in it, as a whole (an agent's wrapper: `cd /repo && <command>`, `eval '<command>'`, its `'\''`
  quoting undone), matches that tool call, `match` "command".  After inheritance, so that a text
  inside another tool call's command does not take that command's cause (red team);
- only tool calls of the last WINDOW_S seconds are tried, and nothing else (no host, no time of day)
  makes a match.  An event no tool call asked for has no `cause`;
- the tool calls of an `llm` event made by a process that itself has a cause (a command a tool call
  started, answering its own "LLM" call) are not tried.  Lineage is attribution, not authorization:
  the agent's own process can still call a model of its choosing.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from agentwarden.core.events import CauseInfo, Event

WINDOW_S = 600                 # a tool call older than this causes nothing more
MAX_CALLS = 256                # tool calls kept per session
MIN_CONTAINED = 8              # a text found inside a longer script must be at least this long
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash"})


@dataclass(frozen=True)
class _Asked:
    ts_ns: int
    cause: CauseInfo
    texts: tuple[str, ...]


def texts_of(arguments: str) -> tuple[str, ...]:
    """The strings a tool call's arguments carry (every string value, nested ones too)."""
    try:
        value: Any = json.loads(arguments)
    except (ValueError, RecursionError):
        return (_norm(arguments),) if _norm(arguments) else ()
    out: list[str] = []
    stack = [value]
    while stack and len(out) < 64:
        v = stack.pop()
        if isinstance(v, str):
            if _norm(v):
                out.append(_norm(v))
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return tuple(out)


def _norm(text: str) -> str:
    # an agent's `eval '...'` wrapper quotes the command's own single quotes as '\''
    return text.replace("'\\''", "'").strip().rstrip(";").strip()


def command_text(argv: list[str]) -> str:
    """What an exec ran, as a tool call would spell it: a shell's `-c` script (the first operand after
    the flags: `zsh -c -l SCRIPT` too), else its argv."""
    if argv and os.path.basename(argv[0]) in _SHELLS:
        command = False
        for arg in argv[1:]:
            if arg.startswith("-") and arg not in ("-", "--"):
                command = command or (not arg.startswith("--") and "c" in arg[1:])
                continue
            if arg == "--":
                continue
            if command:
                return _norm(arg)
            break
    return _norm(" ".join(argv))


class Lineage:
    def __init__(self) -> None:
        self._asked: dict[str, deque[_Asked]] = {}
        # pid -> (session id, the cause its process carries): set at an exec a tool call caused, and
        # passed on at each fork (forked), so a process that forks without exec, or whose parent
        # exits, keeps it (red team: a tool call's process forked twice and answered its own "LLM"
        # call from the grandchild, which looked uncaused)
        self._procs: dict[int, tuple[str, CauseInfo]] = {}

    def stage(self, ev: Event) -> Event:
        sid = ev.session_id
        if not sid:
            return ev
        if ev.kind == "llm" and ev.llm is not None and not self._caused(sid, ev):
            # not from a process a tool call started (red team: a postinstall script answering its own
            # "LLM" call with a tool call that names the next command, to point its cause elsewhere)
            asked = self._asked.setdefault(sid, deque(maxlen=MAX_CALLS))
            for tc in ev.llm.tool_calls:
                texts = texts_of(tc.get("arguments", ""))
                if texts:
                    asked.append(_Asked(ev.ts_ns, CauseInfo(ev.event_id, tc.get("id", ""), tc.get("name", ""),
                                                            "command", ev.llm.model, ev.llm.provider), texts))
        elif ev.kind == "session_end":
            self._asked.pop(sid, None)
            for pid in [p for p, (s, _) in self._procs.items() if s == sid]:
                del self._procs[pid]
            return ev
        elif ev.kind == "exit":
            self._procs.pop(ev.process.pid, None)
            return ev
        cause = self.cause_of(ev)
        if cause is not None:
            ev.cause = cause
            if ev.kind == "exec":
                self._procs[ev.process.pid] = (sid, cause)
        return ev

    def forked(self, parent: int, child: int) -> None:
        """A fork record (daemon/pipeline.py): the child carries its parent's cause."""
        carried = self._procs.get(parent)
        if carried is not None:
            self._procs[child] = carried

    def _inherited(self, sid: str, ev: Event) -> CauseInfo | None:
        for pid in (ev.process.pid, ev.process.ppid):
            carried = self._procs.get(pid)
            if carried is not None and carried[0] == sid:
                return carried[1]
        return None

    def cause_of(self, ev: Event) -> CauseInfo | None:
        """The cause this event gets by the rule above, from what the stage has seen so far; the
        enforcer asks it of an exec the kernel stopped before the exec's own event is read.  The
        cause its process or parent carries first: what a tool call's process tree runs stays that
        tool call's, whatever text it spells (red team: a cheap model's `bash -c 'rm -rf /x # git
        status --short'` took another model's cause by containing its text, and a script named
        `git` run as `git status --short` by matching it exactly).  Then a tool call's exact text,
        then one found inside a longer script."""
        sid = ev.session_id
        if not sid:
            return None
        text = ""
        if ev.kind == "exec" and (ev.exec is None or ev.exec.errno is None):
            text = command_text(ev.process.argv)
        elif ev.kind == "sql" and ev.sql is not None:
            text = _norm(ev.sql.query)
        exact, contained = self._match(sid, text, ev.ts_ns) if text else (None, None)
        inherited = self._inherited(sid, ev) if ev.kind in ("exec", "sql", "http", "llm", "connect") else None
        if inherited is not None:   # a tool call's process tree keeps its cause, whatever it runs
            same = exact is not None and (exact.llm_event_id, exact.tool_call_id) == (
                inherited.llm_event_id, inherited.tool_call_id)
            return exact if same else replace(inherited, match="parent")
        return exact if exact is not None else contained

    def _caused(self, sid: str, ev: Event) -> bool:
        return self._inherited(sid, ev) is not None

    def _match(self, sid: str, text: str, ts_ns: int) -> tuple[CauseInfo | None, CauseInfo | None]:
        """(the latest tool call whose text is this one, the latest one whose text it contains)."""
        asked = self._asked.get(sid)
        if not asked:
            return None, None
        oldest = ts_ns - WINDOW_S * 1_000_000_000
        contained: CauseInfo | None = None
        for a in reversed(asked):
            if a.ts_ns < oldest:
                break
            if text in a.texts:
                return a.cause, None
            # a command line inside a longer script: one with a blank in it, so that a bare path or
            # word a tool call named (a file it read) does not claim every exec that mentions it
            if contained is None and any(len(t) >= MIN_CONTAINED and " " in t and t in text for t in a.texts):
                contained = a.cause
        return None, contained

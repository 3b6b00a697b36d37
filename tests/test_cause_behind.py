"""An exec decided while the capture is behind has an unknown cause, even when a cause is found.

Red team 31, on the first version, which gave the unknown cause only when none was found: with the
capture over DEFER_S behind, the tool call that asked for the exec (a cheap model's) was unread,
an older tool call of another model with the same command text (read earlier, within
lineage.WINDOW_S) was found instead, and a deny on the cheap model failed open."""

from __future__ import annotations

import json
import signal
import time

import pytest
from agentwarden.core.events import Event, LlmInfo
from agentwarden.daemon.lineage import Lineage, command_text
from test_enforcer_unit import ON_CAUSE, World, _stopped_exec


def test_a_stale_same_text_tool_call_of_another_model_is_taken_for_the_unread_cause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agentwarden.enforce import enforcer as enf_mod

    w = World(policy=ON_CAUSE)
    lineage = Lineage()
    seen: list[str] = []

    def cause_of(ev: Event):  # type: ignore[no-untyped-def]
        seen.append(command_text(ev.process.argv))
        return lineage.cause_of(ev)

    w.enforcer.cause_of = cause_of
    # learn the command text the enforcer derives for this stopped exec (the test process's argv)
    w.on_guard(_stopped_exec(w))
    for _ in range(3):
        time.sleep(0.003)
        w.made += w.enforcer.retry_deferred()
    assert seen, "cause_of was not asked"
    text = seen[-1]
    w.verdicts()
    # minutes ago, read: the expensive model asked for this very command
    old = Event(kind="llm", ts_ns=time.time_ns() - 60 * 10**9, host="unit-host", session_id=w.session.id,
                event_id="llm-old", llm=LlmInfo(provider="anthropic", model="big-model", tool_calls=[
                    {"id": "toolu_old", "name": "bash", "arguments": json.dumps({"command": text})}]))
    lineage.stage(old)
    # now: the cheap model asks for it again; its reply is still in the ring (capture > DEFER_S behind)
    monkeypatch.setattr(enf_mod, "DEFER_S", 0.0)
    w.effects.calls.clear()
    w.on_guard(_stopped_exec(w))
    w.made += w.enforcer.retry_deferred()           # past the deadline, the ring not read again
    signals = w.effects.of("signal")
    verdicts = w.verdicts()
    print("\nRT31 stale cause:", signals, [(v.verdict.action, v.verdict.rule, v.verdict.mechanism) for v in verdicts])
    assert signals == [(w.pid, signal.SIGKILL)], (
        f"FAIL OPEN: decided past the deadline with the ring unread, the exec took an older tool call's cause "
        f"(big-model) and ran: {signals}")

"""The store is down when the daemon starts: events spool to disk, survive a
restart, and reach the store exactly once when it is back."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

from conftest import Daemon, make_agent, wait_for


def test_store_down_at_start_then_up_loses_nothing(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "bin", "aw-outage-agent")
    store_path = tmp_path / "store"
    store_path.write_text("not a ClickHouse directory: the embedded engine cannot open this")
    d = Daemon(tmp_path, [{"name": "outage", "match": {"comm": ["aw-outage-agent"]}}], store_path)
    d.start()
    try:
        script = "for i in $(seq 1 40); do /bin/echo outage-$i; done; /bin/true end"
        proc = subprocess.run([str(agent), "-c", script], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0
        # session_start, seq, 40 echos, true: 43 exec-ish events at least
        wait_for(lambda: d.request("status")["store"]["spooled"] >= 43,
                 what="events spooled while the store is down")
        # queries say the store is unavailable, they do not hang or crash the daemon
        res = d.cli("query", "--json")
        assert res.returncode == 1 and "unavailable" in res.stderr
    finally:
        d.stop()
    assert list((tmp_path / "spool").glob("*.jsonl")), "spool must survive the daemon's exit"

    store_path.unlink()   # the store comes back
    d.start()
    try:
        def all_there() -> list[dict[str, object]] | None:
            try:
                evs = d.events(kinds=["exec", "session_start", "session_end", "exit"])
            except Exception:
                return None
            return evs if any(e["kind"] == "session_end" for e in evs) else None

        events = wait_for(all_there, timeout=60, what="spooled events in the store")
        execs = Counter(tuple(e["process"]["argv"]) for e in events if e["kind"] == "exec")  # type: ignore[index]
        assert execs == Counter({**{("/bin/echo", f"outage-{i}"): 1 for i in range(1, 41)},
                                 ("seq", "1", "40"): 1, ("/bin/true", "end"): 1})
        assert len({e["event_id"] for e in events}) == len(events)
        assert not list((tmp_path / "spool").glob("*.jsonl"))
        assert d.request("status")["store"]["replayed"] > 0
    finally:
        d.stop()

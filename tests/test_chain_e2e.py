"""The trail's chain end to end: a real daemon records more than 10,000 events of an agent,
`agentwarden verify` (through the daemon) finds the chain intact, across a clean restart and a
SIGKILL in the middle of a burst (declared, never silent); then, the daemon stopped, one field
changed in the table is found by `verify --direct` with the anchor file, naming its seq."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, make_agent, need_root, wait_for

COMM = "aw-chain-agent"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    need_root()
    root = tmp_path_factory.mktemp("chain")
    d = Daemon(root, [{"name": "chainagent", "match": {"comm": [COMM]}}])
    cfg = json.loads(d.config.read_text())
    cfg["export"] = [{"name": "siem-file", "type": "file", "format": "ocsf", "path": str(root / "siem.ndjson")}]
    cfg["export_state_dir"] = str(root / "export")
    d.config.write_text(json.dumps(cfg))
    d.start()
    yield d
    d.stop()


def verify(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentwarden.cli.main", "verify", "--json", *args,
                           "--config", str(d.config)], capture_output=True, text=True, timeout=300)


def burst(agent: Path, n: int) -> subprocess.Popen[str]:
    return subprocess.Popen([str(agent), "-c", f"for i in $(seq {n}); do /bin/true $i; /bin/false; done; "
                                               "echo done"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def stored(d: Daemon) -> int:
    return int(sum(d.request("count")["kinds"].values()))


def test_the_chain_of_a_real_run(daemon: Daemon, tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "bin", COMM)
    p = burst(agent, 2600)                          # exec and exit of 5,200 commands: >10k events
    assert "done" in p.communicate(timeout=300)[0]
    wait_for(lambda: stored(daemon) >= 10_000, 120, what="10,000 events stored")
    time.sleep(2)
    res = verify(daemon)
    rep = json.loads(res.stdout)
    assert res.returncode == 0 and rep["events"] >= 10_000 and not rep["tampered"], (res.stderr, rep)
    assert rep["checkpoints"] >= 10, rep           # one every 1000 events
    # the session as a timeline: its header checks each of its events against the chain
    sid = next(e["session_id"] for e in daemon.events(kinds=["session_start"]))
    out = subprocess.run([sys.executable, "-m", "agentwarden.cli.main", "replay", sid, "--color", "never",
                          "--config", str(daemon.config)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"session {sid}  agent chainagent") and "each hashes to its record" in lines[4], lines[:6]
    assert sum("> /bin/true" in x and "[exit 0" in x for x in lines) == 2600, lines[:20]
    assert sum("> /bin/false  [exit 1" in x for x in lines) == 2600

    # the SIEM file sink: every stored event, in seq order, as OCSF, and the checkpoints
    siem = Path(json.loads(daemon.config.read_text())["export"][0]["path"])

    def exported() -> list[dict[str, Any]]:
        return [json.loads(x) for x in siem.read_text().splitlines()] if siem.exists() else []
    wait_for(lambda: len([r for r in exported() if "class_uid" in r]) >= rep["events"], 120, what="the export")
    records = exported()
    seqs = [r["unmapped"]["chain"]["seq"] for r in records if "class_uid" in r]
    assert seqs[:rep["events"]] == list(range(1, rep["events"] + 1))
    assert any(r.get("kind") == "checkpoint" for r in records)
    assert {r["class_uid"] for r in records if "class_uid" in r} >= {1007}

    # a clean restart: the chain goes on
    daemon.stop(keep_pins=True)
    daemon.start()
    assert burst(agent, 50).communicate(timeout=60)[0]
    time.sleep(2)
    rep = json.loads(verify(daemon).stdout)
    assert not rep["tampered"] and rep["first_bad_seq"] is None, rep

    # SIGKILL in the middle of a burst: what was in flight is declared lost, or arrived (duplicates)
    p = burst(agent, 3000)
    time.sleep(1.5)
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait()
    p.communicate(timeout=120)
    daemon.stop(keep_pins=True)
    daemon.start()
    time.sleep(3)
    res = verify(daemon)
    rep = json.loads(res.stdout)
    assert res.returncode == 0 and not rep["tampered"], rep
    kinds = {f["kind"] for f in rep["findings"]}
    assert kinds <= {"declared_loss", "duplicate", "unsealed"}, rep["findings"]

    # the daemon stopped: one field changed in the table, found with its seq
    daemon.stop()
    store = json.loads(daemon.config.read_text())["store"]["dsn"][len("chdb://"):]
    subprocess.run([sys.executable, "-c",
                    "import clickhouse_connect, sys; c = clickhouse_connect.get_client(dsn='chdb://' + sys.argv[1]); "
                    "c.command(\"ALTER TABLE agentwarden.events UPDATE process_argv = ['/bin/true', 'nothing'] "
                    "WHERE chain_seq = 777\", settings={'mutations_sync': 2})", store], check=True, timeout=120)
    anchor = json.loads(daemon.config.read_text())["chain"]["anchor_file"]
    res = verify(daemon, "--direct", "--anchor", anchor)
    rep = json.loads(res.stdout)
    assert res.returncode == 1 and rep["tampered"] and rep["first_bad_seq"] == 777, (res.stderr, rep)
    assert [f["kind"] for f in rep["findings"] if f["severity"] == "tamper"] == ["modified"], rep["findings"]
    daemon.start()

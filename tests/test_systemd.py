"""The systemd unit: it verifies, its hardening keeps the daemon working, and the daemon speaks
the notify protocol the unit relies on (READY=1 only when agents are watched, watchdog pings
while it runs, STOPPING=1).  systemd is not PID 1 on the test machines, so the unit's
capability bounding set and no-new-privileges are applied with setpriv, as systemd would."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Daemon, make_agent, need_root, wait_for

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "agentwarden.service"
COMM = "aw-unit-agent"
POLICY = """version: 1
rules:
  - name: deny-the-marker
    when: {kind: exec, exec: {argv: ['aw-unit-denied']}}
    action: deny
"""


def unit_settings() -> dict[str, str]:
    return dict(re.findall(r"(?m)^([A-Za-z]+)=(.*)$", UNIT.read_text()))


def test_the_unit_verifies() -> None:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing (Debian: systemd)")
    res = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    s = unit_settings()
    assert s["Type"] == "notify" and int(s["WatchdogSec"]) > 0 and s["Restart"] == "always"
    assert s["StartLimitIntervalSec"] == "0"      # a crash loop never makes systemd give up


def _caps() -> str:
    caps = unit_settings()["CapabilityBoundingSet"].split()
    assert caps and all(c.startswith("CAP_") for c in caps)
    return "-all," + ",".join("+" + c[4:].lower() for c in caps)


def test_the_daemon_works_under_the_units_capabilities_and_notifies(tmp_path: Path) -> None:
    """Started as systemd starts it (the unit's bounding set, no new privileges, NOTIFY_SOCKET,
    WATCHDOG_USEC): READY=1 comes once the control socket answers, the kernel guards enforce,
    the watchdog is fed, and a clean stop says STOPPING=1."""
    need_root()
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(0.2)
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", [{"name": "unit", "match": {"comm": [COMM]}}], policy=POLICY,
               wrap=["setpriv", f"--bounding-set={_caps()}", "--no-new-privs", "--"],
               env={"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "2000000"})
    agent = make_agent(tmp_path / "bin", COMM)
    messages: list[str] = []

    def received() -> list[str]:
        try:
            while True:
                messages.append(listener.recv(4096).decode())
        except TimeoutError:
            return messages

    try:
        d.start()     # returns when the control socket answers
        wait_for(lambda: any("READY=1" in m for m in received()), 10, what="READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert f"MAINPID={d.proc.pid if d.proc else 0}" in ready and "STATUS=watching" in ready
        caps = Path(f"/proc/{d.proc.pid if d.proc else 0}/status").read_text()
        assert re.search(r"NoNewPrivs:\s+1", caps)
        target = tmp_path / "aw-unit-denied"
        res = subprocess.run([str(agent), "-c", f"touch {target}; echo rc=$?"], capture_output=True, text=True,
                             timeout=60)
        assert not target.exists() and "rc=0" not in res.stdout, res
        time.sleep(2.5)
        assert sum("WATCHDOG=1" in m for m in received()) >= 2     # every second at WATCHDOG_USEC=2 s
        assert d.request("status")["store"]["dsn_connected"]
    finally:
        d.stop()
        listener.settimeout(2)
        received()
        listener.close()
    assert any("STOPPING=1" in m for m in messages), messages
    assert "Traceback" not in d.log.read_text()

"""systemd's notify protocol (sd_notify(3)) with the standard library.

Under `Type=notify` the unit is started only when the daemon says READY=1: after the probes
are attached, the enforcer has re-adopted what an earlier daemon left, and the control socket
accepts (so `systemctl start` returning means agents are watched).  With `WatchdogSec=` the
main loop sends WATCHDOG=1 while it turns and the store writer lives; a daemon wedged in a
ring-buffer callback or a dead writer stops the pings and systemd restarts it.  Nothing is
sent without NOTIFY_SOCKET (started by hand, or by Kubernetes).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        # an abstract socket is written with a leading @
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # pinged at half the timeout, as sd_watchdog_enabled(3) advises
        self.watchdog_interval = int(usec) / 2e6 if watched else 0.0
        self._next_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), e)
            return False

    def ready(self, status: str) -> None:
        if self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}"):
            log.info("told systemd: ready")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self, healthy: bool) -> None:
        """From the main loop, every turn: a ping when one is due and the daemon is healthy."""
        if not self.watchdog_interval or not healthy:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval
            self.send("WATCHDOG=1")

"""Tell people about held operations: a Slack-compatible JSON POST per new request.

Never blocks the daemon: requests are queued and sent by one thread, retried
with exponential backoff on connection errors, 429 and 5xx.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request

from agentwarden.enforce.approvals import Request

log = logging.getLogger(__name__)


def message(req: Request, host: str = "") -> dict[str, str]:
    summary = req.summary if len(req.summary) <= 1500 else req.summary[:1500] + "…"
    expires = time.strftime("%H:%M:%S UTC", time.gmtime(req.expires))
    where = f" on {host}" if host else ""
    text = (f":warning: agentwarden{where}: {req.agent} agent of *{req.launcher}* wants to run a held "
            f"{req.kind} (rule `{req.rule}`), session {req.session_id}\n```{summary}```\n"
            f"Approvers: {', '.join(req.approvers)}. Expires {expires}; then it is denied.\n"
            f"Approve: `agentwarden approve {req.id}{' --code ' + req.code if req.code else ''}`   "
            f"Deny: `agentwarden deny {req.id}`")
    return {"text": text}


class Webhook:
    def __init__(self, url: str, *, timeout_s: float = 5, retries: int = 5, backoff_s: float = 1.0,
                 host: str = "") -> None:
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.host = host
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=1000)
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def notify(self, req: Request) -> None:
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            self.failed += 1
            log.warning("webhook queue full: request %s not announced", req.id)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            req = self._queue.get()
            if req is None:
                return
            self._send(req)

    def _send(self, req: Request) -> None:
        body = json.dumps(message(req, self.host)).encode()
        for attempt in range(self.retries):
            try:
                post = urllib.request.Request(self.url, data=body, method="POST",
                                              headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(post, timeout=self.timeout_s) as resp:
                    resp.read()
                self.sent += 1
                return
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    log.warning("webhook refused request %s: HTTP %d (not retried)", req.id, e.code)
                    break
                why = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                why = str(e)
            log.info("webhook attempt %d for %s failed (%s)", attempt + 1, req.id, why)
            time.sleep(self.backoff_s * 2 ** attempt)
        else:
            log.warning("webhook gave up on request %s after %d attempts", req.id, self.retries)
        self.failed += 1

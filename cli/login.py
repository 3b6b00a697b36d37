"""`agentwarden login`: the CLI's half of binding a person to their identity-provider login.

The CLI runs as the same user as the agent, so it proves nothing by itself: it asks the daemon
for a one-time nonce (the daemon refuses callers inside or beside an agent session), gets an
ID token from the provider carrying that nonce, and hands the daemon only the ID token, which
the daemon verifies (core/oidc.py).  Two flows, both for a public client (no secret):

- authorization code with PKCE (RFC 7636) through the browser, its redirect caught on a random
  loopback port (RFC 8252);
- the device authorization grant (RFC 8628) when there is no display, over SSH, or with
  `--device`: a code to enter on another device.

Access and refresh tokens are dropped: nothing but the ID token leaves this process, and
nothing is written to disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LoginError(RuntimeError):
    pass


def headless() -> bool:
    """No browser here: no display, or a remote shell."""
    return bool(os.environ.get("SSH_CONNECTION") or os.environ.get("SSH_TTY")) or not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.uname().sysname == "Darwin")


def _post(url: str, form: dict[str, str], timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    data = urllib.parse.urlencode(form).encode()
    headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:   # noqa: S310 (the provider's URL)
            return resp.status, json.loads(resp.read(1 << 20) or b"{}")
    except urllib.error.HTTPError as e:   # OAuth errors come back as 400 with a JSON body
        try:
            return e.code, json.loads(e.read(1 << 20) or b"{}")
        except ValueError:
            return e.code, {"error": f"HTTP {e.code}"}
    except (OSError, ValueError) as e:
        raise LoginError(f"cannot reach the identity provider at {url}: {e}") from None


def _id_token(body: dict[str, Any]) -> str:
    token = body.get("id_token")
    if not isinstance(token, str) or not token:
        raise LoginError("the provider answered without an ID token (is `openid` among the scopes?)")
    return token


def device_flow(provider: dict[str, Any], nonce: str, say: Callable[[str], None],
                timeout_s: float = 600.0) -> str:
    """RFC 8628: show a code to enter elsewhere, poll the token endpoint until the person did."""
    endpoint = provider.get("device_authorization_endpoint")
    if not endpoint:
        raise LoginError("the provider has no device authorization endpoint: log in with a browser, "
                         "or pass --id-token")
    status, dev = _post(endpoint, {"client_id": provider["client_id"], "scope": " ".join(provider["scopes"]),
                                   "nonce": nonce})
    if status != 200 or "device_code" not in dev:
        raise LoginError(f"device authorization refused: {dev.get('error_description') or dev.get('error')}")
    uri = dev.get("verification_uri_complete") or dev.get("verification_uri")
    say(f"To log in, open {uri} and enter the code {dev.get('user_code')}")
    interval = max(1.0, float(dev.get("interval") or 5))
    deadline = time.monotonic() + min(timeout_s, float(dev.get("expires_in") or timeout_s))
    while time.monotonic() < deadline:
        time.sleep(interval)
        status, body = _post(provider["token_endpoint"], {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": dev["device_code"], "client_id": provider["client_id"]})
        if status == 200:
            return _id_token(body)
        error = body.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        raise LoginError(f"login failed: {body.get('error_description') or error}")
    raise LoginError("the device code expired before the login was finished")


def code_flow(provider: dict[str, Any], nonce: str, say: Callable[[str], None], open_browser: bool = True,
              timeout_s: float = 300.0) -> str:
    """Authorization code with PKCE: the browser comes back to a one-shot loopback listener."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(24)
    got: dict[str, str] = {}
    done = threading.Event()

    class Callback(BaseHTTPRequestHandler):
        timeout = 5   # a local process that connects and says nothing must not hold the redirect up

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:   # noqa: N802
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(self.path).query))
            mine = query.get("state") == state   # not a page some other site sent here
            ok = mine and "code" in query
            if mine and ("code" in query or "error" in query):
                got.update(query)
                done.set()
            body = (b"agentwarden: logged in, you can close this tab" if ok else
                    b"agentwarden: this is not the login this terminal started")
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Callback)
    server.daemon_threads = True
    redirect = f"http://127.0.0.1:{server.server_address[1]}/callback"
    url = provider["authorization_endpoint"] + "?" + urllib.parse.urlencode({
        "response_type": "code", "client_id": provider["client_id"], "redirect_uri": redirect,
        "scope": " ".join(provider["scopes"]), "state": state, "nonce": nonce,
        "code_challenge": challenge, "code_challenge_method": "S256"})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        say(f"Opening the login page; if no browser opens, visit:\n{url}")
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        if not done.wait(timeout_s):
            raise LoginError("no login came back from the browser in time")
    finally:
        server.shutdown()
        server.server_close()
    if "error" in got:
        raise LoginError(f"login failed: {got.get('error_description') or got['error']}")
    status, body = _post(provider["token_endpoint"], {
        "grant_type": "authorization_code", "code": got["code"], "redirect_uri": redirect,
        "client_id": provider["client_id"], "code_verifier": verifier})
    if status != 200:
        raise LoginError(f"the code was refused: {body.get('error_description') or body.get('error')}")
    return _id_token(body)

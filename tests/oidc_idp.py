"""An OpenID Connect provider for the tests, on loopback: discovery, JWKS, the authorization
endpoint (it logs the configured person in at once and redirects), the token endpoint
(authorization code with PKCE S256, and the device grant), the device authorization
endpoint.  Tokens are signed with real RSA and EC keys (cryptography); `rotate()` replaces
the signing key and `jwks_fetches` counts how often the JWKS was read.

Nothing of agentwarden is imported: the daemon and the CLI talk to it over HTTP as they
would to Keycloak or Okta.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

CLIENT_ID = "agentwarden-cli"


@dataclass
class Key:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algo = jwt.algorithms.RSAAlgorithm if self.alg.startswith(("RS", "PS")) else jwt.algorithms.ECAlgorithm
        d: dict[str, Any] = json.loads(algo.to_jwk(self.private.public_key()))
        d.update(kid=self.kid, alg=self.alg, use="sig")
        return d


def new_key(alg: str = "RS256") -> Key:
    private: Any = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg.startswith(("RS", "PS"))
                    else ec.generate_private_key(ec.SECP256R1()))
    return Key(kid=secrets.token_hex(6), alg=alg, private=private)


@dataclass
class Person:
    sub: str
    email: str
    name: str = ""
    groups: list[str] = field(default_factory=list)
    email_verified: bool = True
    username: str = "alice"                  # preferred_username: the Unix user it may bind


class Provider:
    def __init__(self, person: Person | None = None, keys: list[Key] | None = None) -> None:
        self.person = person or Person(sub="u-123", email="alice@example.com", name="Alice",
                                       groups=["engineering", "db-approvers"])
        self.keys = keys or [new_key("RS256"), new_key("ES256")]
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.codes: dict[str, dict[str, Any]] = {}      # code -> the authorization request
        self.devices: dict[str, dict[str, Any]] = {}    # device_code -> request and state
        self.token_requests: list[dict[str, str]] = []
        self.extra_claims: dict[str, Any] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}/realms/test"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Provider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- tokens ---------------------------------------------------------------------

    def claims(self, **over: Any) -> dict[str, Any]:
        now = int(time.time())
        c: dict[str, Any] = {"iss": self.issuer, "sub": self.person.sub, "aud": CLIENT_ID, "azp": CLIENT_ID,
                             "iat": now, "exp": now + 300, "email": self.person.email,
                             "email_verified": self.person.email_verified, "name": self.person.name,
                             "groups": list(self.person.groups),
                             "preferred_username": self.person.username, **self.extra_claims}
        c.update(over)
        return {k: v for k, v in c.items() if v is not None}

    def mint(self, key: Key | None = None, headers: dict[str, Any] | None = None, **over: Any) -> str:
        key = key or self.keys[0]
        return jwt.encode(self.claims(**over), key.private, algorithm=key.alg,
                          headers={"kid": key.kid, **(headers or {})})

    def rotate(self, alg: str = "RS256") -> Key:
        """A new signing key replaces the first (published from the next JWKS fetch)."""
        self.keys[0] = new_key(alg)
        return self.keys[0]

    def approve_device(self, user_code: str) -> None:
        for d in self.devices.values():
            if d["user_code"] == user_code:
                d["approved"] = True
                return
        raise KeyError(user_code)

    # ---- HTTP -------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:   # noqa: N802
                url = urllib.parse.urlparse(self.path)
                base = urllib.parse.urlparse(idp.issuer).path
                if url.path == base + "/.well-known/openid-configuration":
                    idp.discovery_fetches += 1
                    root = idp.issuer
                    self._json(200, {"issuer": idp.issuer, "jwks_uri": root + "/certs",
                                     "authorization_endpoint": root + "/auth",
                                     "token_endpoint": root + "/token",
                                     "device_authorization_endpoint": root + "/device",
                                     "id_token_signing_alg_values_supported": ["RS256", "ES256"]})
                elif url.path == base + "/certs":
                    idp.jwks_fetches += 1
                    self._json(200, {"keys": [k.jwk() for k in idp.keys]})
                elif url.path == base + "/mint":
                    # for tests whose client runs in another process (another uid): a token as this
                    # provider would issue it after that person logged in, with their nonce
                    q = dict(urllib.parse.parse_qsl(url.query))
                    token = idp.mint(nonce=q.get("nonce"), preferred_username=q.get("u") or idp.person.username)
                    data = token.encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif url.path == base + "/auth":
                    q = dict(urllib.parse.parse_qsl(url.query))
                    if q.get("response_type") != "code" or q.get("client_id") != CLIENT_ID or \
                            q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
                        self._json(400, {"error": "invalid_request"})
                        return
                    code = secrets.token_urlsafe(16)
                    idp.codes[code] = q
                    target = q["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": q["state"]})
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:   # noqa: N802
                url = urllib.parse.urlparse(self.path)
                base = urllib.parse.urlparse(idp.issuer).path
                n = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(n).decode()))
                if url.path == base + "/device":
                    device_code = secrets.token_urlsafe(16)
                    user_code = secrets.token_hex(4).upper()
                    idp.devices[device_code] = {"user_code": user_code, "nonce": form.get("nonce"),
                                                "approved": False, "polls": 0}
                    self._json(200, {"device_code": device_code, "user_code": user_code,
                                     "verification_uri": idp.issuer + "/device-login",
                                     "verification_uri_complete": f"{idp.issuer}/device-login?code={user_code}",
                                     "expires_in": 600, "interval": 1})
                elif url.path == base + "/token":
                    idp.token_requests.append(form)
                    grant = form.get("grant_type")
                    if grant == "authorization_code":
                        q = idp.codes.pop(form.get("code", ""), None)
                        verifier = form.get("code_verifier", "")
                        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()) \
                            .rstrip(b"=").decode()
                        if q is None or q["code_challenge"] != challenge or \
                                q["redirect_uri"] != form.get("redirect_uri"):
                            self._json(400, {"error": "invalid_grant"})
                            return
                        self._json(200, {"id_token": idp.mint(nonce=q.get("nonce")), "access_token": "at",
                                         "refresh_token": "rt-secret", "token_type": "Bearer"})
                    elif grant == "urn:ietf:params:oauth:grant-type:device_code":
                        d = idp.devices.get(form.get("device_code", ""))
                        if d is None:
                            self._json(400, {"error": "expired_token"})
                        elif not d["approved"]:
                            d["polls"] += 1
                            self._json(400, {"error": "authorization_pending"})
                        else:
                            del idp.devices[form["device_code"]]
                            self._json(200, {"id_token": idp.mint(nonce=d["nonce"]), "access_token": "at",
                                             "token_type": "Bearer"})
                    else:
                        self._json(400, {"error": "unsupported_grant_type"})
                else:
                    self._json(404, {"error": "not_found"})

        return Handler

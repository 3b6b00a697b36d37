"""Verifying an OpenID Connect ID token: the daemon's half of `agentwarden login`.

The CLI runs as the same user as the agent, so nothing it says about a person is believed:
it fetches an ID token from the company's identity provider (authorization code with PKCE,
or the device grant) and hands the daemon only that token.  The daemon checks it here with
pyjwt against the provider's own keys:

- the signature, with a key from the provider's JWKS (its discovery document, a configured
  `jwks_uri`, or a local JWKS file for air-gapped sites), cached; an unknown `kid` refetches
  the set once (a provider rotated its keys), and at most every `REFETCH_MIN_S` (a stream of
  tokens with made-up kids must not turn the daemon into a fetch loop);
- the algorithm, against an explicit allow-list of public-key algorithms: `none` and HS*
  (an HMAC "signed" with the provider's public key, which anyone has) are never accepted,
  whatever the configuration says, and the key's type must be the algorithm's;
- `iss`, `aud` (the client id, or a configured audience), `azp` when present (and required
  when the token names several audiences), `exp`, `nbf` and `iat` with a bounded skew, and an
  upper bound on the token's age;
- the nonce, by the caller's check (core/identity.py Bindings: issued to this uid, once);
- `email_verified`, unless the site turns that off.

Every refusal is an `OidcError` whose `reason` is a short fixed code (for the audit trail and
tests) and whose message says precisely what was wrong.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt.exceptions import PyJWKError, PyJWKSetError

# public-key algorithms only; the allow-list in the configuration is a subset of these
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_ALGORITHMS = ("RS256", "ES256")
REFETCH_MIN_S = 30.0          # the fewest seconds between two JWKS fetches caused by unknown kids
METADATA_TTL_S = 3600.0       # discovery document and JWKS kept this long
MAX_DOCUMENT = 1 << 20        # bytes of a discovery document or JWKS read


class OidcError(Exception):
    """A token refused, or the provider unreachable: `reason` is a stable code, str() the detail."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class OidcConfig:
    issuer: str = ""                       # "" turns `agentwarden login` off
    client_id: str = ""
    audiences: tuple[str, ...] = ()        # accepted `aud` values; default: the client id
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    jwks_uri: str = ""                     # instead of the discovery document's
    jwks_file: str = ""                    # a local JWKS (air-gapped): no fetch at all
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    email_claim: str = "email"
    name_claim: str = "name"
    groups_claim: str = "groups"           # a dotted path: realm_access.roles
    # the claim naming the Unix person (its part before "@" when it has one): it must be the
    # caller's login user, or a value identity.users lists for them; "" turns the check off
    user_claim: str = "preferred_username"
    require_email_verified: bool = True
    require_nonce: bool = True             # a token without our nonce (obtained elsewhere) is refused
    skew_s: int = 60
    max_token_age_s: int = 600             # `iat` no older than this: a stale token is not a login
    ca_file: str = ""                      # the provider's CA, when it is not in the system store


@dataclass(frozen=True)
class Claims:
    """What a verified token says about the person."""

    issuer: str
    sub: str
    email: str
    name: str
    groups: tuple[str, ...]
    groups_unknown: bool                   # the provider did not list them (Entra overage, a bad claim)
    username: str                          # the user_claim's value ("" when absent)
    nonce: str | None
    expires: float                         # the token's exp (not the binding's)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def loopback_url(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_url(url: str, what: str) -> None:
    """Provider URLs are https; plain http only on loopback (a test provider, a local proxy)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "https" and parsed.hostname:
        return
    if parsed.scheme == "http" and loopback_url(url):
        return
    raise OidcError("bad_url", f"{what} must be an https URL (http only on loopback), got {url!r}")


class _CheckedRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is followed only to a URL check_url() accepts (never https to plain http)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        check_url(newurl, "a redirect of the provider")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_json(url: str, ca_file: str = "", timeout: float = 10.0) -> dict[str, Any]:
    """GET a JSON document from the provider."""
    check_url(url, "the provider URL")
    ctx = ssl.create_default_context(cafile=ca_file or None) if url.startswith("https") else None
    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "agentwarden"})
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _CheckedRedirect())
    try:
        with opener.open(req, timeout=timeout) as resp:
            body = resp.read(MAX_DOCUMENT + 1)
    except OSError as e:
        raise OidcError("provider_unreachable", f"cannot fetch {url}: {e}") from None
    if len(body) > MAX_DOCUMENT:
        raise OidcError("provider_unreachable", f"{url}: document longer than {MAX_DOCUMENT} bytes")
    try:
        doc = json.loads(body)
    except ValueError:
        raise OidcError("provider_unreachable", f"{url}: not JSON") from None
    if not isinstance(doc, dict):
        raise OidcError("provider_unreachable", f"{url}: not a JSON object")
    return doc


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """A claim by dotted path (`realm_access.roles`); None when any step is missing.  A claim
    whose own name has dots (`https://example.com/groups`) is tried whole first."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class Provider:
    """One identity provider: its metadata and keys (cached), and token verification."""

    def __init__(self, cfg: OidcConfig, fetch: Callable[[str], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._fetch = fetch or (lambda url: fetch_json(url, cfg.ca_file))
        self.clock = clock
        self._lock = threading.RLock()   # metadata() runs inside _key()'s hold: logins are rare
        self._meta: tuple[float, dict[str, Any]] | None = None
        self._keys: tuple[float, dict[str, jwt.PyJWK]] | None = None
        self._last_refetch = float("-inf")
        self.fetches = {"discovery": 0, "jwks": 0}

    # ---- metadata and keys ----------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The discovery document (checked: its `issuer` is ours), cached METADATA_TTL_S."""
        with self._lock:
            now = self.clock()
            if self._meta is not None and now - self._meta[0] < METADATA_TTL_S:
                return self._meta[1]
            url = self.cfg.issuer.rstrip("/") + "/.well-known/openid-configuration"
            self.fetches["discovery"] += 1
            doc = self._fetch(url)
            if doc.get("issuer") != self.cfg.issuer:
                raise OidcError("provider_mismatch", f"{url} names issuer {doc.get('issuer')!r}, "
                                f"not the configured {self.cfg.issuer!r}")
            for key in ("authorization_endpoint", "token_endpoint", "device_authorization_endpoint",
                        "jwks_uri"):
                if isinstance(doc.get(key), str):
                    check_url(doc[key], f"the discovery document's {key}")
            self._meta = (now, doc)
            return doc

    def settings(self) -> dict[str, Any]:
        """What the CLI needs to run a login flow (no secret: the CLI is a public client)."""
        meta = self.metadata()
        return {
            "issuer": self.cfg.issuer,
            "client_id": self.cfg.client_id,
            "scopes": list(self.cfg.scopes),
            "authorization_endpoint": meta.get("authorization_endpoint", ""),
            "token_endpoint": meta.get("token_endpoint", ""),
            "device_authorization_endpoint": meta.get("device_authorization_endpoint", ""),
        }

    def _load_keys(self) -> dict[str, jwt.PyJWK]:
        if self.cfg.jwks_file:
            try:
                with open(self.cfg.jwks_file, encoding="utf-8") as f:
                    doc = json.load(f)
            except (OSError, ValueError) as e:
                raise OidcError("provider_unreachable", f"cannot read jwks_file {self.cfg.jwks_file}: {e}") \
                    from None
        else:
            uri = self.cfg.jwks_uri or self.metadata().get("jwks_uri")
            if not isinstance(uri, str) or not uri:
                raise OidcError("provider_mismatch", "the discovery document names no jwks_uri")
            self.fetches["jwks"] += 1
            doc = self._fetch(uri)
        keys: dict[str, jwt.PyJWK] = {}
        for i, data in enumerate(doc.get("keys") or []):
            if not isinstance(data, dict) or data.get("use", "sig") != "sig":
                continue
            if data.get("kty") == "oct":
                continue   # a symmetric key in a public set is never a signing key we accept
            try:
                key = jwt.PyJWK(data)
            except (PyJWKError, PyJWKSetError, ValueError, TypeError):
                continue   # a key type this pyjwt cannot use: the others still work
            keys[str(data.get("kid", f"#{i}"))] = key
        return keys

    def _key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        with self._lock:
            now = self.clock()
            if self._keys is None or now - self._keys[0] >= METADATA_TTL_S:
                self._keys = (now, self._load_keys())
            keys = self._keys[1]
            found = self._pick(keys, kid, alg)
            if found is None and not self.cfg.jwks_file and now - self._last_refetch >= REFETCH_MIN_S:
                # the provider may have rotated its keys since we fetched them: once
                self._last_refetch = now
                self._keys = (now, self._load_keys())
                found = self._pick(self._keys[1], kid, alg)
        if found is None:
            raise OidcError("unknown_kid", f"no signing key {str(kid)[:80]!r} for {alg} in the provider's "
                            "JWKS")
        return found

    @staticmethod
    def _pick(keys: dict[str, jwt.PyJWK], kid: str | None, alg: str) -> jwt.PyJWK | None:
        if kid is not None:
            return keys.get(kid)
        # no kid: only when exactly one key could have made this signature
        fits = [k for k in keys.values() if _key_fits(k, alg)]
        return fits[0] if len(fits) == 1 else None

    # ---- verification -------------------------------------------------------------------

    def verify(self, token: str, nonce_check: Callable[[str | None], None] = lambda n: None) -> Claims:
        """The token's claims, or OidcError.  `nonce_check` raises OidcError for a nonce that
        is not this caller's (it sees None for a token without one)."""
        cfg = self.cfg
        if not isinstance(token, str) or token.count(".") != 2 or len(token) > 64 * 1024:
            raise OidcError("malformed", "not a compact JWS (three base64url parts)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise OidcError("malformed", f"unreadable token header: {e}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise OidcError("alg_none", "an unsigned token (alg none) is never accepted")
        if alg not in ASYMMETRIC:
            raise OidcError("alg_refused", f"algorithm {alg[:20]!r} is refused: only public-key signatures "
                            f"({', '.join(cfg.algorithms)}) prove the provider made the token")
        if alg not in cfg.algorithms:
            raise OidcError("alg_refused", f"algorithm {alg!r} is not in the allow-list "
                            f"({', '.join(cfg.algorithms)})")
        kid = header.get("kid")
        key = self._key(str(kid) if kid is not None else None, alg)
        if not _key_fits(key, alg):
            raise OidcError("alg_refused", f"key {kid!r} is {key.key_type}, which cannot make {alg} "
                            "signatures")
        audiences = list(cfg.audiences or (cfg.client_id,))
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key=key.key, algorithms=[alg], audience=audiences, issuer=cfg.issuer,
                leeway=cfg.skew_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_signature": True})
        except jwt.ExpiredSignatureError:
            raise OidcError("expired", "the token has expired (exp)") from None
        except jwt.ImmatureSignatureError:
            raise OidcError("not_yet_valid", "the token is not valid yet (nbf or iat in the future)") \
                from None
        except jwt.InvalidIssuerError:
            raise OidcError("wrong_issuer", f"the token's issuer is not {cfg.issuer!r}") from None
        except jwt.InvalidAudienceError:
            raise OidcError("wrong_audience", f"the token is not for {', '.join(audiences)} (aud)") from None
        except jwt.InvalidSignatureError:
            raise OidcError("bad_signature", "the signature does not verify with the provider's key") \
                from None
        except jwt.MissingRequiredClaimError as e:
            raise OidcError("malformed", f"the token has no {e.claim!r} claim") from None
        except jwt.PyJWTError as e:
            raise OidcError("malformed", f"the token is not valid: {e}") from None
        now = self.clock()
        iat = claims.get("iat")
        if not isinstance(iat, (int, float)) or isinstance(iat, bool):
            raise OidcError("malformed", "iat is not a number")
        if iat > now + cfg.skew_s:
            raise OidcError("not_yet_valid", "the token was issued in the future (iat)")
        if now - iat > cfg.max_token_age_s + cfg.skew_s:
            raise OidcError("too_old", f"the token was issued {int(now - iat)} s ago (more than "
                            f"{cfg.max_token_age_s} s): log in again")
        aud = claims.get("aud")
        azp = claims.get("azp")
        if azp is not None and azp != cfg.client_id:
            raise OidcError("wrong_azp", f"the token was issued to {str(azp)[:80]!r} (azp), not "
                            f"{cfg.client_id!r}")
        if isinstance(aud, list) and len(aud) > 1 and azp is None:
            raise OidcError("wrong_azp", "the token names several audiences and no authorized party (azp)")
        nonce = claims.get("nonce")
        if nonce is not None and not isinstance(nonce, str):
            raise OidcError("malformed", "nonce is not a string")
        if nonce is None and cfg.require_nonce:
            raise OidcError("nonce_missing", "the token carries no nonce (run `agentwarden login`, which "
                            "asks the daemon for one)")
        nonce_check(nonce)
        email = claim_at(claims, cfg.email_claim)
        email = email if isinstance(email, str) else ""
        if email and cfg.require_email_verified and claims.get("email_verified") is not True:
            raise OidcError("email_unverified", f"the provider has not verified {email} (email_verified)")
        name = claim_at(claims, cfg.name_claim)
        groups, unknown = _groups(claims, cfg.groups_claim)
        username = claim_at(claims, cfg.user_claim) if cfg.user_claim else ""
        exp = claims.get("exp")
        return Claims(issuer=cfg.issuer, sub=str(claims["sub"]), email=email,
                      name=name if isinstance(name, str) else "", groups=groups, groups_unknown=unknown,
                      username=username if isinstance(username, str) else "",
                      nonce=nonce, expires=float(exp) if isinstance(exp, (int, float)) else now, raw=claims)


def _groups(claims: dict[str, Any], path: str) -> tuple[tuple[str, ...], bool]:
    """The person's groups, and whether they are unknown.  Entra ID leaves them out when there
    are too many (an overage: `_claim_names.groups`, or `hasgroups`); a claim of the wrong type
    is unknown too.  A token that simply has no groups claim: no groups, known."""
    names = claims.get("_claim_names")
    if (isinstance(names, dict) and path.split(".")[0] in names) or claims.get("hasgroups") is True:
        return (), True
    value = claim_at(claims, path)
    if value is None:
        return (), False
    if isinstance(value, str):
        return (value,), False
    if isinstance(value, list) and all(isinstance(g, str) for g in value):
        return tuple(sorted(set(value))), False
    return (), True


def _key_fits(key: jwt.PyJWK, alg: str) -> bool:
    family = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}.get(alg[:2], "")
    if key.key_type != family:
        return False
    crv = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}.get(alg)
    return crv is None or getattr(key, "_jwk_data", {}).get("crv") in (None, crv)

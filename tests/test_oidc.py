"""Token verification (core/oidc.py) and bindings (core/identity.py) against a real provider on
loopback (tests/oidc_idp.py): real RSA and EC keys, real HTTP, nothing of the code under test
replaced.  Every refusal is checked by its reason code."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from agentwarden.core import identity
from agentwarden.core.events import Identity, K8sInfo
from agentwarden.core.oidc import OidcConfig, OidcError, Provider
from agentwarden.daemon import config as config_mod
from agentwarden.enforce import policy as pol
from agentwarden.enforce.approvals import Caller, Request, may_decide

from tests.oidc_idp import CLIENT_ID, new_key
from tests.oidc_idp import Provider as Idp


@pytest.fixture()
def idp() -> Any:
    with Idp() as p:
        yield p


def provider(idp: Idp, **over: Any) -> Provider:
    return Provider(OidcConfig(issuer=idp.issuer, client_id=CLIENT_ID, **over))


def verify(p: Provider, token: str, uid: int = 1000, bindings: identity.Bindings | None = None) -> Any:
    b = bindings or identity.Bindings("h")
    return p.verify(token, b.nonce_check(uid, token))


def nonce(b: identity.Bindings, uid: int = 1000) -> str:
    return b.begin(uid)[0]


def refused(p: Provider, token: str, reason: str, **kw: Any) -> str:
    with pytest.raises(OidcError) as e:
        verify(p, token, **kw)
    assert e.value.reason == reason, (e.value.reason, str(e.value))
    return str(e.value)


def test_a_good_token_gives_the_person_with_rsa_and_ec(idp: Idp) -> None:
    b = identity.Bindings("h")
    p = provider(idp)
    for key in idp.keys:   # RS256 and ES256
        c = verify(p, idp.mint(key=key, nonce=nonce(b)), bindings=b)
        assert (c.sub, c.email, c.name, c.groups, c.groups_unknown, c.username) == \
            ("u-123", "alice@example.com", "Alice", ("db-approvers", "engineering"), False, "alice")
    assert p.fetches == {"discovery": 1, "jwks": 1}          # cached


# times as offsets from the moment the test runs (a suite runs for minutes after collection)
@pytest.mark.parametrize(("over", "reason"), [
    ({"exp": -120}, "expired"),
    ({"nbf": 600}, "not_yet_valid"),
    ({"iat": 600, "exp": 900}, "not_yet_valid"),
    ({"iss": "https://evil.example.com/realms/test"}, "wrong_issuer"),
    ({"aud": "someone-else"}, "wrong_audience"),
    ({"azp": "someone-else"}, "wrong_azp"),
    ({"aud": [CLIENT_ID, "other"], "azp": None}, "wrong_azp"),
    ({"iat": -3600, "exp": 300}, "too_old"),
    ({"email_verified": False}, "email_unverified"),
    ({"sub": None}, "malformed"),
])
def test_refused_with_the_precise_reason(idp: Idp, over: dict[str, Any], reason: str) -> None:
    b = identity.Bindings("h")
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "nbf", "iat") else v for k, v in over.items()}
    refused(provider(idp), idp.mint(nonce=nonce(b), **claims), reason, bindings=b)


def test_a_forged_signature_is_refused(idp: Idp) -> None:
    """Signed by another key under the provider's kid."""
    b = identity.Bindings("h")
    forger = new_key("RS256")
    forger.kid = idp.keys[0].kid
    refused(provider(idp), idp.mint(key=forger, nonce=nonce(b)), "bad_signature", bindings=b)
    # a real token with its payload changed
    head, body, sig = idp.mint(nonce=nonce(b)).split(".")
    claims = json.loads(jwt.utils.base64url_decode(body))
    claims["groups"] = ["admins"]
    forged = ".".join((head, jwt.utils.base64url_encode(json.dumps(claims).encode()).decode(), sig))
    refused(provider(idp), forged, "bad_signature", bindings=b)


def test_alg_none_and_hs256_with_the_public_key_are_refused(idp: Idp) -> None:
    b = identity.Bindings("h")
    claims = idp.claims(nonce=nonce(b))
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": idp.keys[0].kid})
    refused(provider(idp), unsigned, "alg_none", bindings=b)
    # the classic confusion: HMAC keyed with the provider's public key (anyone has it)
    from cryptography.hazmat.primitives import serialization

    pem = idp.keys[0].private.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    import hashlib
    import hmac

    head = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "kid": idp.keys[0].kid}).encode())
    body = jwt.utils.base64url_encode(json.dumps(claims).encode())
    sig = jwt.utils.base64url_encode(hmac.new(pem, head + b"." + body, hashlib.sha256).digest())
    refused(provider(idp), (head + b"." + body + b"." + sig).decode(), "alg_refused", bindings=b)
    # an allowed algorithm with a key of the other type (RS256 header, the EC key's kid)
    rsa_signed = idp.mint(key=idp.keys[0], headers={"kid": idp.keys[1].kid}, nonce=nonce(b))
    refused(provider(idp), rsa_signed, "alg_refused", bindings=b)
    # and the allow-list: ES256 refused when only RS256 is allowed
    refused(provider(idp, algorithms=("RS256",)), idp.mint(key=idp.keys[1], nonce=nonce(b)), "alg_refused",
            bindings=b)


def test_nonces_are_per_uid_and_single_use(idp: Idp) -> None:
    b = identity.Bindings("h")
    p = provider(idp)
    theirs = nonce(b, uid=2000)
    refused(p, idp.mint(nonce=theirs), "nonce_other_uid", uid=1000, bindings=b)
    mine = nonce(b, uid=1000)
    token = idp.mint(nonce=mine)
    assert verify(p, token, uid=1000, bindings=b).nonce == mine
    refused(p, token, "nonce_unknown", uid=1000, bindings=b)              # replayed
    refused(p, idp.mint(nonce="made-up"), "nonce_unknown", bindings=b)
    refused(p, idp.mint(), "nonce_missing", bindings=b)                    # obtained elsewhere
    clock = [time.time()]
    late = identity.Bindings("h", clock=lambda: clock[0])
    n = nonce(late)
    clock[0] += late.NONCE_TTL_S + 1
    refused(p, idp.mint(nonce=n), "nonce_expired", bindings=late)


def test_a_token_without_nonce_is_accepted_once_when_the_site_allows_it(idp: Idp) -> None:
    b = identity.Bindings("h")
    p = provider(idp, require_nonce=False)
    token = idp.mint()
    assert verify(p, token, bindings=b).nonce is None
    refused(p, token, "replayed", bindings=b)
    refused(p, token + "==", "replayed", bindings=b)     # the same signature, spelt with padding


def test_an_unknown_kid_refetches_once_then_a_rotated_key_is_accepted(idp: Idp) -> None:
    b = identity.Bindings("h")
    p = provider(idp)
    verify(p, idp.mint(nonce=nonce(b)), bindings=b)
    assert p.fetches["jwks"] == 1 and idp.jwks_fetches == 1
    new = idp.rotate()
    verify(p, idp.mint(key=new, nonce=nonce(b)), bindings=b)     # unknown kid: one refetch
    assert p.fetches["jwks"] == 2 and idp.jwks_fetches == 2
    stranger = new_key("RS256")
    refused(p, idp.mint(key=stranger, nonce=nonce(b)), "unknown_kid", bindings=b)
    refused(p, idp.mint(key=stranger, nonce=nonce(b)), "unknown_kid", bindings=b)
    assert idp.jwks_fetches == 2      # made-up kids do not make the daemon fetch again and again


def test_a_local_jwks_file_for_air_gapped_sites(idp: Idp, tmp_path: Path) -> None:
    f = tmp_path / "jwks.json"
    f.write_text(json.dumps({"keys": [k.jwk() for k in idp.keys]}))
    b = identity.Bindings("h")
    p = Provider(OidcConfig(issuer="https://idp.invalid/realms/x", client_id=CLIENT_ID, jwks_file=str(f)))
    assert verify(p, idp.mint(iss="https://idp.invalid/realms/x", nonce=nonce(b)), bindings=b).sub == "u-123"
    assert idp.jwks_fetches == 0 and idp.discovery_fetches == 0


def test_discovery_must_name_our_issuer(idp: Idp) -> None:
    p = Provider(OidcConfig(issuer=idp.issuer + "/", client_id=CLIENT_ID))
    with pytest.raises(OidcError) as e:
        p.settings()
    assert e.value.reason == "provider_mismatch"


def test_groups_by_dotted_path_and_the_entra_overage(idp: Idp) -> None:
    b = identity.Bindings("h")
    p = provider(idp, groups_claim="realm_access.roles")
    c = verify(p, idp.mint(nonce=nonce(b), realm_access={"roles": ["ops", "dev"]}), bindings=b)
    assert c.groups == ("dev", "ops") and not c.groups_unknown
    over = verify(provider(idp), idp.mint(nonce=nonce(b), groups=None,
                                          _claim_names={"groups": "src1"},
                                          _claim_sources={"src1": {"endpoint": "https://graph"}}), bindings=b)
    assert over.groups == () and over.groups_unknown
    none = verify(provider(idp), idp.mint(nonce=nonce(b), groups=None), bindings=b)
    assert none.groups == () and not none.groups_unknown


def test_bindings_survive_a_restart_expire_and_make_events(idp: Idp, tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity.json"
    clock = [1_000_000.0]
    b = identity.Bindings("h", str(path), max_age_s=3600, clock=lambda: clock[0])
    c = verify(provider(idp), idp.mint(nonce=nonce(b)), bindings=b)
    seen: list[int] = []
    b.listeners.append(lambda x: seen.append(x.uid))
    b.bind(1000, 1000, c, "device")
    assert seen == [1000] and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = identity.Bindings("h", str(path), max_age_s=3600, clock=lambda: clock[0])
    got = again.of(5, 1000)    # sudo'd: uid 5, login uid 1000
    assert got is not None and got.email == "alice@example.com" and again.of(1000, 2000) is None
    ident = identity.with_binding(Identity(uid=5, login_uid=1000), got)
    assert ident.verified and ident.source == "oidc" and ident.groups == ["db-approvers", "engineering"]
    clock[0] += 3601
    assert again.of(1000, None) is None
    events = again.tick()
    assert [(e.kind, e.binding.state) for e in events if e.binding] == [("identity", "expired")]
    assert json.loads(path.read_text())["bindings"] == []
    ev = b.take()
    assert [e.binding.state for e in ev if e.binding] == ["bound"] and ev[0].identity.verified
    b.refuse(1000, None, "expired", "the token has expired")
    assert b.logout(1000) is not None and b.logout(1000) is None
    assert [(e.binding.state, e.binding.reason) for e in b.take() if e.binding] == \
        [("refused", "expired: the token has expired"), ("logged_out", "")]


def test_an_unreadable_state_file_restores_no_binding(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    path.write_text("{not json")
    assert identity.Bindings("h", str(path)).all() == []


def who(text: str) -> pol.Rule:
    return pol.parse(f"version: 1\nrules:\n{text}").rules[0]


ALICE = Identity(uid=1000, user="alice", source="oidc", verified=True, issuer="https://idp.example.com",
                 email="Alice@Example.com", groups=["engineering"])


def test_policy_who_matches_the_verified_person_and_the_pod() -> None:
    r = who("  - name: r\n    action: deny\n    when: {who: {emails: ['*@example.com'], "
            "issuers: ['https://idp.example.com/'], verified: true}}\n")
    assert pol.who_holds(r, ALICE, frozenset(), None)
    assert not pol.who_holds(r, Identity(uid=1000, user="alice", email="alice@example.com"), frozenset(), None)
    g = who("  - name: r\n    action: allow\n    when: {who: {groups: [engineering]}}\n")
    assert pol.who_holds(g, ALICE, frozenset(), None)
    assert pol.who_holds(g, Identity(user="bob"), frozenset({"engineering"}), None)   # a Unix group
    unverified = Identity(user="bob", groups=["engineering"])    # groups only count when verified
    assert not pol.who_holds(g, unverified, frozenset(), None)
    ns = who("  - name: r\n    action: deny\n    when: {who: {namespaces: ['team-*'], "
             "service_accounts: [team-a/builder]}}\n")
    pod = K8sInfo(namespace="team-a", service_account="builder")
    assert pol.who_holds(ns, ALICE, frozenset(), pod)
    assert not pol.who_holds(ns, ALICE, frozenset(), K8sInfo(namespace="team-a", service_account="x"))
    assert not pol.who_holds(ns, ALICE, frozenset(), None)


def test_unknown_groups_fail_closed_both_ways() -> None:
    """An Entra overage: an `allow` gated on a group does not match; a refusing rule does."""
    unknown = Identity(user="alice", verified=True, source="oidc", groups_unknown=True)
    allow = who("  - name: r\n    action: allow\n    when: {who: {groups: [admins]}}\n")
    deny = who("  - name: r\n    action: deny\n    when: {who: {groups: [contractors]}}\n")
    assert not pol.who_holds(allow, unknown, frozenset(), None)
    assert pol.who_holds(deny, unknown, frozenset(), None)
    # a known Unix membership still counts
    assert pol.who_holds(allow, unknown, frozenset({"admins"}), None)


def test_policy_refuses_unknown_who_conditions() -> None:
    with pytest.raises(pol.PolicyError, match="when.who.team"):
        pol.parse("version: 1\nrules:\n  - name: r\n    action: deny\n    when: {who: {team: [x]}}\n")
    with pytest.raises(pol.PolicyError, match="when.who.verified"):
        pol.parse("version: 1\nrules:\n  - name: r\n    action: deny\n    when: {who: {verified: yes-please}}\n")


def test_approvers_by_provider_group_and_email() -> None:
    req = Request(id="r", rule="x", kind="exec", summary="", session_id="s", agent="a", launcher="bob",
                  approvers=("group:db-approvers", "email:Carol@Example.com"), created=0, expires=1)
    assert may_decide(req, Caller(uid=1, user="dave", groups=frozenset({"db-approvers"})))
    assert may_decide(req, Caller(uid=1, user="carol", groups=frozenset(), email="carol@example.com"))
    assert not may_decide(req, Caller(uid=1, user="carol", groups=frozenset()))


def test_identity_config_is_checked_by_field() -> None:
    with pytest.raises(config_mod.ConfigError, match=r"identity.oidc.algorithms\[0\]"):
        config_mod.parse("identity: {oidc: {issuer: 'https://idp.example.com', client_id: c, "
                         "algorithms: [HS256]}}")
    with pytest.raises(config_mod.ConfigError, match="identity.oidc.issuer"):
        config_mod.parse("identity: {oidc: {issuer: 'http://idp.example.com', client_id: c}}")
    with pytest.raises(config_mod.ConfigError, match="identity.oidc.client_id"):
        config_mod.parse("identity: {oidc: {issuer: 'https://idp.example.com'}}")
    with pytest.raises(config_mod.ConfigError, match="identity.require"):
        config_mod.parse("identity: {require: true}")
    with pytest.raises(config_mod.ConfigError, match="identity.unverified"):
        config_mod.parse("identity: {oidc: {issuer: 'https://i.example', client_id: c}, unverified: wait}")
    cfg = config_mod.parse("identity: {oidc: {issuer: 'https://i.example/', client_id: c}, require: true}")
    # kept exactly as written: some providers' issuers end in / (Auth0, Entra v1), and iss is compared
    # as a string
    assert cfg.identity.oidc.issuer == "https://i.example/" and cfg.identity.require
    cfg = config_mod.parse("identity: {oidc: {issuer: 'https://i.example', client_id: c}, "
                           "users: {alice: [alice.smith, a.smith@corp.example]}}")
    assert cfg.identity.users == (("alice", ("alice.smith", "a.smith@corp.example")),)


def test_the_identity_rule_holds_unverified_sessions_only() -> None:
    p = pol.with_identity_rule(pol.Policy(), "hold", 30)
    from agentwarden.core.events import Event

    ev = Event(kind="session_start", ts_ns=0, host="h", identity=Identity(user="bob"))
    assert pol.decide(p, ev) == pol.Verdict("hold", pol.IDENTITY_RULE)
    ev.identity = ALICE
    assert pol.decide(p, ev).action == "audit"



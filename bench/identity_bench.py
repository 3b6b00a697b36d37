"""Identity benchmark (no root): what a verified login costs.

- Verifying an ID token with the provider's keys cached (the daemon's `login_finish`), RS256 and
  ES256, against a provider on loopback (tests/oidc_idp.py): median and spread of N.
- What a binding adds to a session's start: `identity.of_process` with a bound person against
  the same call without bindings, in interleaved ABBA blocks (the per-session cost; the kernel
  hold, the enforcer's rule mask and everything else at a start is the same either way).

Run:  /opt/agentwarden/venv/bin/python bench/identity_bench.py [--n 2000]
Memory per thousand cached pods: bench/k8s_bench.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agentwarden.core import identity, procfs  # noqa: E402
from agentwarden.core.oidc import OidcConfig, Provider  # noqa: E402

from tests.oidc_idp import CLIENT_ID  # noqa: E402
from tests.oidc_idp import Provider as Idp  # noqa: E402


def spread(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=10)
    return f"{statistics.median(xs):.1f} µs (p10 {q[0]:.1f}, p90 {q[-1]:.1f})"


def verify_times(idp: Idp, p: Provider, key_index: int, n: int) -> list[float]:
    b = identity.Bindings("bench")
    out = []
    for _ in range(n):
        nonce = b.begin(1000)[0]
        token = idp.mint(key=idp.keys[key_index], nonce=nonce)
        t0 = time.perf_counter()
        p.verify(token, b.nonce_check(1000, token))
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def start_cost(n: int, rounds: int) -> tuple[list[float], list[float]]:
    """µs per of_process call, without (A) and with (B) a bound person, ABBA blocks of n calls."""
    uid = os.getuid()
    found = procfs.snapshot(os.getpid())
    assert found is not None
    snap = dataclasses.replace(found, login_uid=uid)   # a person's login: bindings go by login uid
    bound = identity.Bindings("bench")
    with Idp() as idp:
        p = Provider(OidcConfig(issuer=idp.issuer, client_id=CLIENT_ID))
        nonce = bound.begin(uid)[0]
        token = idp.mint(nonce=nonce)
        claims = p.verify(token, bound.nonce_check(uid, token))
        bound.bind(uid, uid, claims, "bench")
    a: list[float] = []
    b: list[float] = []

    def block(bindings: identity.Bindings | None) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            identity.of_process(uid, snap, bindings)
        return (time.perf_counter() - t0) * 1e6 / n

    for _ in range(rounds):
        a.append(block(None))
        b.append(block(bound))
        b.append(block(bound))
        a.append(block(None))
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    with Idp() as idp:
        p = Provider(OidcConfig(issuer=idp.issuer, client_id=CLIENT_ID))
        verify_times(idp, p, 0, 20)          # discovery and JWKS fetched once, then cached
        fetches = dict(p.fetches)
        rs = verify_times(idp, p, 0, args.n)
        es = verify_times(idp, p, 1, args.n)
        assert p.fetches == fetches, "the keys were fetched again: not a cached measure"
    print(f"verify an ID token, keys cached, n={args.n}: RS256 {spread(rs)}; ES256 {spread(es)}")
    a, b = start_cost(2000, 10)
    ratio = [y / x for x, y in zip(a, b, strict=True)]
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"identity at a session's start (of_process), ABBA x10 of 2000 calls: without a binding "
          f"{ma:.2f} µs, with {mb:.2f} µs (added {mb - ma:.2f} µs; ratio {statistics.median(ratio):.2f}, "
          f"{min(ratio):.2f}–{max(ratio):.2f})")


if __name__ == "__main__":
    main()

"""Who a person is: the one owner of identity.

A session's identity is frozen when the tracker first sees its root process (`of_process`);
policy, approvals, `policy test` and the control socket then ask the same two questions of
it, through here only:
- `person(identity)`: who launched the agent.  The login user (the audit login uid survives
  `sudo` and `su`), else the user of the uid.
- `Groups.of(user)`: that person's Unix groups, by name.
- `Bindings`: the identity-provider logins (`agentwarden login`, verified by core/oidc.py)
  bound to Unix persons, frozen into each session that person starts (`with_binding`).

So a dry run (`agentwarden policy test`) and the daemon decide a `sudo` session alike: both
take the groups of the person who logged in, not of root.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import logging
import os
import pwd
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from agentwarden.core import procfs
from agentwarden.core.events import BindingInfo, Event, Identity, format_ts
from agentwarden.core.files import write_atomic

log = logging.getLogger(__name__)


class _Files:
    """The host's user and group databases read from its files, for a daemon in a container
    (`host_root`): the container's own /etc knows none of the node's users.  Re-read when a
    file changes.  Only the files: NSS modules (LDAP, sssd) of the host are not consulted."""

    def __init__(self, etc: str) -> None:
        self.etc = etc
        self._seen: dict[str, tuple[float, list[list[str]]]] = {}
        self._lock = threading.Lock()

    def rows(self, name: str) -> list[list[str]]:
        path = os.path.join(self.etc, name)
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return []
        with self._lock:
            seen = self._seen.get(name)
            if seen is None or seen[0] != mtime:
                with open(path, encoding="utf-8", errors="replace") as f:
                    rows = [line.rstrip("\n").split(":") for line in f
                            if line.strip() and not line.startswith("#")]
                seen = self._seen[name] = (mtime, rows)
        return seen[1]

    def name_of(self, uid: int) -> str | None:
        return next((r[0] for r in self.rows("passwd") if len(r) > 3 and r[2] == str(uid)), None)

    def groups_of(self, user: str) -> frozenset[str]:
        gid = next((r[3] for r in self.rows("passwd") if len(r) > 3 and r[0] == user), None)
        return frozenset(r[0] for r in self.rows("group") if len(r) > 3
                         and (r[2] == gid or user in r[3].split(",")))


_host: _Files | None = None


def use_host_root(root: str) -> None:
    """Read users and groups from `root`/etc (the node's, mounted in the daemon's container);
    "" or "/" goes back to this system's own databases."""
    global _host
    _host = _Files(os.path.join(root, "etc")) if root and root != "/" else None


def user_name(uid: int | None) -> str:
    """The user database's name for a uid; the number itself when it has none."""
    if uid is None or uid < 0:
        return ""
    if _host is not None:
        return _host.name_of(uid) or str(uid)
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def of_process(uid: int, snap: procfs.ProcSnapshot | None, bindings: Bindings | None = None) -> Identity:
    """The identity of a session whose root process runs as `uid` (read once, then frozen), with
    its person's identity-provider login when one is bound."""
    login = snap.login_uid if snap else None
    ident = Identity(
        uid=uid,
        user=user_name(uid),
        login_uid=login,
        login_user=user_name(login) if login is not None else "",
        tty=procfs.tty_name(snap.tty_nr) if snap else "",
    )
    return with_binding(ident, bindings.of(uid, login)) if bindings is not None else ident


def person(identity: Identity) -> str:
    """Who launched the agent: the login user (it survives sudo and su), else the uid's user."""
    return identity.login_user or identity.user


def caller(pid: int, uid: int) -> str:
    """The person behind a process calling the control socket: its login user, else its uid's."""
    login = procfs.login_uid(pid)
    return (user_name(login) if login is not None else "") or user_name(uid)


def user_groups(user: str) -> frozenset[str]:
    """Unix groups of a person: the primary group and every group listing them."""
    if _host is not None:
        return _host.groups_of(user)
    out: set[str] = set()
    with contextlib.suppress(KeyError):
        out.add(grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name)
    out.update(gr.gr_name for gr in grp.getgrall() if user in gr.gr_mem)
    return frozenset(out)


def group_gid(name: str) -> int | None:
    """A group's id by name (the control socket's `control_group`), None when there is none."""
    if _host is not None:
        gid = next((r[2] for r in _host.rows("group") if len(r) > 2 and r[0] == name), None)
        return int(gid) if gid is not None and gid.isdigit() else None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class Groups:
    """`user_groups`, remembered per person until `forget()` (a policy reload calls it: group
    membership may have changed too).  Reading the group database is a file scan; a
    decision asks once per event."""

    def __init__(self) -> None:
        self._cache: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()

    def of(self, user: str) -> frozenset[str]:
        with self._lock:
            found = self._cache.get(user)
        if found is None:
            found = user_groups(user) if user else frozenset()
            with self._lock:
                self._cache[user] = found
        return found

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()


# ---- identity-provider logins (`agentwarden login`) -------------------------------------------


def person_uid(uid: int, login_uid: int | None) -> int | None:
    """The Unix person a binding belongs to: the audit login uid (it survives sudo and su, and is
    set only by a login: sshd, login, a display manager).  None without one: a service, a
    container's process or a cron job is nobody's login, and a binding never reaches it by a bare
    uid (uid 1000 in a pod is not the host's uid 1000)."""
    del uid
    return login_uid


@dataclass(frozen=True)
class Binding:
    """A person's verified identity-provider login, bound to their Unix uid by the daemon."""

    uid: int                       # the audit login uid of the caller who logged in (person_uid)
    login_uid: int | None
    user: str
    issuer: str
    sub: str
    email: str
    name: str
    groups: tuple[str, ...]
    groups_unknown: bool
    bound_at: float
    expires_at: float
    method: str                    # device, code, id_token

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = list(self.groups)
        d["bound_at"] = format_ts(int(self.bound_at * 1e9))
        d["expires_at"] = format_ts(int(self.expires_at * 1e9))
        return d


def _signature_bytes(token: str) -> bytes:
    import base64

    sig = token.rsplit(".", 1)[-1].rstrip("=")
    try:
        return base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    except ValueError:
        return sig.encode()


def with_binding(ident: Identity, binding: Binding | None) -> Identity:
    """A session's identity with its person's binding frozen in (verified), or as is (not)."""
    if binding is None:
        return ident
    return replace(ident, source="oidc", verified=True, issuer=binding.issuer, sub=binding.sub,
                   email=binding.email, name=binding.name, groups=list(binding.groups),
                   groups_unknown=binding.groups_unknown)


class Bindings:
    """Login nonces and the bindings they lead to; `identity` events for every change.

    - `begin(uid)` issues a one-time nonce bound to the caller's person uid (NONCE_TTL_S); the
      token's nonce must be one of these, for this uid, and is spent by its first use.
    - A binding lasts `max_age_s` from the login (not the token's own expiry: the person is
      not asked to log in every hour) and survives daemon restarts in `path` (root, 0600).
    - A token without a nonce (only when the site allows it, `require_nonce: false`) is
      accepted once: its hash is remembered until the token expires.
    Thread-safe: the control socket's threads call it, the daemon's loop drains it."""

    NONCE_TTL_S = 600.0
    MAX_NONCES_PER_UID = 8

    def __init__(self, host: str, path: str = "", max_age_s: float = 12 * 3600,
                 clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.path = path
        self.max_age_s = max_age_s
        self.clock = clock
        self._lock = threading.RLock()
        self._nonces: dict[str, tuple[int, float]] = {}       # nonce -> (uid, expires)
        self._used_tokens: dict[str, float] = {}              # sha256 of a nonce-less token -> exp
        self._by_uid: dict[int, Binding] = {}
        self._outbox: list[Event] = []
        self._refusals: dict[int, list[float]] = {}
        self._suppressed: dict[int, int] = {}
        self.listeners: list[Callable[[Binding], None]] = []   # told of each new binding
        self._load()

    # ---- persistence -------------------------------------------------------------------

    def _load(self) -> None:
        if not self.path:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            # unreadable state is no binding at all (fail closed: sessions are unverified)
            log.error("identity bindings %s unreadable, none restored: %s", self.path, e)
            return
        for raw in doc.get("bindings", []) if isinstance(doc, dict) else []:
            try:
                b = Binding(**{**raw, "groups": tuple(raw.get("groups") or ())})
            except TypeError:
                continue
            self._by_uid[b.uid] = b

    def _save(self) -> None:
        if not self.path:
            return
        data = json.dumps({"bindings": [asdict(b) for b in self._by_uid.values()]}, indent=1)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        write_atomic(self.path, data)

    # ---- login ---------------------------------------------------------------------------

    def begin(self, uid: int) -> tuple[str, float]:
        """A fresh nonce for this person uid and when it expires."""
        with self._lock:
            now = self.clock()
            self._nonces = {n: v for n, v in self._nonces.items() if v[1] > now}
            mine = sorted((v[1], n) for n, v in self._nonces.items() if v[0] == uid)
            for _, n in mine[: max(0, len(mine) - self.MAX_NONCES_PER_UID + 1)]:
                del self._nonces[n]     # a caller looping on begin keeps only its latest few
            nonce = secrets.token_urlsafe(24)
            expires = now + self.NONCE_TTL_S
            self._nonces[nonce] = (uid, expires)
            return nonce, expires

    def nonce_check(self, uid: int, token: str) -> Callable[[str | None], None]:
        """The check Provider.verify runs on the token's nonce: issued to `uid`, unexpired, unused
        (spent now, whatever the rest of the verification says)."""
        def check(nonce: str | None) -> None:
            from agentwarden.core.oidc import OidcError

            with self._lock:
                now = self.clock()
                if nonce is None:
                    # the signature's bytes, not the text: base64url padding or another spelling of
                    # the same token must not make it new (red team)
                    digest = hashlib.sha256(_signature_bytes(token)).hexdigest()
                    self._used_tokens = {h: e for h, e in self._used_tokens.items() if e > now}
                    if digest in self._used_tokens:
                        raise OidcError("replayed", "this token was already used to log in")
                    self._used_tokens[digest] = now + 24 * 3600
                    return
                issued = self._nonces.pop(nonce, None)
                if issued is None:
                    raise OidcError("nonce_unknown", "the token's nonce was not issued by this daemon, "
                                    "or was already used (replayed)")
                if issued[0] != uid:
                    raise OidcError("nonce_other_uid", f"the token's nonce was issued to uid {issued[0]}, "
                                    f"not to the caller (uid {uid})")
                if issued[1] <= now:
                    raise OidcError("nonce_expired", "the login took too long: its nonce expired")
        return check

    def bind(self, uid: int, login_uid: int | None, claims: Any, method: str) -> Binding:
        """A verified login (core.oidc.Claims) becomes this person's binding."""
        now = self.clock()
        b = Binding(uid=uid, login_uid=login_uid, user=user_name(uid), issuer=claims.issuer, sub=claims.sub,
                    email=claims.email, name=claims.name, groups=tuple(claims.groups),
                    groups_unknown=claims.groups_unknown, bound_at=now, expires_at=now + self.max_age_s,
                    method=method)
        with self._lock:
            self._by_uid[uid] = b
            self._save()
            self._emit("bound", method, b)
        log.info("identity bound: uid %d is %s (%s) from %s", uid, b.email or b.sub, method, b.issuer)
        for listener in self.listeners:
            listener(b)
        return b

    REFUSALS_PER_MINUTE = 10

    def refuse(self, uid: int, login_uid: int | None, reason: str, detail: str) -> None:
        """A refused login, as an event; past REFUSALS_PER_MINUTE for one uid they are counted, and
        the next one recorded says how many were not (any local user may call login_finish)."""
        with self._lock:
            now = self.clock()
            times = [t for t in self._refusals.get(uid, []) if now - t < 60]
            if len(times) >= self.REFUSALS_PER_MINUTE:
                self._refusals[uid] = times
                self._suppressed[uid] = self._suppressed.get(uid, 0) + 1
                return
            self._refusals[uid] = [*times, now]
            more = self._suppressed.pop(uid, 0)
            note = f" (and {more} more refusals of this uid not recorded one by one)" if more else ""
            self._emit("refused", f"{reason}: {detail[:300]}{note}", None, uid, login_uid)
        log.warning("identity login refused for uid %d: %s: %.300s", uid, reason, detail)

    def logout(self, uid: int) -> Binding | None:
        with self._lock:
            b = self._by_uid.pop(uid, None)
            if b is not None:
                self._save()
                self._emit("logged_out", "", b)
        return b

    def get(self, uid: int) -> Binding | None:
        """This person's binding, when it has not expired (an expired one is ended here)."""
        with self._lock:
            b = self._by_uid.get(uid)
            if b is not None and b.expires_at <= self.clock():
                self._expire(b)
                return None
            return b

    def of(self, uid: int, login_uid: int | None) -> Binding | None:
        person = person_uid(uid, login_uid)
        return self.get(person) if person is not None else None

    def all(self) -> list[Binding]:
        with self._lock:
            return list(self._by_uid.values())

    def take(self) -> list[Event]:
        """The identity events made since the last call (the daemon passes them on after every
        record: nothing but a list test when there are none)."""
        if not self._outbox:
            return []
        with self._lock:
            out, self._outbox = self._outbox, []
        return out

    def tick(self) -> list[Event]:
        """Once a second: end the bindings that expired, and take the events."""
        with self._lock:
            now = self.clock()
            for b in [b for b in self._by_uid.values() if b.expires_at <= now]:
                self._expire(b)
        return self.take()

    def _expire(self, b: Binding) -> None:
        del self._by_uid[b.uid]
        self._save()
        self._emit("expired", f"max age {int(self.max_age_s)} s", b)
        log.info("identity binding of uid %d (%s) expired", b.uid, b.email or b.sub)

    def _emit(self, state: str, reason: str, b: Binding | None, uid: int = -1,
              login_uid: int | None = None) -> None:
        if b is not None:
            uid, login_uid = b.uid, b.login_uid
        ident = Identity(uid=uid, user=user_name(uid), login_uid=login_uid,
                         login_user=user_name(login_uid) if login_uid is not None else "")
        info = BindingInfo(state=state, reason=reason, uid=uid, login_uid=login_uid)
        if b is not None:
            ident = with_binding(ident, b) if state == "bound" else ident
            info = BindingInfo(state=state, reason=reason, uid=uid, login_uid=login_uid, issuer=b.issuer,
                               sub=b.sub, email=b.email, name=b.name, groups=list(b.groups),
                               groups_unknown=b.groups_unknown,
                               expires=format_ts(int(b.expires_at * 1e9)))
        self._outbox.append(Event(kind="identity", ts_ns=time.time_ns(), host=self.host, identity=ident,
                                  binding=info))

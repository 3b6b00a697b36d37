"""Who a person is: the one owner of identity.

A session's identity is frozen when the tracker first sees its root process (`of_process`);
policy, approvals, `policy test` and the control socket then ask the same two questions of
it, through here only:
- `person(identity)`: who launched the agent.  The login user (the audit login uid survives
  `sudo` and `su`), else the user of the uid.
- `Groups.of(user)`: that person's Unix groups, by name.

So a dry run (`agentwarden policy test`) and the daemon decide a `sudo` session alike: both
take the groups of the person who logged in, not of root.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import threading

from agentwarden.core import procfs
from agentwarden.core.events import Identity


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


def of_process(uid: int, snap: procfs.ProcSnapshot | None) -> Identity:
    """The identity of a session whose root process runs as `uid` (read once, then frozen)."""
    login = snap.login_uid if snap else None
    return Identity(
        uid=uid,
        user=user_name(uid),
        login_uid=login,
        login_user=user_name(login) if login is not None else "",
        tty=procfs.tty_name(snap.tty_nr) if snap else "",
    )


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

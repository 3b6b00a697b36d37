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
import pwd
import threading

from agentwarden.core import procfs
from agentwarden.core.events import Identity


def user_name(uid: int | None) -> str:
    """The user database's name for a uid; the number itself when it has none."""
    if uid is None or uid < 0:
        return ""
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
    out: set[str] = set()
    with contextlib.suppress(KeyError):
        out.add(grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name)
    out.update(gr.gr_name for gr in grp.getgrall() if user in gr.gr_mem)
    return frozenset(out)


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

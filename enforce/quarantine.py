"""Quarantine agent sessions with nftables, keyed by the socket mark.

An eBPF cgroup/sock_create program stamps every socket of a tracked session
with ``MARK_BASE | slot``; here the output hook drops what such sockets send,
either everything (``sessions``) or to chosen addresses (``dests4``/``dests6``).
State lives only in the kernel's sets, with kernel-side timeouts, so it
survives a daemon crash and a restarted daemon picks it up as it is.

A drop in the output hook fails a UDP send() at once with EPERM, but a TCP
connect() ignores that error and retries its SYN until ETIMEDOUT (~2 min).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

from agentwarden.probes.guard import UNGUARDED_MARK

log = logging.getLogger(__name__)

MARK_BASE = 0x61770000
MARK_MASK = 0xFFFF0000
MAX_SLOT = 0x3FFF
SETS = {"sessions": "mark", "dests4": ["mark", "ipv4_addr"], "dests6": ["mark", "ipv6_addr"]}


class QuarantineError(RuntimeError):
    """nftables refused a command, or cannot be used at all."""


@dataclass(frozen=True)
class Entry:
    """One live quarantine, as read back from the kernel."""

    mark: int
    dst: str  # "" for a whole-session quarantine
    expires_s: int  # seconds left (0 = no timeout)


def _check_mark(mark: int) -> None:
    # A stray mark (0 above all) would cut off traffic that is not an agent's.
    if mark & MARK_MASK != MARK_BASE or not 1 <= mark & ~MARK_MASK <= MAX_SLOT:
        raise ValueError(f"mark {mark:#x} is not an agentwarden session mark")


def _match(left: Any, set_name: str) -> list[Any]:
    # reject, not drop: TCP ignores the EPERM of a dropped SYN and retries for two
    # minutes; "administratively prohibited" fails connect() at once (EHOSTUNREACH)
    return [{"match": {"op": "==", "left": left, "right": f"@{set_name}"}},
            {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]


_MARK = {"meta": {"key": "mark"}}
RULES = [
    _match(_MARK, "sessions"),
    _match({"concat": [_MARK, {"payload": {"protocol": "ip", "field": "daddr"}}]}, "dests4"),
    _match({"concat": [_MARK, {"payload": {"protocol": "ip6", "field": "daddr"}}]}, "dests6"),
    # A connection the SQL/HTTP guard had no room for (guard_msg.bpf.c aw_sockops marks it): a
    # reset answers its first segment, so the client fails at once (ECONNRESET) and nothing it
    # sends reaches the server unjudged.
    [{"match": {"op": "==", "left": _MARK, "right": UNGUARDED_MARK}},
     {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
     {"reject": {"type": "tcp reset"}}],
]


class Quarantine:
    """The ``inet <table>`` nftables table; each change is one atomic nft transaction."""

    def __init__(self, table: str = "agentwarden") -> None:
        try:
            import nftables
        except ImportError as e:
            raise QuarantineError("the nftables Python binding (python3-nftables) is missing") from e
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", table):
            raise ValueError(f"bad nftables table name {table!r}")
        self.table = table
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._lock = threading.Lock()  # a libnftables context is not thread-safe

    @staticmethod
    def slot_of(mark: int) -> int | None:
        """The session slot of one of our marks (mark_for's inverse), None for another mark."""
        return mark & MAX_SLOT if mark & ~MAX_SLOT == MARK_BASE and mark & MAX_SLOT else None

    @staticmethod
    def mark_for(slot: int) -> int:
        """The socket mark the eBPF program gives session ``slot``."""
        if not 1 <= slot <= MAX_SLOT:
            raise ValueError(f"slot {slot} out of range 1..{MAX_SLOT:#x}")
        return MARK_BASE | slot

    def _error(self, what: str, err: str) -> QuarantineError:
        hint = " (nftables needs root or CAP_NET_ADMIN)" if "not permitted" in err or os.geteuid() else ""
        return QuarantineError(f"nft {what} failed{hint}: {err.strip()}")

    def _run(self, what: str, cmds: list[dict[str, Any]]) -> None:
        with self._lock:
            rc, _, err = self._nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise self._error(what, err)

    def _list(self, kind: str, name: str) -> list[dict[str, Any]]:
        """One object of our table (``chain``/``set``) as nft's JSON objects, sans metainfo."""
        with self._lock:
            rc, out, err = self._nft.cmd(f"list {kind} inet {self.table} {name}")
        if rc != 0:
            raise self._error(f"list {kind} {name}", err)
        return [o for o in json.loads(out)["nftables"] if "metainfo" not in o]

    def _obj(self, **kw: Any) -> dict[str, Any]:
        return {"family": "inet", "table": self.table, **kw}

    def ensure(self) -> bool:
        """Create the table, sets, chain and rules if missing; never flush what is there.
        Returns whether a rule had to be added (the table or its rules were deleted)."""
        cmds: list[dict[str, Any]] = [{"add": {"table": {"family": "inet", "name": self.table}}}]
        cmds += [{"add": {"set": self._obj(name=n, type=t, flags=["timeout"])}} for n, t in SETS.items()]
        cmds.append({"add": {"chain": self._obj(name="output", type="filter", hook="output", prio=0,
                                                policy="accept")}})
        self._run("create table", cmds)
        have = [o["rule"]["expr"] for o in self._list("chain", "output") if "rule" in o]
        missing = [{"add": {"rule": self._obj(chain="output", expr=r)}} for r in RULES if r not in have]
        if missing:
            self._run("add rules", missing)
        return bool(missing)

    def _elements(self) -> list[tuple[str, Any, Entry]]:
        """(set name, element key as nft spells it, Entry) for every element of our sets."""
        found = []
        for name in SETS:
            for obj in self._list("set", name)[0]["set"].get("elem", []):
                e = obj["elem"] if isinstance(obj, dict) and "elem" in obj else {"val": obj}
                left = max(1, int(e.get("expires", 0))) if "timeout" in e else 0
                mark, dst = (e["val"], "") if name == "sessions" else e["val"]["concat"]
                found.append((name, e["val"], Entry(int(mark), dst and str(ipaddress.ip_address(dst)), left)))
        return found

    def _put(self, set_name: str, mark: int, dst: str, duration_s: int) -> None:
        """Add or refresh an element; an existing one is never shortened (0 = no timeout)."""
        if duration_s < 0:
            raise ValueError("duration_s must be >= 0 (0 = until released)")
        old = [e.expires_s for s, _, e in self._elements() if (s, e.mark, e.dst) == (set_name, mark, dst)]
        if old:
            duration_s = 0 if 0 in (old[0], duration_s) else max(duration_s, old[0])
        key: Any = {"concat": [mark, dst]} if dst else mark
        elem = {"elem": {"val": key, "timeout": duration_s}} if duration_s else key
        ref = self._obj(name=set_name, elem=[key])
        # add + delete + add in one transaction: replaces the timeout whatever the kernel version.
        self._run(f"add to {set_name}", [{"add": {"element": ref}}, {"delete": {"element": ref}},
                   {"add": {"element": self._obj(name=set_name, elem=[elem])}}])

    def session(self, mark: int, duration_s: int) -> None:
        """Drop everything the session's sockets send, for duration_s seconds (0 = until released)."""
        _check_mark(mark)
        self._put("sessions", mark, "", duration_s)
        log.info("quarantined session mark %#x for %ss", mark, duration_s)

    def destination(self, mark: int, ip: str, duration_s: int) -> None:
        """Drop what the session sends to one address, for duration_s seconds (0 = until released)."""
        _check_mark(mark)
        addr = ipaddress.ip_address(ip)
        addr = getattr(addr, "ipv4_mapped", None) or addr  # such a socket sends IPv4 packets
        self._put("dests4" if addr.version == 4 else "dests6", mark, str(addr), duration_s)
        log.info("quarantined %s for session mark %#x for %ss", addr, mark, duration_s)

    def release(self, mark: int) -> int:
        """Lift every quarantine of a session; returns how many elements went."""
        _check_mark(mark)
        mine = [(s, k) for s, k, e in self._elements() if e.mark == mark]
        if mine:
            # add before delete: an element that timed out meanwhile must not fail the transaction
            refs = [self._obj(name=s, elem=[k]) for s, k in mine]
            self._run("release", [{op: {"element": r}} for r in refs for op in ("add", "delete")])
            log.info("released session mark %#x (%d elements)", mark, len(mine))
        return len(mine)

    def entries(self) -> list[Entry]:
        """Every live quarantine, as the kernel has it."""
        return [e for _, _, e in self._elements()]

    def remove(self) -> None:
        """Delete the whole table (uninstall, tests); a missing table is not an error."""
        with self._lock:
            rc, _, err = self._nft.cmd(f"delete table inet {self.table}")
        if rc != 0 and "No such file or directory" not in err:
            raise self._error("delete table", err)

"""Sockets a process already has when it becomes tracked: /proc for its fds,
netlink sock_diag (pyroute2) for what each socket is connected to."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from agentwarden.core import procfs
from agentwarden.core.events import NetInfo

log = logging.getLogger(__name__)

_TCP_ESTABLISHED = 1
_SOCK_STREAM = 1


@dataclass(frozen=True)
class ExistingSocket:
    pid: int
    fd: int
    sock_type: int
    net: NetInfo


def _diag() -> dict[int, tuple[int, NetInfo]]:
    """inode -> (socket type, peer) for connected TCP and Unix stream sockets on this host."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink.diag import SS_ALL, UDIAG_SHOW_NAME, UDIAG_SHOW_PEER

    found: dict[int, tuple[int, NetInfo]] = {}
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in ds.get_sock_stats(family=family, states=1 << _TCP_ESTABLISHED):
                found[m["idiag_inode"]] = (_SOCK_STREAM, NetInfo(
                    transport="tcp", dst_ip=m["idiag_dst"], dst_port=m["idiag_dport"], direction="existing"))
        unix = ds.get_sock_stats(family=socket.AF_UNIX, states=SS_ALL, show=UDIAG_SHOW_NAME | UDIAG_SHOW_PEER)
        names = {m["udiag_ino"]: dict(m["attrs"]).get("UNIX_DIAG_NAME", "") for m in unix}
        for m in unix:
            attrs = dict(m["attrs"])
            peer = attrs.get("UNIX_DIAG_PEER")
            if peer:
                path = names.get(peer, "")
                found[m["udiag_ino"]] = (m["udiag_type"], NetInfo(
                    transport="unix", path=path.replace("\0", "@", 1) if path else "", direction="existing"))
    return found


def existing_sockets(pids: Iterable[int]) -> list[ExistingSocket]:
    by_pid = {pid: procfs.socket_fds(pid) for pid in pids}
    if not any(by_pid.values()):
        return []
    try:
        diag = _diag()
    except Exception as e:   # sock_diag unavailable: better no pre-existing sockets than no daemon
        log.warning("sock_diag failed, sockets opened before tracking are not captured: %s", e)
        return []
    out: list[ExistingSocket] = []
    for pid, inodes in by_pid.items():
        for inode, fd in inodes.items():
            if inode in diag:
                stype, net = diag[inode]
                out.append(ExistingSocket(pid, fd, stype, net))
    return out

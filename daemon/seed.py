"""Find agents that were already running when the daemon started.

The kernel only sees sessions start at exec; an agent launched before the
daemon is found here (psutil) and its whole tree is put in the tracking map.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import psutil
from agentwarden.core import procfs
from agentwarden.core.events import K8sInfo
from agentwarden.daemon.profiles import Profile, Profiles

log = logging.getLogger(__name__)


@dataclass
class RunningAgent:
    root: procfs.ProcSnapshot
    profile: Profile
    descendants: list[procfs.ProcSnapshot]

    @property
    def key(self) -> int:
        """Session key for the kernel map; the top bit keeps it apart from kernel-made keys."""
        digest = hashlib.blake2b(f"{self.root.pid}|{self.root.start_ticks}".encode(), digest_size=8).digest()
        return (1 << 63) | (int.from_bytes(digest, "little") >> 1)


def descendants(pid: int) -> list[procfs.ProcSnapshot]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    snaps = [procfs.snapshot(k.pid) for k in kids]
    return [s for s in snaps if s is not None]


def running_agents(profiles: Profiles, exclude: set[int],
                   pod_of: Callable[[int], K8sInfo | None] | None = None) -> list[RunningAgent]:
    matched: dict[int, Profile] = {}
    parents: dict[int, int] = {}
    for proc in psutil.process_iter(["pid", "ppid", "name", "exe", "cmdline"]):
        info = proc.info
        parents[info["pid"]] = info["ppid"] or 0
        if info["pid"] in exclude:
            continue
        # the pod only for a comm a pod-scoped profile names (a cgroup read per process is not free)
        scoped = pod_of is not None and (info["name"] or "") in profiles.pod_comms
        pod = pod_of(info["pid"]) if scoped and pod_of is not None else None
        profile = profiles.match(info["name"] or "", info["exe"] or "", info["cmdline"] or [], pod)
        if profile is not None:
            matched[info["pid"]] = profile
    found: list[RunningAgent] = []
    for pid, profile in matched.items():
        anc, hops = parents.get(pid, 0), 0
        while anc > 1 and anc not in matched and hops < 4096:
            anc, hops = parents.get(anc, 0), hops + 1
        if anc in matched:
            continue   # part of an outer agent's session
        snap = procfs.snapshot(pid)
        if snap is None:
            continue
        found.append(RunningAgent(snap, profile, descendants(pid)))
    return found

"""Agent profiles: which processes are AI agents whose trees become sessions.

The kernel starts a session by comm alone (a hash lookup on every exec); the
profile's exe globs and cmdline regexes are then checked here, and a session
that fails them is dropped before it produces any event.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agentwarden.core.events import K8sInfo
from agentwarden.daemon.config import TASK_COMM_LEN, AgentMatch, AgentProfileConfig

# Cursor on Linux: the editor is an Electron binary called `cursor` (deb/rpm in
# /usr/share/cursor or /opt/Cursor, or an AppImage whose runtime execs it); its
# renderers, extension host and terminals are its descendants.  `cursor-agent`
# is the CLI launcher script, which then execs its bundled node.
BUILTIN: tuple[AgentProfileConfig, ...] = (
    AgentProfileConfig("cursor", AgentMatch(comm=("cursor", "Cursor", "cursor-agent"))),
)


@dataclass(frozen=True)
class Profile:
    index: int
    name: str
    match: AgentMatch
    comms: frozenset[str]
    cmdline_res: tuple[re.Pattern[str], ...]

    @property
    def needs_pod(self) -> bool:
        return bool(self.match.namespaces or self.match.labels)

    def matches(self, comm: str, exe: str, argv: Sequence[str], pod: K8sInfo | None = None) -> bool:
        if comm not in self.comms:
            return False
        if self.needs_pod:
            # a process in no known pod is not this profile's agent (checked by the daemon after
            # the kernel's comm match, as exe and cmdline are)
            if pod is None:
                return False
            if self.match.namespaces and not any(fnmatch.fnmatchcase(pod.namespace, g)
                                                 for g in self.match.namespaces):
                return False
            if any(pod.labels.get(k) != v for k, v in self.match.labels):
                return False
        if self.match.exe and not any(fnmatch.fnmatchcase(exe, g) for g in self.match.exe):
            return False
        if self.match.cmdline:
            line = " ".join(argv)
            if not any(rx.search(line) for rx in self.cmdline_res):
                return False
        return True


class Profiles:
    """Built-in profiles, then configured ones (a configured name replaces a built-in)."""

    def __init__(self, configured: Iterable[AgentProfileConfig], builtin: bool = True) -> None:
        configured = list(configured)
        names = {p.name for p in configured}
        base = [p for p in BUILTIN if p.name not in names] if builtin else []
        self.items: list[Profile] = [
            Profile(i, p.name, p.match, frozenset(p.match.kernel_comms()),
                    tuple(re.compile(rx) for rx in p.match.cmdline))
            for i, p in enumerate(base + configured)
        ]

    def comm_table(self) -> list[tuple[str, int]]:
        """(comm, profile index) for the kernel map; the first profile wins a shared comm."""
        seen: dict[str, int] = {}
        for p in self.items:
            for c in sorted(p.comms):
                seen.setdefault(c, p.index)
        return list(seen.items())

    def match(self, comm: str, exe: str, argv: Sequence[str], pod: K8sInfo | None = None) -> Profile | None:
        comm = comm.encode()[: TASK_COMM_LEN - 1].decode(errors="ignore")
        for p in self.items:
            if p.matches(comm, exe, argv, pod):
                return p
        return None

    @property
    def pod_comms(self) -> frozenset[str]:
        """The comms of profiles scoped to pods: only their processes need a pod lookup."""
        return frozenset(c for p in self.items if p.needs_pod for c in p.comms)

    def __getitem__(self, index: int) -> Profile:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

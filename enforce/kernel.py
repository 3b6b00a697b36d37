"""Compile a policy into guard.bpf.c's maps, and keep per-session state there.

One rule is one bit (its index in the policy), so the kernel's "lowest set bit"
is the policy's "first match".  Only the first 64 rules reach the kernel; what
the kernel cannot read (argv, table names, regexes, host names) makes a rule
inexact, and then userspace decides (a stopped exec) or acts after the fact.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any

from agentwarden.core.events import Identity, K8sInfo
from agentwarden.enforce import argvdfa
from agentwarden.enforce.policy import DENYING, Policy, Rule, has_who, who_holds
from agentwarden.enforce.sqlnorm import command_hash, fnv
from agentwarden.probes import guard as g

_BASENAME_GLOB = re.compile(r"^\*/([^*?\[\]/]+)$")
COMM_LEN = 15   # exec sets comm to the first 15 bytes of the basename


@dataclass
class Plan:
    """Everything the kernel needs to know about a policy."""

    actions: dict[int, int] = field(default_factory=dict)      # rule index -> AW_ACT_*
    exact: int = 0
    soft: int = 0
    exec_any: int = 0
    exec_names: dict[bytes, int] = field(default_factory=dict)
    connect_any: int = 0
    connect_dsts: dict[tuple[int, bytes], int] = field(default_factory=dict)
    ports: int = 0                                               # rules with a port condition
    port_rules: dict[int, int] = field(default_factory=dict)
    sql_any: int = 0
    sql_opaque: int = 0                                          # rules opaque statements match
    sql_deny: int = 0                                            # SQL rules that deny or hold
    http_deny: int = 0                                           # HTTP rules that deny or hold
    sql_cmds: dict[int, int] = field(default_factory=dict)
    http_any_method: int = 0
    http_any_host: int = 0
    http_any_path: int = 0
    http_exact: int = 0
    http_inexact: int = 0
    http_methods: dict[int, int] = field(default_factory=dict)
    http_hosts: dict[int, int] = field(default_factory=dict)
    http_paths: dict[int, int] = field(default_factory=dict)
    http_prefixes: dict[int, int] = field(default_factory=dict)
    http_suffixes: dict[int, int] = field(default_factory=dict)
    http_suffix_rules: int = 0
    http_transport_ok: int = 0   # HTTP rules a judged transport (git's own helper) is exempt from
    argv_rules: int = 0                                          # exec rules whose argv the kernel matches
    exec_ident: int = 0                                          # exec rules with a path (program identity)
    dfa: argvdfa.Dfa = field(default_factory=argvdfa.Dfa)
    argv_unsupported: dict[str, str] = field(default_factory=dict)   # rule -> why its argv stays in userspace
    identity_rules: int = 0                                      # rules with agent/who conditions
    session_rules: int = 0                                       # rules about whole sessions
    quarantines: bool = False                                    # sockets need their session's mark
    mechanisms: dict[str, tuple[str, str]] = field(default_factory=dict)   # rule -> (mechanism, when)

    @property
    def guards_streams(self) -> bool:
        """SQL or HTTP rules the kernel judges: an agent's TCP sockets go through sk_msg."""
        return bool(self.sql_cmds or self.sql_any or self.http_exact)

    @property
    def enforcing(self) -> bool:
        return any(a >= g.ACTIONS["deny"] for a in self.actions.values())


def _exec(plan: Plan, bit: int, r: Rule) -> bool:
    # path resolution needs userspace (symlinks, the real cwd), and so do the parent process and the
    # tool call behind the exec (its cause: daemon/lineage.py)
    exact = not r.exec_outside_workdir and not r.exec_parent_unless and r.cause_asked is None
    if r.exec_path:
        plan.exec_ident |= bit
    if r.exec_argv or r.exec_argv_unless:
        try:
            argvdfa.compile_rule(plan.dfa, bit.bit_length() - 1, list(r.exec_argv), g.DFA_STATES,
                                 r.exec_argv_unless)
            plan.argv_rules |= bit       # decided in the kernel, or at least pre-filtered there
        except argvdfa.Unsupported as e:
            plan.argv_unsupported[r.name] = str(e)
            exact = False
    if not r.exec_path:
        plan.exec_any |= bit
        return exact
    for glob in r.exec_path:
        m = _BASENAME_GLOB.match(glob)
        if m and len(m.group(1).encode()) <= COMM_LEN:
            key = m.group(1).encode()
            plan.exec_names[key] = plan.exec_names.get(key, 0) | bit
        else:
            # a directory in the glob, or a name longer than comm: every exec is a candidate
            plan.exec_any |= bit
            exact = False
    return exact


def _connect(plan: Plan, bit: int, r: Rule) -> bool:
    if r.connect_path and not r.connect_dst and not r.connect_port:
        return False   # Unix sockets only: not an inet connect
    exact = not r.connect_path
    nets = []
    for d in r.connect_dst:
        try:
            nets.append(ipaddress.ip_network(d, strict=False))
        except ValueError:
            exact = False   # a host name: the kernel sees only addresses
    if r.connect_dst and len(nets) == len(r.connect_dst):
        for net in nets:
            if net.version == 4:
                key = (96 + net.prefixlen, b"\0" * 10 + b"\xff\xff" + net.network_address.packed)
            else:
                key = (net.prefixlen, net.network_address.packed)
            plan.connect_dsts[key] = plan.connect_dsts.get(key, 0) | bit
    else:
        plan.connect_any |= bit
    if r.connect_port:
        plan.ports |= bit
        for lo, hi in r.connect_port:
            for port in range(lo, hi + 1):
                plan.port_rules[port] = plan.port_rules.get(port, 0) | bit
    return exact


# Leading words (at most three, as the kernel hashes them) of opaque statements; "CREATE OR
# REPLACE" stands for the functions, procedures, triggers and rules spelled that way.
OPAQUE_HEADS = ("DO", "CALL", "EXECUTE", "PREPARE", "CREATE FUNCTION", "CREATE PROCEDURE", "CREATE TRIGGER",
                "CREATE EVENT TRIGGER", "CREATE RULE", "CREATE OR REPLACE", "CREATE CONSTRAINT TRIGGER")


def _sql(plan: Plan, bit: int, r: Rule) -> bool:
    exact = not (r.sql_tables or r.sql_database or r.sql_regex or r.connect_dst or r.connect_port
                 or r.connect_path)
    named_opaque = "OPAQUE" in r.sql_command
    if r.action in DENYING or named_opaque:
        # an opaque statement matches this rule (policy.OPAQUE_SQL): its heads, COPY ... PROGRAM
        # (AW_H_COPY/AW_H_PROGRAM) and unread text (AW_CFG_SQL_OPAQUE)
        plan.sql_opaque |= bit
        for head in OPAQUE_HEADS:
            h = command_hash(" ".join(head.split()[:3]))
            plan.sql_cmds[h] = plan.sql_cmds.get(h, 0) | bit
    if not r.sql_command:
        plan.sql_any |= bit
        return exact
    for command in r.sql_command:
        if command == "OPAQUE":
            continue
        if len(command.split()) > 3:
            plan.sql_any |= bit      # the kernel hashes at most three leading words
            exact = False
            continue
        h = command_hash(command)
        plan.sql_cmds[h] = plan.sql_cmds.get(h, 0) | bit
    return exact


_GLOB = re.compile(r"[*?\[]")
_KERNEL_METHOD = re.compile(r"[A-Z]{3,7}")


def _add(table: dict[int, int], key: str, bit: int) -> None:
    h = fnv(key.encode())
    table[h] = table.get(h, 0) | bit


def _suffix(p: str) -> bool:
    """`*/name`: any path whose last segment is `name` (no other wildcard, no '/')."""
    return p.startswith("*/") and not _GLOB.search(p[2:]) and "/" not in p[2:] and p[2:] != ""


def _http(plan: Plan, bit: int, r: Rule) -> bool:
    """Method, host and path conditions, each a map the kernel looks the request up in."""
    exact = not (r.connect_dst or r.connect_port or r.connect_path)
    exact &= all(not _GLOB.search(h) for h in r.http_host)
    exact &= all(not _GLOB.search(p) or (p.endswith("/*") and not _GLOB.search(p[:-1])) or _suffix(p)
                 for p in r.http_path)
    # the kernel reads a method of 3 to 7 capital letters (guard_http.bpf.c http_method_len): a rule
    # naming another (PROPFIND, M-SEARCH) is judged on the reconstructed request (red team)
    exact &= all(_KERNEL_METHOD.fullmatch(m) for m in r.http_method)
    if not exact:
        plan.http_inexact |= bit
        return False
    for m in r.http_method:
        _add(plan.http_methods, m, bit)
    for h in r.http_host:   # and the fully qualified spelling, with its trailing dot (policy.host_name)
        _add(plan.http_hosts, h.lower(), bit)
        _add(plan.http_hosts, h.lower() + ".", bit)
    for p in r.http_path:
        if _suffix(p):
            _add(plan.http_suffixes, p[1:], bit)    # "*/git-receive-pack": a last segment
            plan.http_suffix_rules |= bit
        elif p.endswith("/*"):
            _add(plan.http_prefixes, p[:-1], bit)   # "/api/*": every path under "/api/"
        else:
            _add(plan.http_paths, p, bit)
    plan.http_any_method |= 0 if r.http_method else bit
    plan.http_any_host |= 0 if r.http_host else bit
    plan.http_any_path |= 0 if r.http_path else bit
    plan.http_transport_ok |= bit if r.http_unless_transport else 0
    plan.http_exact |= bit
    return True


def compile_policy(policy: Policy) -> Plan:
    plan = Plan()
    for i, r in enumerate(policy.rules[: g.MAX_RULES]):
        bit = 1 << i
        plan.actions[i] = g.ACTIONS[r.action]
        if r.agents or has_who(r):
            plan.identity_rules |= bit
        plan.quarantines |= r.action == "quarantine"
        exact = True
        if r.kind == "session":
            # judged by the daemon while the session's root waits at its first instruction
            plan.session_rules |= bit
            refuses = r.action in ("deny", "kill")
            plan.mechanisms[r.name] = (("the agent's root is killed at its first instruction", "before")
                                       if refuses else
                                       ("the agent's root waits at its first instruction for a login",
                                        "before")
                                       if r.action == "hold" else ("recorded only", "-"))
            continue
        kinds = (r.kind,) if r.kind else ("exec", "connect", "sql", "http")
        for kind in kinds:
            if kind == "exec":
                exact &= _exec(plan, bit, r)
            elif kind == "connect":
                exact &= _connect(plan, bit, r)
            elif kind == "sql":
                exact &= _sql(plan, bit, r)
                if r.action in DENYING:
                    plan.sql_deny |= bit   # its sessions reach Postgres over TCP only (connect_unix)
            elif r.kind == "http":
                exact &= _http(plan, bit, r)
                if r.action in DENYING:
                    plan.http_deny |= bit   # what a request whose host or path is unread meets
            else:
                plan.http_inexact |= bit   # a rule of every kind: the kernel cannot judge it alone
                exact = False
        if exact:
            plan.exact |= bit
        elif r.action in ("allow", "audit"):
            plan.soft |= bit
        plan.mechanisms[r.name] = _mechanism(r, exact)
    for r in policy.rules[g.MAX_RULES:]:
        plan.mechanisms[r.name] = ("userspace on the recorded event (beyond the kernel's 64 rules)", "after")
    return plan


def _mechanism(r: Rule, exact: bool) -> tuple[str, str]:
    """How the rule is enforced, and whether that acts before the operation reaches its target."""
    if r.action in ("allow", "audit"):
        return "recorded only", "-"
    kind = r.kind or "any"
    if kind == "exec":
        argv = " (argv matched in the kernel)" if (r.exec_argv or r.exec_argv_unless) and exact else ""
        if exact and r.action != "hold":
            return f"SIGKILL at exec, in the kernel, before the first instruction{argv}", "before"
        if exact:
            return (f"refused at exec until approved (stopped, told, SIGKILL); an approved retry runs "
                    f"without a stop{argv}", "before")
        return ("SIGSTOP at exec when path (and argv, where the kernel can match it) hold; userspace decides "
                "(visible to job-control shells)", "before")
    if kind == "connect":
        if exact:
            return "cgroup connect4/connect6 refuses (EPERM)", "before"
        return "userspace on the connect event (host names): kill/quarantine", "after"
    if kind == "sql":
        if exact:
            return ("sk_msg drops the send (TCP, EACCES); SIGKILL at SSL_write (TLS); "
                    "a Unix-socket connect to Postgres is refused (cgroup connect_unix, EPERM)", "before")
        return "userspace on the reconstructed statement: kill/quarantine", "after"
    if kind == "http":
        if exact:
            return ("sk_msg drops the request (plain TCP, EACCES); SIGKILL at SSL_write (TLS)", "before")
        return "userspace on the reconstructed request (host/path globs): kill/quarantine", "after"
    return ("kernel where the kind allows it, else userspace" if exact else "userspace on the event",
            "before" if exact else "after")


def session_mask(policy: Policy, agent: str, ident: Identity, groups: frozenset[str],
                 k8s: K8sInfo | None = None) -> int:
    """The rules whose agent/who conditions hold for one session (policy.who_holds: the same
    test the daemon's decisions make)."""
    mask = 0
    for i, r in enumerate(policy.rules[: g.MAX_RULES]):
        if r.agents and agent not in r.agents:
            continue
        if not who_holds(r, ident, groups, k8s):
            continue
        mask |= 1 << i
    return mask


class KernelPolicy:
    """Writes a Plan and per-session state into the loaded guard maps."""

    def __init__(self, probes: Any) -> None:
        self._m = probes.guard_map

    def _cfg(self, which: int, value: int) -> None:
        self._m("guard_cfg")[ct.c_int(which)] = ct.c_uint64(value)

    def apply(self, plan: Plan, daemon_pid: int, programs: dict[tuple[int, int], int] | None = None) -> None:
        """Replace the policy; enforcement is off while the maps are half written.
        programs: (inode key, ctime) -> rule bits of the program files known (enforce.programs).
        FLAG_SQL stays on meanwhile when it was: it only marks new connections for the guard, and a
        connection opened in the gap would otherwise be one no guard saw open."""
        was = int(self._m("guard_cfg")[ct.c_int(g.CFG_FLAGS)].value)
        self._cfg(g.CFG_FLAGS, was & g.FLAG_SQL)
        files = self._m("exec_files")
        files.clear()
        for (inode, ctime), bits in (programs or {}).items():
            files[g.FileKey(inode, ctime)] = ct.c_uint64(bits)
        rules = self._m("guard_rules")
        for i in range(g.MAX_RULES):
            rules[ct.c_int(i)] = g.GuardRule(plan.actions.get(i, 0), 0)
        names = self._m("exec_names")
        names.clear()
        for name, bits in plan.exec_names.items():
            names[g.NameKey(name)] = ct.c_uint64(bits)
        dsts = self._m("connect_dsts")
        dsts.clear()
        for (prefixlen, addr), bits in plan.connect_dsts.items():
            dsts[g.LpmV6(prefixlen, (ct.c_uint8 * 16)(*addr))] = ct.c_uint64(bits)
        ports = self._m("connect_ports")
        for port in range(65536):
            bits = plan.port_rules.get(port, 0)
            if bits or ports[ct.c_int(port)].value:
                ports[ct.c_int(port)] = ct.c_uint64(bits)
        self._dfa(plan)
        cmds = self._m("sql_cmds")
        cmds.clear()
        for h, bits in plan.sql_cmds.items():
            cmds[ct.c_uint64(h)] = ct.c_uint64(bits)
        for map_name, table in (("http_methods", plan.http_methods), ("http_hosts", plan.http_hosts),
                                ("http_paths", plan.http_paths), ("http_prefixes", plan.http_prefixes),
                                ("http_suffixes", plan.http_suffixes)):
            hmap = self._m(map_name)
            hmap.clear()
            for h, bits in table.items():
                hmap[ct.c_uint64(h)] = ct.c_uint64(bits)
        for which, value in ((g.CFG_EXEC_ANY, plan.exec_any), (g.CFG_CONNECT_ANY, plan.connect_any),
                             (g.CFG_SQL_ANY, plan.sql_any), (g.CFG_EXACT, plan.exact),
                             (g.CFG_SOFT, plan.soft), (g.CFG_PORTS, plan.ports), (g.CFG_DAEMON, daemon_pid),
                             (g.CFG_HTTP_ANY_METHOD, plan.http_any_method),
                             (g.CFG_HTTP_ANY_HOST, plan.http_any_host),
                             (g.CFG_HTTP_ANY_PATH, plan.http_any_path), (g.CFG_HTTP_EXACT, plan.http_exact),
                             (g.CFG_HTTP_INEXACT, plan.http_inexact), (g.CFG_ARGV, plan.argv_rules),
                             (g.CFG_SQL_OPAQUE, plan.sql_opaque), (g.CFG_EXEC_IDENT, plan.exec_ident),
                             (g.CFG_DAEMON_UID, os.getuid()), (g.CFG_SQL_DENY, plan.sql_deny),
                             (g.CFG_HTTP_SUFFIXES, plan.http_suffix_rules),
                             (g.CFG_HTTP_TRANSPORT_OK, plan.http_transport_ok),
                             (g.CFG_HTTP_DENY, plan.http_deny)):
            self._cfg(which, value)
        # a tracked exec of a file that exports OpenSSL without uprobes yet stops (guard_exec.bpf.c
        # tls_unattached), with a policy or not
        flags = g.FLAG_TLS_WAIT | (g.FLAG_ENFORCE if plan.actions else 0)
        if plan.guards_streams:
            flags |= g.FLAG_SQL   # tracked TCP sockets go through sk_msg
        if plan.exec_ident and programs is not None:
            flags |= g.FLAG_IDENTITY   # program files by identity (a new one stops once)
        if plan.identity_rules or plan.quarantines or plan.session_rules:
            # a new session's root waits (a few ms) until its rule mask and socket mark are set
            flags |= g.FLAG_HOLD_SESSIONS
        self._cfg(g.CFG_FLAGS, flags)

    def _dfa(self, plan: Plan) -> None:
        """The argv DFAs: only the rows of states in use (a few hundred, not the whole table)."""
        starts = self._m("argv_start")
        for i in range(g.MAX_RULES):
            starts[ct.c_int(i)] = ct.c_uint32(plan.dfa.starts.get(i, 0))
        table = self._m("argv_dfa")
        n = plan.dfa.states * argvdfa.SYMBOLS
        keys = (ct.c_int * n)(*range(n))
        values = (ct.c_uint16 * n)(*(v for row in plan.dfa.table for v in row))
        try:
            table.items_update_batch(keys, values)
        except Exception:   # an older bcc or kernel without batch updates
            for k in range(n):
                table[ct.c_int(k)] = ct.c_uint16(values[k])

    def add_program(self, key: tuple[int, int], bits: int) -> None:
        """A program file classified in userspace: the next exec of it is decided in the kernel."""
        self._m("exec_files")[g.FileKey(*key)] = ct.c_uint64(bits)

    def allow_exec(self, session: int, ident: int, until_boot_ns: int, uses: int) -> None:
        """An approved command may run again: `uses` times (-1: any number) until the time."""
        self._m("exec_allow")[g.ExecAllowKey(session, ident)] = g.ExecAllowVal(
            until_boot_ns, max(uses, 0), 1 if uses < 0 else 0, 0)

    def set_session(self, session: int, mask: int, mark: int) -> None:
        self._m("session_rules")[ct.c_uint64(session)] = ct.c_uint64(mask)
        if mark:
            self._m("session_marks")[ct.c_uint64(session)] = ct.c_uint32(mark)

    def drop_session(self, session: int) -> None:
        for name in ("session_rules", "session_marks"):
            with contextlib.suppress(KeyError):
                del self._m(name)[ct.c_uint64(session)]

    def allow_statement(self, session: int, stmt_hash: int, until_boot_ns: int) -> None:
        self._m("sql_allow")[g.AllowKey(session, stmt_hash)] = ct.c_uint64(until_boot_ns)

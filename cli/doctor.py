"""`agentwarden doctor`: what the daemon needs from this machine, checked one line each."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from agentwarden.daemon.config import Config


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _tracefs() -> str | None:
    for base in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(os.path.join(base, "events")):
            return base
    return None


def _tracepoint(category: str, name: str) -> Callable[[], Check]:
    def check() -> Check:
        base = _tracefs()
        ok = bool(base) and os.path.isdir(os.path.join(base or "", "events", category, name))
        return Check(f"tracepoint {category}:{name}", ok, "present" if ok else "missing",
                     "mount tracefs (mount -t tracefs tracefs /sys/kernel/tracing) on a kernel with "
                     "CONFIG_FTRACE_SYSCALLS" if not ok else "")
    return check


def checks(cfg: Config) -> list[Check]:
    out: list[Check] = []
    rel = platform.release()
    out.append(Check("root", os.geteuid() == 0, f"euid {os.geteuid()}", "run as root (CAP_BPF, CAP_PERFMON, "
                     "CAP_SYS_ADMIN)"))
    out.append(Check("kernel", True, rel))
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    out.append(Check("BTF", btf, "/sys/kernel/btf/vmlinux" if btf else "absent",
                     "a kernel with CONFIG_DEBUG_INFO_BTF (needed by later probes)", required=False))
    base = _tracefs()
    out.append(Check("tracefs", base is not None, base or "not mounted",
                     "mount -t tracefs tracefs /sys/kernel/tracing"))
    for cat, name in (("sched", "sched_process_exec"), ("sched", "sched_process_exit"),
                      ("task", "task_newtask"), ("syscalls", "sys_enter_execve"),
                      ("syscalls", "sys_exit_execve"), ("syscalls", "sys_enter_execveat"),
                      ("syscalls", "sys_enter_exit_group"), ("signal", "signal_deliver"),
                      ("syscalls", "sys_enter_chdir")):
        out.append(_tracepoint(cat, name)())
    build = f"/lib/modules/{rel}/build"
    hdr = os.path.isdir(os.path.join(build, "include"))
    out.append(Check("kernel headers", hdr, os.path.realpath(build) if hdr else f"{build} missing",
                     "deploy/setup.sh installs linux-headers and links them (see README)"))
    try:
        bcc = importlib.import_module("bcc")
        out.append(Check("bcc", True, f"{getattr(bcc, '__version__', '?')} ({bcc.__file__})"))
    except ImportError as e:
        out.append(Check("bcc", False, str(e), "apt-get install python3-bpfcc, and a venv made with "
                         "/usr/bin/python3 -m venv --system-site-packages"))
    cg2 = next((p for p in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
                if os.path.exists(os.path.join(p, "cgroup.controllers"))), None)
    out.append(Check("cgroup v2", cg2 is not None, cg2 or "not mounted",
                     "mount cgroup2 (needed for enforcement and pod attribution)", required=False))
    out.append(Check("nft", shutil.which("nft") is not None, shutil.which("nft") or "missing",
                     "apt-get install nftables (needed for quarantine)", required=False))
    try:
        importlib.import_module("nftables")
        out.append(Check("python: nftables", True, "installed", required=False))
    except ImportError:
        out.append(Check("python: nftables", False, "missing (quarantine)",
                         "apt-get install python3-nftables", required=False))
    path = cfg.enforce.policy_file
    if path:
        from agentwarden.enforce.policy import PolicyError, parse

        try:
            with open(path) as f:
                rules = parse(f.read(), path).rules
            out.append(Check("policy", True, f"{path}: {len(rules)} rules"))
            refuses_root = any(r.kind == "session" and r.session_as_root and r.action in ("deny", "kill")
                               for r in rules)
            out.append(Check("root agents", refuses_root,
                             "refused by a session rule" if refuses_root else
                             "allowed: a root agent can stop or kill the daemon, and what only the daemon "
                             "enforces ends with it",
                             "add a rule `when: {kind: session, session: {as_root: true}}, action: deny`",
                             required=False))
        except FileNotFoundError:
            out.append(Check("policy", False, f"{path} missing: the daemon records but enforces nothing",
                             f"install -D deploy/policy.yaml {path}", required=False))
        except (OSError, PolicyError) as e:
            out.append(Check("policy", False, str(e), "fix the file (agentwarden policy check)"))
    for mod, why in (("clickhouse_connect", "store client"), ("chdb", "embedded store"),
                     ("psutil", "process seeding"), ("yaml", "config"), ("click", "CLI")):
        try:
            m = importlib.import_module(mod)
            out.append(Check(f"python: {mod}", True, getattr(m, "__version__", "installed")))
        except ImportError:
            out.append(Check(f"python: {mod}", False, f"missing ({why})", "pip install agentwarden's "
                             "dependencies (deploy/setup.sh does)", required=mod != "chdb" or
                             cfg.store.dsn.startswith("chdb")))
    sock_dir = os.path.dirname(cfg.control_socket)
    out.append(Check("control socket dir", os.access(os.path.dirname(sock_dir) or "/", os.W_OK),
                     sock_dir, f"make {sock_dir} creatable by the daemon"))
    try:
        import grp

        grp.getgrnam(cfg.control_group)
        out.append(Check(f"group {cfg.control_group}", True, "exists", required=False))
    except KeyError:
        out.append(Check(f"group {cfg.control_group}", False, "missing: only root can use the CLI",
                         f"groupadd --system {cfg.control_group}", required=False))
    return out

"""Kernel functions (kfuncs) called from programs bcc compiles.

bcc 0.26 cannot emit a kfunc call (its clang leaves an extern unresolved, and it has no
BTF relocation step).  The C side calls each kfunc through a function pointer set to an
impossible helper number (AW_KF_* below, handed to the compile as -D values); after the
compile, and before the program is verified, `patch` rewrites each such `call` instruction
into a kfunc call: src_reg BPF_PSEUDO_KFUNC_CALL, imm the function's id in the running
kernel's BTF.  The verifier then checks it as it checks any kfunc call (arguments, reference
counts: a task from bpf_task_from_pid must be released on every path).

Used for one thing the helpers cannot do: signal a process other than the current one
(bpf_send_signal_task, 6.13+), so that a process resumed while it waits for a decision is
killed at the moment of the resume, from the resumer's context (guard_task.bpf.c), and a child
forked while its parent connects a Unix socket is killed before it first runs (guard_connect.bpf.c).
"""

from __future__ import annotations

import ctypes as ct
import logging
import struct
from typing import Any

from agentwarden.probes import btf

log = logging.getLogger(__name__)

# kfunc -> the placeholder helper number its calls compile to (far above any real helper)
PLACEHOLDERS = {"bpf_task_from_pid": 0x7F01, "bpf_send_signal_task": 0x7F02, "bpf_task_release": 0x7F03}
MACROS = {"bpf_task_from_pid": "AW_KF_TASK_FROM_PID", "bpf_send_signal_task": "AW_KF_SEND_SIGNAL_TASK",
          "bpf_task_release": "AW_KF_TASK_RELEASE"}
# programs that call them: patched before their first load (bcc's TRACEPOINT_PROBEs too: loader.py
# defers their load to Probes._load_all)
PROGRAMS = (b"aw_signal_generate", b"aw_sched_waking", b"tracepoint__sched__sched_process_fork")

BPF_CALL = 0x85            # BPF_JMP | BPF_CALL
BPF_PSEUDO_KFUNC_CALL = 2  # src_reg of a call to a kernel function
_INSN = struct.Struct("<BBhi")


def ids() -> dict[str, int] | None:
    """Each kfunc's BTF id in the running kernel; None when BTF or any of them is missing."""
    try:
        b = btf.vmlinux()
    except (OSError, btf.BtfError):
        return None
    found = {name: b.by_name.get((btf.KIND_FUNC, name)) for name in PLACEHOLDERS}
    if any(v is None for v in found.values()):
        return None
    return {k: int(v) for k, v in found.items() if v is not None}


def cflags(available: dict[str, int] | None) -> list[str]:
    flags = [f"-D{MACROS[name]}={number:#x}" for name, number in PLACEHOLDERS.items()]
    return [f"-DAW_KFUNCS={int(available is not None)}", *flags]


def rewrite(insns: bytearray | Any, size: int, available: dict[str, int]) -> int:
    """Turn every placeholder call in the instructions into its kfunc call.  Returns how many."""
    by_number = {number: available[name] for name, number in PLACEHOLDERS.items()}
    n = 0
    for off in range(0, size - _INSN.size + 1, _INSN.size):
        code, regs, _off, imm = _INSN.unpack_from(insns, off)
        if code == BPF_CALL and (regs >> 4) == 0 and imm in by_number:
            _INSN.pack_into(insns, off, code, (regs & 0x0F) | (BPF_PSEUDO_KFUNC_CALL << 4), 0, by_number[imm])
            n += 1
    return n


def patch(bpf: Any, name: bytes, available: dict[str, int]) -> int:
    """Rewrite one compiled (not yet loaded) function of a bcc module in place."""
    from bcc.libbcc import lib as libbcc

    start = libbcc.bpf_function_start(bpf.module, name)
    size = int(libbcc.bpf_function_size(bpf.module, name))
    if not start or size <= 0:
        raise LookupError(f"no compiled function {name.decode()}")
    n = rewrite((ct.c_uint8 * size).from_address(start), size, available)
    log.debug("%s: %d kfunc calls", name.decode(), n)
    return n

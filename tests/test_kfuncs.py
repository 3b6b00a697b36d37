"""probes/kfuncs.py: placeholder helper calls become kfunc calls, and nothing else changes."""

from __future__ import annotations

import struct

from agentwarden.probes import kfuncs

INSN = struct.Struct("<BBhi")
IDS = {"bpf_task_from_pid": 101, "bpf_send_signal_task": 102, "bpf_task_release": 103}


def program(*insns: tuple[int, int, int, int]) -> bytearray:
    return bytearray(b"".join(INSN.pack(*i) for i in insns))


def test_placeholder_calls_become_kfunc_calls() -> None:
    code = program(
        (0xB7, 0x01, 0, 7),                                            # r1 = 7
        (0x85, 0x00, 0, kfuncs.PLACEHOLDERS["bpf_task_from_pid"]),       # call placeholder
        (0x85, 0x00, 0, 14),                                           # call bpf_get_current_pid_tgid
        (0x85, 0x00, 0, kfuncs.PLACEHOLDERS["bpf_send_signal_task"]),
        (0x18, 0x00, 0, kfuncs.PLACEHOLDERS["bpf_task_release"]),      # not a call: an immediate
        (0x85, 0x10, 0, kfuncs.PLACEHOLDERS["bpf_task_release"]),      # a BPF-to-BPF call: untouched
        (0x85, 0x00, 0, kfuncs.PLACEHOLDERS["bpf_task_release"]),
        (0x95, 0x00, 0, 0),                                            # exit
    )
    before = bytes(code)
    assert kfuncs.rewrite(code, len(code), IDS) == 3
    got = [INSN.unpack_from(code, i) for i in range(0, len(code), 8)]
    assert got[1] == (0x85, kfuncs.BPF_PSEUDO_KFUNC_CALL << 4, 0, 101)
    assert got[3] == (0x85, kfuncs.BPF_PSEUDO_KFUNC_CALL << 4, 0, 102)
    assert got[6] == (0x85, kfuncs.BPF_PSEUDO_KFUNC_CALL << 4, 0, 103)
    for i in (0, 2, 4, 5, 7):
        assert code[i * 8:(i + 1) * 8] == before[i * 8:(i + 1) * 8], i


def test_cflags_say_whether_the_kernel_has_them() -> None:
    assert "-DAW_KFUNCS=0" in kfuncs.cflags(None) and "-DAW_KFUNCS=1" in kfuncs.cflags(IDS)
    assert "-DAW_KF_TASK_FROM_PID=0x7f01" in kfuncs.cflags(IDS)


def test_this_kernel_has_them() -> None:
    """BTF names each kfunc (6.13+); the decision stop's SIGCONT guard depends on them."""
    ids = kfuncs.ids()
    assert ids is not None and set(ids) == set(kfuncs.PLACEHOLDERS), ids

"""Struct member offsets of the running kernel, from its own BTF (/sys/kernel/btf/vmlinux).

bcc compiles against whatever headers the machine has, which may be another kernel's
(see the kernel notes): a struct offset taken from them could be wrong.  The running
kernel describes its own types in BTF; this reads that description (the format of
Documentation/bpf/btf.rst: a header, a type section, a string section) and resolves
dotted member paths, descending through anonymous structs and unions as C does.  The
offsets are handed to the bcc compile as -D values.
"""

from __future__ import annotations

import contextlib
import struct
from functools import lru_cache

VMLINUX = "/sys/kernel/btf/vmlinux"

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19


class BtfError(LookupError):
    pass


class Btf:
    def __init__(self, data: bytes) -> None:
        header = struct.unpack_from("<HBBIIIII", data)
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = header
        if magic != 0xEB9F:
            raise BtfError("not BTF (bad magic)")
        types = data[hdr_len + type_off: hdr_len + type_off + type_len]
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        # type id -> (kind, name, kind_flag, size_or_type, members [(name, type, bit offset)])
        self.types: list[tuple[int, str, bool, int, list[tuple[str, int, int]]]] = [(0, "", False, 0, [])]
        self.by_name: dict[tuple[int, str], int] = {}
        self.enumerators: dict[str, int] = {}      # every enum constant of the kernel, by name
        off = 0
        while off < len(types):
            name_off, info, size_type = struct.unpack_from("<III", types, off)
            off += 12
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
            members: list[tuple[str, int, int]] = []
            if kind in (KIND_INT, KIND_VAR, KIND_DECL_TAG):
                off += 4
            elif kind == KIND_ARRAY:
                off += 12
            elif kind in (KIND_STRUCT, KIND_UNION):
                for _ in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", types, off)
                    off += 12
                    bit = m_off & 0xFFFFFF if kflag else m_off
                    members.append((self._str(m_name), m_type, bit))
            elif kind == KIND_ENUM:
                for _ in range(vlen):
                    e_name, e_val = struct.unpack_from("<Ii", types, off)
                    off += 8
                    self.enumerators[self._str(e_name)] = e_val
            elif kind == KIND_FUNC_PROTO:
                off += 8 * vlen
            elif kind in (KIND_DATASEC, KIND_ENUM64):
                off += 12 * vlen
            name = self._str(name_off)
            self.types.append((kind, name, kflag, size_type, members))
            if name:
                self.by_name.setdefault((kind, name), len(self.types) - 1)

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _resolve(self, tid: int) -> int:
        """Through typedefs and qualifiers to the type itself."""
        while self.types[tid][0] in (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG):
            tid = self.types[tid][3]
        return tid

    def _member(self, tid: int, name: str) -> tuple[int, int] | None:
        """(bit offset, type id) of a member, searching anonymous structs and unions too."""
        for m_name, m_type, bit in self.types[self._resolve(tid)][4]:
            if m_name == name:
                return bit, m_type
            if not m_name:
                inner = self._member(m_type, name)
                if inner is not None:
                    return bit + inner[0], inner[1]
        return None

    def offset(self, struct_name: str, member: str) -> int:
        """Byte offset of `member` (no pointers followed) in `struct struct_name`."""
        tid = self.by_name.get((KIND_STRUCT, struct_name))
        if tid is None:
            raise BtfError(f"struct {struct_name} is not in the kernel's BTF")
        found = self._member(tid, member)
        if found is None:
            raise BtfError(f"struct {struct_name} has no member {member}")
        bit, _ = found
        if bit % 8:
            raise BtfError(f"{struct_name}.{member} is a bit field")
        return bit // 8


    def first_offset(self, struct_name: str, members: str) -> int:
        """offset() of the first of `a|b|c` the struct has."""
        last: BtfError | None = None
        for m in members.split("|"):
            try:
                return self.offset(struct_name, m)
            except BtfError as e:
                last = e
        assert last is not None
        raise last


@lru_cache(maxsize=1)
def vmlinux() -> Btf:
    with open(VMLINUX, "rb") as f:
        return Btf(f.read())


# What the probes read, as (macro, struct, member); a member "a|b" takes the first the kernel has
# (inode ctime: i_ctime_sec since 6.11, the timespec64 __i_ctime or i_ctime before, tv_sec first).
OFFSETS = (
    ("AW_OFF_INODE_CTIME_SEC", "inode", "i_ctime_sec|__i_ctime|i_ctime"),
    ("AW_OFF_TASK_MM", "task_struct", "mm"),
    ("AW_OFF_MM_ARG_START", "mm_struct", "arg_start"),
    ("AW_OFF_MM_ARG_END", "mm_struct", "arg_end"),
    ("AW_OFF_MM_ENV_START", "mm_struct", "env_start"),
    ("AW_OFF_MM_ENV_END", "mm_struct", "env_end"),
    ("AW_OFF_MM_EXE_FILE", "mm_struct", "exe_file"),
    ("AW_OFF_FILE_INODE", "file", "f_inode"),
    ("AW_OFF_INODE_INO", "inode", "i_ino"),
    ("AW_OFF_INODE_SB", "inode", "i_sb"),
    ("AW_OFF_SB_DEV", "super_block", "s_dev"),
    ("AW_OFF_TASK_FS", "task_struct", "fs"),
    ("AW_OFF_FS_PWD", "fs_struct", "pwd"),
    ("AW_OFF_PATH_DENTRY", "path", "dentry"),
    ("AW_OFF_DENTRY_INODE", "dentry", "d_inode"),
    # the working directory's path, walked up to the root across mounts (process.bpf.c)
    ("AW_OFF_PATH_MNT", "path", "mnt"),
    ("AW_OFF_DENTRY_PARENT", "dentry", "d_parent"),
    ("AW_OFF_DENTRY_NAME", "dentry", "d_name"),
    ("AW_OFF_QSTR_NAME", "qstr", "name"),
    ("AW_OFF_QSTR_LEN", "qstr", "len"),
    ("AW_OFF_MOUNT_PARENT", "mount", "mnt_parent"),
    ("AW_OFF_MOUNT_MOUNTPOINT", "mount", "mnt_mountpoint"),
    ("AW_OFF_MOUNT_MNT", "mount", "mnt"),
    ("AW_OFF_VFSMOUNT_ROOT", "vfsmount", "mnt_root"),
    ("AW_OFF_TASK_EXIT_CODE", "task_struct", "exit_code"),
    # a process stopped for a decision is still that process, not a later one with its number
    ("AW_OFF_TASK_START_BOOTTIME", "task_struct", "start_boottime"),
    # a process woken from a ptrace stop (guard.bpf.c aw_sched_waking)
    ("AW_OFF_TASK_STATE", "task_struct", "__state|state"),
    # a 32-bit system call in progress (net.bpf.c in_compat: TS_COMPAT), and how the new image
    # came to be: its first exec since its parent forked it (guard.bpf.c, parent_unless)
    ("AW_OFF_TASK_THREAD_INFO", "task_struct", "thread_info"),
    ("AW_OFF_THREAD_INFO_STATUS", "thread_info", "status"),
    ("AW_OFF_TASK_SELF_EXEC_ID", "task_struct", "self_exec_id"),
    # a traced exec does not wait for its TLS uprobes (guard_exec.bpf.c: its tracer would resume it)
    ("AW_OFF_TASK_PTRACE", "task_struct", "ptrace"),
    ("AW_OFF_TASK_PARENT_EXEC_ID", "task_struct", "parent_exec_id"),
    # a forked child writing on its parent's TLS connection (guard.bpf.c ssl_streams)
    ("AW_OFF_TASK_REAL_PARENT", "task_struct", "real_parent"),
    ("AW_OFF_TASK_TGID", "task_struct", "tgid"),
    # ... keyed by the process's start too (its group leader's), so that a process with a reused number
    # does not go on from a dead one's framing
    ("AW_OFF_TASK_GROUP_LEADER", "task_struct", "group_leader"),
    # a Unix connect's address (guard.bpf.c aw_connect_unix: the program's context is this struct)
    ("AW_OFF_SOCK_ADDR_UADDR", "bpf_sock_addr_kern", "uaddr"),
    # a socket first seen moving bytes: its family, type, peer and cookie (net.bpf.c sock_conn)
    ("AW_OFF_SKC_FAMILY", "sock_common", "skc_family"),
    ("AW_OFF_SKC_DADDR", "sock_common", "skc_daddr"),
    ("AW_OFF_SKC_DPORT", "sock_common", "skc_dport"),
    ("AW_OFF_SKC_V6_DADDR", "sock_common", "skc_v6_daddr"),
    ("AW_OFF_SKC_COOKIE", "sock_common", "skc_cookie"),
    ("AW_OFF_SK_TYPE", "sock", "sk_type"),
    # a send waiting for the handshake inside tcp_sendmsg (guard_msg.bpf.c aw_sockops)
    ("AW_OFF_SK_WRITE_PENDING", "sock", "sk_write_pending"),
    # ... and bytes queued before it (TCP Fast Open set through a call the cgroup hook does not see)
    ("AW_OFF_TCP_WRITE_SEQ", "tcp_sock", "write_seq"),
    ("AW_OFF_UNIX_PEER", "unix_sock", "peer"),
    ("AW_OFF_UNIX_ADDR", "unix_sock", "addr"),
    ("AW_OFF_UNIX_ADDRESS_LEN", "unix_address", "len"),
    ("AW_OFF_UNIX_ADDRESS_NAME", "unix_address", "name"),
    # the socket behind an fd in a system call's registers (net.bpf.c fd_sock): the registers
    # describe the send or receive only when they name this socket (red team: io_uring)
    ("AW_OFF_TASK_FILES", "task_struct", "files"),
    # PF_EXITING: a tracer's exit resumes what it stopped (guard.bpf.c join_traced)
    ("AW_OFF_TASK_FLAGS", "task_struct", "flags"),
    ("AW_OFF_FILES_FDT", "files_struct", "fdt"),
    ("AW_OFF_FDT_MAX_FDS", "fdtable", "max_fds"),
    ("AW_OFF_FDT_FD", "fdtable", "fd"),
    ("AW_OFF_FILE_PRIVATE_DATA", "file", "private_data"),
    ("AW_OFF_SOCKET_SK", "socket", "sk"),
    # a write through /proc/PID/mem (guard_task.bpf.c proc_mem_target): the file is procfs's
    # `mem`, and the process it writes is its proc_inode's pid's task
    ("AW_OFF_FILE_PATH", "file", "f_path"),
    ("AW_OFF_SB_MAGIC", "super_block", "s_magic"),
    ("AW_OFF_PROC_INODE_PID", "proc_inode", "pid"),
    ("AW_OFF_PROC_INODE_VFS", "proc_inode", "vfs_inode"),
    ("AW_OFF_PID_TASKS", "pid", "tasks"),
    ("AW_OFF_TASK_PID_LINKS", "task_struct", "pid_links"),
)


# Whether a Unix socket is shared with another process (guard_connect.bpf.c unix_shared): its
# file's references, the descriptor table's users and the process's threads; and the threads in
# connect() when one forks (the fork check, sched_process_fork: the thread list of 6.7+, each thread's saved
# registers found from its kernel stack).  All or none: -DAW_UNIX_SHARE=1 when the kernel has them.
UNIX_SHARE_OFFSETS = (
    ("AW_OFF_SOCK_ADDR_SK", "bpf_sock_addr_kern", "sk"),
    ("AW_OFF_SK_SOCKET", "sock", "sk_socket"),
    ("AW_OFF_SKC_STATE", "sock_common", "skc_state"),
    ("AW_OFF_SOCKET_FILE", "socket", "file"),
    ("AW_OFF_FILE_REF", "file", "f_ref|f_count"),
    ("AW_OFF_FILES_COUNT", "files_struct", "count"),
    ("AW_OFF_TASK_SIGNAL", "task_struct", "signal"),
    ("AW_OFF_SIGNAL_NR_THREADS", "signal_struct", "nr_threads"),
    ("AW_OFF_SIGNAL_THREAD_HEAD", "signal_struct", "thread_head"),
    ("AW_OFF_TASK_THREAD_NODE", "task_struct", "thread_node"),
    ("AW_OFF_TASK_STACK", "task_struct", "stack"),
    ("AW_OFF_TASK_PID", "task_struct", "pid"),
    # a message that carries descriptors: the last queued on the receiving socket, its control block
    ("AW_OFF_SK_RECEIVE_QUEUE", "sock", "sk_receive_queue"),
    ("AW_OFF_SKB_HEAD_PREV", "sk_buff_head", "prev"),
    ("AW_OFF_SKB_CB", "sk_buff", "cb"),
    ("AW_OFF_UNIX_SKB_FP", "unix_skb_parms", "fp"),
)


def unix_connect_attach_type() -> int | None:
    """BPF_CGROUP_UNIX_CONNECT of the running kernel (6.7+), None where it has none."""
    try:
        return vmlinux().enumerators.get("BPF_CGROUP_UNIX_CONNECT")
    except (OSError, BtfError):
        return None


def _has_member(btf: Btf, struct_name: str, member: str) -> bool:
    try:
        btf.offset(struct_name, member)
    except BtfError:
        return False
    return True


def cflags() -> list[str]:
    """-D flags with every offset the probes need; AW_BTF=0 (and no offsets) without BTF."""
    try:
        btf = vmlinux()
        flags = ["-DAW_BTF=1"] + [f"-D{macro}={btf.first_offset(s, m)}" for macro, s, m in OFFSETS]
        with contextlib.suppress(BtfError):   # a separate nsec field (6.11+); else tv_nsec follows tv_sec
            flags.append(f"-DAW_OFF_INODE_CTIME_NSEC={btf.offset('inode', 'i_ctime_nsec')}")
        try:
            share = [f"-D{macro}={btf.first_offset(st, m)}" for macro, st, m in UNIX_SHARE_OFFSETS]
            # file_ref_t (6.13+) holds the count less one; atomic_long_t f_count before it, the count
            share.append(f"-DAW_FILE_REF_BIAS={int(_has_member(btf, 'file', 'f_ref'))}")
            flags += ["-DAW_UNIX_SHARE=1", *share]
        except BtfError:
            flags.append("-DAW_UNIX_SHARE=0")
        with contextlib.suppress(BtfError):   # CONFIG_MEMCG: the task a memory belongs to (guard_memwrite)
            flags.append(f"-DAW_OFF_MM_OWNER={btf.offset('mm_struct', 'owner')}")
        return flags
    except (OSError, BtfError):
        return ["-DAW_BTF=0"]

// guard_task.bpf.c: processes.  A process an agent takes control of (ptrace, pidfd_getfd) joins
// its session; self-protection of the daemon; the decision stop that only the daemon ends
// (sched_waking, signal_generate, the loader's entry), and a frozen daemon cgroup.
// Uses guard.bpf.c, guard_exec.bpf.c.

// ---- a process an agent takes control of joins its session ---------------------
//
// ptrace(ATTACH/SEIZE) or process_vm_writev on a process outside every agent session would
// let the agent run anything through it (gdb -p PID -ex 'call system(...)'), untracked and
// able to approve.  Called from the raw sys_enter before the call runs: the target joins the
// caller's session, so what it runs from then on is the agent's, and it can never approve.
#define AW_PTRACE_ATTACH 16
#define AW_PTRACE_SEIZE 0x4206
static __always_inline void guard_taint(struct track_info *t, long nr, u64 request, u64 target)
{
    if (!t || (nr == __NR_ptrace && request != AW_PTRACE_ATTACH && request != AW_PTRACE_SEIZE))
        return;
    u32 pid = (u32)target;
    if (!pid || pid == (u32)cfg(AW_CFG_DAEMON) || tracked.lookup(&pid))
        return;   // the daemon never joins a session (a root agent's PTRACE_SEIZE of it: red team)
    struct track_info joined = *t;
    joined.flags |= AW_TRACK_JOINED;
    if (tracked.insert(&pid, &joined) != 0) {
        count(AW_CNT_TRACK_FULL);
        return;
    }
    filter_add(pid, 1);
    struct fork_event *e = events.ringbuf_reserve(sizeof(*e));   // the tracker learns of it as a child
    if (!e) {
        count(AW_CNT_LOST);
        return;
    }
    fill_hdr(&e->h, AW_EV_FORK, t);
    e->child = pid;
    e->joined = 1;
    events.ringbuf_submit(e, ring_wake());
}

// pidfd_getfd: a descriptor of another process, taken without connect() or accept(): a
// socket had this way never met the connect checks (a Postgres Unix socket of a process
// outside the session, red team) and is in no capture map.  A session under SQL or HTTP rules
// may not take one: the caller is killed before the call runs (an agent has no use for it).
static __always_inline void guard_fdgrab(struct track_info *t)
{
    if (!t || !(cfg(AW_CFG_FLAGS) & AW_FLAG_SQL))
        return;
    bpf_send_signal(AW_SIGKILL);
    struct guard_event *e = guard_begin(AW_G_FDGRAB, t);
    if (!e)
        return;
    e->done = AW_DONE_KILLED;
    e->target = 438;   // __NR_pidfd_getfd
    guard_send(e);
}

// ---- self-protection (called from the raw sys_enter of net.bpf.c) -------------

#if defined(__x86_64__) && AW_RAW_SYSCALLS
static __always_inline void guard_self(struct track_info *t, long nr, u64 target_pid);

#if AW_SOCK_CAPTURE
// The process whose memory a write on fd `fd` goes to when that fd is a /proc/PID/mem (or
// /proc/PID/task/TID/mem) file: its tgid, else 0.  Such a write needs no ptrace attach and no
// process_vm_writev (red team: a root agent's `pwrite` into the daemon's heap, or into a shell
// of its user outside the session), and a descriptor opened anywhere (inherited, passed) is
// caught at the write, not at an open.  procfs's `mem` is the only file of that name there.
#define AW_PROC_SUPER_MAGIC 0x9fa0
static __always_inline u32 proc_mem_target(s32 fd, u32 *owner)
{
    u64 file = fd_file(fd);
    u64 inode = file ? kread(file + AW_OFF_FILE_INODE) : 0;
    u64 sb = inode ? kread(inode + AW_OFF_INODE_SB) : 0;
    if (!sb || kread(sb + AW_OFF_SB_MAGIC) != AW_PROC_SUPER_MAGIC)
        return 0;
    u64 dentry = kread(file + AW_OFF_FILE_PATH + AW_OFF_PATH_DENTRY);
    if (!dentry || kread_n(dentry + AW_OFF_DENTRY_NAME + AW_OFF_QSTR_LEN, 4) != 3)
        return 0;
    u32 name = kread_n(kread(dentry + AW_OFF_DENTRY_NAME + AW_OFF_QSTR_NAME), 4);
    if (name != 0x006d656d)   // "mem\0"
        return 0;
    // the file writes the memory it opened (private_data: the mm), which a vfork child shares
    // with its parent (red team: the daemon's `ss -K` child, stopped before its exec): the
    // memory's owner is checked too
#ifdef AW_OFF_MM_OWNER
    u64 mm = kread(file + AW_OFF_FILE_PRIVATE_DATA);
    u64 otask = mm ? kread(mm + AW_OFF_MM_OWNER) : 0;
    *owner = otask ? (u32)kread_n(otask + AW_OFF_TASK_TGID, 4) : 0;
#endif
    u64 pid = kread(inode - AW_OFF_PROC_INODE_VFS + AW_OFF_PROC_INODE_PID);
    u64 first = pid ? kread(pid + AW_OFF_PID_TASKS) : 0;   // tasks[PIDTYPE_PID].first
    return first ? (u32)kread_n(first - AW_OFF_TASK_PID_LINKS + AW_OFF_TASK_TGID, 4) : 0;
}

// A write into another process's memory through /proc/PID/mem: into the daemon's (whatever pid
// the file names), the writer is killed before the call moves a byte (the SIGKILL is pending
// when the kernel pins the first page, and get_user_pages stops at a fatal signal: the test
// writes a marker and reads it back); into a process outside every session, that process joins
// the writer's session before the write runs (opening the file took ptrace rights over it; at
// the exit, a large write's first pages would have landed, and code written there could fork
// an untracked child first: red team).
static __always_inline int guard_memwrite(struct track_info *t, long nr, s32 fd)
{
    u32 owner = 0;
    u32 target = proc_mem_target(fd, &owner);
    u32 self = bpf_get_current_pid_tgid() >> 32;
    u32 daemon = (u32)cfg(AW_CFG_DAEMON);
    if (!target)
        return 0;
    if (daemon && (target == daemon || owner == daemon)) {
        guard_self(t, nr, daemon);
        return 0;
    }
    if (target != self)
        guard_taint(t, nr, 0, target);
    if (owner && owner != self && owner != target)
        guard_taint(t, nr, 0, owner);
    return 0;
}
#endif

// setpriority/ioprio_set (which, who): a process, a process group (the daemon leads its own)
// or a whole user (who 0: the caller's), which reaches the daemon when it is the daemon's user
static __always_inline void guard_prio(struct track_info *t, long nr, u64 which, u64 who)
{
    u64 base = nr == __NR_setpriority ? 0 : 1;   // PRIO_PROCESS, IOPRIO_WHO_PROCESS
    u64 target = 0;
    if (which == base || which == base + 1) {
        target = who;
    } else if (which == base + 2) {
        u32 uid = who ? (u32)who : (u32)bpf_get_current_uid_gid();
        if (uid == (u32)cfg(AW_CFG_DAEMON_UID))
            target = cfg(AW_CFG_DAEMON);
    }
    guard_self(t, nr, target);
}

static __always_inline void guard_self(struct track_info *t, long nr, u64 target_pid)
{
    u64 daemon = cfg(AW_CFG_DAEMON);
    if (nr == __NR_kill && (s32)target_pid == -1)   // kill(-1, ...) reaches the daemon too
        target_pid = daemon;
    if (!t || !daemon || (nr != __NR_bpf && target_pid != daemon))
        return;
    bpf_send_signal(AW_SIGKILL);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 now = bpf_ktime_get_boot_ns();
    offenders.update(&tgid, &now);
    struct guard_event *e = guard_begin(AW_G_SELF, t);
    if (!e)
        return;
    e->done = AW_DONE_KILLED;
    e->target = nr;
    guard_send(e);
}
#endif

// ---- killing another process (the kfuncs: guard.bpf.c) --------------------------------

// The process `tgid` was stopped for a decision at boot time `since`: is it still that
// process (not a later one that reuses the number)?  `task` is its task_struct.
static __always_inline int deciding_since(u64 task, u64 since)
{
#if AW_BTF
    u64 started = task ? kread(task + AW_OFF_TASK_START_BOOTTIME) : 0;
    return started && started <= since;
#else
    return 1;
#endif
}

// SIGKILL to an exec stopped for a decision that someone else resumes, from the resumer's
// context.  Sent while the resumer holds the target's signal lock, so the kernel delivers
// it by irq_work the moment that lock is dropped; the ld.so entry uprobe (aw_loader_entry)
// and the first-syscall check stand behind it.  Returns 1 when the signal went.
static __always_inline int kill_resumed(u32 tgid, u64 since)
{
#if AW_KFUNCS && AW_BTF
    struct task_struct *task = aw_task_from_pid(tgid);
    if (!task)
        return 0;
    int ok = deciding_since((u64)task, since) && aw_send_signal_task(task, AW_SIGKILL, AW_PIDTYPE_TGID, 0) == 0;
    aw_task_release(task);
    return ok;
#else
    return 0;
#endif
}

// ---- the decision stop: only the daemon ends it -----------------------------------

// Called from the raw sys_enter of every tracked process (net.bpf.c): a process still
// waiting for its decision cannot be making a system call unless someone resumed it.
// Nothing of the new image has touched the world before this first call; the call
// itself still runs (there is no bpf_override_return here), so this guards real
// programs (whose first calls are the loader's brk/mmap), see README.
static __always_inline int guard_escaped(u32 tgid, struct track_info *t)
{
    u64 *since = exec_deciding.lookup(&tgid);
    if (!since)
        return 0;
    if (!deciding_since(bpf_get_current_task(), *since)) {
        exec_deciding.delete(&tgid);   // a later process with the number of one that died stopped
        return 0;
    }
    bpf_send_signal(AW_SIGKILL);
    exec_deciding.delete(&tgid);
    struct guard_event *e = guard_begin(AW_G_ESCAPED, t);
    if (e) {
        e->done = AW_DONE_KILLED;
        guard_send(e);
    }
    return 1;
}

// The first instruction of a dynamic loader (a uprobe on the entry point of each ld.so the
// daemon finds, probes/loader.py attach_loader_guards): every dynamically linked program
// starts there, after its exec.  A process that reaches it while its exec waits for a
// decision was resumed by someone else, by any means (SIGCONT, a debugger's PTRACE_CONT,
// job control): killed before the loader's first instruction runs.  A uprobe costs about a
// microsecond, once per exec of a dynamic program, on the whole host.
int aw_loader_entry(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 0;
    u64 *since = exec_deciding.lookup(&tgid);
    if (!since)
        return 0;
    exec_deciding.delete(&tgid);
    if (!deciding_since(bpf_get_current_task(), *since))
        return 0;
    bpf_send_signal(AW_SIGKILL);
    struct track_info *t = tracked.lookup(&tgid);
    struct track_info outside = {};
    struct guard_event *e = guard_begin(AW_G_ESCAPED, t ? t : &outside);
    if (e) {
        e->done = AW_DONE_KILLED;
        e->target = AW_ESCAPE_LOADER;
        guard_send(e);
    }
    return 0;
}

// sched:sched_waking (its format), in the waker's context
struct aw_waking_tp {
    u64 common;
    char comm[16];
    s32 pid;
    int prio;
    int target_cpu;
};
#define AW_TASK_TRACED 8   // __TASK_TRACED: in a ptrace stop

// A debugger resumes a process without any signal: PTRACE_CONT, PTRACE_DETACH and the like wake
// it from its ptrace stop.  An exec waiting for its decision that a tracer wakes is killed
// from the tracer's context, before it runs (a static binary, or one with a loader of its own,
// meets no loader uprobe).  Runs on every wakeup of the host: the first test is the inlined
// tracked-process filter (a process waiting for a decision is an agent's).
// A process outside every session that an agent's process wakes from a ptrace stop (a
// debugger's PTRACE_CONT, DETACH or syscall step, after it stopped the process and could
// write its registers and memory): it joins the tracer's session before it runs again, so
// what the agent made it do is judged as the agent's.  Without the syscall hook this is where
// a ptrace is seen (a ptrace that never stops its target changes nothing it runs).
static __always_inline void join_traced(u32 pid)
{
#if AW_KFUNCS && AW_BTF
    u32 waker = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = maybe_tracked(waker) ? tracked.lookup(&waker) : 0;
    if (!t) {
        // a tracer that exits detaches its tracees after it left `tracked` (red team: it exited
        // instead of resuming them): found among the processes that just exited.  Only an
        // exiting waker (PF_EXITING) is looked up: this runs on every wakeup of the host.
        u32 pflags = 0;
        bpf_probe_read_kernel(&pflags, sizeof(pflags), (void *)(bpf_get_current_task() + AW_OFF_TASK_FLAGS));
        if (!(pflags & 0x4))
            return;
        struct exited_tracker *ex = exited_tracked.lookup(&waker);
        if (!ex || ex->start != kread(bpf_get_current_task() + AW_OFF_TASK_START_BOOTTIME))
            return;
        t = &ex->t;
    }
    struct task_struct *task = aw_task_from_pid(pid);
    if (!task)
        return;
    u32 state = 0;
    bpf_probe_read_kernel(&state, sizeof(state), (void *)((u64)task + AW_OFF_TASK_STATE));
    u32 tgid = 0;
    bpf_probe_read_kernel(&tgid, sizeof(tgid), (void *)((u64)task + AW_OFF_TASK_TGID));
    aw_task_release(task);
    if ((state & AW_TASK_TRACED) && tgid != waker)
        guard_taint(t, __NR_ptrace, AW_PTRACE_ATTACH, tgid);
#endif
}

int aw_sched_waking(struct aw_waking_tp *args)
{
#if AW_KFUNCS && AW_BTF
    u32 pid = args->pid;
    if (!maybe_tracked(pid)) {
        join_traced(pid);
        return 0;
    }
    if (judged_transports.lookup(&pid)) {
        // resumed from a ptrace stop (another process may have written it): no longer judged
        struct task_struct *jt = aw_task_from_pid(pid);
        if (jt) {
            u32 st = 0;
            bpf_probe_read_kernel(&st, sizeof(st), (void *)((u64)jt + AW_OFF_TASK_STATE));
            aw_task_release(jt);
            if (st & AW_TASK_TRACED)
                judged_transports.delete(&pid);
        }
    }
    u64 *since = exec_deciding.lookup(&pid);
    if (!since)
        return 0;
    u32 waker = bpf_get_current_pid_tgid() >> 32;
    if (waker == pid || waker == (u32)cfg(AW_CFG_DAEMON))
        return 0;
    struct task_struct *task = aw_task_from_pid(pid);
    if (!task)
        return 0;
    u32 state = 0;
    bpf_probe_read_kernel(&state, sizeof(state), (void *)((u64)task + AW_OFF_TASK_STATE));
    int resumed = (state & AW_TASK_TRACED) && deciding_since((u64)task, *since);
    int killed = resumed && aw_send_signal_task(task, AW_SIGKILL, AW_PIDTYPE_TGID, 0) == 0;
    aw_task_release(task);
    if (!resumed)
        return 0;
    struct track_info *t = maybe_tracked(waker) ? tracked.lookup(&waker) : 0;
    struct track_info outside = {};
    // the tracer, when it is an agent's (deferred, like the kill above: -EBUSY leaves it to the
    // daemon, which the record's action tells)
    int tracer_killed = t && bpf_send_signal(AW_SIGKILL) == 0;
    struct guard_event *e = guard_begin(AW_G_ESCAPED, t ? t : &outside);
    if (e) {
        e->done = killed ? AW_DONE_KILLED : AW_DONE_SEEN;
        e->action = tracer_killed ? AW_ACT_KILL : AW_ACT_NONE;
        e->target = AW_ESCAPE_PTRACE;
        e->hash = pid;
        guard_send(e);
    }
#endif
    return 0;
}

// cgroup v2 ids (directory inodes) of the daemon's cgroup and its ancestors below the root:
// freezing any of them freezes the daemon (userspace keeps the set current, daemon.server)
BPF_HASH(daemon_cgroups, u64, u8, 64);

// cgroup.freeze written (in the writer's context): the daemon cannot be kept from freezing,
// but an agent that does it dies, and the record waits in the ring until someone thaws it
TRACEPOINT_PROBE(cgroup, cgroup_freeze)
{
    u64 id = args->id;
    if (!daemon_cgroups.lookup(&id))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = maybe_tracked(tgid) ? tracked.lookup(&tgid) : 0;
    struct track_info outside = {};
    if (t)
        bpf_send_signal(AW_SIGKILL);
    struct guard_event *e = guard_begin(AW_G_SELF, t ? t : &outside);
    if (e) {
        e->done = t ? AW_DONE_KILLED : AW_DONE_SEEN;
        e->target = AW_SELF_FREEZE;
        guard_send(e);
    }
    return 0;
}

// signal:signal_generate (its format); a named program, not TRACEPOINT_PROBE: its kfunc
// calls are patched before it loads, and bcc loads TRACEPOINT_PROBEs as it compiles them
struct aw_signal_tp {
    u64 common;
    int sig;
    int err;
    int code;
    char comm[16];
    s32 pid;
    int group;
    int result;
};

// Every signal of the host passes here (an ordinary tracepoint: no syscall slow path).
// SIGCONT to an exec waiting for its decision is tampering: the stopped process is killed
// at once and the sender too when it is an agent's; a stop signal aimed at a tracked
// process is remembered for the daemon (see stopped_at).
int aw_signal_generate(struct aw_signal_tp *args)
{
    int sig = args->sig;
    u32 target = args->pid;
    // a signal for the daemon from an agent, by any path: kill, kill(-pgid), tgkill,
    // pidfd_send_signal through a /proc directory fd...  It cannot be refused here; the sender
    // dies with it and it is recorded (SIGTERM/INT/HUP from offenders are ignored by the daemon)
    if (target && target == (u32)cfg(AW_CFG_DAEMON) && sig > 0) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        struct track_info *st = maybe_tracked(tgid) ? tracked.lookup(&tgid) : 0;
        if (st) {
            u64 now = bpf_ktime_get_boot_ns();
            u64 *seen = offenders.lookup(&tgid);
            if (seen && now - *seen < 10000000ULL)
                return 0;   // the syscall hook (guard_self) has just killed and recorded it
            offenders.update(&tgid, &now);
            int killed = bpf_send_signal(AW_SIGKILL) == 0;   // deferred here: -EBUSY leaves it to the daemon
            struct guard_event *e = guard_begin(AW_G_SELF, st);
            if (e) {
                e->done = killed ? AW_DONE_KILLED : AW_DONE_SEEN;
                e->target = 1000 + sig;   // a signal (not a syscall number): 1000 + its number
                guard_send(e);
            }
        }
        return 0;
    }
    if (sig == AW_SIGCONT) {
        u64 *since = exec_deciding.lookup(&target);
        if (!since)
            return 0;
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        if (tgid == (u32)cfg(AW_CFG_DAEMON))
            return 0;
        int stopped_killed = kill_resumed(target, *since);
        struct track_info *t = tracked.lookup(&tgid);
        struct track_info outside = {};
        // the sender, when it is an agent's; under the signal lock this is deferred too, and
        // the CPU's one deferred signal may be the target's (-EBUSY): then the daemon kills it
        int sender_killed = t && bpf_send_signal(AW_SIGKILL) == 0;
        struct guard_event *e = guard_begin(AW_G_RESUME, t ? t : &outside);
        if (e) {
            e->done = sender_killed ? AW_DONE_KILLED : AW_DONE_SEEN;
            e->action = stopped_killed ? AW_ACT_KILL : AW_ACT_NONE;   // the resumed process's fate
            e->target = target;
            guard_send(e);
        }
        return 0;
    }
    if ((sig == AW_SIGSTOP || (sig >= AW_SIGTSTP && sig <= AW_SIGTTOU)) && maybe_tracked(target) &&
        tracked.lookup(&target)) {
        u64 now = bpf_ktime_get_boot_ns();
        stopped_at.update(&target, &now);
    }
    return 0;
}

// Process lifecycle of AI-agent sessions, from sched/task tracepoints only.
//
// No syscall tracepoint: attaching any one sets TIF_SYSCALL_TRACEPOINT on every
// task of the host and puts every system call on the slow path (1.12x for
// `dd bs=1` from sys_enter_execve alone, kernel notes).  With the kernel's BTF
// (AW_BTF, offsets from probes/btf.py) the new image's command line is read from
// its mm at sched_process_exec (exactly what exec copied), the working directory
// from task->fs, the exit status from task->exit_code at sched_process_exit; a
// failed exec is seen by a uprobe just after the syscall instruction of libc's
// execve/execveat (it returns only when it failed).  Without BTF the syscall
// tracepoints of earlier versions are the fallback.  Tracking lives in the
// kernel (`tracked`), so a child is tracked before it runs and untracked
// processes cost one hash lookup and produce no event.
//
// Build-time constants (set by probes/loader.py): AW_ARGV_MAX, AW_ARG_LEN,
// AW_ARGS_SIZE (power of two), AW_RINGBUF_PAGES, AW_MAX_TRACKED.

#define AW_PATH_LEN 256
#define AW_CWD_DEPTH 64      // path components of the working directory walked in the kernel (a power of two)
#define AW_CWD_STEPS 12      // walk steps (components or mount crossings) per program
#define AW_CWD_RUNS 6        // programs: 72 steps in all
#define AW_CLONE_THREAD 0x00010000ULL

enum aw_event_type {
    AW_EV_SESSION   = 1,  // an exec whose comm matches an agent profile: new session root
    AW_EV_FORK      = 2,  // a tracked process forked (the child is already tracked)
    AW_EV_EXEC_ARGS = 3,  // argv captured at execve entry
    AW_EV_EXEC      = 4,  // a tracked process replaced its image
    AW_EV_EXEC_FAIL = 5,  // execve returned an error
    AW_EV_EXIT      = 6,  // the last thread of a tracked process exited
    AW_EV_CHDIR     = 7,  // chdir/fchdir succeeded (userspace keeps the cwd)
    AW_EV_CWD       = 8,  // the working directory at exec, walked in the kernel (BTF)
};

enum aw_counter {
    AW_CNT_LOST = 0,          // ring buffer full: events dropped
    AW_CNT_TRACK_FULL = 1,    // tracked map full: a process could not be tracked
    AW_CNT_MAX = 2,
};

// Truncation flags of an exec_args event.
#define AW_TRUNC_ARGC  1   // more than AW_ARGV_MAX arguments
#define AW_TRUNC_ARG   2   // one argument longer than AW_ARG_LEN
#define AW_TRUNC_TOTAL 4   // the argument buffer was full
#define AW_ARGS_RAW    8   // args is the new image's argument area; argc is the most to keep

struct track_info {
    u64 session;   // session key, chosen by whoever started the session
    u32 profile;   // agent profile index
    u32 flags;     // AW_TRACK_*
};
// a process that joined a session other than by an exec or a fork under the kernel's eyes (the
// daemon's /proc scan at its start, a ptrace join): what it shared before is not known
#define AW_TRACK_JOINED 1

struct comm_key {
    char comm[16];
};

struct exit_info {
    s32 code;      // exit status passed to exit/exit_group
    s32 signal;    // fatal signal, when no exit status was recorded
};

struct hdr {
    u32 type;
    u32 pid;       // tgid
    u32 tid;
    u32 uid;       // real uid of the current task
    u32 gid;
    u32 profile;
    u64 ts;        // CLOCK_BOOTTIME ns
    u64 session;
    u64 cgroup;
    char comm[16];
};

struct exec_args_event {
    struct hdr h;
    u32 argc;
    u32 args_len;
    u32 truncated;
    u32 _pad;
    char filename[AW_PATH_LEN];
    char args[AW_ARGS_SIZE + AW_ARG_LEN];   // slack so the verifier sees every read in bounds
};

struct exec_event {
    struct hdr h;
    u32 old_pid;
    u32 _pad;
    char filename[AW_PATH_LEN];
};

struct fork_event {
    struct hdr h;
    u32 child;
    u32 joined;    // 1: not a fork, a running process that joined the session (guard_taint)
};

struct exec_fail_event {
    struct hdr h;
    s32 err;
    u32 _pad;
};

struct exit_event {
    struct hdr h;
    s32 code;
    s32 signal;
    u32 has_code;
    u32 _pad;
};

struct chdir_event {
    struct hdr h;
    s32 fd;        // -1 for chdir(path)
    u32 _pad;
    char path[AW_PATH_LEN];
};

// The working directory at exec, from the kernel: its path components, leaf first, each in
// a slot of its own; only `n` slots are sent.  A deeper directory is cut and userspace
// reads /proc/PID/cwd instead.
struct cwd_event {
    struct hdr h;
    u32 n;
    u32 cut;       // deeper than AW_CWD_DEPTH, or a name the slot cannot hold
    char name[AW_CWD_DEPTH][AW_PATH_LEN];
};

// Enforcement hooks, defined in the guard_*.bpf.c files (compiled after this one).
static __always_inline void guard_exec(void *ctx, struct track_info *t, const void *kfilename);
static __always_inline void guard_session_start(struct track_info *t);
static __always_inline void guard_ssl_write(struct pt_regs *ctx, struct track_info *t, u64 buf, u64 n);
static __always_inline void guard_ssl_done(struct pt_regs *ctx, u32 tid, u64 moved, u64 sp, int ok, u64 buf);
static __always_inline void ssl_thread_exit(u32 tid);
static __always_inline void unix_thread_exit(u32 tid);
static __always_inline void guard_self(struct track_info *t, long nr, u64 target_pid);
static __always_inline u64 cfg(u32 which);
static __always_inline int guard_escaped(u32 tgid, struct track_info *t);
static __always_inline void guard_taint(struct track_info *t, long nr, u64 request, u64 target);
static __always_inline void guard_fdgrab(struct track_info *t);
static __always_inline void guard_prio(struct track_info *t, long nr, u64 which, u64 who);
static __always_inline int guard_memwrite(struct track_info *t, long nr, s32 fd);

BPF_HASH(tracked, u32, struct track_info, AW_MAX_TRACKED);
// How many tracked tgids share each value of (tgid & 0xffff).  An array lookup
// is inlined by the JIT; the per-syscall probes check it first, so a process
// that is not tracked never pays for the hash lookup (measured: dd bs=1 at 1.8x
// instead of 2.1x).  Kept exact: +1 where `tracked` gains a key, -1 where it loses one.
BPF_ARRAY(track_filter, u32, 65536);
BPF_HASH(agent_comms, struct comm_key, u32, 1024);
BPF_HASH(exit_status, u32, struct exit_info, AW_MAX_TRACKED);
struct exited_tracker {
    struct track_info t;
    u64 start;     // the exiting task's start_boottime: a later process with the number is another
};
BPF_TABLE("lru_hash", u32, struct exited_tracker, exited_tracked, 4096);
BPF_HASH(chdir_args, u32, u64, 4096);          // tid -> user pointer or fd
BPF_ARRAY(counters, u64, AW_CNT_MAX);
BPF_PERCPU_ARRAY(args_scratch, struct exec_args_event, 1);
BPF_PERCPU_ARRAY(cwd_scratch, struct cwd_event, 1);
BPF_RINGBUF_OUTPUT(events, AW_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(ring_woken, u64, 1);          // when this CPU last woke the daemon (boot ns)

// The flags of an events record: wake the daemon at most once per AW_RING_WAKE_NS on a CPU.
// The records in between wait for its next poll, which it makes within RING_BUSY_POLL_MS
// while records flow (probes/process.py, Probes.poll), so none waits longer than that; a
// wakeup per record cost every send of an agent a context switch into the daemon.  Call it
// when the record is written (copy_data: once before its loop of chunks, which may then write
// none; its CPU's next records then wait for the daemon's poll, 100 ms at most).  Arithmetic,
// not a branch (barrier_var keeps the compiler from making one): a caller's loop carries one
// unknown value [1, 2] through the verifier, not two constants that double its states.
static __always_inline u64 ring_wake_at(u64 *at)
{
    u64 now = bpf_ktime_get_ns();
    u64 since = now - *at;
    u64 quiet = (since - AW_RING_WAKE_NS) >> 63;     // 1: this CPU woke it less than the window ago
    asm volatile("" : "+r"(quiet));
    *at += since & (quiet - 1);                       // to now when it wakes (quiet - 1: all ones)
    return BPF_RB_FORCE_WAKEUP - quiet;               // BPF_RB_NO_WAKEUP is 1, BPF_RB_FORCE_WAKEUP 2
}

static __always_inline u64 ring_wake(void)
{
    u32 zero = 0;
    u64 *at = ring_woken.lookup(&zero);
    return at ? ring_wake_at(at) : BPF_RB_FORCE_WAKEUP;
}

static __always_inline void count(u32 which)
{
    u64 *v = counters.lookup(&which);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline void fill_hdr(struct hdr *h, u32 type, struct track_info *t)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 uid_gid = bpf_get_current_uid_gid();
    h->type = type;
    h->pid = pid_tgid >> 32;
    h->tid = (u32)pid_tgid;
    h->uid = (u32)uid_gid;
    h->gid = uid_gid >> 32;
    h->profile = t->profile;
    h->ts = bpf_ktime_get_boot_ns();
    h->session = t->session;
    h->cgroup = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

static __always_inline void filter_add(u32 tgid, int delta)
{
    u32 slot = tgid & 0xffff;
    u32 *n = track_filter.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, delta);
}

// Cheap pre-check: false means certainly not tracked.
static __always_inline int maybe_tracked(u32 tgid)
{
    u32 slot = tgid & 0xffff;
    u32 *n = track_filter.lookup(&slot);
    return n && *n;
}

#if AW_BTF
static __always_inline u64 kread(u64 addr)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
    return v;
}
#endif

static __always_inline struct track_info *current_tracked(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    return tracked.lookup(&tgid);
}

// ---- fork: track the child before it can run -------------------------------

// task_newtask fires in copy_process() in the parent's context, before the
// child is woken; unlike sched_process_fork it carries clone_flags, so threads
// (CLONE_THREAD) are told apart from processes without reading task_struct.
TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & AW_CLONE_THREAD)
        return 0;
    struct track_info *t = current_tracked();
    if (!t)
        return 0;
    u32 child = args->pid;
    struct track_info c = *t;
    if (tracked.insert(&child, &c) != 0) {
        // already there (a stale entry of a reused pid): refresh it, the count stands
        if (tracked.update(&child, &c) != 0) {
            count(AW_CNT_TRACK_FULL);
            return 0;
        }
    } else {
        filter_add(child, 1);
    }
    struct fork_event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        count(AW_CNT_LOST);
        return 0;
    }
    fill_hdr(&e->h, AW_EV_FORK, t);
    e->child = child;
    e->joined = 0;
    events.ringbuf_submit(e, ring_wake());
    return 0;
}

// ---- exec ------------------------------------------------------------------

static __always_inline int capture_argv(const char *filename, const char *const *argv)
{
    struct track_info *t = current_tracked();
    if (!t)
        return 0;
    u32 zero = 0;
    struct exec_args_event *e = args_scratch.lookup(&zero);
    if (!e)
        return 0;
    fill_hdr(&e->h, AW_EV_EXEC_ARGS, t);
    e->truncated = 0;
    e->filename[0] = 0;
    bpf_probe_read_user_str(e->filename, sizeof(e->filename), filename);

    u32 off = 0;
    u32 argc = 0;
    for (int i = 0; i < AW_ARGV_MAX; i++) {
        const char *p = NULL;
        if (bpf_probe_read_user(&p, sizeof(p), &argv[i]) != 0 || !p)
            goto done;
        if (off > AW_ARGS_SIZE - AW_ARG_LEN) {
            e->truncated |= AW_TRUNC_TOTAL;
            goto done;
        }
        long len = bpf_probe_read_user_str(&e->args[off & (AW_ARGS_SIZE - 1)], AW_ARG_LEN, p);
        if (len <= 0)
            goto done;
        if (len == AW_ARG_LEN)
            e->truncated |= AW_TRUNC_ARG;
        off += len;
        argc++;
    }
    {
        const char *p = NULL;
        bpf_probe_read_user(&p, sizeof(p), &argv[AW_ARGV_MAX]);
        if (p)
            e->truncated |= AW_TRUNC_ARGC;
    }
done:
    e->argc = argc;
    e->args_len = off;
    u64 size = sizeof(*e) - sizeof(e->args) + (off & (AW_ARGS_SIZE - 1));
    if (off >= AW_ARGS_SIZE)
        size = sizeof(*e) - AW_ARG_LEN;
    if (size > sizeof(*e))
        size = sizeof(*e);
    if (events.ringbuf_output(e, size, ring_wake()) != 0)
        count(AW_CNT_LOST);
    return 0;
}

// An exec that returned an error (the kernel's record of it: sys_exit_execve without BTF,
// the uprobe after glibc's syscall instruction with it).
static __always_inline int send_exec_fail(struct track_info *t, long ret)
{
    struct exec_fail_event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        count(AW_CNT_LOST);
        return 0;
    }
    fill_hdr(&e->h, AW_EV_EXEC_FAIL, t);
    e->err = -ret;
    events.ringbuf_submit(e, ring_wake());
    return 0;
}

#if !AW_BTF
TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    return capture_argv((const char *)args->filename, (const char *const *)args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    return capture_argv((const char *)args->filename, (const char *const *)args->argv);
}
#else
#include <asm/ptrace.h>

// A failed execve/execveat: libc's wrapper, just after its syscall instruction (it gets
// here only when the call failed).  The argument registers are preserved across syscall.
static __always_inline int exec_failed(long ret, const char *filename, const char *const *argv)
{
    if (ret >= 0 || ret < -4095)
        return 0;
    struct track_info *t = current_tracked();
    if (!t)
        return 0;
    capture_argv(filename, argv);
    return send_exec_fail(t, ret);
}

int aw_exec_failed(struct pt_regs *ctx)     // execve(filename, argv, envp)
{
    return exec_failed(PT_REGS_RC(ctx), (const char *)PT_REGS_PARM1(ctx),
                       (const char *const *)PT_REGS_PARM2(ctx));
}

int aw_execat_failed(struct pt_regs *ctx)   // execveat(dirfd, filename, argv, envp, flags)
{
    return exec_failed(PT_REGS_RC(ctx), (const char *)PT_REGS_PARM2(ctx),
                       (const char *const *)PT_REGS_PARM3(ctx));
}

// The command line of the image exec just put in place, from its mm: the argument area
// exactly as exec copied it (NUL-separated), cut at AW_ARGS_SIZE.  Userspace splits it.
static __always_inline void capture_exec_args(struct track_info *t, u64 task, const void *kfilename)
{
    u32 zero = 0;
    struct exec_args_event *e = args_scratch.lookup(&zero);
    if (!e)
        return;
    fill_hdr(&e->h, AW_EV_EXEC_ARGS, t);
    e->truncated = AW_ARGS_RAW;
    e->argc = AW_ARGV_MAX;
    e->filename[0] = 0;
    bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), kfilename);
    u64 mm = kread(task + AW_OFF_TASK_MM);
    u64 start = mm ? kread(mm + AW_OFF_MM_ARG_START) : 0, end = mm ? kread(mm + AW_OFF_MM_ARG_END) : 0;
    u64 len = end > start ? end - start : 0;
    if (len > AW_ARGS_SIZE) {
        len = AW_ARGS_SIZE;
        e->truncated |= AW_TRUNC_TOTAL;
    }
    asm volatile("" : "+r"(len));
    if (len > AW_ARGS_SIZE)
        len = AW_ARGS_SIZE;
    if (len && bpf_probe_read_user(e->args, len, (void *)start) != 0)
        len = 0;
    e->args_len = len;
    u64 size = sizeof(*e) - sizeof(e->args) + len;
    if (size > sizeof(*e))
        size = sizeof(*e);
    if (events.ringbuf_output(e, size, ring_wake()) != 0)
        count(AW_CNT_LOST);
}

// The working directory (as /proc/PID/cwd reads from the host), walked from task->fs->pwd
// up to the root, across mounts.  AW_CWD_STEPS steps per program: each step the verifier
// walks multiplies the states it carries into the exec guard after it (8 steps: 19K
// instructions processed, 16: 117K, 20: 455K, 32: over the 1M limit), so a deeper directory
// goes on in aw_cwd_more (tail calls, AW_CWD_STEPS each), which ends with the rest of the
// exec (its record and the guard) itself.
struct cwd_walk {
    u64 dentry, vfsmnt, mnt;
    u32 n, done;
    u32 type;                // the exec's record type (AW_EV_EXEC or AW_EV_SESSION)
    u32 runs;
    struct track_info t;
};
BPF_PERCPU_ARRAY(cwd_walks, struct cwd_walk, 1);
BPF_PROG_ARRAY(cwd_progs, 1);   // aw_cwd_more

static __always_inline struct cwd_walk *cwd_begin(struct track_info *t, u32 type, u64 task)
{
    u32 zero = 0;
    struct cwd_walk *w = cwd_walks.lookup(&zero);
    struct cwd_event *e = cwd_scratch.lookup(&zero);
    if (!w || !e)
        return 0;
    u64 fs = kread(task + AW_OFF_TASK_FS);
    w->t = *t;
    w->type = type;
    w->runs = 0;
    w->n = 0;
    w->done = !fs;
    w->dentry = fs ? kread(fs + AW_OFF_FS_PWD + AW_OFF_PATH_DENTRY) : 0;
    w->vfsmnt = fs ? kread(fs + AW_OFF_FS_PWD + AW_OFF_PATH_MNT) : 0;
    w->mnt = w->vfsmnt - AW_OFF_MOUNT_MNT;
    fill_hdr(&e->h, AW_EV_CWD, t);
    e->cut = 1;
    e->n = 0;
    return w;
}

// AW_CWD_STEPS more steps; w->done once the root (or a dead end) is reached.
static __always_inline void cwd_steps(struct cwd_walk *w)
{
    u32 zero = 0;
    struct cwd_event *e = cwd_scratch.lookup(&zero);
    if (!e || w->done)
        return;
    u64 dentry = w->dentry, vfsmnt = w->vfsmnt, mnt = w->mnt;
    u32 n = w->n;
    for (int i = 0; i < AW_CWD_STEPS; i++) {
        u64 root = kread(vfsmnt + AW_OFF_VFSMOUNT_ROOT);
        if (dentry == root) {
            u64 up = kread(mnt + AW_OFF_MOUNT_PARENT);
            if (!up || up == mnt) {
                e->cut = 0;                          // the root of everything
                w->done = 1;
                break;
            }
            dentry = kread(mnt + AW_OFF_MOUNT_MOUNTPOINT);
            mnt = up;
            vfsmnt = mnt + AW_OFF_MOUNT_MNT;
            continue;
        }
        u64 parent = kread(dentry + AW_OFF_DENTRY_PARENT);
        if (!parent || parent == dentry || n >= AW_CWD_DEPTH) {
            w->done = 1;
            break;
        }
        u64 name = kread(dentry + AW_OFF_DENTRY_NAME + AW_OFF_QSTR_NAME);
        if (bpf_probe_read_kernel_str(e->name[n & (AW_CWD_DEPTH - 1)], AW_PATH_LEN, (void *)name) <= 0) {
            w->done = 1;
            break;
        }
        n++;
        dentry = parent;
    }
    w->dentry = dentry;
    w->vfsmnt = vfsmnt;
    w->mnt = mnt;
    w->n = n;
    e->n = n;
}

static __always_inline void cwd_send(void)
{
    u32 zero = 0;
    struct cwd_event *e = cwd_scratch.lookup(&zero);
    if (!e)
        return;
    u32 k = *(volatile u32 *)&e->n;
    if (k > AW_CWD_DEPTH)
        k = AW_CWD_DEPTH;
    u64 size = sizeof(*e) - sizeof(e->name) + (u64)k * AW_PATH_LEN;
    if (size > sizeof(*e))
        size = sizeof(*e);
    if (events.ringbuf_output(e, size, ring_wake()) != 0)
        count(AW_CNT_LOST);
}
#endif

// The new image is in place; its comm decides whether a session starts here.
// The exec record (after the directory and the command line: records are read in the order
// they were reserved, and userspace needs both for it), then the policy.
// sched:sched_process_exec's record (its format file: the common fields, then these); the
// tail-called programs below cannot name bcc's generated struct a second time
struct aw_exec_tp {
    u64 common;
    u32 data_loc_filename;
    s32 pid;
    s32 old_pid;
};

static __always_inline int exec_rest(struct aw_exec_tp *args, struct track_info *t, u32 type)
{
    unsigned short loc = args->data_loc_filename & 0xFFFF;
#if AW_BTF
    capture_exec_args(t, bpf_get_current_task(), (void *)args + loc);
#endif
    struct exec_event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        count(AW_CNT_LOST);
        return 0;
    }
    fill_hdr(&e->h, type, t);
    e->old_pid = args->old_pid;
    bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), (void *)args + loc);
    events.ringbuf_submit(e, ring_wake());
    struct track_info cur = *t;
    if (type == AW_EV_SESSION)
        guard_session_start(&cur);
    else
        guard_exec(args, &cur, (void *)args + loc);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = tracked.lookup(&tgid);
    struct track_info fresh = {};
    u32 type = AW_EV_EXEC;
    if (!t) {
        struct comm_key k = {};
        bpf_get_current_comm(&k.comm, sizeof(k.comm));
        u32 *profile = agent_comms.lookup(&k);
        if (!profile)
            return 0;
        fresh.session = bpf_ktime_get_boot_ns();
        fresh.profile = *profile;
        if (tracked.insert(&tgid, &fresh) != 0) {
            count(AW_CNT_TRACK_FULL);
            return 0;
        }
        filter_add(tgid, 1);
        t = &fresh;
        type = AW_EV_SESSION;
    } else {
        // the old image's OpenSSL calls are over: one left open (red team: exec from a callback
        // inside SSL_do_handshake) must not vouch for the new program's sends (tls_send)
        ssl_thread_exit((u32)bpf_get_current_pid_tgid());
    }
#if AW_BTF
    struct cwd_walk *w = cwd_begin(t, type, bpf_get_current_task());
    if (w) {
        cwd_steps(w);
        if (!*(volatile u32 *)&w->done)
            cwd_progs.call(args, 0);   // a deeper directory: aw_cwd_more goes on, and ends the exec
        cwd_send();                    // done (or out of tail calls: cut, userspace reads /proc)
    }
#endif
    return exec_rest((struct aw_exec_tp *)args, t, type);
}

#if AW_BTF
int aw_cwd_more(struct aw_exec_tp *args)
{
    u32 zero = 0;
    struct cwd_walk *w = cwd_walks.lookup(&zero);
    if (!w)
        return 0;   // never: a per-CPU array's key 0
    cwd_steps(w);
    w->runs++;
    if (!*(volatile u32 *)&w->done && w->runs < AW_CWD_RUNS)
        cwd_progs.call(args, 0);
    cwd_send();
    // the exec record and the guard here, not through another tail call that could fail
    struct track_info t = w->t;
    return exec_rest(args, &t, w->type);
}
#endif

#if !AW_BTF
static __always_inline int exec_exit(long ret)
{
    if (ret >= 0)
        return 0;
    struct track_info *t = current_tracked();
    if (!t)
        return 0;
    return send_exec_fail(t, ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
    return exec_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
    return exec_exit(args->ret);
}
#endif

// ---- exit status -----------------------------------------------------------

#if !AW_BTF
static __always_inline int record_exit_code(int code)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!tracked.lookup(&tgid))
        return 0;
    struct exit_info info = {.code = code & 0xff, .signal = 0};
    exit_status.insert(&tgid, &info);   // the first thread to exit decides
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    return record_exit_code(args->error_code);
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit)
{
    return record_exit_code(args->error_code);
}

// A signal whose default action terminates the process, delivered with the
// default handler: the process dies of it (unless exit_group came first).
TRACEPOINT_PROBE(signal, signal_deliver)
{
    int sig = args->sig;
    if (args->sa_handler != 0 || sig <= 0)
        return 0;
    if ((sig >= 17 && sig <= 23) || sig == 28)   // CHLD CONT STOP TSTP TTIN TTOU URG WINCH
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!tracked.lookup(&tgid))
        return 0;
    struct exit_info info = {.code = -1, .signal = sig};
    exit_status.insert(&tgid, &info);
    return 0;
}
#endif

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!maybe_tracked(tgid))
        return 0;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    ssl_thread_exit((u32)pid_tgid);   // a thread that died inside SSL_write leaves nothing behind
    unix_thread_exit((u32)pid_tgid);  // nor one that connected a Unix socket (guard_connect.bpf.c)
    if (!args->group_dead)
        return 0;
    struct exit_event *e = events.ringbuf_reserve(sizeof(*e));
    if (e) {
        fill_hdr(&e->h, AW_EV_EXIT, t);
        e->has_code = 0;
        e->code = 0;
        e->signal = 0;
#if AW_BTF
        // the group's status (every thread of a group exit carries it): a signal in the low
        // 7 bits, else exit()'s status in the next 8
        s32 status = 0;
        bpf_probe_read_kernel(&status, sizeof(status), (void *)(bpf_get_current_task() + AW_OFF_TASK_EXIT_CODE));
        if (status & 0x7f) {
            e->signal = status & 0x7f;
        } else {
            e->has_code = 1;
            e->code = (status >> 8) & 0xff;
        }
#else
        struct exit_info *info = exit_status.lookup(&tgid);
        if (info) {
            e->has_code = info->signal == 0;
            e->code = info->code;
            e->signal = info->signal;
        }
#endif
        events.ringbuf_submit(e, ring_wake());
    } else {
        count(AW_CNT_LOST);
    }
    exit_status.delete(&tgid);
#if AW_BTF
    // what a ptrace stop it leaves behind is resumed by (its exit detaches its tracees after this
    // tracepoint, from its own context): guard.bpf.c join_traced still finds its session
    struct exited_tracker ex = {.t = *t};
    bpf_probe_read_kernel(&ex.start, sizeof(ex.start),
                          (void *)(bpf_get_current_task() + AW_OFF_TASK_START_BOOTTIME));
    exited_tracked.update(&tgid, &ex);
#endif
    if (tracked.delete(&tgid) == 0)
        filter_add(tgid, -1);
    return 0;
}

// ---- working directory -----------------------------------------------------

#if !AW_BTF   // with BTF the directory is read at each exec (cwd_steps)
TRACEPOINT_PROBE(syscalls, sys_enter_chdir)
{
    if (!current_tracked())
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    u64 ptr = (u64)args->filename;
    chdir_args.update(&tid, &ptr);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchdir)
{
    if (!current_tracked())
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    u64 fd = (1ULL << 63) | (u32)args->fd;
    chdir_args.update(&tid, &fd);
    return 0;
}

static __always_inline int chdir_exit(long ret)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 *arg = chdir_args.lookup(&tid);
    if (!arg)
        return 0;
    u64 a = *arg;
    chdir_args.delete(&tid);
    struct track_info *t = current_tracked();
    if (ret != 0 || !t)
        return 0;
    struct chdir_event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        count(AW_CNT_LOST);
        return 0;
    }
    fill_hdr(&e->h, AW_EV_CHDIR, t);
    e->path[0] = 0;
    if (a >> 63) {
        e->fd = (s32)(u32)a;
    } else {
        e->fd = -1;
        bpf_probe_read_user_str(e->path, sizeof(e->path), (const char *)a);
    }
    events.ringbuf_submit(e, ring_wake());
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_chdir)
{
    return chdir_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_fchdir)
{
    return chdir_exit(args->ret);
}
#endif

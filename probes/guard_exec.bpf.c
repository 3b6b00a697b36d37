// guard_exec.bpf.c: execs.  The session hold, argv and environment read from the new image and
// matched against the rules' DFAs (enforce/argvdfa.py), program identities, and the verdict at
// sched_process_exec (process.bpf.c calls guard_exec): SIGKILL, or SIGSTOP for userspace.
// Uses guard.bpf.c (maps, records, cfg, guard_send).

// ---- exec (called from sched_process_exec in process.bpf.c) ------------------

static __always_inline void guard_session_start(struct track_info *t)
{
    if (!(cfg(AW_CFG_FLAGS) & AW_FLAG_HOLD_SESSIONS))
        return;
    bpf_send_signal(AW_SIGSTOP);
    struct guard_event *e = guard_begin(AW_G_SESSION, t);
    if (!e)
        return;
    e->done = AW_DONE_STOPPED;
    guard_send(e);
}

// ---- argv: the rules' regexes as DFAs over the command line (enforce/argvdfa.py) ---------

#define AW_ARGV_SCAN 4096     // bytes of the command line the DFAs read
#define AW_DFA_SYMS 257       // 256 bytes and the end of the text
#define AW_DFA_MAX 8          // DFAs run per exec
#define AW_DFA_END 256
#define AW_VERDICT_ARGV 2048  // bytes of the command line a verdict carries
#define AW_ENV_CHUNK 512      // environment bytes hashed per run
#define AW_ENV_RUNS 16        // so at most 8 KiB of environment; a longer one is approved in userspace

struct argv_scan {
    u32 len;                  // bytes of text (the final NUL dropped)
    u32 n;                    // DFAs running
    u32 truncated;            // the command line is longer than AW_ARGV_SCAN
    u32 unsure;               // the kernel cannot decide: userspace does
    u32 pos;                  // next byte to scan
    u32 nonascii;             // a byte >= 0x80: the DFAs agree with Python's re on ASCII only
    u32 unknown;              // the program file is new: its identity is userspace's to read
    u32 first_exec;           // this image is the first its process ran since its parent forked it
    u32 tls_wait;             // the program file is in tls_unattached: the exec stops whatever the rules say
    u64 possible;             // rules only a new file's identity could add (not known to match)
    u64 unrun;                // argv rules past the AW_DFA_MAX DFAs run (the policy's later ones)
    u64 env_pos, env_end;     // the environment, hashed after the command line (user addresses)
    u64 env_len;
    u64 env_hash;
    u32 env_runs, env_cut;    // runs spent on it; it was longer than AW_ENV_MAX
    u64 envw[AW_ENV_CHUNK / 8];   // words: loads the verifier can bound
    u64 cand;                 // candidate rules (path and identity conditions hold)
    u64 session;
    u64 hash;                 // FNV-1a of the text, NULs as spaces (approved retries)
    u64 file, cwd;            // inode keys of the program and the working directory
    u32 rule[AW_DFA_MAX];
    u32 state[AW_DFA_MAX];
    char text[AW_ARGV_SCAN];
};
BPF_PERCPU_ARRAY(argv_scratch, struct argv_scan, 1);
BPF_ARRAY(argv_dfa, u16, AW_DFA_STATES * AW_DFA_SYMS);   // state * 257 + symbol -> state
BPF_ARRAY(argv_start, u32, AW_GUARD_RULES);               // rule -> its DFA's start state
// probes/guard.py EXEC_PROGRAMS: the programs in these slots, in this order (tests/test_twins.py)
enum aw_exec_prog { AW_PROG_EXEC_ARGV = 0, AW_PROG_EXEC_ENV = 1 };
BPF_PROG_ARRAY(exec_progs, 2);

struct exec_allow_key {
    u64 session;
    u64 ident;                // argv hash, program inode and working directory inode, mixed
};
struct exec_allow_val {
    u64 until;                // boot ns
    s64 left;                 // retries left; < 0 after the last one
    u32 unlimited;            // approved with --for: any number until `until`
    u32 _pad;
};
BPF_HASH(exec_allow, struct exec_allow_key, struct exec_allow_val, 4096);

// Program files userspace has classified, by inode and change time: the rules whose path they
// are (a copy, link, memfd or loader-run image of /usr/bin/rm is rm), 0 for none.  A file not
// here is new: the exec stops once for userspace to read it (enforce/programs.py).
struct file_key {
    u64 inode;                // inode_key(): (dev << 32) ^ ino
    u64 ctime;                // ns; a write or a new link changes it, and so the file is read again
};
BPF_HASH(exec_files, struct file_key, u64, 65536);

// Program files that export OpenSSL themselves (Node) and have no uprobes yet, by inode (change
// time 0): daemon/tls_libs.py finds them ahead of their first exec (the system's program directories,
// and the directories on the PATH of each tracked exec), and probes/loader.py attach_openssl takes
// them out.  A tracked exec of one stops until its uprobes are on (enforcer _attach_tls): attached
// at the exec record instead, they came about 0.1 s late, after a script's first TLS connection,
// and its plaintext was lost.  Once per file while the daemon runs.
BPF_HASH(tls_unattached, struct file_key, u8, 1024);

static __always_inline u16 dfa_next(u32 state, u32 sym)
{
    u32 idx = state * AW_DFA_SYMS + sym;
    u16 *nx = argv_dfa.lookup(&idx);
    return nx ? *nx : 0;
}

#if AW_BTF

// (dev << 32) ^ ino of an inode, as userspace computes it from stat (enforcer.inode_key)
static __always_inline u64 inode_key(u64 inode)
{
    if (!inode)
        return 0;
    u64 ino = kread(inode + AW_OFF_INODE_INO);
    u32 dev = 0;
    u64 sb = kread(inode + AW_OFF_INODE_SB);
    if (sb)
        bpf_probe_read_kernel(&dev, sizeof(dev), (void *)(sb + AW_OFF_SB_DEV));
    return ((u64)dev << 32) ^ ino;
}
#endif

// The command line of the image exec just put in place (its mm's argument area: exactly
// what the kernel copied), and the inodes that identify the operation for approvals.
static __always_inline int read_argv(struct argv_scan *a, u64 task, u64 mm)
{
#if AW_BTF
    if (!mm)
        return -1;
    u64 start = kread(mm + AW_OFF_MM_ARG_START), end = kread(mm + AW_OFF_MM_ARG_END);
    if (end <= start)
        return -1;
    u64 len = end - start;
    a->truncated = len > AW_ARGV_SCAN;
    if (len > AW_ARGV_SCAN)
        len = AW_ARGV_SCAN;
    asm volatile("" : "+r"(len));
    if (len < 1 || len > AW_ARGV_SCAN)
        return -1;
    if (bpf_probe_read_user(a->text, len, (void *)start) != 0)
        return -1;
    a->len = a->truncated ? len : len - 1;   // the last argument's NUL is not text
    a->env_pos = kread(mm + AW_OFF_MM_ENV_START);
    a->env_end = kread(mm + AW_OFF_MM_ENV_END);
    a->env_len = a->env_end > a->env_pos ? a->env_end - a->env_pos : 0;
    u64 fs = kread(task + AW_OFF_TASK_FS);
    u64 dentry = fs ? kread(fs + AW_OFF_FS_PWD + AW_OFF_PATH_DENTRY) : 0;
    a->cwd = dentry ? inode_key(kread(dentry + AW_OFF_DENTRY_INODE)) : 0;
    return 0;
#else
    return -1;
#endif
}

// An approved retry: a person approved this very command line, program and directory.
static __always_inline int exec_approved(u64 session, u64 ident)
{
    if (!ident)
        return 0;
    struct exec_allow_key k = {.session = session, .ident = ident};
    struct exec_allow_val *v = exec_allow.lookup(&k);
    if (!v || v->until < bpf_ktime_get_boot_ns())
        return 0;
    if (v->unlimited)
        return 1;
    return __sync_fetch_and_add(&v->left, -1) > 0;
}

// Stopped before its first instruction, for userspace to decide (enforce/enforcer.py
// _decide_stopped_exec); whoever else resumes it is caught by the decision stop's guards.
static __always_inline void exec_stop(struct guard_event *e)
{
    bpf_send_signal(AW_SIGSTOP);
    e->done = AW_DONE_STOPPED;
    u32 tgid = e->h.pid;
    u64 since = e->h.ts;
    exec_deciding.update(&tgid, &since);
    guard_send(e);
}

// The decision, once every DFA has read the command line.
static __always_inline void exec_finish(struct argv_scan *a, struct guard_event *e)
{
    u64 cand = a->cand;
    if (a->nonascii && a->n)
        a->unsure = 1;
    for (int k = 0; k < AW_DFA_MAX; k++) {
        if (k >= a->n)
            break;
        u32 st = a->state[k];
        if (st > 1)
            st = dfa_next(st, AW_DFA_END);
        if (st != 1 && !a->truncated && !a->unsure)
            cand &= ~(1ULL << (a->rule[k] & 63));   // its argv condition does not hold
    }
    if (!cand)
        return;
    struct guard_rule r = {};
    u32 exact = 0;
    int idx = first_rule(cand, &r, &exact);
    if (a->unsure || a->truncated)
        exact = 0;
    // a rule whose argv no DFA read decides nothing here when it comes first; when an earlier
    // rule comes first, the later ones cannot change the verdict
    if (idx >= 0 && (a->unrun & ((2ULL << (idx & 63)) - 1)))
        exact = 0;
    // a new file: a rule it only might be (by identity) decides nothing yet; one it certainly
    // is (by name) still does
    if (a->unknown && (!exact || !denies(r.action) || (a->possible & (1ULL << (idx & 63)))))
        exact = 0;
    if (idx < 0 || (exact && !denies(r.action))) {
        if (a->tls_wait) {   // no rule stops it (rule -1: the kernel's verdict stands), its TLS uprobes do
            e->target = AW_EXEC_TLS;
            exec_stop(e);
        }
        return;
    }
    // the command line goes with the verdict (after the path, at AW_PATH_LEN): the capture
    // record of this exec may be read after the verdict, and the process may be gone by then
    u64 alen = a->len < AW_VERDICT_ARGV ? a->len + 1 : AW_VERDICT_ARGV;
    asm volatile("" : "+r"(alen));
    alen &= AW_VERDICT_ARGV - 1;
    if (alen >= 1) {
        bpf_probe_read_kernel(&e->text[AW_PATH_LEN], alen, a->text);
        e->len = AW_PATH_LEN + alen;
    }
    // approvals name the whole command: none for one the kernel could not read whole
    u64 ident = (a->unsure || a->truncated || a->env_cut) ? 0
        : ((((a->hash * AW_MIX) ^ a->file) * AW_MIX ^ a->cwd) * AW_MIX) ^ ((a->env_hash ^ a->env_len) * AW_FNV_PRIME);
    e->hash = ident;
    e->rule = idx;
    e->action = r.action;
    e->target = a->first_exec | (a->tls_wait ? AW_EXEC_TLS : 0);   // parent_unless (enforcer _parent_of); TLS
    if (exact && r.action == AW_ACT_HOLD && exec_approved(a->session, ident)) {
        e->done = AW_DONE_APPROVED;   // recorded; it runs
        guard_send(e);
        return;
    }
    if (exact && r.action != AW_ACT_HOLD) {
        bpf_send_signal(AW_SIGKILL);
        e->done = AW_DONE_KILLED;
        guard_send(e);
    } else {
        // undecided, or a hold: userspace decides (and tells the agent why it was refused)
        exec_stop(e);
    }
}

// 256 bytes of the command line through every DFA (and the hash) per run; it tail-calls
// itself for the rest, so each run is verified once, not once per possible length.
int aw_exec_argv(void *ctx)
{
    u32 zero = 0;
    struct argv_scan *a = argv_scratch.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!a || !e)
        return 0;
    u32 start = a->pos;
    for (u32 k = 0; k < AW_CHUNK_SCAN; k++) {
        u32 i = start + k;
        if (i >= a->len || i >= AW_ARGV_SCAN)
            break;
        u32 at = i;
        asm volatile("" : "+r"(at));   // keep the mask: the verifier needs it, clang thinks not
        u8 c = a->text[at & (AW_ARGV_SCAN - 1)];
        // NULs too: "a b" is not "a" "b"; the DFAs see the boundary as NUL (argvdfa: a space
        // to every pattern that does not name \x00)
        a->hash = (a->hash ^ c) * AW_FNV_PRIME;
        a->nonascii |= c >= 0x80;
        for (int d = 0; d < AW_DFA_MAX; d++) {
            if (d >= a->n)
                break;
            u32 st = a->state[d];
            if (st > 1)   // 0 rejects and 1 accepts for good
                a->state[d] = dfa_next(st, c);
        }
    }
    a->pos = start + AW_CHUNK_SCAN;
    if (a->pos < a->len && a->pos < AW_ARGV_SCAN) {
        exec_progs.call(ctx, AW_PROG_EXEC_ARGV);
        a->unsure = 1;   // out of tail calls
    } else if (a->env_pos < a->env_end) {
        exec_progs.call(ctx, AW_PROG_EXEC_ENV);
        a->env_cut = 1;
    }
    exec_finish(a, e);
    return 0;
}

// The environment goes into the approval identity too (an approved `git push` must not run
// again with GIT_CONFIG_* or KUBECONFIG pointing elsewhere): AW_ENV_CHUNK bytes per run as
// little-endian words, the last chunk zero-padded, its length mixed in by exec_finish
// (enforcer.env_hash is the twin).
int aw_exec_env(void *ctx)
{
    u32 zero = 0;
    struct argv_scan *a = argv_scratch.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!a || !e)
        return 0;
    u64 n = a->env_end - a->env_pos;
    if (a->env_pos >= a->env_end)
        n = 0;
    if (n > AW_ENV_CHUNK)
        n = AW_ENV_CHUNK;
    asm volatile("" : "+r"(n));
    if (n == 0 || n > AW_ENV_CHUNK || bpf_probe_read_user(a->envw, n, (void *)a->env_pos) != 0) {
        a->env_cut = 1;
        exec_finish(a, e);
        return 0;
    }
    // the chunk zero-padded to AW_ENV_CHUNK and hashed whole: a loop without a data-dependent
    // exit, which the verifier walks once (the length is mixed in at the end, exec_finish)
    for (u32 k = 0; k < AW_ENV_CHUNK / 8; k++) {
        u64 w = a->envw[k];
        if (k * 8 + 8 > n) {   // the bytes past n are stale: keep the first n - k*8 of this word
            u32 keep = k * 8 < n ? n - k * 8 : 0;
            w = keep ? w & ((1ULL << (keep * 8)) - 1) : 0;
        }
        a->env_hash = (a->env_hash ^ w) * AW_FNV_PRIME;
    }
    a->env_pos += n;
    if (a->env_pos < a->env_end) {
        if (++a->env_runs < AW_ENV_RUNS)
            exec_progs.call(ctx, AW_PROG_EXEC_ENV);
        a->env_cut = 1;   // longer than AW_ENV_RUNS chunks, or out of tail calls
    }
    exec_finish(a, e);
    return 0;
}

// The executed file's identity (the image, also of a script's interpreter), -1 without BTF.
static __always_inline int exe_file(u64 mm, struct file_key *fk)
{
#if AW_BTF
    u64 exe = mm ? kread(mm + AW_OFF_MM_EXE_FILE) : 0;
    u64 inode = exe ? kread(exe + AW_OFF_FILE_INODE) : 0;
    if (!inode)
        return -1;
    fk->inode = inode_key(inode);
    s64 sec = 0;
    u32 nsec = 0;
    bpf_probe_read_kernel(&sec, sizeof(sec), (void *)(inode + AW_OFF_INODE_CTIME_SEC));
#ifdef AW_OFF_INODE_CTIME_NSEC
    bpf_probe_read_kernel(&nsec, sizeof(nsec), (void *)(inode + AW_OFF_INODE_CTIME_NSEC));
#else
    bpf_probe_read_kernel(&nsec, sizeof(nsec), (void *)(inode + AW_OFF_INODE_CTIME_SEC + 8));
#endif
    // nanoseconds are below 2^30; 6.13+ keeps a flag in bit 31 (I_CTIME_QUERIED, multigrain timestamps)
    fk->ctime = (u64)sec * 1000000000ULL + (nsec & 0x3fffffff);
    return 0;
#else
    return -1;
#endif
}

static __always_inline void guard_exec(void *ctx, struct track_info *t, const void *kfilename)
{
    u32 self = bpf_get_current_pid_tgid() >> 32;
    judged_transports.delete(&self);   // a new image is no longer what was judged
    u64 flags = cfg(AW_CFG_FLAGS);
    if (!(flags & (AW_FLAG_ENFORCE | AW_FLAG_TLS_WAIT)))
        return;
    struct guard_event *e = guard_begin(AW_G_EXEC, t);
    if (!e)
        return;
    long n = bpf_probe_read_kernel_str(e->text, AW_PATH_LEN, kfilename);
    if (n <= 0)
        return;
    e->len = n - 1;
    // exec set comm to the basename of this very filename (15 bytes of it)
    struct name_key k = {};
    bpf_get_current_comm(&k.name, sizeof(k.name));
    u64 cand = cfg(AW_CFG_EXEC_ANY);
    u64 *named = exec_names.lookup(&k);
    if (named)
        cand |= *named;
    if (!(flags & AW_FLAG_ENFORCE))
        cand = 0;   // no rule loaded: only the TLS wait below
    u32 unknown = 0;
    u64 possible = 0;
    struct file_key fk = {};
    // the new image's task and mm, read once for its identity and its command line
    u64 task = (u64)bpf_get_current_task();
#if AW_BTF
    u64 mm = kread(task + AW_OFF_TASK_MM);
#else
    u64 mm = 0;
#endif
    int have_file = exe_file(mm, &fk);
    if (flags & AW_FLAG_IDENTITY) {
        u64 *is = have_file == 0 ? exec_files.lookup(&fk) : 0;
        if (is) {
            cand |= *is;
        } else {
            unknown = 1;   // a program file not seen before: it could be any program a rule names
            possible = cfg(AW_CFG_EXEC_IDENT) & ~cand;
            cand |= possible;
        }
    }
    // a program file that exports OpenSSL and has no uprobes yet (tls_unattached): stopped for them
    struct file_key tk = {.inode = fk.inode};   // the inode alone: a chmod or touch keeps the wait
    u32 tls_wait = have_file == 0 && (flags & AW_FLAG_TLS_WAIT) && tls_unattached.lookup(&tk);
#if AW_BTF
    // not a traced one: its debugger (strace, gdb) resumes it from the stop, and the decision stop's
    // guard would kill it for that (red team); it races the attach as before
    u32 traced = 0;
    bpf_probe_read_kernel(&traced, sizeof(traced), (void *)(task + AW_OFF_TASK_PTRACE));
    tls_wait = tls_wait && !traced;
#endif
    cand &= session_mask(t->session);
    if (!cand) {
        if (tls_wait) {
            e->target = AW_EXEC_TLS;
            exec_stop(e);
        }
        return;
    }
    u32 zero = 0;
    struct argv_scan *a = argv_scratch.lookup(&zero);
    if (!a)
        return;
    a->tls_wait = tls_wait;
    a->file = have_file == 0 ? fk.inode : 0;
    a->cand = cand;
    a->session = t->session;
    a->n = 0;
    a->pos = 0;
    a->hash = AW_FNV_OFF;
    a->truncated = 0;
    a->nonascii = 0;
    a->env_pos = a->env_end = a->env_len = 0;
    a->env_hash = AW_FNV_OFF;
    a->env_runs = a->env_cut = 0;
    a->unsure = read_argv(a, task, mm) != 0;
#if AW_BTF
    // self_exec_id counts this process's execs (a fork copies the parent's, and notes it in
    // parent_exec_id): one more is this exec, straight from the fork, with no shell between
    a->first_exec = kread(task + AW_OFF_TASK_SELF_EXEC_ID) == kread(task + AW_OFF_TASK_PARENT_EXEC_ID) + 1;
#else
    a->first_exec = 0;
#endif
    if (a->unsure)
        a->len = 0;
    a->unknown = unknown;
    a->possible = possible;
    u64 left = cand & cfg(AW_CFG_ARGV);
    for (int d = 0; d < AW_DFA_MAX; d++) {
        if (!left)
            break;
        u32 idx = low_bit_index(left & -left);
        left &= left - 1;
        u32 *st = argv_start.lookup(&idx);
        a->rule[d] = idx;
        a->state[d] = st ? *st : 0;
        a->n = d + 1;
    }
    a->unrun = left;     // more argv rules than DFAs at once: these are userspace's (exec_finish)
    exec_progs.call(ctx, AW_PROG_EXEC_ARGV);
    a->unsure = 1;       // the scanner could not run
    exec_finish(a, e);
}

// Enforcement: the kernel half of the policy (compiled last, same unit).
//
// Userspace (enforce/kernel.py) compiles the policy into the maps below; each
// rule is one bit, in policy order, so "first matching rule decides" is "lowest
// set bit".  A rule is `exact` when the kernel can decide it completely; when the
// first candidate is not exact the kernel stops the process (exec) or lets the
// operation through for userspace to judge after the fact (connect, SQL).
//
//   exec     sched_process_exec: SIGKILL (exact deny) or SIGSTOP (userspace decides,
//            SIGCONT/SIGKILL) before the new image runs its first instruction
//   connect  cgroup connect4/connect6: return 0, the caller gets EPERM
//   SQL      sock_ops puts tracked TCP sockets in a sockhash; sk_msg frames the
//            Postgres stream and drops a send carrying a denied statement (EACCES); a send
//            cut short of what can be judged is corked until it can be (bpf_msg_cork_bytes)
//   HTTP     the same sk_msg, requests framed by Content-Length (aw_http_next)
//   unjudged urgent data and TCP Fast Open, which the framing cannot follow: refused
//   TLS SQL  the SSL_write uprobe runs the same matcher on the plaintext and SIGKILLs
//   sockets  cgroup sock_create stamps the session's mark (nftables quarantine)
//   self     a tracked process signalling, ptracing or bpf()-ing the daemon is killed
//
//   exec     the command line, environment and file identities are read from the new
//            image's mm at offsets from the kernel's BTF (probes/btf.py: AW_OFF_*)
//
// Every kernel verdict is a guard_event on the ring buffer.

#define AW_EV_GUARD 30
#define AW_GUARD_RULES 64
#define AW_SCAN 4096          // bytes of one send the SQL matcher reads
#define AW_SCAN_MASK (AW_SCAN - 1)
#define AW_MAX_MSGS 8         // Postgres messages framed per send
#define AW_MAX_FLAGGED 8      // statements with a candidate rule, per send
#define AW_MIX 0x9E3779B97F4A7C15ULL
#define AW_FNV_OFF 0xcbf29ce484222325ULL
#define AW_FNV_PRIME 0x100000001b3ULL
#define AW_CHUNK_SCAN 256     // bytes per program run; the matchers tail-call themselves for the rest
#define AW_SELF_FREEZE 2000   // guard_event.target of a G_SELF record: the daemon's cgroup was frozen
#define AW_ESCAPE_LOADER 1    // guard_event.target of a G_ESCAPED record: caught at ld.so's entry (else 0:
                              // at the first system call)
#define AW_ESCAPE_PTRACE 2    // ... woken from a ptrace stop by its tracer (the record is the tracer's;
                              // guard_event.hash: the woken process)
#define AW_UNJUDGED_OOB 1      // urgent data (MSG_OOB): the server's recv skips the byte, the framing would not
#define AW_UNJUDGED_FASTOPEN 2 // TCP Fast Open: the data leaves before the socket is in the guard's sockhash
#define AW_UNJUDGED_UNREAD 3   // a send whose flags the kernel cannot read (io_uring, a 32-bit call)
#define AW_FLAGS_UNREAD (1ULL << 62)
#define AW_MSG_OOB 1
#define AW_MSG_FASTOPEN 0x20000000
#define AW_SOL_TCP 6
#define AW_TCP_FASTOPEN_CONNECT 30
#define AW_SIGKILL 9
#define AW_SIGCONT 18
#define AW_SIGSTOP 19
#define AW_SIGTSTP 20
#define AW_SIGTTOU 22

enum aw_action {
    AW_ACT_NONE = 0, AW_ACT_ALLOW = 1, AW_ACT_AUDIT = 2, AW_ACT_DENY = 3,
    AW_ACT_KILL = 4, AW_ACT_QUARANTINE = 5, AW_ACT_HOLD = 6,
};

enum aw_guard_what {
    AW_G_EXEC = 1, AW_G_CONNECT = 2, AW_G_SQL = 3, AW_G_SQL_TLS = 4,
    AW_G_SESSION = 5, AW_G_SELF = 6, AW_G_HTTP = 7, AW_G_HTTP_TLS = 8,
    AW_G_RESUME = 9,    // someone but the daemon sent SIGCONT to an exec stopped for a decision
    AW_G_ESCAPED = 10,  // an exec stopped for a decision ran anyway: killed at its first syscall
    AW_G_DGRAM = 11,    // a datagram sent with an address (no connect): refused like a connect
    AW_G_UNIX = 12,     // a Unix-socket connect to Postgres, refused for a session under SQL rules
    AW_G_FDGRAB = 13,   // pidfd_getfd by a session under SQL/HTTP rules: killed
    AW_G_UNJUDGED = 14, // a send the guards cannot read as the server will: refused (target: AW_UNJUDGED_*)
};

enum aw_guard_done {
    AW_DONE_STOPPED = 1,   // process stopped, userspace decides
    AW_DONE_KILLED = 2,    // SIGKILL sent before the operation took effect
    AW_DONE_REFUSED = 3,   // the syscall fails (EPERM/EACCES), the process lives
    AW_DONE_SEEN = 4,      // recorded only (the actor is outside every agent session)
    AW_DONE_APPROVED = 5,  // a held operation a person approved earlier: let through
};

enum aw_cfg {
    AW_CFG_EXEC_ANY = 0,   // rules that are candidates for every exec
    AW_CFG_CONNECT_ANY = 1,
    AW_CFG_SQL_ANY = 2,
    AW_CFG_FLAGS = 3,
    AW_CFG_DAEMON = 4,     // the daemon's tgid
    AW_CFG_EXACT = 5,      // rules the kernel can decide alone
    AW_CFG_SOFT = 6,       // rules neither exact nor denying (allow/audit with conditions the kernel cannot read)
    AW_CFG_PORTS = 7,      // connect rules with a port condition
    AW_CFG_HTTP_ANY_METHOD = 8,   // HTTP rules without a method condition (and so on)
    AW_CFG_HTTP_ANY_HOST = 9,
    AW_CFG_HTTP_ANY_PATH = 10,
    AW_CFG_HTTP_EXACT = 11,       // HTTP rules the kernel matches itself
    AW_CFG_HTTP_INEXACT = 12,     // HTTP rules it cannot read: candidates for every request
    AW_CFG_ARGV = 13,             // exec rules with an argv DFA (argv_start): dropped when it rejects
    AW_CFG_SQL_OPAQUE = 14,       // SQL rules an opaque statement matches (enforce/kernel.py OPAQUE)
    AW_CFG_EXEC_IDENT = 15,       // exec rules with a path: what an unknown program file may turn out to be
    AW_CFG_DAEMON_UID = 16,       // the daemon's uid (setpriority/ioprio_set for a whole user)
    AW_CFG_SQL_DENY = 17,         // SQL rules that deny or hold: their sessions reach Postgres over TCP only
    AW_CFG_HTTP_SUFFIXES = 18,    // HTTP rules with a `*/name` path: candidates when the last segment has a '%'
    AW_CFG_HTTP_TRANSPORT_OK = 19, // HTTP rules a judged transport is exempt from (unless_judged_transport)
    AW_CFG_MAX = 24,
};
#define AW_FLAG_HOLD_SESSIONS 1   // stop a new session's root until its rules are known
#define AW_FLAG_ENFORCE 2         // any guard at all
#define AW_FLAG_SQL 4             // some rule is about SQL or HTTP: tracked TCP sockets go through sk_msg
#define AW_FLAG_IDENTITY 8        // exec rules match program files by identity (exec_files)

#define AW_PG_UNKNOWN 0
#define AW_PG_STREAM 1           // Postgres frontend messages, framed
#define AW_PG_OTHER 2            // neither Postgres nor HTTP (or encrypted): pass
#define AW_HTTP 3                // HTTP/1.x requests, framed: skip is the body still to come
#define AW_HTTP_LOOSE 4          // HTTP whose framing was lost (a chunked body, headers past the
                                 // window): each send that starts a request line is judged alone

struct guard_rule {
    u32 action;
    u32 _pad;
};

struct name_key {
    char name[16];
};

struct lpm_v6 {
    u32 prefixlen;
    u8 addr[16];     // IPv4 as ::ffff:a.b.c.d
};

struct allow_key {
    u64 session;
    u64 hash;
};

struct guard_conn {
    u64 session;
    u32 state;       // AW_PG_*
    u32 skip;        // bytes of a message that continues from the previous send
    u32 cork;        // the size this send was corked to wait for (bpf_msg_cork_bytes), else 0
    u32 _pad;
};

struct guard_event {
    struct hdr h;
    u32 what;        // AW_G_*
    u32 done;        // AW_DONE_*
    s32 rule;        // index in the policy, -1 when none
    u32 action;      // AW_ACT_* of that rule
    u64 hash;        // SQL: the normalised statement; exec: 0
    u64 target;      // self-protection: the syscall number; connect: port
    u8 addr[16];
    u32 len;         // bytes of text
    u32 _pad;
    char text[AW_SCAN + 8];   // slack: the matcher peeks one byte ahead
};

BPF_ARRAY(guard_rules, struct guard_rule, AW_GUARD_RULES);
BPF_ARRAY(guard_cfg, u64, AW_CFG_MAX);
BPF_HASH(session_rules, u64, u64, 4096);          // session -> rules its identity/agent allows
BPF_HASH(session_marks, u64, u32, 4096);          // session -> socket mark (quarantine)
BPF_HASH(exec_names, struct name_key, u64, 1024); // basename -> candidate rules
BPF_LPM_TRIE(connect_dsts, struct lpm_v6, u64, 1024);
BPF_ARRAY(connect_ports, u64, 65536);             // port -> rules whose port condition includes it
BPF_HASH(sql_cmds, u64, u64, 1024);               // hash of a command prefix -> rules
BPF_HASH(http_methods, u64, u64, 256);            // hash of a method -> rules naming it
BPF_HASH(http_hosts, u64, u64, 1024);             // hash of a lower-case host (no port) -> rules
BPF_HASH(http_paths, u64, u64, 1024);             // hash of an exact path -> rules
BPF_HASH(http_prefixes, u64, u64, 1024);          // hash of a path prefix ending in '/' -> rules
BPF_HASH(http_suffixes, u64, u64, 1024);          // hash of a last segment with its '/' ("*/name") -> rules
// Processes an exec rule's parent_unless let run (git's own remote helper, started and fed by a
// judged git push), with no loader variables in their environment: tgid -> boot ns of that
// decision.  Forgotten at their next exec and when something resumes them from a ptrace stop.
BPF_HASH(judged_transports, u32, u64, 4096);
BPF_HASH(sql_allow, struct allow_key, u64, 4096); // approved statement or request -> expiry (boot ns)
BPF_TABLE("lru_hash", u64, struct guard_conn, guard_conns, 65536);   // socket cookie -> state
BPF_SOCKHASH(guard_socks, u64, 65536);
BPF_SK_STORAGE(guard_sk, struct guard_conn);      // the same state, reachable from sk_msg

// The state of the socket an sk_msg program runs for (NULL: not one the guard tracks).
static __always_inline struct guard_conn *msg_conn(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    return sk ? guard_sk.sk_storage_get(sk, 0, 0) : 0;
}
BPF_PERCPU_ARRAY(guard_scratch, struct guard_event, 1);
// Execs stopped for a userspace decision: tgid -> boot ns of the stop.  The daemon
// deletes the entry before it resumes or kills the process, so a process found here
// making a system call was resumed by someone else (SIGCONT, ptrace): it is killed at
// that first call.  Pinned in bpffs (AW_PIN_DIR), so a restarted daemon finds what its
// predecessor left undecided and decides it, or kills it if it ran meanwhile.
BPF_TABLE_PINNED("hash", u32, u64, exec_deciding, 4096, AW_PIN_DIR "/exec_deciding");
// Tracked tgids a stop signal was generated for, and when: sudo, su and runuser stop
// themselves when their child stops, and the daemon resumes those the decision stopped.
BPF_TABLE("lru_hash", u32, u64, stopped_at, 4096);
// tgids that aimed at the daemon: written before their syscall goes on, so the
// daemon can recognise their signal even after they are gone
BPF_TABLE("lru_hash", u32, u64, offenders, 1024);

static __always_inline u64 cfg(u32 which)
{
    u64 *v = guard_cfg.lookup(&which);
    return v ? *v : 0;
}

static __always_inline u64 session_mask(u64 session)
{
    u64 *m = session_rules.lookup(&session);
    return m ? *m : ~0ULL;
}

// First-match over the candidate rules, without a loop: masks kept by userspace
// say which rules are exact (the kernel may act) and which are "soft" (not
// exact, and allow or audit: they may match and let the operation through, so
// the kernel cannot decide past them).  A non-exact rule that would deny does
// not hide a later exact denial: the outcome is a denial either way.
// Returns the deciding rule's index (or the first candidate when undecided), -1
// for none; *exact says whether the kernel may act on it.
static __always_inline u32 low_bit_index(u64 low)
{
    u32 n = 0;
    if (!(low & 0xffffffffULL)) { n += 32; low >>= 32; }
    if (!(low & 0xffffULL)) { n += 16; low >>= 16; }
    if (!(low & 0xffULL)) { n += 8; low >>= 8; }
    if (!(low & 0xfULL)) { n += 4; low >>= 4; }
    if (!(low & 0x3ULL)) { n += 2; low >>= 2; }
    if (!(low & 0x1ULL)) { n += 1; }
    return n;
}

static __always_inline int first_rule(u64 cand, struct guard_rule *out, u32 *exact)
{
    *exact = 0;
    if (!cand)
        return -1;
    u64 exact_mask = cfg(AW_CFG_EXACT), soft = cfg(AW_CFG_SOFT);
    u64 stop = cand & (exact_mask | soft);
    u64 first = stop & -stop;
    u32 idx;
    if (first && (first & exact_mask)) {
        idx = low_bit_index(first);
        *exact = 1;
    } else {
        idx = low_bit_index(cand & -cand);
    }
    struct guard_rule *r = guard_rules.lookup(&idx);
    if (!r) {
        *exact = 0;
        return -1;
    }
    *out = *r;
    return idx;
}

static __always_inline int denies(u32 action)
{
    return action >= AW_ACT_DENY;
}

static __always_inline struct guard_event *guard_begin(u32 what, struct track_info *t)
{
    u32 zero = 0;
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!e)
        return NULL;
    fill_hdr(&e->h, AW_EV_GUARD, t);
    e->what = what;
    e->done = 0;
    e->rule = -1;
    e->action = 0;
    e->hash = 0;
    e->target = 0;
    __builtin_memset(e->addr, 0, sizeof(e->addr));
    e->len = 0;
    e->_pad = 0;
    return e;
}

// Verdicts have their own ring buffer, which the daemon reads first and also
// between records of `events`: a decision never waits behind a capture backlog.
// Only a session's start hold goes through `events`, after the session's record,
// because the daemon needs that record to know the session.
BPF_RINGBUF_OUTPUT(verdicts, 64);

static __always_inline void guard_send(struct guard_event *e)
{
    u32 len = e->len;
    if (len > AW_SCAN)
        len = AW_SCAN;
    u64 size = sizeof(*e) - sizeof(e->text) + len;
    if (size > sizeof(*e))
        size = sizeof(*e);
    long err = e->what == AW_G_SESSION ? events.ringbuf_output(e, size, BPF_RB_FORCE_WAKEUP)
                                       : verdicts.ringbuf_output(e, size, BPF_RB_FORCE_WAKEUP);
    if (err != 0)
        count(AW_CNT_LOST);
}

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
BPF_PROG_ARRAY(exec_progs, 2);                            // aw_exec_argv, aw_exec_env

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
    if (idx < 0 || (exact && !denies(r.action)))
        return;
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
    e->target = a->first_exec;   // for parent_unless (enforce.enforcer _parent_of)
    if (exact && r.action == AW_ACT_HOLD && exec_approved(a->session, ident)) {
        e->done = AW_DONE_APPROVED;   // recorded; it runs
        guard_send(e);
        return;
    }
    if (exact && r.action != AW_ACT_HOLD) {
        bpf_send_signal(AW_SIGKILL);
        e->done = AW_DONE_KILLED;
    } else {
        // undecided, or a hold: userspace decides (and tells the agent why it was refused)
        bpf_send_signal(AW_SIGSTOP);
        e->done = AW_DONE_STOPPED;
        u32 tgid = e->h.pid;
        u64 since = e->h.ts;
        exec_deciding.update(&tgid, &since);
    }
    guard_send(e);
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
        exec_progs.call(ctx, 0);
        a->unsure = 1;   // out of tail calls
    } else if (a->env_pos < a->env_end) {
        exec_progs.call(ctx, 1);
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
            exec_progs.call(ctx, 1);
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
    if (!(cfg(AW_CFG_FLAGS) & AW_FLAG_ENFORCE))
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
    if (cfg(AW_CFG_FLAGS) & AW_FLAG_IDENTITY) {
        u64 *is = have_file == 0 ? exec_files.lookup(&fk) : 0;
        if (is) {
            cand |= *is;
        } else {
            unknown = 1;   // a program file not seen before: it could be any program a rule names
            possible = cfg(AW_CFG_EXEC_IDENT) & ~cand;
            cand |= possible;
        }
    }
    cand &= session_mask(t->session);
    if (!cand)
        return;
    u32 zero = 0;
    struct argv_scan *a = argv_scratch.lookup(&zero);
    if (!a)
        return;
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
    exec_progs.call(ctx, 0);
    a->unsure = 1;       // the scanner could not run
    exec_finish(a, e);
}

// ---- connect -----------------------------------------------------------------

// A send of a tracked thread with MSG_OOB or MSG_FASTOPEN, noted at its syscall's entry
// (net.bpf.c) for the sk_msg and connect guards that run inside that syscall (red team: two
// urgent bytes shifted the server's framing past a CopyData; Fast Open data left before the
// socket was in the sockhash).
BPF_HASH(unjudged_sends, u32, u64, 4096);   // thread -> the send's flags
BPF_ARRAY(unjudged_noted, u64, 1);          // entries noted and not yet forgotten: a syscall's exit
                                            // reads this array slot, not the hash, while it is 0

static __always_inline void note_send_flags(struct track_info *t, u64 flags)
{
    if (!t || !(flags & (AW_MSG_OOB | AW_MSG_FASTOPEN)))
        return;
    u32 tid = bpf_get_current_pid_tgid();
    u32 zero = 0;
    u64 *noted = unjudged_noted.lookup(&zero);
    if (noted && unjudged_sends.update(&tid, &flags) == 0)
        __sync_fetch_and_add(noted, 1);
}

static __always_inline void forget_send_flags(u32 tid)
{
    u32 zero = 0;
    u64 *noted = unjudged_noted.lookup(&zero);
    if (noted && *noted && unjudged_sends.delete(&tid) == 0)
        __sync_fetch_and_add(noted, -1);
}

#if AW_SOCK_CAPTURE
// The flags of the send system call this thread is in, when its registers describe a send on
// socket `sk` (a struct sock address): sendto's and sendmmsg's 4th argument, sendmsg's 3rd,
// none for write, writev, sendfile and splice.  AW_FLAGS_UNREAD when they do not: io_uring
// (its registers are io_uring_enter's, or another call's it runs at the exit of), a 32-bit
// call, a call naming another fd (red team: MSG_OOB through io_uring or int 0x80).
static __always_inline u64 send_flags(u64 sk)
{
    u64 nr = 0, fd = 0, flags = 0;
    struct pt_regs *regs = syscall_regs(&nr, &fd);
    if (in_compat())
        return AW_FLAGS_UNREAD;
    if (nr == __NR_sendto || nr == __NR_sendmmsg)
        bpf_probe_read_kernel(&flags, sizeof(flags), &regs->r10);
    else if (nr == __NR_sendmsg)
        bpf_probe_read_kernel(&flags, sizeof(flags), &regs->dx);
    else if (nr == __NR_splice)
        bpf_probe_read_kernel(&fd, sizeof(fd), &regs->dx);   // fd_out
    else if (nr != __NR_write && nr != __NR_writev && nr != __NR_pwritev && nr != __NR_pwritev2 &&
             nr != __NR_sendfile && nr != __NR_connect)
        return AW_FLAGS_UNREAD;
    u64 ino = 0;
    if (fd_sock((s32)fd, &ino) != sk)
        return AW_FLAGS_UNREAD;
    return flags;
}
#else
static __always_inline u64 send_flags(u64 sk)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 *f = unjudged_sends.lookup(&tid);
    return f ? *f : 0;
}
#endif

static __always_inline void unjudged(struct track_info *t, u32 why)
{
    struct guard_event *e = guard_begin(AW_G_UNJUDGED, t);
    if (!e)
        return;
    e->done = AW_DONE_REFUSED;
    e->target = why;
    guard_send(e);
}

// A TCP connect that is not a plain connect() on this socket: a send with MSG_FASTOPEN (its
// data leaves before the socket is in the guard's sockhash), io_uring's, a 32-bit call's.
static __always_inline int connect_unread(struct bpf_sock_addr *ctx)
{
#if AW_SOCK_CAPTURE
    u64 nr = 0, fd = 0, ino = 0;
    syscall_regs(&nr, &fd);
    struct bpf_sock *sk = ctx->sk;
    return in_compat() || nr != __NR_connect || !sk || fd_sock((s32)fd, &ino) != (u64)sk;
#else
    return (send_flags(0) & AW_MSG_FASTOPEN) != 0;
#endif
}

static __always_inline int connect_verdict(struct bpf_sock_addr *ctx, int v6, u32 what)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 1;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 1;
    if (what == AW_G_CONNECT && ctx->type == 1 && (cfg(AW_CFG_FLAGS) & AW_FLAG_SQL) &&
        connect_unread(ctx)) {
        unjudged(t, AW_UNJUDGED_FASTOPEN);   // sendto(MSG_FASTOPEN) connects here: EPERM
        return 0;
    }
    u64 flags = cfg(AW_CFG_FLAGS);
    if (ctx->type == 1 && (flags & AW_FLAG_SQL)) {   // SOCK_STREAM: remember it for the SQL guard
        struct guard_conn gc = {.session = t->session};
        u64 cookie = bpf_get_socket_cookie(ctx);
        guard_conns.update(&cookie, &gc);
    }
    if (!(flags & AW_FLAG_ENFORCE))
        return 1;
    struct lpm_v6 key = {.prefixlen = 128};
    if (v6) {
        u32 *a = (u32 *)key.addr;
        a[0] = ctx->user_ip6[0];
        a[1] = ctx->user_ip6[1];
        a[2] = ctx->user_ip6[2];
        a[3] = ctx->user_ip6[3];
    } else {
        key.addr[10] = 0xff;
        key.addr[11] = 0xff;
        u32 ip = ctx->user_ip4;
        __builtin_memcpy(&key.addr[12], &ip, 4);
    }
    u16 port = bpf_ntohs(ctx->user_port);
    u64 cand = cfg(AW_CFG_CONNECT_ANY);
    u64 *hit = connect_dsts.lookup(&key);
    if (hit)
        cand |= *hit;
    cand &= session_mask(t->session);
    u64 with_ports = cfg(AW_CFG_PORTS);
    if (cand & with_ports) {
        u32 p = port;
        u64 *ok = connect_ports.lookup(&p);
        cand &= ~with_ports | (ok ? *ok : 0);
    }
    if (!cand)
        return 1;
    struct guard_rule r = {};
    u32 exact = 0;
    int idx = first_rule(cand, &r, &exact);
    if (idx < 0 || !exact || !denies(r.action))
        return 1;
    struct guard_event *e = guard_begin(what, t);
    if (e) {
        e->done = AW_DONE_REFUSED;
        e->rule = idx;
        e->action = r.action;
        e->target = port;
        __builtin_memcpy(e->addr, key.addr, 16);
        guard_send(e);
    }
    return 0;
}

// An allowed connect of a tracked process is where its connection's record begins
// (net.bpf.c capture_connect); a datagram sent with an address is recorded by the guard.
static __always_inline int guard_connect(struct bpf_sock_addr *ctx, int v6, u32 what)
{
    int ok = connect_verdict(ctx, v6, what);
#if AW_SOCK_CAPTURE
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!ok || what != AW_G_CONNECT || !maybe_tracked(tgid))
        return ok;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return ok;
    u8 addr[28] = {};
    u16 port = ctx->user_port;
    addr[0] = v6 ? 10 : 2;
    __builtin_memcpy(&addr[2], &port, 2);
    if (v6) {
        u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
        __builtin_memcpy(&addr[8], &w0, 4);
        __builtin_memcpy(&addr[12], &w1, 4);
        __builtin_memcpy(&addr[16], &w2, 4);
        __builtin_memcpy(&addr[20], &w3, 4);
    } else {
        u32 ip = ctx->user_ip4;
        __builtin_memcpy(&addr[4], &ip, 4);
    }
    capture_connect(t, addr, v6 ? 28 : 16, ctx->type, bpf_get_socket_cookie(ctx));
#endif
    return ok;
}

// setsockopt(TCP_FASTOPEN_CONNECT): the connect that follows is deferred to the first write,
// whose data then leaves before the socket is in the sockhash.  Refused (EPERM) for a session
// while SQL or HTTP rules are loaded; the client falls back to a plain connect.
int aw_setsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->level != AW_SOL_TCP || ctx->optname != AW_TCP_FASTOPEN_CONNECT)
        return 1;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 1;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t || !(cfg(AW_CFG_FLAGS) & AW_FLAG_SQL))
        return 1;
    unjudged(t, AW_UNJUDGED_FASTOPEN);
    return 0;
}

int aw_connect4(struct bpf_sock_addr *ctx) { return guard_connect(ctx, 0, AW_G_CONNECT); }
int aw_connect6(struct bpf_sock_addr *ctx) { return guard_connect(ctx, 1, AW_G_CONNECT); }

// ---- Postgres over a Unix socket ---------------------------------------------------
//
// sk_msg runs on TCP sockets only: a statement sent over a Unix socket (psql's default)
// would reach the server before anything could judge it.  So a session under a SQL rule
// that denies or holds reaches Postgres over TCP only: its connect to a `.s.PGSQL.<port>`
// socket is refused here (cgroup connect_unix, kernel 6.7+), and userspace tells the
// process why.  The context is the kernel's bpf_sock_addr_kern; the address it points to is
// the kernel's copy of the one connect() was given.
#if AW_BTF
// ".s.PGSQL." anywhere in a Unix socket name (a directory of any name; an abstract name too)
static __always_inline int pgsql_name(const char *path)
{
    for (int i = 0; i < 100; i++) {
        if (path[i] == '.' && path[i + 1] == 's' && path[i + 2] == '.' && path[i + 3] == 'P' &&
            path[i + 4] == 'G' && path[i + 5] == 'S' && path[i + 6] == 'Q' && path[i + 7] == 'L' &&
            path[i + 8] == '.')
            return 1;
    }
    return 0;
}

// The current process's parent: told why when a refused client has already given up and gone
static __always_inline u32 parent_tgid(void)
{
    u64 parent = kread(bpf_get_current_task() + AW_OFF_TASK_REAL_PARENT);
    u32 ptgid = 0;
    if (parent)
        bpf_probe_read_kernel(&ptgid, sizeof(ptgid), (void *)(parent + AW_OFF_TASK_TGID));
    return ptgid;
}

static __always_inline int unix_verdict(struct bpf_sock_addr *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 1;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t || !(cfg(AW_CFG_FLAGS) & AW_FLAG_ENFORCE))
        return 1;
    u64 cand = cfg(AW_CFG_SQL_DENY) & session_mask(t->session);
    if (!cand)
        return 1;
    u64 uaddr = 0;
    char path[112] = {};
    bpf_probe_read_kernel(&uaddr, sizeof(uaddr), (void *)ctx + AW_OFF_SOCK_ADDR_UADDR);
    if (!uaddr || bpf_probe_read_kernel(path, 108, (void *)(uaddr + 2)) != 0)   // sockaddr_un.sun_path
        return 1;
    int found = pgsql_name(path);
    // a socket reached through a descriptor's path (/proc/self/fd/N, /dev/fd/N, fd/N or N
    // relative to such a directory, of an O_PATH open of it): its name is not there to read,
    // so any such connect is refused too
    int digits = path[0] != 0;
    for (int i = 0; i < 100; i++) {
        if (path[i] == 'f' && path[i + 1] == 'd' && path[i + 2] == '/' && (i == 0 || path[i - 1] == '/'))
            found = 1;
        if (path[i] == 0)
            break;
        if (path[i] < '0' || path[i] > '9')
            digits = 0;
    }
    found |= digits;
    if (!found)
        return 1;
    struct guard_rule r = {};
    u32 exact = 0;
    int idx = first_rule(cand, &r, &exact);
    struct guard_event *e = guard_begin(AW_G_UNIX, t);
    if (e) {
        e->done = AW_DONE_REFUSED;
        e->rule = idx;
        e->action = r.action;
        bpf_probe_read_kernel(e->text, 108, (void *)(uaddr + 2));
        e->len = 108;
        e->target = parent_tgid();
        guard_send(e);
    }
    return 0;
}

#if AW_SOCK_CAPTURE
// Postgres over a Unix socket reached by a name connect_unix does not know (a symlink or hard
// link of another name: red team).  The server end of such a connection is known by its own
// bound name, `.s.PGSQL.<port>`, whatever path reached it.  sk:sk_data_ready runs in the
// client's context before the server is woken: at connect() on the listener, and at every send
// on the receiving end.  A session under SQL rules that deny or hold is killed there: at
// connect, before it has sent a byte (whatever it would have sent them with: splice, sendmmsg,
// a child it forks after); at a send on a socket it did not connect (handed over, or shared with
// a process that forked before connecting), after that send's bytes are queued (README).
static __always_inline int pg_unix_name(u64 sk, char *path)
{
    u64 addr = kread(sk + AW_OFF_UNIX_ADDR);
    if (!addr)
        return 0;
    bpf_probe_read_kernel(path, 108, (void *)(addr + AW_OFF_UNIX_ADDRESS_NAME + 2));
    return pgsql_name(path);
}

RAW_TRACEPOINT_PROBE(sk_data_ready)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 0;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t || !(cfg(AW_CFG_FLAGS) & AW_FLAG_ENFORCE))
        return 0;
    u64 sk = ctx->args[0];
    if (kread_n(sk + AW_OFF_SKC_FAMILY, 2) != 1)   // AF_UNIX
        return 0;
    u64 cand = cfg(AW_CFG_SQL_DENY) & session_mask(t->session);
    if (!cand)
        return 0;
    char path[112] = {};
    if (!pg_unix_name(sk, path))
        return 0;
    bpf_send_signal(AW_SIGKILL);
    struct guard_rule r = {};
    u32 exact = 0;
    int idx = first_rule(cand, &r, &exact);
    struct guard_event *e = guard_begin(AW_G_UNIX, t);
    if (e) {
        e->done = AW_DONE_KILLED;
        e->rule = idx;
        e->action = r.action;
        __builtin_memcpy(e->text, path, 108);
        e->len = 108;
        e->target = parent_tgid();
        guard_send(e);
    }
    return 0;
}
#endif

int aw_connect_unix(struct bpf_sock_addr *ctx)
{
    int ok = unix_verdict(ctx);
#if AW_SOCK_CAPTURE
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!ok || !maybe_tracked(tgid))
        return ok;
    struct track_info *t = tracked.lookup(&tgid);
    u64 uaddr = 0;
    bpf_probe_read_kernel(&uaddr, sizeof(uaddr), (void *)ctx + AW_OFF_SOCK_ADDR_UADDR);
    if (t && uaddr)
        capture_connect(t, (void *)uaddr, 110, ctx->type, bpf_get_socket_cookie(ctx));
#endif
    return ok;
}
#endif

// ---- datagrams without connect(): sendto/sendmsg with an address -------------------

struct dgram_key {
    u64 cookie;
    u8 addr[16];
    u32 port;
    u32 _pad;
};
// (socket, destination) pairs already recorded: one connect-like event per destination
BPF_TABLE("lru_hash", struct dgram_key, u8, dgram_seen, 16384);

// The connect rules judge every datagram sent with an address (the same verdict, EPERM);
// the first one a socket sends to each destination is recorded as a connect event with
// fd -1 (userspace: direction "sendto").
static __always_inline int guard_sendmsg(struct bpf_sock_addr *ctx, int v6)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 1;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 1;
    if (!guard_connect(ctx, v6, AW_G_DGRAM))
        return 0;
    struct dgram_key k = {.cookie = bpf_get_socket_cookie(ctx), .port = ctx->user_port};
    if (v6) {
        u32 *a = (u32 *)k.addr;
        a[0] = ctx->user_ip6[0];
        a[1] = ctx->user_ip6[1];
        a[2] = ctx->user_ip6[2];
        a[3] = ctx->user_ip6[3];
    } else {
        u32 ip = ctx->user_ip4;
        __builtin_memcpy(&k.addr[0], &ip, 4);
    }
    u8 one = 1;
    if (dgram_seen.insert(&k, &one) != 0)
        return 1;   // recorded before
    struct conn_event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        count(AW_CNT_LOST);
        return 1;
    }
    fill_hdr(&e->h, AW_EV_CONNECT, t);
    e->conn_id = k.cookie;
    e->fd = -1;
    e->ret = 0;
    e->type = 2;   // SOCK_DGRAM
    __builtin_memset(e->addr, 0, sizeof(e->addr));
    if (v6) {   // struct sockaddr_in6: family, port, flowinfo, address
        e->addr_len = 28;
        e->addr[0] = 10;
        __builtin_memcpy(&e->addr[2], &k.port, 2);
        __builtin_memcpy(&e->addr[8], k.addr, 16);
    } else {    // struct sockaddr_in: family, port, address
        e->addr_len = 16;
        e->addr[0] = 2;
        __builtin_memcpy(&e->addr[2], &k.port, 2);
        __builtin_memcpy(&e->addr[4], k.addr, 4);
    }
    events.ringbuf_submit(e, 0);
    return 1;
}

int aw_sendmsg4(struct bpf_sock_addr *ctx) { return guard_sendmsg(ctx, 0); }
int aw_sendmsg6(struct bpf_sock_addr *ctx) { return guard_sendmsg(ctx, 1); }

// Every socket of a tracked process carries its session's mark, so one
// nftables set element quarantines the whole session.
int aw_sock_create(struct bpf_sock *sk)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 1;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 1;
    u32 *mark = session_marks.lookup(&t->session);
    if (mark)
        sk->mark = *mark;
    return 1;
}

// ---- SQL ---------------------------------------------------------------------

int aw_sockops(struct bpf_sock_ops *skops)
{
    u32 op = skops->op;
#if AW_SOCK_CAPTURE
    if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {   // an accepted socket (net.bpf.c sock_conn)
        u64 cookie = bpf_get_socket_cookie(skops);
        u8 one = 1;
        passive_socks.update(&cookie, &one);
        return 1;
    }
#endif
    if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    u64 cookie = bpf_get_socket_cookie(skops);
    struct guard_conn *gc = guard_conns.lookup(&cookie);
    struct bpf_sock *sk = skops->sk;
    if (!gc || !sk)
        return 1;
    struct guard_conn *st = guard_sk.sk_storage_get(sk, gc, BPF_SK_STORAGE_GET_F_CREATE);
    if (st)
        guard_socks.sock_hash_update(skops, &cookie, BPF_ANY);
    guard_conns.delete(&cookie);
    return 1;
}


static __always_inline u64 fnv(u64 h, u8 c)
{
    return (h ^ c) * AW_FNV_PRIME;
}

static __always_inline int word_char(u8 c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c >= 0x80;
}

static __always_inline u32 be32(const char *p)
{
    return ((u32)(u8)p[0] << 24) | ((u32)(u8)p[1] << 16) | ((u32)(u8)p[2] << 8) | (u8)p[3];
}

// The matcher's state between tail calls (one per CPU; a run never sleeps).
struct scan_state {
    u64 session;
    u64 h;           // hash of the statement so far
    u64 cand;        // candidate rules of the statement so far
    u64 over;        // candidates of flagged statements beyond AW_MAX_FLAGGED
    u64 fl_cand[AW_MAX_FLAGGED];
    u64 fl_hash[AW_MAX_FLAGGED];
    u32 regions[AW_MAX_MSGS];   // start | end << 16 | Parse << 31
    u32 nregions, reg, in_reg, name, reg_end;
    u32 pos, len, nflag;
    u32 st, depth, words, head, in_word, pend, nonempty, skip;
    u32 unread;      // Query/Parse text the matcher did not read: opaque (matches every denying rule)
    u32 cork;        // framing: the send must reach this size before it can be judged (0: it can be)
    u32 beyond;      // framing: the first message header past the copied window (0: none)
    u32 short_run;   // sk_msg: this verdict ran before the bytes a cork waited for came
    u32 odd, semi;   // mark_ambiguous (in map memory: the verifier does not split loop states on it)
    u32 q_lo, q_hi;  // the copied bytes from the first Query's text to the last one's end (0, 0: none)
    u32 from;        // HTTP over sk_msg: where in the send the request in e->text starts
    u32 advance;     // aw_http_next: empty lines to step over; then where Content-Length's value starts
    u32 lengths;     // aw_http_next: Content-Length headers seen   (map memory, not registers: the
    u32 chunked;     // aw_http_next: Transfer-Encoding seen         verifier does not split on them)
    u32 hdr_end;     // aw_http_next: the end of the header block (0: not in the window)
    u32 body_peek;   // aw_http_msg: judging a send the framing says is body (no framing after it)
    u64 wh;          // hash of the current word (upper case)
    u64 first;       // hash of the statement's first word
};
BPF_PERCPU_ARRAY(scan_states, struct scan_state, 1);
BPF_PROG_ARRAY(sql_msg_progs, 9);   // aw_sql_msg, aw_http_msg, aw_msg_route, aw_msg_beyond, aw_msg_ambig,
                                    // aw_http_next, aw_http_copy, aw_http_length, aw_http_body
BPF_PROG_ARRAY(sql_ssl_progs, 3);   // aw_sql_ssl, aw_http_ssl, aw_ssl_ambig

static __always_inline void flag_statement(struct scan_state *s, u64 any)
{
    u64 c2 = s->cand | any;
    if (!s->nonempty || !c2)
        return;
    u32 k = s->nflag;
    if (k < AW_MAX_FLAGGED) {
        s->fl_cand[k & (AW_MAX_FLAGGED - 1)] = c2;
        s->fl_hash[k & (AW_MAX_FLAGGED - 1)] = s->h;
        s->nflag = k + 1;
    } else {
        s->over |= c2;
    }
}

#define AW_H_COPY 0x2011c49c7ce10124ULL      // fnv("COPY"), checked by tests/test_kernel_plan.py
#define AW_H_PROGRAM 0xbdd0373600e34f6bULL   // fnv("PROGRAM")

static __always_inline void end_word(struct scan_state *s)
{
    if (!s->in_word)
        return;
    s->in_word = 0;
    s->words++;
    if (s->words == 1)
        s->first = s->wh;
    else if (s->first == AW_H_COPY && s->wh == AW_H_PROGRAM)
        s->cand |= cfg(AW_CFG_SQL_OPAQUE);   // COPY ... PROGRAM runs a shell command on the server
    if (s->head && s->words <= 3) {
        u64 h = s->h;
        u64 *m = sql_cmds.lookup(&h);
        if (m)
            s->cand |= *m;
    }
}

static __always_inline void new_statement(struct scan_state *s)
{
    s->words = 0; s->head = 1; s->pend = 0; s->nonempty = 0; s->h = AW_FNV_OFF; s->cand = 0;
    s->in_word = 0;
}

// Statement text normalised as enforce/sqlnorm.py does: comments and whitespace
// runs become one space, words outside quotes are upper-cased, `;` splits
// statements.  The hash of a statement's leading words (up to three) selects
// candidate rules; the hash of the whole statement identifies it for approvals.
// Scans text[pos, pos + AW_CHUNK_SCAN) of the regions (Query text, or Parse text
// after the statement name).  Returns 1 when there is more to scan.
static __always_inline int scan_chunk(struct scan_state *s, const char *b)
{
    u64 any = cfg(AW_CFG_SQL_ANY);
    u32 start = s->pos;
    for (u32 k = 0; k < AW_CHUNK_SCAN; k++) {
        u32 i = start + k;
        if (i >= s->len || i >= AW_SCAN)
            break;
        s->pos = i + 1;
        if (!s->in_reg) {
            u32 r = s->reg;
            if (r >= s->nregions || r >= AW_MAX_MSGS)
                return 0;
            u32 packed = s->regions[r & (AW_MAX_MSGS - 1)];
            if (i < (packed & 0xffff))
                continue;
            s->in_reg = 1;
            s->name = packed >> 31;
            s->reg_end = (packed >> 16) & 0x7fff;
            s->reg = r + 1;
            s->st = 0; s->depth = 0; s->skip = 0;
            new_statement(s);
        }
        u32 at = i;
        asm volatile("" : "+r"(at));   // keep the mask: the verifier needs it, clang thinks not
        u8 c = b[at & AW_SCAN_MASK];
        // never past the text: no NUL is written after it (a write indexed by the
        // length would make the verifier walk the rest once per possible length)
        u8 n = i + 1 < s->len ? b[(at & AW_SCAN_MASK) + 1] : 0;
        int end = c == 0 || i + 1 >= s->reg_end;
        u32 st = s->st;
        if (s->skip) {
            s->skip = 0;
        } else if (s->name) {
            if (c == 0) {
                s->name = 0;
                end = i + 1 >= s->reg_end;
            }
        } else if (st == 0) {
            // `$` continues an identifier (x$$ is a name, as in PostgreSQL's lexer): no dollar quote
            int w = word_char(c) | ((c == '$') & (s->in_word != 0));
            if (!w)
                end_word(s);
            if (c == 0 || c == ';') {
                // the statement ends below
            } else if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
                s->pend = s->nonempty;
            } else if ((c == '-' && n == '-') || (c == '/' && n == '*')) {
                s->pend = s->nonempty;
                s->st = c == '-' ? 3 : 4;
                s->depth = 1;
                s->skip = 1;
            } else {
                if (!w)
                    s->head = 0;
                u64 h = s->h;
                if (s->pend) {
                    h = fnv(h, ' ');
                    s->pend = 0;
                }
                if (w && !s->in_word)
                    s->wh = AW_FNV_OFF;
                if (w)
                    s->wh = fnv(s->wh, (c >= 'a' && c <= 'z') ? c - 32 : c);
                s->in_word |= w;
                h = fnv(h, (c >= 'a' && c <= 'z') ? c - 32 : c);
                s->nonempty = 1;
                if (c == '\'')
                    s->st = 1;
                else if (c == '"')
                    s->st = 2;
                else if (c == '$' && n == '$' && !w) {
                    s->st = 5;
                    h = fnv(h, '$');
                    s->skip = 1;
                }
                s->h = h;
            }
            if (c == ';' || end) {
                end_word(s);
                flag_statement(s, any);
                new_statement(s);
            }
        } else if (st == 1 || st == 2 || st == 5) {
            if (c) {
                u64 h = fnv(s->h, c);
                if ((st == 1 && c == '\'') || (st == 2 && c == '"'))
                    s->st = 0;
                if (st == 5 && c == '$' && n == '$') {
                    h = fnv(h, '$');
                    s->skip = 1;
                    s->st = 0;
                }
                s->h = h;
            }
        } else if (st == 3) {
            if (c == '\n' || c == '\r')   // the server's comment ends at either (red team: CR)
                s->st = 0;
        } else if (st == 4) {
            if (c == '*' && n == '/') {
                s->skip = 1;
                if (--s->depth == 0)
                    s->st = 0;
            } else if (c == '/' && n == '*') {
                s->depth++;
                s->skip = 1;
            }
        }
        if (end) {
            if (s->st != 0 || s->name) {   // text ended inside a quote or comment: still a statement
                end_word(s);
                flag_statement(s, any);
                new_statement(s);
            }
            s->in_reg = 0;
        }
    }
    return s->pos < s->len && s->pos < AW_SCAN && s->reg <= s->nregions &&
           (s->in_reg || s->reg < s->nregions);
}

struct sql_result {
    int rule;
    u32 action;
    u64 hash;
};

// The flagged statements, in order: the first one an exact rule denies (and no
// approval covers) decides.
static __always_inline int sql_decide(struct scan_state *s, struct sql_result *res)
{
    u64 mask = session_mask(s->session);
    u64 now = bpf_ktime_get_boot_ns();
    for (int k = 0; k < AW_MAX_FLAGGED + 1; k++) {
        u64 c2, hh = 0;
        if (k < AW_MAX_FLAGGED) {
            if (k >= s->nflag)
                continue;
            c2 = s->fl_cand[k];
            hh = s->fl_hash[k];
        } else {
            c2 = s->over;
        }
        c2 &= mask;
        struct guard_rule r = {};
        u32 exact = 0;
        int idx = first_rule(c2, &r, &exact);
        if (idx < 0 || !exact || !denies(r.action))
            continue;
        if (hh) {
            struct allow_key ak = {.session = s->session, .hash = hh};
            u64 *until = sql_allow.lookup(&ak);
            if (until && *until > now)
                continue;
        }
        res->rule = idx;
        res->action = r.action;
        res->hash = hh;
        return 1;
    }
    return 0;
}

#define AW_PG_MAX_MSG 0x40000000   // PostgreSQL's own limit on a message (MaxAllocSize)

// Frame the Postgres messages of one send held in e->text[0..len) into s->regions;
// `skip` bytes belong to a message begun in an earlier send.  Returns the bytes
// the last message still owes to the next send.
//
// An agent cuts its messages where a matcher reading one send at a time would lose them
// (red team: a header cut after its type byte, one byte a send, a statement behind a message
// longer than the window).  So the framing never guesses: a send that ends inside a header,
// or inside a Query/Parse that fits in the window, sets s->cork (the size the send must reach,
// which sk_msg waits for with bpf_msg_cork_bytes); a header past the copied window sets
// s->beyond (sk_msg reads it there); a statement past the window, or a length no client sends,
// sets s->unread (opaque: it meets every denying rule).
static __always_inline u32 pg_regions(struct guard_event *e, struct scan_state *s, u32 len, u32 total,
                                      u32 skip)
{
    u32 off = skip;
    u32 owed = 0;
    s->nregions = 0;
    s->cork = 0;
    s->beyond = 0;
    s->q_lo = 0;
    s->q_hi = 0;
    for (int k = 0; k < AW_MAX_MSGS; k++) {
        if (off >= total)
            break;
        if (off + 5 > len) {
            if (len >= total)
                s->cork = off + 5;   // the send ends inside a header
            else
                s->beyond = off;     // the copied window does
            break;
        }
        u8 type = e->text[off & AW_SCAN_MASK];
        u32 mlen = be32(&e->text[(off + 1) & AW_SCAN_MASK]);
        if (mlen - 4 > AW_PG_MAX_MSG - 4) {   // below 4 or above the limit
            s->nregions = 0;
            s->unread = 1;         // not a Postgres stream as the server reads it
            return 0;
        }
        u32 next = off + 1 + mlen;
        u32 end = next < len ? next : len;
        int text = type == 'Q' || type == 'P';
        if (text && next > len) {
            if (next > total && next <= AW_SCAN) {
                s->cork = next;        // a statement that ends in a later send, and fits: wait for it
                owed = next - total;   // (a TLS write cannot wait: it frames on from here)
                break;
            }
            s->unread = 1;   // the statement continues past what was copied
        }
        // only statements are regions: a region of nothing to scan would stop the scan there
        // (red team: `Sync` then `Query` in one send hid the Query)
        if (type == 'Q') {   // only a Query can hold more than one statement
            if (!s->q_hi)
                s->q_lo = off + 5;
            s->q_hi = end;
        }
        if (text) {
            u32 r = s->nregions;
            s->regions[r & (AW_MAX_MSGS - 1)] =
                ((off + 5) & 0xffff) | ((end & 0x7fff) << 16) | (type == 'P' ? 0x80000000u : 0);
            s->nregions = r + 1;
        }
        if (next > total) {
            owed = next - total;
            break;
        }
        off = next;
        if (k == AW_MAX_MSGS - 1 && off < total)
            s->unread = 1;   // more messages than the matcher frames
    }
    return owed;
}

static __always_inline struct scan_state *scan_begin(u64 session, u32 len)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    if (!s)
        return NULL;
    s->session = session;
    s->over = 0;
    s->reg = 0; s->in_reg = 0; s->name = 0; s->reg_end = 0;
    s->pos = 0; s->len = len; s->nflag = 0;
    s->st = 0; s->depth = 0; s->skip = 0;
    s->unread = 0; s->wh = 0; s->first = 0;
    s->cork = 0; s->beyond = 0;
    new_statement(s);
    return s;
}

static __always_inline struct guard_event *sql_event(u32 what, struct sql_result *res, u32 done,
                                                     u64 session)
{
    u32 zero = 0;
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!e)
        return NULL;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = tracked.lookup(&tgid);
    struct track_info anon = {.session = session};
    fill_hdr(&e->h, AW_EV_GUARD, t ? t : &anon);
    e->h.session = session;
    e->what = what;
    e->done = done;
    e->rule = res->rule;
    e->action = res->action;
    e->hash = res->hash;
    e->target = 0;
    return e;
}

// ---- HTTP ----------------------------------------------------------------------

#define AW_HTTP_PATH 128   // path bytes read (a longer path matches prefix rules only)
#define AW_HTTP_HEAD 256   // header bytes searched for Host

// Length of the method token of a request line ("GET " -> 3), 0 if the text does
// not start one.
static __always_inline u32 http_method_len(const char *t)
{
    for (u32 i = 0; i < 8; i++) {
        char c = t[i];
        if (c == ' ' || c == '\t')   // servers split the request line on either (red team: a tab)
            return i >= 3 ? i : 0;
        if (c < 'A' || c > 'Z')
            return 0;
    }
    return 0;
}

// one small function per map: bcc rewrites map calls only outside macros
static __always_inline u64 method_rules(u64 k) { u64 *m = http_methods.lookup(&k); return m ? *m : 0; }
static __always_inline u64 host_rules(u64 k) { u64 *m = http_hosts.lookup(&k); return m ? *m : 0; }
static __always_inline u64 path_rules(u64 k) { u64 *m = http_paths.lookup(&k); return m ? *m : 0; }
static __always_inline u64 prefix_rules(u64 k) { u64 *m = http_prefixes.lookup(&k); return m ? *m : 0; }
static __always_inline u64 suffix_rules(u64 k) { u64 *m = http_suffixes.lookup(&k); return m ? *m : 0; }

// One request at the start of t[0..len): method, path (exact, and every prefix
// that ends in '/'), Host header (lower-case, without the port); the rules whose
// three conditions all hold, plus the rules the kernel cannot read.

// *key identifies the request for approvals (enforce/enforcer.py request_key()):
// the hashes of method, host and path, mixed.
static __always_inline u64 http_candidates(const char *t, u32 len, u64 *key)
{
    u32 ml = http_method_len(t);
    if (!ml)
        return 0;
    u64 h = AW_FNV_OFF;
    for (u32 i = 0; i < 8; i++) {
        if (i >= ml)
            break;
        h = fnv(h, t[i]);
    }
    u64 methods = method_rules(h);
    u64 hm = h;
    u64 paths = 0;
    // the target: after a run of blanks (red team: two spaces)
    u32 ps = ml + 1;
#pragma unroll
    for (u32 q = 0; q < 3; q++) {
        char c = t[ps & AW_SCAN_MASK];
        ps += c == ' ' || c == '\t';
    }
    h = AW_FNV_OFF;
    u64 hs = AW_FNV_OFF;   // the last segment, from its '/' ("*/git-receive-pack")
    u32 pct = 0;           // a '%' in it: a server may decode it to any name
    for (u32 k = 0; k < AW_HTTP_PATH; k++) {
        u32 j = ps + k;
        if (j >= len)
            break;
        u8 c = t[j & AW_SCAN_MASK];
        // the target ends at a space or any control byte (a tab: servers split the request line
        // on any whitespace; red team: POST<TAB>/r.git/git-receive-pack<TAB>HTTP/1.1), or a byte
        // past ASCII, which no server reads as part of a name it matches literally
        if (c <= ' ' || c == '?' || c == '#' || c >= 0x7f)
            break;
        h = fnv(h, c);
        hs = fnv(c == '/' ? AW_FNV_OFF : hs, c);
        pct = c == '/' ? 0 : pct | (c == '%');
        if (c == '/')
            paths |= prefix_rules(h);
    }
    paths |= path_rules(h) | (pct ? cfg(AW_CFG_HTTP_SUFFIXES) : suffix_rules(hs));
    u64 hp = h;
    // the Host header: a line starting "host:" (any case), spaces, the name up to ':'
    // or CR.  One pass whose index is the loop counter: a second loop starting where
    // this one stopped would be verified once per possible start.
    u64 hosts = 0;
    u64 hh = AW_FNV_OFF, hkey = AW_FNV_OFF;
    u32 mode = 0;   // 0 lines, 1 "host:", 2 spaces, 3 the name
    for (u32 k = 0; k < AW_HTTP_HEAD; k++) {
        if (k >= len)
            break;
        u8 c = t[k];
        if (mode == 0) {
            if (c != '\n')
                continue;
            if (t[k + 1] == '\r')
                break;   // the blank line: no Host header
            if ((t[k + 1] | 0x20) == 'h' && (t[k + 2] | 0x20) == 'o' && (t[k + 3] | 0x20) == 's' &&
                (t[k + 4] | 0x20) == 't' && t[k + 5] == ':')
                mode = 1;
        } else if (mode == 1) {
            if (c == ':')
                mode = 2;
        } else {
            if (mode == 2 && (c == ' ' || c == '\t'))
                continue;
            if (c == ':' || c == '\r' || c == '\n' || c == ' ' || c == 0) {
                hosts = host_rules(hh);
                hkey = hh;
                break;
            }
            mode = 3;
            hh = fnv(hh, (c >= 'A' && c <= 'Z') ? c + 32 : c);
        }
    }
    *key = ((hm * AW_MIX) ^ hkey) * AW_MIX ^ hp;
    u64 cand = (methods | cfg(AW_CFG_HTTP_ANY_METHOD)) & (hosts | cfg(AW_CFG_HTTP_ANY_HOST)) &
               (paths | cfg(AW_CFG_HTTP_ANY_PATH)) & cfg(AW_CFG_HTTP_EXACT);
    return cand | cfg(AW_CFG_HTTP_INEXACT);
}

// The connection of a dropped send, so userspace can close it: a client whose
// send failed (libpq, curl) would wait for an answer that never comes.  IPv6 is
// left empty (the verifier refuses the reads of remote_ip6 as clang emits them).
static __always_inline void note_peer(struct guard_event *e, struct sk_msg_md *msg)
{
    __builtin_memset(e->addr, 0, sizeof(e->addr));
    if (msg->family == 2) {   // AF_INET
        e->addr[10] = 0xff;
        e->addr[11] = 0xff;
        u32 ip = msg->remote_ip4;
        __builtin_memcpy(&e->addr[12], &ip, 4);
    } else {                  // AF_INET6: one load per word, each at a constant ctx offset
        u32 w0 = msg->remote_ip6[0];
        asm volatile("" : "+r"(w0));
        u32 w1 = msg->remote_ip6[1];
        asm volatile("" : "+r"(w1));
        u32 w2 = msg->remote_ip6[2];
        asm volatile("" : "+r"(w2));
        u32 w3 = msg->remote_ip6[3];
        asm volatile("" : "+r"(w3));
        __builtin_memcpy(&e->addr[0], &w0, 4);
        __builtin_memcpy(&e->addr[4], &w1, 4);
        __builtin_memcpy(&e->addr[8], &w2, 4);
        __builtin_memcpy(&e->addr[12], &w3, 4);
    }
    e->target = ((u64)msg->local_port << 32) | msg->remote_port;
}

// The deciding rule's index, or -1 to let the request go (no denying rule, or a
// held request a person approved for this session).
// The rules a judged transport is exempt from, when the current process is one (and not a later
// process with its number).
static __always_inline u64 transport_exempt(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 *since = judged_transports.lookup(&tgid);
    if (!since)
        return 0;
#if AW_BTF
    if (kread(bpf_get_current_task() + AW_OFF_TASK_START_BOOTTIME) > *since)
        return 0;
#endif
    return cfg(AW_CFG_HTTP_TRANSPORT_OK);
}

static __always_inline int http_decide(const char *t, u32 len, u64 session, struct guard_rule *r, u64 *key)
{
    u64 cand = http_candidates(t, len, key) & session_mask(session) & ~transport_exempt();
    u32 exact = 0;
    int idx = first_rule(cand, r, &exact);
    if (idx < 0 || !exact || !denies(r->action))
        return -1;
    if (r->action == AW_ACT_HOLD) {
        struct allow_key ak = {.session = session, .hash = *key};
        u64 *until = sql_allow.lookup(&ak);
        if (until && *until > bpf_ktime_get_boot_ns())
            return -1;
    }
    return idx;
}

// The first bytes of a connection, cut short of 8: they could begin a StartupMessage or
// SSLRequest (a length below 64 KiB: two zero bytes), or a request line (capital letters).
static __always_inline int could_start(const char *t, u32 len)
{
    u32 up = 1;   // no early exit: one path for the verifier, after a copy loop with many
#pragma unroll
    for (u32 i = 0; i < 8; i++) {
        u8 c = t[i];
        up &= (i >= len) | ((u8)(c - 'A') < 26);
    }
    return len > 0 && ((t[0] == 0 && (len < 2 || t[1] == 0)) || up);
}

// Where the request line in t[0..len) ends (its LF): 0 when it is not ended in the window,
// AW_HTTP_HEAD when it does not end in " HTTP/1.x" (before a CR, or a bare LF as servers
// also take).
static __always_inline u32 http1_line_end(const char *t, u32 len)
{
    u32 line = 0;
    for (u32 i = 0; i < AW_HTTP_HEAD; i++) {
        if (i + 1 > len)
            return 0;
        if (t[i] != '\n')
            continue;
        line = i;
        break;
    }
    if (!line)
        return AW_HTTP_HEAD;
    u32 cr = line >= 1 && t[(line - 1) & AW_SCAN_MASK] == '\r';
    if (line < 10 + cr)
        return AW_HTTP_HEAD;
    u32 v = line - 9 - cr;
    if (!(t[v & AW_SCAN_MASK] == ' ' && t[(v + 1) & AW_SCAN_MASK] == 'H' && t[(v + 2) & AW_SCAN_MASK] == 'T' &&
          t[(v + 3) & AW_SCAN_MASK] == 'T' && t[(v + 4) & AW_SCAN_MASK] == 'P' && t[(v + 5) & AW_SCAN_MASK] == '/' &&
          t[(v + 6) & AW_SCAN_MASK] == '1' && t[(v + 7) & AW_SCAN_MASK] == '.'))
        return AW_HTTP_HEAD;
    return line;
}

// Whether a request's start in t[0..len) must wait for more before it can be judged: its
// request line is not ended yet, or it ends in " HTTP/1.x" and the blank line that ends the
// headers is not there yet.  A first line that ends otherwise is not an HTTP/1 request (red
// team: a line protocol, `SET k v` and CRLF, waited for a blank line that never came).
static __always_inline int http_incomplete(const char *t, u32 len)
{
    u32 line = http1_line_end(t, len);
    if (!line)
        return 1;
    if (line >= AW_HTTP_HEAD)
        return 0;
    for (u32 i = 0; i < AW_HTTP_HEAD; i++) {   // the blank line: CRLF CRLF, or LF LF
        if (i + 3 > len)
            return 1;
        if (t[i] == '\n' && (t[i + 1] == '\n' || (t[i + 1] == '\r' && t[i + 2] == '\n')))
            return 0;
    }
    return 0;
}

// One request at e->text, s->from bytes into the send.  s->cork: a request must start there
// (a connection's first bytes, or where the last request's body ended), so a request line or
// header block cut short waits for the rest, empty lines before it are stepped over as servers
// do (nginx), and once it is judged aw_http_next finds where the next one starts.  In a
// connection whose framing was lost (AW_HTTP_LOOSE) a send is judged when it starts a request.
int aw_http_msg(struct sk_msg_md *msg)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    struct guard_conn *gc = msg_conn(msg);
    if (!s || !e || !gc)
        return SK_PASS;
    u32 rest = msg->size - s->from;
    if (s->cork) {
        u32 blank = 0;   // leading CR/LF
#pragma unroll
        for (u32 i = 0; i < 4; i++)
            blank += (blank == i) & (i < s->len) & (e->text[i] == '\r' || e->text[i] == '\n');
        if (blank) {
            s->advance = blank;
            sql_msg_progs.call(msg, 5);
            gc->state = AW_HTTP_LOOSE;
            return SK_PASS;
        }
        if ((rest < 8 && could_start(e->text, s->len)) ||
            (rest < AW_HTTP_HEAD && http_incomplete(e->text, s->len))) {
            gc->cork = msg->size + 1;   // the request line or headers go on in the next send
            bpf_msg_cork_bytes(msg, msg->size + 1);
            return SK_PASS;
        }
        if (!http_method_len(e->text)) {
            gc->state = AW_HTTP_LOOSE;   // not a request line where one must start
            return SK_PASS;
        }
    } else if (!http_method_len(e->text)) {
        return SK_PASS;
    }
    struct guard_rule r = {};
    u64 key = 0;
    int idx = http_decide(e->text, s->len, s->session, &r, &key);
    if (idx >= 0) {
        struct sql_result res = {.rule = idx, .action = r.action, .hash = key};
        e = sql_event(AW_G_HTTP, &res, AW_DONE_REFUSED, s->session);
        if (e) {
            note_peer(e, msg);
            guard_send(e);
        }
        return SK_DROP;
    }
    if (s->body_peek)
        return SK_PASS;   // a body judged as a request: the framing goes on past it
    if (s->cork) {
        s->advance = 0;
        sql_msg_progs.call(msg, 5);   // where the next request starts
    }
    gc->state = AW_HTTP_LOOSE;
    return SK_PASS;
}

int aw_http_ssl(struct pt_regs *ctx)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!s || !e)
        return 0;
    struct guard_rule r = {};
    u64 key = 0;
    int idx = http_decide(e->text, s->len, s->session, &r, &key);
    if (idx < 0)
        return 0;
    bpf_send_signal(AW_SIGKILL);   // before SSL_write encrypts the request
    struct sql_result res = {.rule = idx, .action = r.action, .hash = key};
    e = sql_event(AW_G_HTTP_TLS, &res, AW_DONE_KILLED, s->session);
    if (e)
        guard_send(e);
    return 0;
}


// Copy the send's bytes [from, from + AW_SCAN) into e->text.
static __always_inline void copy_window(struct sk_msg_md *msg, struct guard_event *e, u32 from, u32 total)
{
    u32 end = total - from < AW_SCAN ? total : from + AW_SCAN;
    bpf_msg_pull_data(msg, from, end, 0);
    void *d = msg->data, *dend = msg->data_end;
    u32 len = 0;
    for (u32 i = 0; i < AW_SCAN / 8; i++) {     // 8 bytes a step: fewer branches for the verifier
        if (d + (i + 1) * 8 > dend)
            break;
        *(u64 *)&e->text[i * 8] = *(u64 *)(d + i * 8);
        len = (i + 1) * 8;
    }
    for (u32 i = 0; i < 8; i++) {
        u32 j = len;
        if (j >= AW_SCAN || d + j + 1 > dend)
            break;
        e->text[j] = *(char *)(d + j);
        len = j + 1;
    }
    e->len = len;
}

int aw_sk_msg(struct sk_msg_md *msg)
{
    struct guard_conn *gc = msg_conn(msg);
    if (!gc)
        return SK_PASS;
    struct bpf_sock *msk = msg->sk;
    u64 flags = send_flags(msk ? (u64)msk : 0);
    if (flags & (AW_MSG_OOB | AW_FLAGS_UNREAD)) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        struct track_info *t = tracked.lookup(&tgid);
        struct track_info anon = {.session = gc->session};
        unjudged(t ? t : &anon, (flags & AW_FLAGS_UNREAD) ? AW_UNJUDGED_UNREAD : AW_UNJUDGED_OOB);
        return SK_DROP;
    }
    if (gc->state == AW_PG_OTHER)
        return SK_PASS;
    u32 total = msg->size;
    u32 skip = gc->skip;
    if (gc->state == AW_PG_STREAM && skip >= total) {
        gc->skip = skip - total;   // inside a message
        return SK_PASS;
    }
    u32 zero = 0;
    struct guard_event *e = guard_scratch.lookup(&zero);
    struct scan_state *s = scan_states.lookup(&zero);
    if (!e || !s)
        return SK_PASS;
    s->body_peek = 0;
    if (gc->state == AW_HTTP && skip >= total) {
        // inside a request's body; a server whose handler does not read a body it did not want
        // (Python's http.server) reads it as the next request, so a body that starts with a
        // whole HTTP/1 request line is judged as a request too
        gc->skip = skip - total;
        s->session = gc->session;
        sql_msg_progs.call(msg, 8);   // aw_http_body
        return SK_PASS;
    }
    // HTTP: the next request starts where the body ends (Postgres frames from the send's start)
    u32 from = gc->state == AW_HTTP ? skip : 0;
    s->from = from;
    copy_window(msg, e, from, total);
    // the rest runs as its own program: verified once, not once per copied length
    sql_msg_progs.call(msg, 2);
    return SK_PASS;
}

// Where the next request starts: past empty lines (s->advance), or past this request's
// header block and its Content-Length bytes of body.  Inside this send, that request is judged
// too (red team: a DELETE pipelined behind a GET, or behind a POST's body, in one send); past
// it, the body still to come is skipped and the next send starts a request.  A chunked body, a
// header block past AW_HTTP_HEAD or two Content-Length headers lose the framing
// (AW_HTTP_LOOSE).  Nothing is committed until the send's last request is judged, so a cork
// on the way frames the whole send again.  What the loops carry lives in map memory (s->...):
// in registers each exit would be a state of its own, and the verifier's 1M ran out.
// The next request starts at `next`: past this send, the rest of the body is skipped; inside
// it, that request is copied and judged too.
static __always_inline int http_go_on(struct sk_msg_md *msg, struct scan_state *s, struct guard_conn *gc,
                                      u64 next)
{
    u32 total = msg->size;
    if (next >= total) {
        gc->state = AW_HTTP;
        gc->skip = next - total;
        return SK_PASS;
    }
    s->from = next;   // another request (or empty lines) in this send: judge it too
    sql_msg_progs.call(msg, 6);
    gc->state = AW_HTTP_LOOSE;   // out of tail calls: the rest of this send was not judged
    return SK_PASS;
}

int aw_http_next(struct sk_msg_md *msg)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    struct guard_conn *gc = msg_conn(msg);
    if (!s || !e || !gc)
        return SK_PASS;
    u64 next = s->from;
    if (s->advance) {
        next += s->advance;
        s->advance = 0;
    } else {
        const char *t = e->text;
        s->hdr_end = 0;
        s->lengths = 0;
        s->chunked = 0;
        for (u32 i = 0; i < AW_HTTP_HEAD; i++) {
            if (i + 4 > s->len)
                break;
            u32 crlf = ((u8)t[i] ^ '\r') | ((u8)t[i + 1] ^ '\n') | ((u8)t[i + 2] ^ '\r') | ((u8)t[i + 3] ^ '\n');
            if (!crlf) {
                s->hdr_end = i + 4;
                break;
            }
            u64 cl = ((u8)t[i] ^ '\n') |
                     (((u8)t[i + 1] | 0x20) ^ 'c') | (((u8)t[i + 2] | 0x20) ^ 'o') | (((u8)t[i + 3] | 0x20) ^ 'n') |
                     (((u8)t[i + 4] | 0x20) ^ 't') | (((u8)t[i + 5] | 0x20) ^ 'e') | (((u8)t[i + 6] | 0x20) ^ 'n') |
                     (((u8)t[i + 7] | 0x20) ^ 't') | ((u8)t[i + 8] ^ '-') | (((u8)t[i + 9] | 0x20) ^ 'l') |
                     (((u8)t[i + 10] | 0x20) ^ 'e') | (((u8)t[i + 11] | 0x20) ^ 'n') | (((u8)t[i + 12] | 0x20) ^ 'g') |
                     (((u8)t[i + 13] | 0x20) ^ 't') | (((u8)t[i + 14] | 0x20) ^ 'h') | ((u8)t[i + 15] ^ ':');
            u64 tr = ((u8)t[i] ^ '\n') |
                     (((u8)t[i + 1] | 0x20) ^ 't') | (((u8)t[i + 2] | 0x20) ^ 'r') | (((u8)t[i + 3] | 0x20) ^ 'a') |
                     (((u8)t[i + 4] | 0x20) ^ 'n') | (((u8)t[i + 5] | 0x20) ^ 's') | (((u8)t[i + 6] | 0x20) ^ 'f') |
                     (((u8)t[i + 7] | 0x20) ^ 'e') | (((u8)t[i + 8] | 0x20) ^ 'r') | ((u8)t[i + 9] ^ '-');
            u64 is_cl = ((cl | -cl) >> 63) ^ 1;   // 1 when cl == 0
            s->chunked |= ((tr | -tr) >> 63) ^ 1;
            s->lengths += is_cl;
            s->advance |= (u32)(-is_cl) & (i + 16);   // where the value starts
        }
        sql_msg_progs.call(msg, 7);   // the Content-Length value, in a program of its own
        gc->state = AW_HTTP_LOOSE;
        return SK_PASS;
    }
    return http_go_on(msg, s, gc, next);
}

// Past the request at s->from: its header block (s->hdr_end) and the Content-Length value that
// starts at s->advance.  A program of its own: entered from one state, not from each of the
// header loop's exits (together they were past the verifier's 1M).
int aw_http_length(struct sk_msg_md *msg)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    struct guard_conn *gc = msg_conn(msg);
    if (!s || !e || !gc)
        return SK_PASS;
    const char *t = e->text;
    u32 hend = s->hdr_end;
    u32 at = s->advance;
    s->advance = 0;
    u64 body = 0;
    u32 digits = 0;
    for (u32 k = 0; k < 24; k++) {   // the value: blanks, then up to 10 digits
        u32 j = at + k;
        if (!at || j >= hend)
            break;
        u8 c = t[j & AW_SCAN_MASK];
        if (c >= '0' && c <= '9') {
            body = body * 10 + (c - '0');
            digits++;
        } else if (digits || (c != ' ' && c != '\t')) {
            break;
        }
    }
    u32 lengths = s->lengths;
    if (!hend || s->chunked || lengths > 1 || (lengths && !digits) || digits > 10 || body > AW_PG_MAX_MSG) {
        gc->state = AW_HTTP_LOOSE;   // a chunked body, or a length the kernel does not trust
        return SK_PASS;
    }
    return http_go_on(msg, s, gc, (u64)s->from + hend + body);
}

// A send inside a request's body, whose first line is a whole HTTP/1 request line: judged as a
// request (aw_sk_msg's note says why), without framing anything after it.
int aw_http_body(struct sk_msg_md *msg)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!s || !e)
        return SK_PASS;
    copy_window(msg, e, 0, msg->size);
    asm volatile("" ::: "memory");   // e->len from memory: the copy's exits become one state
    u32 line = http1_line_end(e->text, e->len);
    if (!http_method_len(e->text) || !line || line >= AW_HTTP_HEAD)
        return SK_PASS;   // a body like any other
    s->from = 0;
    s->len = e->len;
    s->cork = 0;
    s->body_peek = 1;
    sql_msg_progs.call(msg, 1);
    return SK_PASS;
}

// The request at s->from, copied (its own program: the copy's exits times the header parse's
// would be too many paths for the verifier), then judged.
int aw_http_copy(struct sk_msg_md *msg)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!s || !e)
        return SK_PASS;
    copy_window(msg, e, s->from, msg->size);
    asm volatile("" ::: "memory");
    s->len = e->len;
    s->cork = 1;
    sql_msg_progs.call(msg, 1);
    struct guard_conn *gc = msg_conn(msg);
    if (gc)
        gc->state = AW_HTTP_LOOSE;   // out of tail calls
    return SK_PASS;
}

// One message header past the copied window, h[0..5) (sk_msg and the TLS uprobe read it each
// their own way): a statement there is not read (opaque), a length no client sends stops the
// framing (opaque).  1 and *off past the message; or 0 and *owed, the bytes it still owes.
static __always_inline int pg_step_beyond(struct scan_state *s, const u8 *h, u32 *off, u32 total, u32 *owed)
{
    u32 mlen = ((u32)h[1] << 24) | ((u32)h[2] << 16) | ((u32)h[3] << 8) | h[4];
    *owed = 0;
    if (mlen < 4 || mlen > AW_PG_MAX_MSG) {
        s->unread = 1;
        return 0;
    }
    if (h[0] == 'Q' || h[0] == 'P')
        s->unread = 1;
    u32 next = *off + 1 + mlen;
    if (next > total) {
        *owed = next - total;
        return 0;
    }
    *off = next;
    return 1;
}

// Headers past the copied window, read one at a time (bpf_msg_pull_data of 5 bytes): the
// framing goes on, and a statement there (not read) is opaque.  Returns the bytes owed.
static __always_inline u32 pg_beyond(struct sk_msg_md *msg, struct scan_state *s, u32 off, u32 total)
{
    u32 owed = 0;
    for (int k = 0; k < AW_MAX_MSGS; k++) {
        if (off >= total)
            return 0;
        u8 h[5] = {};
        if (off + 5 > total || bpf_msg_pull_data(msg, off, off + 5, 0) != 0) {
            s->unread = 1;   // a header cut at the end of a send larger than the window
            return 0;
        }
        u8 *d = msg->data, *dend = msg->data_end;
        if ((void *)(d + 5) > (void *)dend) {
            s->unread = 1;
            return 0;
        }
        __builtin_memcpy(h, d, 5);
        if (!pg_step_beyond(s, h, &off, total, &owed))
            return owed;
    }
    if (off < total)
        s->unread = 1;
    return 0;
}

static __always_inline int cork(struct sk_msg_md *msg, struct guard_conn *gc, u32 bytes)
{
    gc->cork = bytes;
    bpf_msg_cork_bytes(msg, bytes);
    return SK_PASS;
}

int aw_msg_route(struct sk_msg_md *msg)
{
    struct guard_conn *gc = msg_conn(msg);
    u32 zero = 0;
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!gc || !e)
        return SK_PASS;
    u32 total = msg->size;
    u32 skip = gc->skip;
    u32 len = e->len;
    if (len > AW_SCAN)
        return SK_PASS;
    // the verdict ran before the bytes a cork waited for came (the kernel's message was full):
    // what is here cannot be framed as the server will read it
    int short_run = gc->cork && total < gc->cork;
    gc->cork = 0;   // set again below when this run corks
    // a connection's first bytes, cut short of what tells Postgres from HTTP: wait for 8
    if (gc->state == AW_PG_UNKNOWN && total < 8 && !short_run && could_start(e->text, len))
        return cork(msg, gc, 8);
    if (gc->state == AW_HTTP || gc->state == AW_HTTP_LOOSE ||
        (gc->state == AW_PG_UNKNOWN && (http_method_len(e->text) > 0 || e->text[0] == '\r' || e->text[0] == '\n'))) {
        u32 z = 0;
        struct scan_state *hs = scan_states.lookup(&z);
        if (hs) {
            hs->session = gc->session;
            hs->len = len;
            // a request starts here (the connection's first, or the one after a framed body):
            // it may wait for its whole request line and headers; in a connection whose framing
            // was lost a send may be a body, which must never wait
            hs->cork = gc->state != AW_HTTP_LOOSE && !short_run;
            sql_msg_progs.call(msg, 1);
        }
        return SK_PASS;
    }
    if (gc->state == AW_PG_UNKNOWN) {
        // StartupMessage (protocol 3.0) starts a plain stream.  SSLRequest and
        // GSSENCRequest ask first: refused ('N'), the StartupMessage follows in
        // the clear; accepted, a TLS handshake follows (the SSL_write uprobe
        // covers TLS) and is not a StartupMessage, so the stream is let be.
        u32 code = len >= 8 ? be32(&e->text[4]) : 0;
        if (total == 8 && (code == 80877103 || code == 80877104))
            return SK_PASS;
        if ((code >> 16) != 3) {   // protocol 3.x: the server negotiates any minor (red team: 3.1)
            gc->state = AW_PG_OTHER;
            return SK_PASS;
        }
        skip = be32(&e->text[0]);
        if (skip >= total) {
            gc->state = AW_PG_STREAM;
            gc->skip = skip - total;
            return SK_PASS;
        }
    }
    struct scan_state *s = scan_begin(gc->session, len);
    if (!s)
        return SK_PASS;
    u32 owed = pg_regions(e, s, len, total, skip);
    s->short_run = short_run;
    if (s->beyond) {
        sql_msg_progs.call(msg, 3);   // frames on past the window, then judges
        s->unread = 1;
    }
    if (short_run)
        s->unread = 1;
    else if (s->cork)
        return cork(msg, gc, s->cork);   // nothing committed: the whole send is framed again
    gc->state = AW_PG_STREAM;
    gc->skip = owed;
    if (!s->nregions && !s->unread)
        return SK_PASS;
    sql_msg_progs.call(msg, 4);   // aw_msg_ambig, then the matcher
    return SK_PASS;
}

int aw_msg_beyond(struct sk_msg_md *msg)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_conn *gc = msg_conn(msg);
    if (!s || !gc)
        return SK_PASS;
    u32 owed = pg_beyond(msg, s, s->beyond, msg->size);
    if (s->short_run)
        s->unread = 1;
    gc->state = AW_PG_STREAM;
    gc->skip = owed;
    if (s->nregions || s->unread)
        sql_msg_progs.call(msg, 4);
    return SK_PASS;
}

// Text whose strings the server may end elsewhere than the matcher does: a backslash (an
// E'' string, or any string once the session sets standard_conforming_strings off) or a
// tagged dollar quote ($tag$, which the matcher does not pair), together with a `;` that could
// then start a statement only one of them sees (red team: `select E'\''; drop table t; --'`,
// `select $q$ '$q$; drop table t; --'`).  Opaque: it meets every denying rule.  One pass of its
// own over what was copied, so that the matcher's loop stays as the verifier can walk it.
#define AW_HASZERO(v) (((v) - 0x0101010101010101ULL) & ~(v) & 0x8080808080808080ULL)

static __always_inline void mark_ambiguous(struct scan_state *s, const char *t)
{
    u32 lo = s->q_lo, hi = s->q_hi;
    s->odd = 0;
    s->semi = 0;
    // the Query texts, 8 bytes a step, each tested for the three bytes at once (a zero byte of
    // v ^ pattern); any `$` counts (the matcher pairs only `$$`).  The first word's bytes
    // before the text are shifted out; the last word's past it are masked to zero (no match).
    u32 first = lo & ~7u;
    for (u32 k = 0; k < AW_SCAN / 8; k++) {
        u32 off = first + k * 8;
        if (off >= hi)
            break;
        u32 at = off;
        asm volatile("" : "+r"(at));
        u64 v = *(u64 *)&t[at & (AW_SCAN_MASK & ~7u)];
        u64 keep = ~0ULL;
        u32 past = off + 8 - hi;             // bytes of this word past the text, when below 8
        keep >>= (past < 8 ? past : 0) * 8;
        u32 before = k ? 0 : lo - first;     // bytes of the first word before the text
        keep &= ~0ULL << (before * 8);
        v &= keep;
        u64 bs = v ^ 0x5c5c5c5c5c5c5c5cULL, dl = v ^ 0x2424242424242424ULL, sc = v ^ 0x3b3b3b3b3b3b3b3bULL;
        s->odd |= (AW_HASZERO(bs) | AW_HASZERO(dl)) != 0;
        s->semi |= AW_HASZERO(sc) != 0;
    }
    if (s->odd && s->semi)
        s->unread = 1;
}

int aw_msg_ambig(struct sk_msg_md *msg)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!s || !e)
        return SK_PASS;
    mark_ambiguous(s, e->text);
    sql_msg_progs.call(msg, 0);
    return SK_PASS;
}

int aw_sql_msg(struct sk_msg_md *msg)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!s || !e)
        return SK_PASS;
    if (scan_chunk(s, e->text)) {
        sql_msg_progs.call(msg, 0);
        s->unread = 1;    // out of tail calls: what is left was not read
    }
    if (s->unread)
        s->over |= cfg(AW_CFG_SQL_OPAQUE);
    struct sql_result res = {};
    if (!sql_decide(s, &res))
        return SK_PASS;
    e = sql_event(AW_G_SQL, &res, AW_DONE_REFUSED, s->session);
    if (e) {
        note_peer(e, msg);
        guard_send(e);
    }
    return SK_DROP;
}

// ---- TLS: the plaintext at SSL_write entry (called from tls.bpf.c) -------------
//
// Framed per connection as the sockets are (ssl_streams, by process and SSL *; SSL_free
// forgets it): a statement behind another message, or cut across writes, is read where the
// server will read it.  A write cannot wait as a corked send does, so a statement or header
// cut at the end of a write is opaque (red team: `Sync` then `Query` in one write, a header
// cut after its type byte, one byte a write).

BPF_TABLE("lru_hash", u64, struct guard_conn, ssl_streams, 16384);

static __always_inline u64 ssl_stream_key(u64 ssl)
{
    return ((u64)(bpf_get_current_pid_tgid() >> 32) << 32) ^ ssl;
}

// Headers past the copied window, read from the caller's buffer.  Returns the bytes owed.
static __always_inline u32 ssl_pg_beyond(u64 buf, struct scan_state *s, u32 off, u32 total)
{
    u32 owed = 0;
    for (int k = 0; k < AW_MAX_MSGS; k++) {
        if (off >= total)
            return 0;
        u8 h[5] = {};
        if (off + 5 > total || bpf_probe_read_user(h, 5, (void *)(buf + off)) != 0) {
            s->unread = 1;
            return 0;
        }
        if (!pg_step_beyond(s, h, &off, total, &owed))
            return owed;
    }
    if (off < total)
        s->unread = 1;
    return 0;
}

// A frontend message's type byte and the high byte of a length below 16 MiB.
static __always_inline int pg_message_start(const char *t)
{
    char c = t[0];
    return t[1] == 0 && (c == 'B' || c == 'C' || c == 'D' || c == 'E' || c == 'F' || c == 'H' || c == 'P' ||
                         c == 'Q' || c == 'S' || c == 'X' || c == 'c' || c == 'd' || c == 'f' || c == 'p');
}

static __always_inline void guard_ssl_write(struct pt_regs *ctx, struct track_info *t, u64 buf, u32 n)
{
    if (!(cfg(AW_CFG_FLAGS) & AW_FLAG_ENFORCE) || n == 0)
        return;
    u64 ssl = PT_REGS_PARM1(ctx);
    u64 key = ssl_stream_key(ssl);
    struct guard_conn *gs = ssl_streams.lookup(&key);
    if (!gs) {   // the connection's first write here
        struct guard_conn fresh = {.session = t->session};
#if AW_BTF
        // a forked child writes on its parent's connection: it goes on from the parent's framing
        // (red team: the parent cut a message, the child wrote the rest and a statement)
        u64 parent = 0;
        u32 ptgid = 0;
        bpf_probe_read_kernel(&parent, sizeof(parent), (void *)(bpf_get_current_task() + AW_OFF_TASK_REAL_PARENT));
        if (parent)
            bpf_probe_read_kernel(&ptgid, sizeof(ptgid), (void *)(parent + AW_OFF_TASK_TGID));
        u64 pkey = ((u64)ptgid << 32) ^ ssl;
        struct guard_conn *from_parent = ptgid ? ssl_streams.lookup(&pkey) : 0;
        if (from_parent)
            fresh = *from_parent;
#endif
        ssl_streams.update(&key, &fresh);
        gs = ssl_streams.lookup(&key);
    }
    if (!gs || gs->state == AW_PG_OTHER)
        return;
    u32 skip = gs->skip;
    if (gs->state == AW_PG_STREAM && skip >= n) {
        gs->skip = skip - n;
        return;
    }
    u32 zero = 0;
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!e)
        return;
    u32 len = n < AW_SCAN ? n : AW_SCAN;
    *(u64 *)e->text = 0;   // a write shorter than 8 bytes: what the checks below read past it is 0
    struct scan_state *s = scan_begin(t->session, len);
    if (!s)
        return;
    if (bpf_probe_read_user(e->text, len & AW_SCAN_MASK ? len & AW_SCAN_MASK : AW_SCAN, (void *)buf) != 0) {
        // a buffer the kernel cannot read here (red team: a file mapping not yet touched), which
        // OpenSSL will read in a moment: opaque, wherever the stream is
        s->unread = 1;
        sql_ssl_progs.call(ctx, 0);
        return;
    }
    e->len = len;
    if (gs->state == AW_HTTP_LOOSE || (gs->state == AW_PG_UNKNOWN && http_method_len(e->text) > 0)) {
        gs->state = AW_HTTP_LOOSE;   // each write that starts a request line is judged alone
        if (http_method_len(e->text) > 0)
            sql_ssl_progs.call(ctx, 1);
        return;
    }
    if (gs->state == AW_PG_UNKNOWN) {
        // a StartupMessage (inside TLS it comes first, after the handshake) starts a stream
        if (n < 8 && could_start(e->text, len)) {
            s->unread = 1;   // cut short: nothing honest writes a StartupMessage in pieces
            sql_ssl_progs.call(ctx, 0);
            return;
        }
        gs->state = AW_PG_STREAM;
        if (n >= 8 && (be32(&e->text[4]) >> 16) == 3) {
            skip = be32(&e->text[0]);
            if (skip >= n) {
                gs->skip = skip - n;
                return;
            }
        } else if (!pg_message_start(e->text)) {
            gs->state = AW_PG_OTHER;
            return;
        }   // else a connection the daemon met mid-stream (opened before it started): framed from here
    }
    u32 owed = pg_regions(e, s, len, n, skip);
    if (s->beyond)
        owed = ssl_pg_beyond(buf, s, s->beyond, n);
    if (s->cork)
        s->unread = 1;   // a write cannot wait for the rest
    gs->skip = owed;
    if (s->nregions || s->unread)
        sql_ssl_progs.call(ctx, 2);   // aw_ssl_ambig, then the matcher
}

int aw_ssl_free(struct pt_regs *ctx)
{
    u64 key = ssl_stream_key(PT_REGS_PARM1(ctx));
    ssl_streams.delete(&key);
    return 0;
}

int aw_ssl_ambig(struct pt_regs *ctx)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!s || !e)
        return 0;
    mark_ambiguous(s, e->text);
    sql_ssl_progs.call(ctx, 0);
    return 0;
}

int aw_sql_ssl(struct pt_regs *ctx)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!s || !e)
        return 0;
    if (scan_chunk(s, e->text)) {
        sql_ssl_progs.call(ctx, 0);
        s->unread = 1;
    }
    if (s->unread)
        s->over |= cfg(AW_CFG_SQL_OPAQUE);
    struct sql_result res = {};
    if (!sql_decide(s, &res))
        return 0;
    // SIGKILL lands before SSL_write encrypts a byte: the statement never leaves
    bpf_send_signal(AW_SIGKILL);
    e = sql_event(AW_G_SQL_TLS, &res, AW_DONE_KILLED, s->session);
    if (e)
        guard_send(e);
    return 0;
}

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
    events.ringbuf_submit(e, 0);
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

// ---- killing another process: kfuncs (probes/kfuncs.py patches these calls) ----------

#if AW_KFUNCS && AW_BTF
static struct task_struct *(*aw_task_from_pid)(s32 pid) = (void *)AW_KF_TASK_FROM_PID;
static int (*aw_send_signal_task)(struct task_struct *task, int sig, int type, u64 value) =
    (void *)AW_KF_SEND_SIGNAL_TASK;
static void (*aw_task_release)(struct task_struct *task) = (void *)AW_KF_TASK_RELEASE;
#define AW_PIDTYPE_TGID 1
#endif

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

// Enforcement: the kernel half of the policy (compiled last, same unit).
//
// This file holds what every guard shares: the records, maps, configuration and helpers.  The
// guards follow in files of their own, one concern each, compiled in probes/loader.py SOURCES
// order (each file's header names what it uses from the files before it):
//   guard_exec.bpf.c     execs: session hold, argv and environment, program identities
//   guard_connect.bpf.c  connects, Postgres over Unix sockets, datagrams, the quarantine mark
//   guard_stream.bpf.c   what the SQL and HTTP matchers share: hashing, state, slots, verdicts
//   guard_sql.bpf.c      the SQL matcher and Postgres framing
//   guard_http.bpf.c     the HTTP matcher
//   guard_msg.bpf.c      sock_ops and sk_msg: the stream router on TCP sends
//   guard_tls.bpf.c      the matchers on SSL_write's plaintext
//   guard_task.bpf.c     ptrace joins, self-protection, the decision stop
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
#define AW_UNJUDGED_JOINED 4   // a send on a connection the guard did not see open (AW_PG_JOINED)
#define AW_UNJUDGED_FULL 5     // the guard had no room for a connection (guard_socks, guard_sk) or a TLS
                               // stream (ssl_streams): the connection is reset, the TLS writer killed
#define AW_UNJUDGED_PARTIAL 6  // a TLS write after one that went only in part (SSL_MODE_ENABLE_PARTIAL_WRITE):
                               // the framing counted bytes that did not go; the writer is killed
#define AW_UNJUDGED_NESTED 7   // an SSL_write inside another on the same thread (a callback), or after one
                               // whose return never came (longjmp): the framing cannot be trusted
#define AW_UNJUDGED_EARLY 8    // a send already waiting in tcp_sendmsg when the connection was established:
                               // it goes on past sk_msg, so the connection is reset (as AW_UNJUDGED_FULL)
#define AW_UNJUDGED_RETRY 9    // a TLS write after one that failed (WANT_WRITE: OpenSSL may have sent part of
                               // it) that does not begin with the same bytes, or a failed one too big to check
#define AW_UNJUDGED_HUGE 10    // a TLS write of 2 GiB or more (SSL_write_ex's size_t): past what the framing counts
#define AW_UNJUDGED_HANDSHAKE 11 // a handshake inside SSL_write (no SSL_connect first): the write is a new
                               // connection's first, framed against the old one's state
#define AW_UNJUDGED_SENDFILE 12 // SSL_sendfile (kTLS) or early data: plaintext the uprobes do not see
#define AW_UNJUDGED_HELD 13    // another sk_msg program holds the socket (not an earlier daemon's guard)
#define AW_UNJUDGED_TLS 14     // a send on a Postgres connection that went TLS (SSLRequest, then a handshake)
                               // from outside every OpenSSL call the TLS uprobes watch: another TLS
                               // library's (Go, Java, rustls, Node's memory BIOs) or a libssl the uprobes
                               // are not on (a copy deleted from disk), whose statements nothing reads
#define AW_UNJUDGED_GSS 15     // GSSAPI encryption (GSSENCRequest, then no StartupMessage in the clear)
#define AW_UNJUDGED_DEPTH 16   // an HTTP send with more requests than the guard's tail calls reach (33 a
                               // send: about eight): the rest of it was not judged
#define AW_UNJUDGED_CUT 17     // a request body that starts with an HTTP/1 request line, or like one (a
                               // method, blanks, '/') cut at the end of its send: a server that reads no
                               // body takes it and what follows for requests the guard does not frame
#define AW_UNJUDGED_HELLO 18   // a TLS ClientHello as a connection's first bytes that the guard cannot read
                               // whole (cut across records or sends, or past AW_SCAN), in a session under
                               // SQL rules: it could open Postgres over TLS with no SSLRequest (PostgreSQL
                               // 17's direct TLS) and hide the ALPN that says so (aw_msg_hello)
#define AW_UNJUDGED_METHOD 19   // an HTTP request line whose method the guard does not read (PROPFIND,
                               // M-SEARCH), in a session under an HTTP rule that denies or holds
#define AW_UNJUDGED_HTTP2 20    // the HTTP/2 preface, in a session under an HTTP rule that denies or holds:
                               // its requests are HPACK-coded frames no guard reads (guard_http.bpf.c)
#define AW_EBUSY 16
#define AW_UNGUARDED_MARK 0x6177ffff // socket mark of a connection the guard had no room for: nftables
                               // resets it (enforce/quarantine.py; outside the sessions' marks)
#define AW_FLAGS_UNREAD (1ULL << 62)
#define AW_MSG_OOB 1
#define AW_MSG_FASTOPEN 0x20000000
#define AW_SOL_TCP 6
#define AW_TCP_FASTOPEN_CONNECT 30
#define AW_SOL_SOCKET 1
#define AW_SO_MARK 36
#ifndef AW_GUARD_SOCKS
#define AW_GUARD_SOCKS 65536   // connections the stream guard holds at once (probes.guard_connections)
#endif
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
    AW_G_UNIX_SHARED = 15, // a Unix socket another process shares, connected by a session under SQL
                           // rules: refused; or a child forked while it connects: killed (target: child)
};

// guard_event.hash of an AW_G_UNIX_SHARED record that killed (0: a connect refused)
#define AW_UNIX_FORKED 1   // a child forked while a thread of its parent connected a Unix socket
#define AW_UNIX_PASSED 2   // descriptors passed over a Unix socket while a thread of the sender connected one

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
    AW_CFG_HTTP_DENY = 20,        // HTTP rules that deny or hold: what a request whose host or path is
                                  // not read (http_candidates) is taken to meet
    AW_CFG_MAX = 24,
};
#define AW_FLAG_HOLD_SESSIONS 1   // stop a new session's root until its rules are known
#define AW_FLAG_ENFORCE 2         // any guard at all
#define AW_FLAG_SQL 4             // some rule is about SQL or HTTP: tracked TCP sockets go through sk_msg
#define AW_FLAG_IDENTITY 8        // exec rules match program files by identity (exec_files)
#define AW_FLAG_TLS_WAIT 16       // a tracked exec of a file in tls_unattached stops for its uprobes
#define AW_EXEC_TLS 2             // guard_event.target of an exec stopped (also) for its TLS uprobes

#define AW_PG_UNKNOWN 0
#define AW_PG_STREAM 1           // Postgres frontend messages, framed
#define AW_PG_OTHER 2            // neither Postgres nor HTTP (or encrypted): pass
#define AW_HTTP 3                // HTTP/1.x requests, framed: skip is the body still to come
#define AW_HTTP_LOOSE 4          // HTTP whose framing was lost (a chunked body, headers past the
                                 // window): each send that starts a request line is judged alone
#define AW_PG_JOINED 5           // put in the guard by the daemon, already connected and guarded by
                                 // nothing (opened while no SQL/HTTP rule was loaded, or by a process
                                 // that joined a session): where its messages start is unknown, so
                                 // every send is refused (AW_UNJUDGED_JOINED)
#define AW_PG_TLS_ASKED 6        // after an SSLRequest: a handshake (AW_PG_TLS) or a StartupMessage follows
#define AW_PG_GSS_ASKED 7        // after a GSSENCRequest: only a StartupMessage in the clear may follow
#define AW_PG_TLS 8              // Postgres in TLS: the SSL_write uprobe reads it (guard_tls.bpf.c), so a
                                 // send must come from inside an OpenSSL call it watches (tls_send)
#define AW_TLS_HELLO 9           // TLS whose first ClientHello offered no "postgresql": until the client's
                                 // first application-data record, its records are walked (skip: the bytes
                                 // of one that goes on from the last send), and a second ClientHello (after
                                 // a HelloRetryRequest) is read as the first was (aw_msg_hello)

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
// A connection's state lives with its socket (sk storage, written at connect or by the daemon's
// adoption): nothing else can evict it (an LRU of cookies could be churned by connects).  The
// sockhash is what makes sk_msg run on its sends; a full one fails closed (aw_sockops).
BPF_SOCKHASH(guard_socks, u64, AW_GUARD_SOCKS);
BPF_SK_STORAGE(guard_sk, struct guard_conn);
// socket cookie -> state, for a connect still in progress when the daemon took the socket up
// (Probes.guard_socket; its connect ran while no stream rule was loaded).  Only the daemon writes it.
BPF_TABLE("lru_hash", u64, struct guard_conn, guard_conns, 4096);

// The state of the socket an sk_msg program runs for (NULL: not one the guard tracks).
static __always_inline struct guard_conn *msg_conn(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    return sk ? guard_sk.sk_storage_get(sk, 0, 0) : 0;
}
BPF_PERCPU_ARRAY(guard_scratch, struct guard_event, 1);

// Killing another process: kfuncs (probes/kfuncs.py patches these calls into every program of
// kfuncs.PROGRAMS before it loads)
#if AW_KFUNCS && AW_BTF
static struct task_struct *(*aw_task_from_pid)(s32 pid) = (void *)AW_KF_TASK_FROM_PID;
static int (*aw_send_signal_task)(struct task_struct *task, int sig, int type, u64 value) =
    (void *)AW_KF_SEND_SIGNAL_TASK;
static void (*aw_task_release)(struct task_struct *task) = (void *)AW_KF_TASK_RELEASE;
#define AW_PIDTYPE_TGID 1
#endif

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

// The same, in a context that is no process's (sock_ops runs where the handshake's last segment
// arrives): no pid, uid, comm or cgroup, the session from the connection's state.  A scratch of its
// own: a softirq can come in the middle of an sk_msg or uprobe chain on this CPU (red team).
BPF_PERCPU_ARRAY(softirq_scratch, struct guard_event, 1);
// 1 while an earlier daemon's guard may hold sockets (EBUSY at the sockhash is then its own), else 0
// (Probes: set at the start, cleared once no predecessor is held)
BPF_ARRAY(succession, u64, 1);
static __always_inline struct guard_event *guard_begin_session(u32 what, u64 session)
{
    u32 zero = 0;
    struct guard_event *e = softirq_scratch.lookup(&zero);
    if (!e)
        return NULL;
    __builtin_memset(e, 0, offsetof(struct guard_event, text));
    e->h.type = AW_EV_GUARD;
    e->h.ts = bpf_ktime_get_boot_ns();
    e->h.session = session;
    e->what = what;
    e->rule = -1;
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

// guard_connect.bpf.c: where a socket goes.  cgroup connect4/6 (refuse with EPERM), Postgres
// over a Unix socket (connect_unix, and sk_data_ready for a name reached through a link),
// unconnected datagrams (sendmsg4/6), the quarantine mark at sock_create.
// Uses guard.bpf.c.

#if AW_UNIX_SHARE && AW_SOCK_CAPTURE
// A thread's Unix connect in a session under SQL rules, from connect_unix until its sk_data_ready
// (the connect made, or the thread's next Unix send), its next connect of any socket, or its exit:
// thread -> the socket.  What the fork check (sched_process_fork) and a descriptor's passing
// (sk_data_ready) look up for a thread inside connect(): its socket, whatever its descriptor
// names by then (red team: the socket dup'ed and its number dup2'ed over while the connect waited
// on a full backlog).  Not an LRU: a connect is refused when there is no room (red team: 20,000
// failed connects of other threads evicted a waiting connect's entry).
BPF_HASH(unix_connecting, u32, u64, 4096);
// Descriptor tables shared with another process: a CLONE_FILES child made while tracked
// (sched_process_fork), forgotten when the table's last user exits.  Not an LRU either: a
// CLONE_FILES child is killed when there is no room (red team: forks of other processes evicted
// an entry; and a value naming the processes was overwritten by a grandchild's fork).
BPF_HASH(files_shared, u64, u8, 4096);
#endif

// A thread leaves no Unix connect behind (process.bpf.c sched_process_exit); the last user of a
// table shared with a CLONE_FILES child takes its note with it.
static __always_inline void unix_thread_exit(u32 tid)
{
#if AW_UNIX_SHARE && AW_SOCK_CAPTURE
    unix_connecting.delete(&tid);
    u64 files = kread(bpf_get_current_task() + AW_OFF_TASK_FILES);
    s32 users = 0;
    if (files && files_shared.lookup(&files)) {
        bpf_probe_read_kernel(&users, sizeof(users), (void *)(files + AW_OFF_FILES_COUNT));
        if (users <= 1)
            files_shared.delete(&files);
    }
#endif
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
    if (ctx->type == 1 && (flags & AW_FLAG_SQL)) {   // SOCK_STREAM: sock_ops puts it in the guard
        struct guard_conn gc = {.session = t->session};
        struct bpf_sock *sk = ctx->sk;
        struct guard_conn *st = sk ? guard_sk.sk_storage_get(sk, &gc, BPF_SK_STORAGE_GET_F_CREATE) : 0;
        if (!st) {   // no memory for its state: it would go unguarded
            unjudged(t, AW_UNJUDGED_FULL);
            return 0;
        }
        *st = gc;    // a connect again on the same socket starts a new stream
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
#if AW_UNIX_SHARE && AW_SOCK_CAPTURE
    if (what == AW_G_CONNECT) {   // a thread that connects this socket is in no Unix connect (a
        u32 tid = bpf_get_current_pid_tgid();   // failed one's entry: red team, a false kill)
        unix_connecting.delete(&tid);
    }
#endif
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
// setsockopt(SO_MARK) (root, or CAP_NET_ADMIN): the mark is how nftables quarantines a session and
// resets a connection the guard had no room for; a session never changes it (EPERM).
int aw_setsockopt(struct bpf_sockopt *ctx)
{
    int fastopen = ctx->level == AW_SOL_TCP && ctx->optname == AW_TCP_FASTOPEN_CONNECT;
    int mark = ctx->level == AW_SOL_SOCKET && ctx->optname == AW_SO_MARK;
    if (!fastopen && !mark)
        return 1;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 1;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 1;
    u64 flags = cfg(AW_CFG_FLAGS);
    if (mark)
        return (flags & AW_FLAG_ENFORCE) ? 0 : 1;
    if (!(flags & AW_FLAG_SQL))
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

#define AW_THREAD_WALK 256         // threads the fork check reads (sched_process_fork)
#define AW_NR_CONNECT 42           // x86_64
#define AW_NR32_SOCKETCALL 102     // i386: socketcall(SYS_CONNECT, ...) and connect
#define AW_NR32_CONNECT 362
#define AW_TS_COMPAT 0x2

#if AW_SOCK_CAPTURE
// Is the Unix socket `sk` bound to a Postgres name (`.s.PGSQL.<port>`)?  Its name in `path`.
static __always_inline int pg_unix_name(u64 sk, char *path)
{
    u64 addr = kread(sk + AW_OFF_UNIX_ADDR);
    if (!addr)
        return 0;
    bpf_probe_read_kernel(path, 108, (void *)(addr + AW_OFF_UNIX_ADDRESS_NAME + 2));
    return pgsql_name(path);
}
#endif

#if AW_UNIX_SHARE && AW_SOCK_CAPTURE

// Does another process hold this socket?  The kill at sk_data_ready (below) ends the process that
// connects; a process sharing its socket (a child forked before the connect, a CLONE_FILES
// sibling, one it was passed to over SCM_RIGHTS) would outlive it with the socket connected, and
// its first send would reach the server before anything could act: no hook refuses a Unix send
// (red team: forkfirst).  The file's references are all this process's own when they are its
// descriptor and, while threads share the descriptor table, the one connect() took for the call
// (fdget).  A second descriptor of its own (dup) counts as shared too: nothing tells the two
// apart, and a client has no use for one.  The table is another process's too when a CLONE_FILES
// child was made while this one was tracked; for a process that joined its session otherwise (the
// daemon's scan at its start), when its table has more users than the process has threads.
static __always_inline int unix_shared(u64 sk, struct track_info *t)
{
    u64 sock = kread(sk + AW_OFF_SK_SOCKET);
    u64 file = sock ? kread(sock + AW_OFF_SOCKET_FILE) : 0;
    u64 task = bpf_get_current_task();
    u64 files = kread(task + AW_OFF_TASK_FILES);
    u64 signal = kread(task + AW_OFF_TASK_SIGNAL);
    if (!file || !files || !signal)
        return 1;
    u64 refs = kread(file + AW_OFF_FILE_REF) + AW_FILE_REF_BIAS;
    s32 users = 0, threads = 0;
    bpf_probe_read_kernel(&users, sizeof(users), (void *)(files + AW_OFF_FILES_COUNT));
    bpf_probe_read_kernel(&threads, sizeof(threads), (void *)(signal + AW_OFF_SIGNAL_NR_THREADS));
    u32 table_shared = users > 1 && files_shared.lookup(&files) != 0;
    // (a scanned process's count: a thread being made counts in the table before it counts as a
    // thread, so a process making threads meets this now and then)
    table_shared |= (t->flags & AW_TRACK_JOINED) && users > threads;
    // A connect the fork check (sched_process_fork) would not see going on: one made by io_uring (its
    // request holds the file, and its thread is in io_uring_enter or is a worker of its own), or
    // by a process of more threads than that check walks.
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 nr = 0;
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    u32 compat = (kread_n(task + AW_OFF_TASK_THREAD_INFO + AW_OFF_THREAD_INFO_STATUS, 4) & AW_TS_COMPAT) != 0;
    u32 by_connect = compat ? (nr == AW_NR32_SOCKETCALL || nr == AW_NR32_CONNECT) : nr == AW_NR_CONNECT;
    if (users < 1 || table_shared || refs > 1 + (users > 1) || threads > AW_THREAD_WALK || !by_connect)
        return 1;
    u32 tid = bpf_get_current_pid_tgid();
    return unix_connecting.update(&tid, &sk) != 0;   // no room: refused
}

// Is a thread of this process (other than the current one) inside connect() on a Unix stream
// socket that a process sharing it now could reach Postgres through: one not yet connected (its
// connect goes on, or waits on a full backlog that the agent's own listener may hold, and looks
// its path up again when woken), or one connected to Postgres (sk_data_ready kills or has killed
// its process).  Threads are read from the list of the thread group (AW_THREAD_WALK of them:
// connect_unix refuses a process of more, and threads made since joined the list's tail); a
// thread is inside connect() when the system call number saved at its entry is connect's (also
// for a moment after a connect that failed, until a timer tick or its next call rewrites it) and
// it has a socket in unix_connecting (a 32-bit thread's connect too, or socketcall's).
// `path` gets the peer's name when it is Postgres.
struct unix_walk {
    u32 connecting;
    u32 _pad;
    u64 sk[4];   // the first two threads' sockets; [2] and [3] are spares
};
BPF_PERCPU_ARRAY(unix_walks, struct unix_walk, 1);

static __always_inline int unix_connect_inflight(char *path)
{
    u64 me = bpf_get_current_task();
    // where a task's saved user registers are, from its kernel stack (the same for every task);
    // the pointer's value read as a number (the verifier allows no arithmetic on it)
    struct pt_regs *mine = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 regs_at = 0;
    bpf_probe_read_kernel(&regs_at, sizeof(regs_at), &mine);
    regs_at -= kread(me + AW_OFF_TASK_STACK);
    u64 head = kread(me + AW_OFF_TASK_SIGNAL) + AW_OFF_SIGNAL_THREAD_HEAD;
    u64 node = kread(head);
    // kept in map memory, not registers: the verifier then sees one state per step of the walk
    // (370K instructions processed with them in registers, 1M+ with a counter)
    u32 zero = 0;
    struct unix_walk *w = unix_walks.lookup(&zero);
    if (!w)
        return 0;
    w->connecting = 0;
    w->sk[0] = 0;
    w->sk[1] = 0;
    for (int i = 0; i < AW_THREAD_WALK; i++) {
        if ((node == head) | (node == 0))
            break;
        u64 th = node - AW_OFF_TASK_THREAD_NODE;
        node = kread(node);
        u64 stack = kread(th + AW_OFF_TASK_STACK) * (th != me);
        u64 nr = kread(stack + regs_at + offsetof(struct pt_regs, orig_ax));
        u32 status = kread_n(th + AW_OFF_TASK_THREAD_INFO + AW_OFF_THREAD_INFO_STATUS, 4);
        u32 compat = (status & AW_TS_COMPAT) != 0;
        // a 32-bit connect: its own call, or socketcall(SYS_CONNECT) (red team: a thread in
        // socketcall's accept was taken for one)
        u64 op = kread(stack + regs_at + offsetof(struct pt_regs, bx));
        u32 in = compat ? (nr == AW_NR32_CONNECT) | ((nr == AW_NR32_SOCKETCALL) & (op == 3))
                        : nr == AW_NR_CONNECT;
        u32 tid = kread_n(th + AW_OFF_TASK_PID, 4);
        u64 *sk = (stack != 0) & in ? unix_connecting.lookup(&tid) : 0;
        u32 in64 = sk != 0;
        // the socket into slot `connecting` (the third: a spare), written always
        u32 n = w->connecting;
        u32 slot = n ^ ((n ^ 2) & -(u32)(n > 2));
        asm volatile("" : "+r"(slot));
        w->sk[slot & 3] = sk ? *sk : 0;
        w->connecting = n + in64;
    }
    u32 doom = w->connecting > 2;   // not worth telling apart
    u64 sks[2] = {w->sk[0], w->sk[1]};
    u64 established = 0;            // the socket of a thread in connect() that is connected (one)
#pragma unroll
    for (int k = 0; k < 2; k++) {
        u64 sk = sks[k];
        if (!sk)
            continue;
        if (kread_n(sk + AW_OFF_SKC_STATE, 1) != 1 || established)   // connecting or failed; or two
            doom = 1;
        else
            established = sk;
    }
    if (!doom && established) {
        u64 peer = kread(established + AW_OFF_UNIX_PEER);
        doom = peer && pg_unix_name(peer, path);
    }
    return doom;
}
#endif

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
    u32 what = AW_G_UNIX;
#if AW_UNIX_SHARE && AW_SOCK_CAPTURE
    // a stream socket of any name: whatever it reaches, it may be Postgres through a link
    if (!found && (ctx->type == 1 || ctx->type == 5) &&   // SOCK_STREAM, SOCK_SEQPACKET
        unix_shared(kread((u64)ctx + AW_OFF_SOCK_ADDR_SK), t)) {
        found = 1;
        what = AW_G_UNIX_SHARED;
    }
#endif
    if (!found)
        return 1;
    struct guard_rule r = {};
    u32 exact = 0;
    int idx = first_rule(cand, &r, &exact);
    struct guard_event *e = guard_begin(what, t);
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
#if AW_UNIX_SHARE
// Descriptors sent over a Unix socket (SCM_RIGHTS: the message just queued on the receiving
// socket carries them) while another thread of the sender connects a Unix socket: the receiver
// would hold the socket once connected (red team: the connect waited on a full backlog of the
// agent's own listener, re-targeted to Postgres meanwhile).  The sender is killed: its connect,
// waiting, ends with it, and the receiver holds a socket that never connected.
static __always_inline void unix_passing(struct track_info *t, u64 sk)
{
    u64 queue = sk + AW_OFF_SK_RECEIVE_QUEUE;
    u64 skb = kread(queue + AW_OFF_SKB_HEAD_PREV);
    if (!skb || skb == queue || !kread(skb + AW_OFF_SKB_CB + AW_OFF_UNIX_SKB_FP))
        return;
    char path[112] = {};
    if (!unix_connect_inflight(path))
        return;
    int killed = bpf_send_signal(AW_SIGKILL) == 0;
    struct guard_event *e = guard_begin(AW_G_UNIX_SHARED, t);
    if (e) {
        e->done = killed ? AW_DONE_KILLED : AW_DONE_SEEN;
        e->rule = -1;
        e->hash = AW_UNIX_PASSED;
        __builtin_memcpy(e->text, path, 108);
        e->len = 108;
        guard_send(e);
    }
}
#endif

// Postgres over a Unix socket reached by a name connect_unix does not know (a symlink or hard
// link of another name: red team).  The server end of such a connection is known by its own
// bound name, `.s.PGSQL.<port>`, whatever path reached it.  sk:sk_data_ready runs in the
// client's context before the server is woken: at connect() on the listener, and at every send
// on the receiving end.  A session under SQL rules that deny or hold is killed there: at
// connect, before it has sent a byte (whatever it would have sent them with: splice, sendmmsg,
// a child it forks after); at a send on a socket it did not connect (handed over, or shared with
// a process that forked before connecting), after that send's bytes are queued (README).

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
#if AW_UNIX_SHARE
    u32 tid = bpf_get_current_pid_tgid();
    unix_connecting.delete(&tid);   // this thread's connect is made, or it sends: not in connect()
#endif
    char path[112] = {};
    if (!pg_unix_name(sk, path)) {
#if AW_UNIX_SHARE
        unix_passing(t, sk);
#endif
        return 0;
    }
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
#if AW_UNIX_SHARE && AW_SOCK_CAPTURE
    u64 id = bpf_get_current_pid_tgid();
    u32 me = id;
    if (maybe_tracked(id >> 32))   // an earlier connect's entry goes (unix_shared makes this one's)
        unix_connecting.delete(&me);
#endif
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

#define AW_CLONE_FILES 0x00000400ULL

// A fork while another thread of the process is inside connect() on a Unix stream socket
// (unix_connect_inflight).  connect_unix saw the socket held by this process alone; a child
// forked after that check and before the connect ends would share it, connected, and outlive the
// kill at sk_data_ready.  sched_process_fork runs in the parent once the child's descriptor table
// is copied and before the child first runs: such a child is killed there, before its first
// instruction.  Every child that shares its parent's table
// (CLONE_FILES) is noted too (files_shared).  Its kfunc calls are patched before it loads
// (kfuncs.PROGRAMS).  Not task_newtask, which has clone_flags: bcc keeps one attachment per
// tracepoint (and the pins re-make only that one), and the fork tracking's program is there.
TRACEPOINT_PROBE(sched, sched_process_fork)
{
#if AW_SOCK_CAPTURE && AW_UNIX_SHARE && AW_KFUNCS
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 0;
    u32 pid = args->child_pid;
    struct task_struct *task = aw_task_from_pid(pid);
    if (!task)
        return 0;
    u64 child = 0;
    bpf_probe_read_kernel(&child, sizeof(child), &task);   // its address as a number, to read from
    aw_task_release(task);
    if ((u32)kread_n(child + AW_OFF_TASK_TGID, 4) == tgid)   // a thread
        return 0;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    u64 files = kread(bpf_get_current_task() + AW_OFF_TASK_FILES);
    // a CLONE_FILES child: noted whatever the rules (unix_shared); under SQL rules it does not live
    // when there is no room to note it
    u8 one = 1;
    u32 unnoted = files && kread(child + AW_OFF_TASK_FILES) == files && files_shared.update(&files, &one) != 0;
    if (!(cfg(AW_CFG_FLAGS) & AW_FLAG_ENFORCE) || !(cfg(AW_CFG_SQL_DENY) & session_mask(t->session)))
        return 0;
    char path[112] = {};
    if (!unnoted && !unix_connect_inflight(path))
        return 0;
    int killed = 0;
    task = aw_task_from_pid(pid);
    if (task) {
        killed = aw_send_signal_task(task, AW_SIGKILL, AW_PIDTYPE_TGID, 0) == 0;
        aw_task_release(task);
    }
    struct guard_event *e = guard_begin(AW_G_UNIX_SHARED, t);
    if (e) {
        e->done = killed ? AW_DONE_KILLED : AW_DONE_SEEN;
        e->rule = -1;
        e->hash = AW_UNIX_FORKED;
        e->target = pid;
        __builtin_memcpy(e->text, path, 108);
        e->len = 108;
        guard_send(e);
    }
#endif
    return 0;
}

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
    events.ringbuf_submit(e, ring_wake());
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

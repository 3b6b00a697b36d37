// Connections and payloads of tracked processes.
//
// Compiled in the same unit as process.bpf.c (it uses `tracked`, `struct hdr`,
// fill_hdr, count and the `events` ring buffer from there).  A socket is known per
// process and fd in `conns`; only known sockets are copied, so a tracked process pays
// for its sockets, not for its file I/O.
//
// Where the kernel has BTF (x86-64): the payload comes from the ordinary tracepoints
// sock:sock_send_length and sock:sock_recv_length, which fire inside every
// sock_sendmsg/sock_recvmsg (write, send*, writev, read, recv*, readv, on any socket
// family) in the caller's context once the bytes have moved.  The system call's own
// registers (bpf_task_pt_regs) name the fd and the user buffers, which are copied as
// at a syscall exit.  A socket is registered at its connect (the cgroup connect hooks,
// guard.bpf.c) or the first time a tracked process moves bytes on it (accepted,
// inherited, passed over a Unix socket, opened before the daemon), from the socket
// itself.  Unlike a syscall tracepoint, these set no per-task flag: a process that
// moves no socket bytes pays nothing, and an untracked one pays one array lookup per
// socket call.  Without BTF (or off x86-64) the syscall tracepoints below do it.
//
// Build-time constants: AW_CHUNK (power of two), AW_MAX_CHUNKS, AW_MAX_IOV.

#define AW_EV_CONNECT 20
#define AW_EV_ACCEPT  21
#define AW_EV_CLOSE   22
#define AW_EV_DATA    23
#define AW_EV_SOCKET  24
#define AW_EV_SEEN    25   // a socket first seen moving bytes (not connected under our eyes)

#if defined(__x86_64__) && AW_BTF
#define AW_SOCK_CAPTURE 1
#else
#define AW_SOCK_CAPTURE 0
#endif

#define AW_DIR_OUT 0
#define AW_DIR_IN  1

#define AW_OP_CONNECT 1
#define AW_OP_ACCEPT  2
#define AW_OP_SOCKET  3
#define AW_OP_BUF     4   // write/read/send/recv/sendto/recvfrom
#define AW_OP_IOV     5   // writev/readv
#define AW_OP_MSG     6   // sendmsg/recvmsg
#define AW_OP_MMSG    7   // sendmmsg/recvmmsg
#define AW_OP_TAINT   8   // ptrace/process_vm_writev: the target joins the session if the call succeeds

#define AW_SOCKADDR_LEN 128
#define AW_DATA_TLS 1

struct conn {
    u64 id;        // boot ns at registration: tells a reused fd apart
    u64 off[2];    // bytes seen so far, per direction
    u32 type;      // SOCK_STREAM/DGRAM when socket() was seen, else 0
    u32 tls;       // OpenSSL plaintext seen (tls.bpf.c): the ciphertext is no longer copied
    u64 ptoff[2];  // plaintext bytes so far, per direction
    u64 sk;        // the struct sock the fd named when its bytes were first seen (0: not yet)
    u64 ino;       // and its socket inode: a freed sock reused at the same address is another
};

struct pend {
    u32 op;
    u32 dir;
    s32 fd;
    u32 type;
    u64 ptr;       // buffer, iovec, msghdr, mmsghdr or sockaddr
    u64 arg;       // count, iovcnt, vlen, or addrlen pointer
};

struct conn_event {
    struct hdr h;
    u64 conn_id;
    s32 fd;
    s32 ret;       // connect: 0 or -EINPROGRESS; accept: the new fd; seen: AW_SEEN_* bits
    u32 type;
    u32 addr_len;
    u8 addr[AW_SOCKADDR_LEN];
};

struct data_event {
    struct hdr h;
    u64 conn_id;
    u64 offset;    // of data[0] in this direction's stream
    s32 fd;
    u32 len;       // bytes in data
    u32 total;     // bytes the syscall moved (len < total: the rest is a gap)
    u8 dir;
    u8 flags;      // AW_DATA_TLS: plaintext from the OpenSSL uprobes, not the socket
    u8 _pad[2];
    char data[AW_CHUNK];
};

BPF_HASH(conns, u64, struct conn, AW_MAX_TRACKED);
BPF_HASH(sock_types, u64, u32, AW_MAX_TRACKED);
BPF_HASH(pending, u32, struct pend, 16384);
BPF_PERCPU_ARRAY(data_scratch, struct data_event, 1);

static __always_inline u64 fd_key(u32 tgid, s32 fd)
{
    return ((u64)tgid << 32) | (u32)fd;
}

// An OpenSSL call in progress on a thread (tls.bpf.c): the read/write syscall
// OpenSSL makes inside it reveals the socket.
struct ssl_call {
    u64 buf;
    u64 outlen;    // size_t * of the _ex variants, else 0
    s32 fd;        // -1 until the nested syscall names it
    u32 dir;
    u64 sp;        // the caller's stack pointer at entry: with buf and dir, which call this is
    u64 ts;        // when it entered (boot ns)
    u64 cookie;    // the attachment that saw it enter (its bpf_cookie; 0 without one)
};

BPF_HASH(ssl_calls, u32, struct ssl_call, 16384);

static __always_inline void note_ssl_fd(s32 fd)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct ssl_call *call = ssl_calls.lookup(&tid);
    if (call && call->fd < 0)
        call->fd = fd;
}

// (tgid, SSL *) -> the fd of its socket: learnt from the syscall inside a call, or at the
// ClientHello (below); a read served from OpenSSL's buffer makes no syscall.  SSL_free and
// SSL_clear forget it (guard_tls.bpf.c aw_ssl_free): the address may be another connection's next.
BPF_TABLE("lru_hash", u64, s32, ssl_fds, 16384);   // LRU: a process that exits frees none of them
// The same key -> that socket's struct sock (its address): which connection an object's records
// belong on, for the Postgres TLS check (guard_msg.bpf.c tls_send), which sees sockets, not fds, and
// cannot read a socket's cookie (no bpf_get_socket_cookie for sk_msg).
BPF_TABLE("lru_hash", u64, u64, ssl_socks, 16384);
BPF_HASH(ssl_ptr, u32, u64, 16384);   // tid -> SSL * of the SSL_read/SSL_write call in progress

// Memory-BIO TLS (Node's OpenSSL, which its binary exports; any runtime that encrypts into memory
// and sends later): no socket call happens inside SSL_write, so the call cannot name its socket.
// The object is tied to it once, at the connection's ClientHello, which is the first bytes of the
// client's stream and is sent once per connection:
// - a client: the last SSL object without a socket this thread called (Node's TLSWrap::Start calls
//   SSL_read, which makes the ClientHello, then writes it to the socket in the same callback), when
//   the thread's next send that starts a stream is a ClientHello, within AW_BIND_NS;
// - a server: the socket a ClientHello was the first bytes received on, when the thread's next
//   call is on an SSL object without a socket, within AW_BIND_NS.
// Two objects without a socket called on one thread before a ClientHello (or two ClientHellos
// received before a call) bind neither: a wrong connection is worse than none, and their
// plaintext is not recorded (their `tls` event stands).  An OpenSSL socket BIO binds the same way
// (its ClientHello goes out inside SSL_connect), and its calls' own syscalls agree.
#define AW_BIND_NS (50ULL * 1000000ULL)
struct ssl_bind {
    u64 ssl;       // the SSL * (client), or 0
    s32 fd;        // the socket a ClientHello came in on (server), or -1
    u32 many;      // a second candidate came: bind nothing
    u64 ts;
    u64 sock;      // that socket's struct sock (server)
};
BPF_TABLE("lru_hash", u32, struct ssl_bind, ssl_unbound, 16384);   // tid -> client candidate
BPF_TABLE("lru_hash", u32, struct ssl_bind, hello_in, 16384);      // tid -> server candidate

static __always_inline int stash(u32 op, u32 dir, s32 fd, u64 ptr, u64 arg, int need_conn)
{
    u64 pt = bpf_get_current_pid_tgid();
    u32 tgid = pt >> 32, tid = (u32)pt;
    if (!tracked.lookup(&tgid))
        return 0;
    if (need_conn) {
        u64 key = fd_key(tgid, fd);
        if (!conns.lookup(&key))
            return 0;
        note_ssl_fd(fd);
    }
    struct pend p = {.op = op, .dir = dir, .fd = fd, .ptr = ptr, .arg = arg};
    pending.update(&tid, &p);
    return 0;
}


// Consume this thread's pending call (copied to *out); 0 when there is none.
static __always_inline int take(struct pend *out)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct pend *p = pending.lookup(&tid);
    if (!p)
        return 0;
    *out = *p;
    pending.delete(&tid);
    return 1;
}

// ---- socket, connect, accept, close ---------------------------------------

static __always_inline int socket_exit(long ret)
{
    struct pend p;
    if (!take(&p) || p.op != AW_OP_SOCKET || ret < 0)
        return 0;
    u64 key = fd_key(bpf_get_current_pid_tgid() >> 32, ret);
    u32 type = p.arg;
    sock_types.update(&key, &type);
    return 0;
}

static __always_inline void emit_conn(u32 type, struct track_info *t, u64 id, s32 fd, s32 ret,
                                      u32 stype, const void *addr, u32 addr_len)
{
    struct conn_event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        count(AW_CNT_LOST);
        return;
    }
    fill_hdr(&e->h, type, t);
    e->conn_id = id;
    e->fd = fd;
    e->ret = ret;
    e->type = stype;
    e->addr_len = addr_len;
    __builtin_memset(e->addr, 0, sizeof(e->addr));
    if (addr && addr_len)
        bpf_probe_read_user(e->addr, addr_len < sizeof(e->addr) ? addr_len & (AW_SOCKADDR_LEN - 1)
                                                                 : sizeof(e->addr), addr);
    events.ringbuf_submit(e, ring_wake());
}

static __always_inline void register_conn(struct track_info *t, u32 tgid, s32 fd, u32 ev, s32 ret,
                                          const void *addr, u32 addr_len)
{
    u64 key = fd_key(tgid, fd);
    u32 *st = sock_types.lookup(&key);
    struct conn c = {};
    c.id = bpf_ktime_get_boot_ns();
    c.type = st ? *st : 0;
    if (conns.update(&key, &c) != 0)
        count(AW_CNT_TRACK_FULL);
    emit_conn(ev, t, c.id, fd, ret, c.type, addr, addr_len);
}

static __always_inline int connect_exit(long ret)
{
    struct pend c;
    if (!take(&c) || c.op != AW_OP_CONNECT || (ret != 0 && ret != -115))   // 0 or -EINPROGRESS
        return 0;
    struct track_info *t = current_tracked();
    if (!t)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u16 family = 0;
    bpf_probe_read_user(&family, sizeof(family), (void *)c.ptr);
    if (family != 1 && family != 2 && family != 10)   // AF_UNIX, AF_INET, AF_INET6
        return 0;
    register_conn(t, tgid, c.fd, AW_EV_CONNECT, ret, (void *)c.ptr, (u32)c.arg);
    return 0;
}

static __always_inline int accept_enter(s32 fd, void *addr, int *addrlen)
{
    return stash(AW_OP_ACCEPT, 0, fd, (u64)addr, (u64)addrlen, 0);
}

static __always_inline int accept_exit(long ret)
{
    struct pend c;
    if (!take(&c) || c.op != AW_OP_ACCEPT || ret < 0)
        return 0;
    struct track_info *t = current_tracked();
    if (!t)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    int len = 0;
    if (c.arg)
        bpf_probe_read_user(&len, sizeof(len), (void *)c.arg);
    if (len < 0)
        len = 0;
    register_conn(t, tgid, ret, AW_EV_ACCEPT, ret, (void *)c.ptr, c.ptr ? (u32)len : 0);
    return 0;
}

static __always_inline int close_enter(s32 fd)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    u64 key = fd_key(tgid, fd);
    sock_types.delete(&key);
    struct conn *c = conns.lookup(&key);
    if (!c)
        return 0;
    emit_conn(AW_EV_CLOSE, t, c->id, fd, 0, c->type, 0, 0);
    conns.delete(&key);
    return 0;
}

// ---- payloads ----------------------------------------------------------------

struct aw_iovec {
    u64 base;
    u64 len;
};

// Copy the `total` bytes a syscall moved, from one buffer (iov_ptr == 0) or an
// iovec array, in chunks.  One flat loop walks iovecs and chunks together;
// what does not fit in AW_MAX_CHUNKS chunks or AW_MAX_IOV iovecs is a gap,
// which the next record's offset reveals.
static __always_inline void copy_data(struct track_info *t, struct conn *c, s32 fd, u32 dir,
                                      u64 buf, u64 iov_ptr, u64 iovcnt, u64 total, u64 offset, u8 flags)
{
    u32 zero = 0;
    struct data_event *e = data_scratch.lookup(&zero);
    u64 *woke = ring_woken.lookup(&zero);
    if (!e || !woke)
        return;
    // once, before the loop: inside it the sys_exit handlers of probes.hardened (three copies
    // of this loop for sendmmsg) passed the verifier's 1M instructions
    u64 wake = ring_wake_at(woke);
    u64 base = buf;
    u64 avail = iov_ptr ? 0 : total;
    u64 pos = 0;
    u32 next_iov = 0;
    u32 chunks = 0;
    for (int i = 0; i < AW_MAX_CHUNKS + AW_MAX_IOV; i++) {
        if (pos >= total || chunks >= AW_MAX_CHUNKS)
            break;
        if (avail == 0) {
            if (!iov_ptr || next_iov >= iovcnt || next_iov >= AW_MAX_IOV)
                break;
            struct aw_iovec v = {};
            if (bpf_probe_read_user(&v, sizeof(v), (void *)(iov_ptr + next_iov * sizeof(v))) != 0)
                break;
            next_iov++;
            base = v.base;
            avail = v.len;
            continue;
        }
        u64 n = avail;
        if (n > total - pos)
            n = total - pos;
        fill_hdr(&e->h, AW_EV_DATA, t);
        e->conn_id = c->id;
        e->offset = offset + pos;
        e->fd = fd;
        e->total = total;
        e->dir = dir;
        e->flags = flags;
        // volatile: keep the clamps the compiler would prove redundant, the verifier needs them
        volatile u64 vn = n;
        u64 rn = vn;
        if (rn > AW_CHUNK)
            rn = AW_CHUNK;
        if (bpf_probe_read_user(e->data, rn, (void *)base) != 0)
            break;
        e->len = rn;
        volatile u64 vsize = sizeof(*e) - AW_CHUNK + rn;
        u64 size = vsize;
        if (size > sizeof(*e))
            size = sizeof(*e);
        if (events.ringbuf_output(e, size, wake) != 0) {
            count(AW_CNT_LOST);
            break;
        }
        base += rn;
        avail -= rn;
        pos += rn;
        chunks++;
    }
}

// The `ret` bytes a call of kind `op` moved on a known connection: ptr and arg are the
// call's buffer and count (BUF), iovec and count (IOV), msghdr (MSG), or one message of
// an mmsghdr vector (MMSG: ptr is that message's mmsghdr).  Any other call (sendfile,
// splice, io_uring) moved bytes we cannot read: the offset still advances, so the next
// record shows the gap.
static __always_inline void capture_io(struct track_info *t, struct conn *c, s32 fd, u32 dir, u32 op,
                                       u64 ptr, u64 arg, long ret)
{
    if (c->tls)
        return;   // its plaintext comes from the OpenSSL uprobes
    dir &= 1;
    u64 off = c->off[dir];
    c->off[dir] = off + ret;
    if (op == AW_OP_BUF) {
        copy_data(t, c, fd, dir, ptr, 0, 0, ret, off, 0);
    } else if (op == AW_OP_IOV) {
        copy_data(t, c, fd, dir, 0, ptr, arg, ret, off, 0);
    } else if (op == AW_OP_MSG || op == AW_OP_MMSG) {   // a user_msghdr starts an mmsghdr
        u64 iov = 0, iovcnt = 0;
        bpf_probe_read_user(&iov, sizeof(iov), (void *)(ptr + 16));
        bpf_probe_read_user(&iovcnt, sizeof(iovcnt), (void *)(ptr + 24));
        copy_data(t, c, fd, dir, 0, iov, iovcnt, ret, off, 0);
    }
}

static __always_inline int data_exit(long ret, const u32 op)
{
    struct pend pd;
    if (!take(&pd) || ret <= 0 || pd.op != op)
        return 0;
    struct track_info *t = current_tracked();
    if (!t)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 key = fd_key(tgid, pd.fd);
    struct conn *c = conns.lookup(&key);
    if (!c)
        return 0;
    if (op == AW_OP_MMSG) {
        // ret is a message count; each mmsghdr is a user_msghdr (56 bytes) + msg_len
        for (int k = 0; k < 2; k++) {   // stream sockets rarely batch; datagrams are not our protocols
            if (k >= ret)
                break;
            u64 m = pd.ptr + k * 64;
            u32 mlen = 0;
            bpf_probe_read_user(&mlen, sizeof(mlen), (void *)(m + 56));
            capture_io(t, c, pd.fd, pd.dir, AW_OP_MMSG, m, 0, mlen);
        }
        return 0;
    }
    capture_io(t, c, pd.fd, pd.dir, op, pd.ptr, pd.arg, ret);
    return 0;
}

// ---- capture at the socket (sock:sock_send_length / sock_recv_length) ---------------

#if defined(__x86_64__)
// A 32-bit system call (int 0x80, or any call of a 32-bit program): its own numbers and
// argument registers (bx, cx, dx).  Read through the task's thread_info (TS_COMPAT), at
// offsets from BTF.  The guards' calls are mapped to their 64-bit twins; the socket calls
// (socketcall and its kin) are not captured (red team: a 32-bit ptrace joined nothing).
#define AW_TS_COMPAT 0x0002
static __always_inline int in_compat(void)
{
#if AW_BTF
    u32 status = 0;
    bpf_probe_read_kernel(&status, sizeof(status),
                          (void *)(bpf_get_current_task() + AW_OFF_TASK_THREAD_INFO + AW_OFF_THREAD_INFO_STATUS));
    return status & AW_TS_COMPAT;
#else
    return 0;
#endif
}
#endif


#if AW_SOCK_CAPTURE
#include <asm/unistd.h>

#define AW_SEEN_ACCEPTED 1   // the process's end was accepted, not connected
#define AW_SEEN_MIDSTREAM 2  // bytes moved on it before this record (the stream is read from the middle)

BPF_TABLE("lru_hash", u64, u8, passive_socks, 65536);    // cookies of accepted TCP sockets (aw_sockops)
BPF_TABLE("lru_hash", u64, u8, connected_socks, 65536);  // cookies a tracked process connected
// socket -> the (process, fd) key it was last seen under: bytes moved by a call that names no
// fd in its registers (io_uring, splice) still advance that stream's offset, a visible gap
BPF_TABLE("lru_hash", u64, u64, sk_conns, 65536);

// The system call the current thread is in: its number and first argument, from the user
// registers saved at its entry (their address: bpf_task_pt_regs).  Not a syscall hook: read
// from whatever hook runs inside the call.
static __always_inline struct pt_regs *syscall_regs(u64 *nr, u64 *a0)
{
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    bpf_probe_read_kernel(nr, sizeof(*nr), &regs->orig_ax);
    bpf_probe_read_kernel(a0, sizeof(*a0), &regs->di);
    return regs;
}

static __always_inline u64 kread_n(u64 addr, u32 size)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, size & 7, (void *)addr);
    return v;
}

// The struct file behind fd `fd` of the current process (0: no such fd).
static __always_inline u64 fd_file(s32 fd)
{
    u64 files = kread(bpf_get_current_task() + AW_OFF_TASK_FILES);
    u64 fdt = files ? kread(files + AW_OFF_FILES_FDT) : 0;
    if (!fdt || fd < 0 || (u32)fd >= (u32)kread_n(fdt + AW_OFF_FDT_MAX_FDS, 4))
        return 0;
    u64 arr = kread(fdt + AW_OFF_FDT_FD);
    return arr ? kread(arr + (u64)(u32)fd * 8) : 0;
}

// The struct sock behind fd `fd` of the current process (0: no such fd), and the inode of its
// file.  For a file that is not a socket the result is no socket's address, so a caller that
// compares it with the tracepoint's socket learns "not this one".
static __always_inline u64 fd_sock(s32 fd, u64 *ino)
{
    u64 file = fd_file(fd);
    if (!file)
        return 0;
    u64 inode = kread(file + AW_OFF_FILE_INODE);
    *ino = inode ? kread(inode + AW_OFF_INODE_INO) : 0;
    u64 sock = kread(file + AW_OFF_FILE_PRIVATE_DATA);
    return sock ? kread(sock + AW_OFF_SOCKET_SK) : 0;
}

// The peer of socket `sk` as a sockaddr in e->addr, read from the socket; for a Unix socket
// whose peer has no name (an accepted one: the client did not bind), its own name, and
// AW_SEEN_ACCEPTED.
static __always_inline u32 peer_of(u64 sk, u16 family, struct conn_event *e)
{
    u32 seen = 0;
    __builtin_memset(e->addr, 0, sizeof(e->addr));
    e->addr[0] = family;
    if (family == 2) {
        u32 ip = kread_n(sk + AW_OFF_SKC_DADDR, 4);
        u16 port = kread_n(sk + AW_OFF_SKC_DPORT, 2);
        __builtin_memcpy(&e->addr[2], &port, 2);
        __builtin_memcpy(&e->addr[4], &ip, 4);
        e->addr_len = 16;
    } else if (family == 10) {
        u16 port = kread_n(sk + AW_OFF_SKC_DPORT, 2);
        __builtin_memcpy(&e->addr[2], &port, 2);
        bpf_probe_read_kernel(&e->addr[8], 16, (void *)(sk + AW_OFF_SKC_V6_DADDR));
        e->addr_len = 28;
    } else {
        u64 peer = kread(sk + AW_OFF_UNIX_PEER);
        u64 addr = peer ? kread(peer + AW_OFF_UNIX_ADDR) : 0;
        if (!addr) {
            addr = kread(sk + AW_OFF_UNIX_ADDR);
            seen |= addr ? AW_SEEN_ACCEPTED : 0;
        }
        u32 len = addr ? kread_n(addr + AW_OFF_UNIX_ADDRESS_LEN, 4) : 0;
        if (len > 110)
            len = 110;
        if (len > 2)   // sun_path whole: userspace reads only addr_len bytes of it
            bpf_probe_read_kernel(&e->addr[2], 108, (void *)(addr + AW_OFF_UNIX_ADDRESS_NAME + 2));
        e->addr_len = len > 2 ? len : 2;
    }
    return seen;
}


// The connection an fd of this process names, registered the first time its bytes are seen;
// an fd that names another socket than when it was registered (closed and reused, dup2 over
// it) ends the old connection first.
static __always_inline struct conn *sock_conn(struct track_info *t, u32 tgid, s32 fd, u64 sk, u64 ino)
{
    u64 key = fd_key(tgid, fd);
    struct conn *c = conns.lookup(&key);
    if (c && c->sk == sk && c->ino == ino)
        return c;
    if (c && c->sk == 0) {   // registered at its connect, or by userspace (a fork, an older socket)
        c->sk = sk;
        c->ino = ino;
        sk_conns.update(&sk, &key);
        return c;
    }
    if (c) {
        emit_conn(AW_EV_CLOSE, t, c->id, fd, 0, c->type, 0, 0);
        conns.delete(&key);
    }
    u16 family = kread_n(sk + AW_OFF_SKC_FAMILY, 2);
    if (family != 1 && family != 2 && family != 10)   // AF_UNIX, AF_INET, AF_INET6
        return 0;
    struct conn nc = {};
    nc.id = bpf_ktime_get_boot_ns();
    nc.type = kread_n(sk + AW_OFF_SK_TYPE, 2);
    nc.sk = sk;
    nc.ino = ino;
    if (conns.update(&key, &nc) != 0) {
        count(AW_CNT_TRACK_FULL);
        return 0;
    }
    sk_conns.update(&sk, &key);
    struct conn_event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        count(AW_CNT_LOST);
        return conns.lookup(&key);
    }
    fill_hdr(&e->h, AW_EV_SEEN, t);
    e->conn_id = nc.id;
    e->fd = fd;
    e->type = nc.type;
    u32 seen = peer_of(sk, family, e);
    u64 cookie = kread(sk + AW_OFF_SKC_COOKIE);
    if (cookie && family != 1 && passive_socks.lookup(&cookie)) {
        seen |= AW_SEEN_ACCEPTED;
        passive_socks.delete(&cookie);
    } else if (cookie && connected_socks.lookup(&cookie)) {
        connected_socks.delete(&cookie);   // its connect was recorded under another fd (dup)
        seen |= AW_SEEN_MIDSTREAM;
    } else {
        seen |= AW_SEEN_MIDSTREAM;
    }
    e->ret = seen;
    events.ringbuf_submit(e, ring_wake());
    return conns.lookup(&key);
}

// A cgroup connect hook (guard.bpf.c) of a tracked process: the connect of fd `fd`, recorded
// as the syscall front end recorded it (before the kernel tries it; a refused connect is not
// recorded).  `addr` is the kernel's copy of the address.
static __always_inline void capture_connect(struct track_info *t, const void *addr, u32 addr_len, u32 type,
                                            u64 cookie)
{
    u64 nr = 0, fd = 0;
    syscall_regs(&nr, &fd);
    if (nr != __NR_connect && nr != __NR_sendto && nr != __NR_sendmsg && nr != __NR_sendmmsg)
        return;   // io_uring's connect, a 32-bit socketcall: registered at its first bytes
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 key = fd_key(tgid, (s32)fd);
    struct conn c = {};
    c.id = bpf_ktime_get_boot_ns();
    c.type = type;
    struct conn *old = conns.lookup(&key);
    if (old)
        emit_conn(AW_EV_CLOSE, t, old->id, fd, 0, old->type, 0, 0);
    if (conns.update(&key, &c) != 0) {
        count(AW_CNT_TRACK_FULL);
        return;
    }
    u8 one = 1;
    connected_socks.update(&cookie, &one);
    struct conn_event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        count(AW_CNT_LOST);
        return;
    }
    fill_hdr(&e->h, AW_EV_CONNECT, t);
    e->conn_id = c.id;
    e->fd = fd;
    e->ret = 0;
    e->type = type;
    e->addr_len = addr_len;
    __builtin_memset(e->addr, 0, sizeof(e->addr));
    bpf_probe_read_kernel(e->addr, addr_len & (AW_SOCKADDR_LEN - 1), addr);
    events.ringbuf_submit(e, ring_wake());
}

// Bytes the registers do not describe (io_uring, splice, a 32-bit call, a vector of several
// messages): the socket's stream still advances by them, a visible gap, never a guess.
static __always_inline int sock_gap(struct track_info *t, u32 tgid, u64 sk, u32 dir, long ret)
{
    u64 *key = sk_conns.lookup(&sk);
    struct conn *g = key ? conns.lookup(key) : 0;
    if (g && g->sk == sk && (u32)(*key >> 32) == tgid)
        capture_io(t, g, (s32)*key, dir, 0, 0, 0, ret);
    return 0;
}

// The call sock_io just captured, for aw_ssl_hello (its tail call): set before the copy, in map
// memory, so that it splits no verifier state.  Inlined into sock_io, this check took
// sock_send_length from 622K to 957K instructions processed (of the verifier's 1M), and
// sock_recv_length past 1M: every state the copy loop leaves in went through its branches.
struct hello_args {
    u64 ptr;       // the call's buffer, iovec or msghdr
    s64 ret;       // bytes it moved
    s32 fd;
    u32 dir;
    u32 op;
    u32 tgid;
};
BPF_PERCPU_ARRAY(hello_args, struct hello_args, 1);
BPF_PROG_ARRAY(net_progs, 1);   // aw_ssl_hello

// After each captured send or receive of a tracked process: the SSL object whose SSL_read or
// SSL_write made it is on this socket (its struct sock, for tls_send); and where these were the first
// bytes of this direction (so one read per stream), a ClientHello binds the candidate SSL object of
// this thread to the socket (client), or becomes the candidate socket (server).
int aw_ssl_hello(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0;
    struct hello_args *a = hello_args.lookup(&zero);
    if (!a)
        return 0;
    u32 tgid = a->tgid, dir = a->dir & 1, op = a->op;
    s32 fd = a->fd;
    u64 ptr = a->ptr, ret = a->ret;
    if ((u32)(bpf_get_current_pid_tgid() >> 32) != tgid)
        return 0;
    u64 ckey = fd_key(tgid, fd);
    struct conn *c = conns.lookup(&ckey);
    if (!c || !c->sk)
        return 0;
    u64 sock = c->sk;   // the socket, as sk_msg sees it
    u32 tid = bpf_get_current_pid_tgid();
    u64 *inside = ssl_ptr.lookup(&tid);
    if (inside) {   // the first socket only: a callback's I/O later in a call must not move it (red team)
        u64 skey = ((u64)tgid << 32) ^ *inside;
        ssl_socks.insert(&skey, &sock);
    }
    if (c->off[dir] != ret || c->tls)
        return 0;
    u64 first = ptr;
    if (op == AW_OP_IOV) {
        bpf_probe_read_user(&first, sizeof(first), (void *)ptr);        // iov[0].iov_base
    } else if (op == AW_OP_MSG || op == AW_OP_MMSG) {
        u64 iov = 0;
        bpf_probe_read_user(&iov, sizeof(iov), (void *)(ptr + 16));    // msg_iov
        bpf_probe_read_user(&first, sizeof(first), (void *)iov);
    } else if (op != AW_OP_BUF) {
        return 0;
    }
    u8 h[6] = {};
    // a handshake record (22) of TLS (3, x), whose first message is a ClientHello (1)
    if (bpf_probe_read_user(h, sizeof(h), (void *)first) != 0 || h[0] != 22 || h[1] != 3 || h[5] != 1)
        return 0;
    u64 now = bpf_ktime_get_boot_ns();
    if (dir == AW_DIR_OUT) {
        struct ssl_bind *u = ssl_unbound.lookup(&tid);
        if (!u)
            return 0;
        struct ssl_bind b = *u;
        ssl_unbound.delete(&tid);
        if (b.many || now - b.ts > AW_BIND_NS)
            return 0;
        u64 key = ((u64)tgid << 32) ^ b.ssl;
        ssl_fds.update(&key, &fd);
        ssl_socks.update(&key, &sock);
        return 0;
    }
    struct ssl_bind *in = hello_in.lookup(&tid);
    if (in && in->fd != fd && now - in->ts <= AW_BIND_NS) {
        in->many = 1;
        in->ts = now;
        return 0;
    }
    struct ssl_bind b = {.ssl = 0, .fd = fd, .many = 0, .ts = now, .sock = sock};
    hello_in.update(&tid, &b);
    return 0;
}

static __always_inline int sock_io(struct bpf_raw_tracepoint_args *ctx, u32 dir)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 0;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    long ret = (int)ctx->args[1];
    if (ret <= 0 || (dir == AW_DIR_IN && (ctx->args[2] & 2)))   // nothing moved; MSG_PEEK
        return 0;
    u64 sk = ctx->args[0];
    u64 nr = 0, a0 = 0, a1 = 0, a2 = 0;
    struct pt_regs *regs = syscall_regs(&nr, &a0);
    bpf_probe_read_kernel(&a1, sizeof(a1), &regs->si);
    bpf_probe_read_kernel(&a2, sizeof(a2), &regs->dx);
    if (in_compat())
        return sock_gap(t, tgid, sk, dir, ret);   // its numbers and registers differ
    u32 op = 0;
    switch (nr) {
    case __NR_write: case __NR_read: case __NR_sendto: case __NR_recvfrom: op = AW_OP_BUF; break;
    case __NR_writev: case __NR_readv: case __NR_pwritev: case __NR_preadv:   // a socket takes offset -1
    case __NR_pwritev2: case __NR_preadv2: op = AW_OP_IOV; break;
    case __NR_sendmsg: case __NR_recvmsg: op = AW_OP_MSG; break;
    // one tracepoint call per message of the vector, and nothing says which: only a vector
    // of one is read (red team: a cursor kept across calls was steered to another message)
    case __NR_sendmmsg: case __NR_recvmmsg: op = a2 == 1 ? AW_OP_MMSG : 0; break;
    }
    // MSG_TRUNC on a stream receive discards the bytes: the buffer holds none of them
    if (dir == AW_DIR_IN && (ctx->args[2] & 0x20))
        op = 0;
    if (!op && nr != __NR_sendfile)
        return sock_gap(t, tgid, sk, dir, ret);
    // the registers describe this call only when their fd is this socket (red team: a send that
    // io_uring runs at the exit of another system call borrows that call's registers)
    u64 ino = 0;
    if (fd_sock((s32)a0, &ino) != sk)
        return sock_gap(t, tgid, sk, dir, ret);
    struct conn *c = sock_conn(t, tgid, (s32)a0, sk, ino);   // sendfile: its out_fd, a gap
    if (!c)
        return 0;
    note_ssl_fd((s32)a0);
    u32 zero = 0;
    struct hello_args *ha = hello_args.lookup(&zero);
    if (!ha)
        return 0;
    ha->ptr = a1;
    ha->ret = ret;
    ha->fd = (s32)a0;
    ha->dir = dir;
    ha->op = op;
    ha->tgid = tgid;
    capture_io(t, c, (s32)a0, dir, op, a1, a2, ret);
    net_progs.call(ctx, 0);   // aw_ssl_hello
    return 0;
}

RAW_TRACEPOINT_PROBE(sock_send_length) { return sock_io(ctx, AW_DIR_OUT); }
RAW_TRACEPOINT_PROBE(sock_recv_length) { return sock_io(ctx, AW_DIR_IN); }

// The process closes a TCP socket it connected (its close() moves the state): the
// connection ends here, so what it carried unanswered is recorded now, not at exit.
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    int state = ctx->args[2];
    if (state != 4 && state != 9 && state != 7)   // FIN_WAIT1, LAST_ACK, CLOSE
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 0;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    u64 nr = 0, fd = 0;
    syscall_regs(&nr, &fd);
    if (nr != __NR_close || in_compat())
        return 0;
    u64 key = fd_key(tgid, (s32)fd);
    struct conn *c = conns.lookup(&key);
    if (!c || (c->sk && c->sk != (u64)ctx->args[0]))
        return 0;
    emit_conn(AW_EV_CLOSE, t, c->id, fd, 0, c->type, 0, 0);
    conns.delete(&key);
    return 0;
}
#endif

// ---- front ends --------------------------------------------------------------
//
// The syscall hook: attached only in the hardened mode (probes.hardened: self-protection
// against a root agent, the decision stop's first-syscall kill, ptrace joins), or to
// capture where the socket tracepoints above cannot (no BTF).  Any syscall tracepoint puts
// every syscall of every process on the kernel's slow path (dd bs=1: 1.46 with an empty
// pair, about 2 with this one; README, Performance).
// x86-64: one raw_tracepoint pair for all the syscalls above.  It runs on every
// syscall of every process, but costs one inlined array lookup (track_filter)
// there, which is cheaper than the perf-based syscalls:* tracepoints (argument
// copy into a perf buffer before the program even runs).  Arguments come from pt_regs, a stable ABI.  The exit
// side tail-calls one program per operation, so the verifier sees each path alone.
// Elsewhere: the syscalls:* tracepoints, whose formats give the arguments.

#if defined(__x86_64__) && AW_RAW_SYSCALLS

#include <asm/ptrace.h>
#include <asm/unistd.h>

BPF_PROG_ARRAY(exit_progs, 16);

static __always_inline u64 sys_arg(struct pt_regs *regs, int n)
{
    u64 v = 0;
    switch (n) {
    case 0: bpf_probe_read_kernel(&v, sizeof(v), &regs->di); break;
    case 1: bpf_probe_read_kernel(&v, sizeof(v), &regs->si); break;
    case 2: bpf_probe_read_kernel(&v, sizeof(v), &regs->dx); break;
    case 3: bpf_probe_read_kernel(&v, sizeof(v), &regs->r10); break;   // the 4th argument of a syscall
    }
    return v;
}

static __always_inline void note_send_flags(struct track_info *t, u64 flags);

static __always_inline u64 sys_arg32(struct pt_regs *regs, int n)
{
    u64 v = 0;
    switch (n) {
    case 0: bpf_probe_read_kernel(&v, sizeof(v), &regs->bx); break;
    case 1: bpf_probe_read_kernel(&v, sizeof(v), &regs->cx); break;
    case 2: bpf_probe_read_kernel(&v, sizeof(v), &regs->dx); break;
    }
    return (u32)v;
}

static __always_inline int compat_enter(struct track_info *t, struct pt_regs *regs, long nr)
{
    switch (nr) {
    case 26:    // ptrace(request, pid, ...)
        guard_self(t, __NR_ptrace, sys_arg32(regs, 1));
        return stash(AW_OP_TAINT, 0, __NR_ptrace, sys_arg32(regs, 1), sys_arg32(regs, 0), 0);
    case 348:   // process_vm_writev(pid, ...)
        guard_self(t, __NR_process_vm_writev, sys_arg32(regs, 0));
        return stash(AW_OP_TAINT, 0, __NR_process_vm_writev, sys_arg32(regs, 0), 0, 0);
    case 37:  guard_self(t, __NR_kill, sys_arg32(regs, 0)); return 0;
    case 238: guard_self(t, __NR_tkill, sys_arg32(regs, 0)); return 0;
    case 270: guard_self(t, __NR_tgkill, sys_arg32(regs, 0)); return 0;
    case 340: guard_self(t, __NR_prlimit64, sys_arg32(regs, 0)); return 0;
    case 154: guard_self(t, __NR_sched_setparam, sys_arg32(regs, 0)); return 0;
    case 156: guard_self(t, __NR_sched_setscheduler, sys_arg32(regs, 0)); return 0;
    case 241: guard_self(t, __NR_sched_setaffinity, sys_arg32(regs, 0)); return 0;
    case 351: guard_self(t, __NR_sched_setattr, sys_arg32(regs, 0)); return 0;
    case 357: guard_self(t, __NR_bpf, 0); return 0;
    case 97:  guard_prio(t, __NR_setpriority, sys_arg32(regs, 0), sys_arg32(regs, 1)); return 0;
    case 289: guard_prio(t, __NR_ioprio_set, sys_arg32(regs, 0), sys_arg32(regs, 1)); return 0;
    case 434: guard_self(t, __NR_pidfd_open, sys_arg32(regs, 0)); return 0;   // the same numbers from 424 on
    case 438: guard_fdgrab(t); return 0;
#if AW_SOCK_CAPTURE
    case 4: case 146: case 181: case 334: case 379:   // write, writev, pwrite64, pwritev, pwritev2
        return guard_memwrite(t, nr == 4 ? __NR_write : nr == 146 ? __NR_writev : nr == 181 ? __NR_pwrite64
                              : nr == 334 ? __NR_pwritev : __NR_pwritev2, sys_arg32(regs, 0));
#endif
    case 440: guard_self(t, __NR_process_madvise, sys_arg32(regs, 0)); return 0;
    case 448: guard_self(t, __NR_process_mrelease, sys_arg32(regs, 0)); return 0;
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_enter)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 0;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t || guard_escaped(tgid, t))
        return 0;
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long nr = ctx->args[1];
    if (in_compat())
        return compat_enter(t, regs, nr);
    switch (nr) {
#if !AW_SOCK_CAPTURE
    case __NR_socket:
        return stash(AW_OP_SOCKET, 0, -1, 0, sys_arg(regs, 1) & 0xf, 0);
    case __NR_connect:
        return stash(AW_OP_CONNECT, 0, sys_arg(regs, 0), sys_arg(regs, 1), sys_arg(regs, 2), 0);
    case __NR_accept:
    case __NR_accept4:
        return stash(AW_OP_ACCEPT, 0, sys_arg(regs, 0), sys_arg(regs, 1), sys_arg(regs, 2), 0);
    case __NR_close:
        return close_enter(sys_arg(regs, 0));
    case __NR_sendto:
        note_send_flags(t, sys_arg(regs, 3));
        return stash(AW_OP_BUF, AW_DIR_OUT, sys_arg(regs, 0), sys_arg(regs, 1), sys_arg(regs, 2), 1);
    case __NR_write:
        return stash(AW_OP_BUF, AW_DIR_OUT, sys_arg(regs, 0), sys_arg(regs, 1), sys_arg(regs, 2), 1);
    case __NR_read:
    case __NR_recvfrom:
        return stash(AW_OP_BUF, AW_DIR_IN, sys_arg(regs, 0), sys_arg(regs, 1), sys_arg(regs, 2), 1);
    case __NR_writev:
        return stash(AW_OP_IOV, AW_DIR_OUT, sys_arg(regs, 0), sys_arg(regs, 1), sys_arg(regs, 2), 1);
    case __NR_readv:
        return stash(AW_OP_IOV, AW_DIR_IN, sys_arg(regs, 0), sys_arg(regs, 1), sys_arg(regs, 2), 1);
    case __NR_sendmsg:
        note_send_flags(t, sys_arg(regs, 2));
        return stash(AW_OP_MSG, AW_DIR_OUT, sys_arg(regs, 0), sys_arg(regs, 1), 0, 1);
    case __NR_recvmsg:
        return stash(AW_OP_MSG, AW_DIR_IN, sys_arg(regs, 0), sys_arg(regs, 1), 0, 1);
    case __NR_sendmmsg:
        note_send_flags(t, sys_arg(regs, 3));
        return stash(AW_OP_MMSG, AW_DIR_OUT, sys_arg(regs, 0), sys_arg(regs, 1), sys_arg(regs, 2), 1);
    case __NR_recvmmsg:
        return stash(AW_OP_MMSG, AW_DIR_IN, sys_arg(regs, 0), sys_arg(regs, 1), sys_arg(regs, 2), 1);
#endif
#if AW_SOCK_CAPTURE
    // a write into another process's memory through /proc/PID/mem (guard_task.bpf.c)
    case __NR_write:
    case __NR_writev:
    case __NR_pwrite64:
    case __NR_pwritev:
    case __NR_pwritev2:
        return guard_memwrite(t, nr, sys_arg(regs, 0));
#endif
    // self-protection: the daemon is not a target for a tracked process
    case __NR_kill: {
        guard_self(tracked.lookup(&tgid), nr, sys_arg(regs, 0));
        return 0;
    }
    case __NR_process_vm_writev:
        guard_self(tracked.lookup(&tgid), nr, sys_arg(regs, 0));
        // the target joins at the exit, and only if the call wrote into it: a failed or empty
        // call must not pull another user's process into the session (red team)
        return stash(AW_OP_TAINT, 0, nr, sys_arg(regs, 0), 0, 0);
    case __NR_tgkill:
    case __NR_tkill:
    case __NR_pidfd_open:
    case __NR_bpf:
    // the daemon's limits, scheduling and memory policy: a root agent could make it deaf
    case __NR_prlimit64:
    case __NR_sched_setscheduler:
    case __NR_sched_setparam:
    case __NR_sched_setaffinity:
    case __NR_sched_setattr:
    case __NR_process_madvise:
    case __NR_process_mrelease:
        guard_self(tracked.lookup(&tgid), nr, sys_arg(regs, 0));
        return 0;
    case __NR_setpriority:
    case __NR_ioprio_set:
        guard_prio(tracked.lookup(&tgid), nr, sys_arg(regs, 0), sys_arg(regs, 1));
        return 0;
    case __NR_pidfd_getfd:
        guard_fdgrab(tracked.lookup(&tgid));
        return 0;
    case __NR_ptrace:
        guard_self(tracked.lookup(&tgid), nr, sys_arg(regs, 1));
        // joins at the exit of a successful attach, before the tracer can drive the tracee
        // (it must wait for the attach stop first)
        return stash(AW_OP_TAINT, 0, nr, sys_arg(regs, 1), sys_arg(regs, 0), 0);
    }
    return 0;
}

static __always_inline void forget_send_flags(u32 tid);

RAW_TRACEPOINT_PROBE(sys_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!maybe_tracked(pid_tgid >> 32))
        return 0;
    u32 tid = pid_tgid;
    forget_send_flags(tid);
    struct pend *p = pending.lookup(&tid);
    if (!p)
        return 0;
    exit_progs.call(ctx, p->op);
    pending.delete(&tid);   // only reached when no program handles this operation
    return 0;
}

int aw_exit_socket(struct bpf_raw_tracepoint_args *ctx) { return socket_exit(ctx->args[1]); }
int aw_exit_connect(struct bpf_raw_tracepoint_args *ctx) { return connect_exit(ctx->args[1]); }
int aw_exit_accept(struct bpf_raw_tracepoint_args *ctx) { return accept_exit(ctx->args[1]); }
int aw_exit_buf(struct bpf_raw_tracepoint_args *ctx) { return data_exit(ctx->args[1], AW_OP_BUF); }
int aw_exit_iov(struct bpf_raw_tracepoint_args *ctx) { return data_exit(ctx->args[1], AW_OP_IOV); }
int aw_exit_msg(struct bpf_raw_tracepoint_args *ctx) { return data_exit(ctx->args[1], AW_OP_MSG); }
int aw_exit_mmsg(struct bpf_raw_tracepoint_args *ctx) { return data_exit(ctx->args[1], AW_OP_MMSG); }
int aw_exit_taint(struct bpf_raw_tracepoint_args *ctx)
{
    struct pend p;
    long ret = ctx->args[1];
    if (!take(&p) || p.op != AW_OP_TAINT)
        return 0;
    // ptrace attach/seize returns 0; process_vm_writev and a /proc/PID/mem write the bytes written
    if ((p.fd == __NR_ptrace && ret != 0) || (p.fd != __NR_ptrace && ret <= 0))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    guard_taint(tracked.lookup(&tgid), p.fd, p.arg, p.ptr);
    return 0;
}

#elif !AW_SOCK_CAPTURE

TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
    return stash(AW_OP_SOCKET, 0, -1, 0, args->type & 0xf, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
    return socket_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    return stash(AW_OP_CONNECT, 0, args->fd, (u64)args->uservaddr, args->addrlen, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    return connect_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept)
{
    return accept_enter(args->fd, args->upeer_sockaddr, args->upeer_addrlen);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
    return accept_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept4)
{
    return accept_enter(args->fd, args->upeer_sockaddr, args->upeer_addrlen);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
    return accept_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    return close_enter(args->fd);
}

#define AW_DATA_PROBES(name, op, dir, fdf, ptrf, argf)             \
TRACEPOINT_PROBE(syscalls, sys_enter_##name)                        \
{                                                                   \
    return stash(op, dir, args->fdf, (u64)args->ptrf, (u64)args->argf, 1); \
}                                                                   \
TRACEPOINT_PROBE(syscalls, sys_exit_##name)                         \
{                                                                   \
    return data_exit(args->ret, op);                                \
}

AW_DATA_PROBES(write, AW_OP_BUF, AW_DIR_OUT, fd, buf, count)
AW_DATA_PROBES(read, AW_OP_BUF, AW_DIR_IN, fd, buf, count)
AW_DATA_PROBES(sendto, AW_OP_BUF, AW_DIR_OUT, fd, buff, len)
AW_DATA_PROBES(recvfrom, AW_OP_BUF, AW_DIR_IN, fd, ubuf, size)
AW_DATA_PROBES(writev, AW_OP_IOV, AW_DIR_OUT, fd, vec, vlen)
AW_DATA_PROBES(readv, AW_OP_IOV, AW_DIR_IN, fd, vec, vlen)
AW_DATA_PROBES(sendmsg, AW_OP_MSG, AW_DIR_OUT, fd, msg, flags)
AW_DATA_PROBES(recvmsg, AW_OP_MSG, AW_DIR_IN, fd, msg, flags)
AW_DATA_PROBES(sendmmsg, AW_OP_MMSG, AW_DIR_OUT, fd, mmsg, vlen)
AW_DATA_PROBES(recvmmsg, AW_OP_MMSG, AW_DIR_IN, fd, mmsg, vlen)

#endif

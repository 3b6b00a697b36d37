// Plaintext of TLS connections, from uprobes on OpenSSL's SSL_read/SSL_write.
//
// Compiled after net.bpf.c (same unit).  At SSL_* entry the thread is marked
// with the buffer; the read/write syscall OpenSSL makes inside the call reveals
// the socket (note_ssl_fd, called from net.bpf.c's stash), or for an object that
// encrypts into memory, the ClientHello bound it (ssl_touch); at return the bytes
// the call moved are copied from the caller's buffer, so they join the same
// connection, and that connection's ciphertext is no longer copied.  Arguments
// come from pt_regs (PT_REGS_PARMn, a stable ABI), never from OpenSSL structs.


// Whether a thread is inside an OpenSSL call the uprobes watch (SSL_read, SSL_write, their _ex
// forms, SSL_peek, and the calls that send records of their own: SSL_connect, SSL_do_handshake,
// SSL_shutdown; in TLS 1.3 their handshake and close_notify go out as application-data records).
// guard_msg.bpf.c tls_send lets a Postgres TLS connection send only from inside one.
// tid -> the calls open and when the last one entered.  One map for every daemon generation,
// pinned at a fixed path (the loader makes it first: probes/loader.py VOUCH_PIN), so that a
// connection an earlier generation's sk_msg still holds is vouched for by this generation's
// uprobes after that one's are gone.  The count is capped (a thread deeper than the kernel's 64
// pending uretprobes would never count down) and a call open longer than AW_VOUCH_NS vouches no
// more (one left open when an earlier generation's uretprobe went in the middle of it); exec and
// a thread's exit drop the entry (ssl_thread_exit).
#define AW_VOUCH_NS (30ULL * 1000000000ULL)
#define AW_VOUCH_MAX 8
struct ssl_vouch {
    u32 open;
    u32 _pad;
    u64 ts;      // boot ns of the latest entry
};
BPF_TABLE_PINNED("hash", u32, struct ssl_vouch, ssl_vouch, 16384, AW_PIN_DIR "/shared-ssl-vouch-v1");
// tid -> the SSL object of the outermost watched call open on the thread (this generation's): a
// send vouched for by the thread must also be on that object's socket, when it is known
// (ssl_socks), so that a callback run inside a call on one connection (Python's
// SSLContext._msg_callback, a signal handler) cannot send another TLS stack's records on a
// Postgres connection (red team).  Nested calls do not change it.
BPF_HASH(vouch_outer, u32, u64, 16384);

static __always_inline void vouch_enter(u32 tid, u64 ssl)
{
    struct ssl_vouch *v = ssl_vouch.lookup(&tid);
    u64 now = bpf_ktime_get_boot_ns();
    if (v) {
        if (v->open < AW_VOUCH_MAX)
            v->open += 1;
        v->ts = now;
        return;
    }
    struct ssl_vouch fresh = {.open = 1, .ts = now};
    ssl_vouch.update(&tid, &fresh);
    vouch_outer.update(&tid, &ssl);
}

static __always_inline void vouch_leave(u32 tid)
{
    struct ssl_vouch *v = ssl_vouch.lookup(&tid);
    if (v && v->open > 1) {
        v->open -= 1;
        return;
    }
    if (v)
        ssl_vouch.delete(&tid);
    vouch_outer.delete(&tid);
}

// A call on SSL object `ssl` by this thread: the fd of its socket, or -1 while not known.  An
// object without one takes the socket whose ClientHello this thread received last (a server), or
// becomes this thread's candidate for the next ClientHello it sends (a client): net.bpf.c ssl_hello.
static __always_inline s32 ssl_touch(u32 tgid, u32 tid, u64 ssl)
{
    u64 key = ((u64)tgid << 32) ^ ssl;
    s32 *known = ssl_fds.lookup(&key);
    if (known)
        return *known;
    u64 now = bpf_ktime_get_boot_ns();
    struct ssl_bind *in = hello_in.lookup(&tid);
    if (in) {
        s32 fd = in->fd;
        int fresh = !in->many && now - in->ts <= AW_BIND_NS;
        u64 sock = in->sock;
        hello_in.delete(&tid);
        if (fresh) {
            ssl_fds.update(&key, &fd);
            ssl_socks.update(&key, &sock);
            return fd;
        }
    }
    struct ssl_bind *u = ssl_unbound.lookup(&tid);
    if (u && u->ssl != ssl && !u->many && now - u->ts <= AW_BIND_NS) {
        u->many = 1;   // two objects without a socket: the next ClientHello could be either's
        u->ts = now;
        return -1;
    }
    if (u && u->many && now - u->ts <= AW_BIND_NS) {
        u->ts = now;
        return -1;
    }
    struct ssl_bind b = {.ssl = ssl, .fd = -1, .many = 0, .ts = now};
    ssl_unbound.update(&tid, &b);
    return -1;
}

static __always_inline int ssl_enter(struct pt_regs *ctx, u32 dir, int ex)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
    if (!maybe_tracked(tgid) || !tracked.lookup(&tgid))
        return 0;
    vouch_enter(tid, PT_REGS_PARM1(ctx));   // before the dedup below: every attachment's return leaves once
    u64 now = bpf_ktime_get_boot_ns();
    // The same call seen a second time: one libssl file reached through several containers'
    // overlay mounts is attached once per mount (each its own device number), and every attach
    // is a consumer of the one real inode, so its entry fires once per attach.  The guard would
    // judge (and frame) the same bytes twice (red team); the return side is already once, since
    // the first return takes the call.  A call in progress on this thread with the same stack
    // pointer, buffer and direction, entered within the millisecond through another attachment
    // (its bpf_cookie), is this one.  Through the same attachment it is a new call: red team, a
    // callback that longjmps out of a write, and a write with the same buffer from the same place.
    u64 cookie = bpf_get_attach_cookie(ctx);
    struct ssl_call *prev = ssl_calls.lookup(&tid);
    if (prev && prev->sp == PT_REGS_SP(ctx) && prev->buf == PT_REGS_PARM2(ctx) && prev->dir == dir
        && now - prev->ts < 1000000 && prev->cookie != cookie)
        return 0;
    struct ssl_call call = {};
    call.sp = PT_REGS_SP(ctx);
    call.ts = now;
    call.buf = PT_REGS_PARM2(ctx);
    call.outlen = ex ? PT_REGS_PARM4(ctx) : 0;
    call.dir = dir;
    call.fd = -1;
    call.cookie = cookie;

    call.fd = ssl_touch(tgid, tid, PT_REGS_PARM1(ctx));
    ssl_calls.update(&tid, &call);
    // remember which SSL * this thread is in, to learn its fd for later calls
    u64 ssl = PT_REGS_PARM1(ctx);
    ssl_ptr.update(&tid, &ssl);
    if (dir == AW_DIR_OUT) {   // the policy on the plaintext; may tail-call, so last
        struct track_info *t = tracked.lookup(&tgid);
        if (t)
            guard_ssl_write(ctx, t, call.buf, PT_REGS_PARM3(ctx));
    }
    return 0;
}

int aw_ssl_write(struct pt_regs *ctx) { return ssl_enter(ctx, AW_DIR_OUT, 0); }
int aw_ssl_write_ex(struct pt_regs *ctx) { return ssl_enter(ctx, AW_DIR_OUT, 1); }
int aw_ssl_read(struct pt_regs *ctx) { return ssl_enter(ctx, AW_DIR_IN, 0); }
int aw_ssl_read_ex(struct pt_regs *ctx) { return ssl_enter(ctx, AW_DIR_IN, 1); }

int aw_ssl_hs(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!maybe_tracked(tgid) || !tracked.lookup(&tgid))
        return 0;
    vouch_enter((u32)pid_tgid, PT_REGS_PARM1(ctx));
    ssl_touch(tgid, (u32)pid_tgid, PT_REGS_PARM1(ctx));   // its ClientHello may go out in this call
    return 0;
}

int aw_ssl_hs_done(struct pt_regs *ctx)
{
    vouch_leave(bpf_get_current_pid_tgid());
    return 0;
}

int aw_ssl_return(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
    vouch_leave(tid);
    struct ssl_call *p = ssl_calls.lookup(&tid);
    if (!p)
        return 0;
    struct ssl_call call = *p;
    ssl_calls.delete(&tid);
    u64 *sslp = ssl_ptr.lookup(&tid);
    u64 ssl = sslp ? *sslp : 0;
    ssl_ptr.delete(&tid);
    int ret = (int)PT_REGS_RC(ctx);   // an int in rax: the upper half is not sign-extended
    u64 n = 0;
    if (call.outlen) {
        if (ret == 1)
            bpf_probe_read_user(&n, sizeof(n), (void *)call.outlen);
    } else if (ret > 0) {
        n = ret;
    }
    u64 skey = ((u64)tgid << 32) ^ ssl;
    if (call.fd >= 0)
        ssl_fds.update(&skey, &call.fd);
    // the guard's framing stands for the bytes that went (a failed write tail-calls from here)
    if (call.dir == AW_DIR_OUT)
        guard_ssl_done(ctx, tid, n, call.sp, call.outlen ? ret == 1 : ret > 0, call.buf);
    if (call.fd < 0)
        return 0;
    if (n == 0)
        return 0;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    u64 key = fd_key(tgid, call.fd);
    struct conn *c = conns.lookup(&key);
    if (!c)
        return 0;
    c->tls = 1;
    u32 dir = call.dir & 1;
    u64 off = c->ptoff[dir];
    c->ptoff[dir] = off + n;
    copy_data(t, c, call.fd, dir, call.buf, 0, 0, n, off, AW_DATA_TLS);
    return 0;
}

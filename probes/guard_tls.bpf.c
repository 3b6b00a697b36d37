// guard_tls.bpf.c: the same matchers on SSL_write's plaintext (tls.bpf.c calls guard_ssl_write),
// framed per SSL stream; a denied statement or request SIGKILLs the writer before OpenSSL
// encrypts it.
// Uses guard.bpf.c, guard_stream.bpf.c, guard_sql.bpf.c, guard_http.bpf.c, guard_msg.bpf.c.

// ---- TLS: the plaintext at SSL_write entry (called from tls.bpf.c) -------------
//
// Framed per connection as the sockets are (ssl_streams, by process and SSL *; SSL_free
// forgets it): a statement behind another message, or cut across writes, is read where the
// server will read it.  A write cannot wait as a corked send does, so a statement or header
// cut at the end of a write is opaque (red team: `Sync` then `Query` in one write, a header
// cut after its type byte, one byte a write).

// Not an LRU: an agent that made many SSL objects would evict its own stream's framing, and the
// stream's next write would be read from a place the agent chose.  A full map fails closed (the
// writer is killed); the daemon deletes the entries of processes that are gone
// (Probes.sweep_ssl_streams), and a new daemon takes over its predecessor's (Pins.hand_over).
struct ssl_key {
    u64 ssl;
    u64 start;       // the process's start (boot ns; 0 without BTF): a reused pid is another process
    u32 tgid;
    u32 _pad;
};

static __always_inline u64 process_start(u64 task)
{
#if AW_BTF
    u64 leader = task ? kread(task + AW_OFF_TASK_GROUP_LEADER) : 0;
    return leader ? kread(leader + AW_OFF_TASK_START_BOOTTIME) : 0;
#else
    return 0;
#endif
}

static __always_inline struct ssl_key ssl_key_of(u64 ssl)
{
    struct ssl_key key = {.ssl = ssl, .tgid = bpf_get_current_pid_tgid() >> 32,
                          .start = process_start(bpf_get_current_task())};
    return key;
}
BPF_HASH(ssl_streams, struct ssl_key, struct guard_conn, AW_GUARD_SOCKS);

// A write's framing is undone when the write did not go: SSL_write before the handshake (no
// connect state), an error, or WANT_WRITE (the caller retries with the same bytes, judged again
// from the same place).  Without it, a write that failed (red team: one byte before SSL_connect)
// would set the stream's framing, and a StartupMessage after it would be read as something else.
struct ssl_undo {
    struct ssl_key key;
    struct guard_conn old;
    u64 n;
    u32 fresh;       // the write made the entry: undone by deleting it
    u32 _pad;
};
BPF_HASH(ssl_undo, u32, struct ssl_undo, 16384);   // tid -> the write in progress

static __always_inline void guard_ssl_done(u32 tid, u64 moved)
{
    struct ssl_undo *u = ssl_undo.lookup(&tid);
    if (!u)
        return;
    struct ssl_undo undo = *u;
    ssl_undo.delete(&tid);
    if (moved >= undo.n)
        return;                       // all of it went: the framing stands
    if (moved == 0) {                 // none of it went: as if never written
        if (undo.fresh)
            ssl_streams.delete(&undo.key);
        else
            ssl_streams.update(&undo.key, &undo.old);
        return;
    }
    // part of it went (SSL_MODE_ENABLE_PARTIAL_WRITE; the caller writes the rest later): the
    // framing counted bytes that did not go
    struct guard_conn *gs = ssl_streams.lookup(&undo.key);
    if (gs && gs->state != AW_PG_OTHER)
        gs->state = (gs->state == AW_HTTP || gs->state == AW_HTTP_LOOSE) ? AW_HTTP_LOOSE : AW_PG_JOINED;
}

// A write the guard cannot frame, in a session under SQL/HTTP rules: SIGKILL before SSL_write
// encrypts a byte (a write cannot be refused as a send can), and the reason recorded.
static __always_inline void ssl_unjudged(struct track_info *t, u32 why)
{
    if (!(cfg(AW_CFG_FLAGS) & AW_FLAG_SQL))
        return;
    bpf_send_signal(AW_SIGKILL);
    struct guard_event *e = guard_begin(AW_G_UNJUDGED, t);
    if (e) {
        e->done = AW_DONE_KILLED;
        e->target = why;
        guard_send(e);
    }
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
    struct ssl_key key = ssl_key_of(ssl);
    struct guard_conn *gs = ssl_streams.lookup(&key);
    u32 fresh = !gs;
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
        struct ssl_key pkey = {.ssl = ssl, .tgid = ptgid, .start = process_start(parent)};
        struct guard_conn *from_parent = ptgid ? ssl_streams.lookup(&pkey) : 0;
        if (from_parent)
            fresh = *from_parent;
#endif
        ssl_streams.update(&key, &fresh);
        gs = ssl_streams.lookup(&key);
        if (!gs) {   // no room to frame it: its statements would go unjudged
            ssl_unjudged(t, AW_UNJUDGED_FULL);
            return;
        }
    }
    struct ssl_undo undo = {.key = key, .old = *gs, .n = n, .fresh = fresh};
    u32 tid = bpf_get_current_pid_tgid();
    ssl_undo.update(&tid, &undo);
    if (gs->state == AW_PG_OTHER)
        return;
    if (gs->state == AW_PG_JOINED) {   // after a write that went in part: where messages start is lost
        ssl_unjudged(t, AW_UNJUDGED_PARTIAL);
        return;
    }
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
        ssl_progs.call(ctx, AW_PROG_SQL_SSL);
        return;
    }
    e->len = len;
    if (gs->state == AW_HTTP_LOOSE || (gs->state == AW_PG_UNKNOWN && http_method_len(e->text) > 0)) {
        gs->state = AW_HTTP_LOOSE;   // each write that starts a request line is judged alone
        if (http_method_len(e->text) > 0)
            ssl_progs.call(ctx, AW_PROG_HTTP_SSL);
        return;
    }
    if (gs->state == AW_PG_UNKNOWN) {
        // a StartupMessage (inside TLS it comes first, after the handshake) starts a stream
        if (n < 8 && could_start(e->text, len)) {
            s->unread = 1;   // cut short: nothing honest writes a StartupMessage in pieces
            ssl_progs.call(ctx, AW_PROG_SQL_SSL);
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
        ssl_progs.call(ctx, AW_PROG_SSL_AMBIG);   // aw_ssl_ambig, then the matcher
}

int aw_ssl_free(struct pt_regs *ctx)
{
    struct ssl_key key = ssl_key_of(PT_REGS_PARM1(ctx));
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
    ssl_progs.call(ctx, AW_PROG_SQL_SSL);
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
        ssl_progs.call(ctx, AW_PROG_SQL_SSL);
        s->unread = 1;
    }
    if (s->unread)
        s->over |= cfg(AW_CFG_SQL_OPAQUE);
    struct op_result res = {};
    if (!sql_decide(s, &res))
        return 0;
    // SIGKILL lands before SSL_write encrypts a byte: the statement never leaves
    bpf_send_signal(AW_SIGKILL);
    e = op_event(AW_G_SQL_TLS, &res, AW_DONE_KILLED, s->session);
    if (e)
        guard_send(e);
    return 0;
}

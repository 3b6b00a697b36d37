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

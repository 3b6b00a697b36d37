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
// Kept per thread, for the one write in progress: a write that starts while one is open (an
// SSL_write from a callback inside another, or after one whose return never came: longjmp) is
// killed, since the framing of neither can be trusted (red team: a nested write's return undid
// the outer write's framing).  A thread that exits drops its entry (ssl_thread_exit).
struct ssl_undo {
    struct ssl_key key;
    struct guard_conn old;
    u64 n;
    u64 sp;          // the call's stack pointer at entry: its return is the one that applies this
    u32 fresh;       // the write made the entry: undone by deleting it
    u32 _pad;
};
BPF_HASH(ssl_undo, u32, struct ssl_undo, 16384);   // tid -> the write in progress

static __always_inline void ssl_thread_exit(u32 tid)
{
    ssl_undo.delete(&tid);
    ssl_calls.delete(&tid);
    ssl_ptr.delete(&tid);
    ssl_vouch.delete(&tid);
    ssl_unbound.delete(&tid);
    hello_in.delete(&tid);
    vouch_outer.delete(&tid);
}

// A write that failed may still have gone in part: on WANT_WRITE OpenSSL may have sent records of
// it, and its retry (which must pass as many bytes or more) sends the rest from the retry's own
// buffer (red team: a retry with other bytes after the first record, which the guard would read
// from the start).  So a failed write leaves the digest of its bytes (up to AW_RETRY_MAX), and the
// stream's next write must begin with the same bytes, or it is killed (AW_UNJUDGED_RETRY).
#define AW_RETRY_STEP 16384    // bytes digested per program run (more is over the verifier's limit)
#define AW_RETRY_MAX (12 * AW_RETRY_STEP)   // 192 KiB: 12 runs, with the matcher's within 33 tail calls
#define AW_RETRY_CHUNK 256
struct ssl_retry {
    u64 digest;
    u64 n;
};
BPF_HASH(ssl_retry, struct ssl_key, struct ssl_retry, 16384);
struct digest_job {         // bytes aw_ssl_digest reads, over as many runs as it takes
    struct ssl_key key;
    u64 buf;
    u64 n;
    u64 off;                // read so far
    u64 v[4];               // SipHash state
    u64 h;                  // the digest, once off >= n
    u64 want;               // verify: the failed write's digest
    u64 session;
    u32 verify;             // 0: a failed write's bytes, kept for its retry; 1: its retry's, compared
    u32 _pad;
};
BPF_PERCPU_ARRAY(digest_jobs, struct digest_job, 1);
struct retry_chunk {
    u8 b[2 * AW_RETRY_CHUNK];
};
BPF_PERCPU_ARRAY(retry_chunks, struct retry_chunk, 1);
// The digest is SipHash-1-3 under a key the daemon draws at each start (Probes: digest_key), not
// FNV: the agent writes both buffers, and an FNV step is invertible, so it could make a retry with
// other bytes and the same digest (red team).
BPF_ARRAY(digest_key, u64, 2);

#define AW_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define AW_SIPROUND(v)                                                       \
    do {                                                                     \
        v[0] += v[1]; v[1] = AW_ROTL(v[1], 13); v[1] ^= v[0]; v[0] = AW_ROTL(v[0], 32); \
        v[2] += v[3]; v[3] = AW_ROTL(v[3], 16); v[3] ^= v[2];                 \
        v[0] += v[3]; v[3] = AW_ROTL(v[3], 21); v[3] ^= v[0];                 \
        v[2] += v[1]; v[1] = AW_ROTL(v[1], 17); v[1] ^= v[2]; v[2] = AW_ROTL(v[2], 32); \
    } while (0)

static __always_inline struct digest_job *digest_begin(struct ssl_key *key, u64 buf, u64 n, u64 session)
{
    u32 zero = 0;
    struct digest_job *j = digest_jobs.lookup(&zero);
    if (!j)
        return NULL;
    j->key = *key;
    j->buf = buf;
    j->n = n;
    j->off = 0;
    u32 k0i = 0, k1i = 1;
    u64 *k0 = digest_key.lookup(&k0i), *k1 = digest_key.lookup(&k1i);
    u64 a = k0 ? *k0 : 0, b = k1 ? *k1 : 0;
    j->v[0] = a ^ 0x736f6d6570736575ULL;
    j->v[1] = b ^ 0x646f72616e646f6dULL;
    j->v[2] = a ^ 0x6c7967656e657261ULL;
    j->v[3] = b ^ 0x7465646279746573ULL;
    j->h = 0;
    j->want = 0;
    j->session = session;
    j->verify = 0;
    return j;
}

// SipHash-1-3 over the 8-byte words of buf[off, off + AW_RETRY_STEP) in chunks (a last chunk's
// tail read as zeros; n goes into the finish).  0: unreadable.
static __always_inline int digest_step(struct digest_job *j)
{
    u32 zero = 0;
    struct retry_chunk *c = retry_chunks.lookup(&zero);
    if (!c)
        return 0;
    u64 v[4] = {j->v[0], j->v[1], j->v[2], j->v[3]};
    u64 n = j->n, start = j->off;
    for (u32 i = 0; i < AW_RETRY_STEP / AW_RETRY_CHUNK; i++) {
        u64 off = start + (u64)i * AW_RETRY_CHUNK;
        if (off >= n)
            break;
        u64 left = n - off;
        u32 len = left < AW_RETRY_CHUNK ? (u32)left : AW_RETRY_CHUNK;
        __builtin_memset(c->b, 0, AW_RETRY_CHUNK);
        if (bpf_probe_read_user(c->b, len & (2 * AW_RETRY_CHUNK - 1), (void *)(j->buf + off)) != 0)
            return 0;
        u64 *words = (u64 *)c->b;
#pragma unroll
        for (u32 w = 0; w < AW_RETRY_CHUNK / 8; w++) {   // no branch: the verifier walks it once
            u64 m = words[w];
            v[3] ^= m;
            AW_SIPROUND(v);
            v[0] ^= m;
        }
    }
    j->off = start + AW_RETRY_STEP;
    if (j->off >= n) {   // the finish: the length, then three rounds
        v[3] ^= n;
        AW_SIPROUND(v);
        v[0] ^= n;
        v[2] ^= 0xff;
        AW_SIPROUND(v);
        AW_SIPROUND(v);
        AW_SIPROUND(v);
        j->h = v[0] ^ v[1] ^ v[2] ^ v[3];
    }
    j->v[0] = v[0];
    j->v[1] = v[1];
    j->v[2] = v[2];
    j->v[3] = v[3];
    return 1;
}

// The stream's framing is lost: its next write is killed (a session under SQL/HTTP rules).
static __always_inline void ssl_lost(struct ssl_key *key, u64 session)
{
    struct guard_conn lost = {.session = session, .state = AW_PG_JOINED};
    ssl_streams.update(key, &lost);
}

// ok: the call said it wrote (SSL_write > 0, SSL_write_ex 1); moved: the bytes it says went (for
// SSL_write_ex read from the caller's *written, which another thread can change: a success that
// says fewer than all of them is read as a part, never as nothing).  A failed write tail-calls
// aw_ssl_failed, which digests its bytes for its retry.
static __always_inline void guard_ssl_done(struct pt_regs *ctx, u32 tid, u64 moved, u64 sp, int ok, u64 buf)
{
    struct ssl_undo *u = ssl_undo.lookup(&tid);
    if (!u || u->sp != sp)
        return;
    struct ssl_undo undo = *u;
    ssl_undo.delete(&tid);
    if (ok && moved >= undo.n)
        return;                       // all of it went: the framing stands
    if (!ok) {                        // as if never written, but the next write must be its retry
        if (undo.fresh)
            ssl_streams.delete(&undo.key);
        else
            ssl_streams.update(&undo.key, &undo.old);
        if (!undo.fresh && undo.old.state == AW_PG_OTHER)
            return;                   // nothing on it is judged
        if (undo.n <= AW_RETRY_MAX && digest_begin(&undo.key, buf, undo.n, undo.old.session))
            ssl_progs.call(ctx, AW_PROG_SSL_DIGEST);
        ssl_lost(&undo.key, undo.old.session);   // too big to check its retry (or no tail call)
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

// A TLS write that starts like a request line whose method the HTTP matcher does not read
// (guard_http.bpf.c unread_request), in a session under an HTTP rule that denies or holds: the
// writer is killed before SSL_write encrypts it.
int aw_ssl_unread(struct pt_regs *ctx)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    struct guard_event *e = guard_scratch.lookup(&zero);
    if (!s || !e)
        return 0;
    s->h_line = http1_line_end(e->text, s->len);   // in map memory: one state past its loop
    if (!unread_request(e->text, s->len, s->h_line > 0 && s->h_line < AW_HTTP_HEAD))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = tracked.lookup(&tgid);
    struct track_info anon = {.session = s->session};
    ssl_unjudged(t ? t : &anon, AW_UNJUDGED_METHOD);
    return 0;
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

static __always_inline void ssl_frame(struct pt_regs *ctx, struct track_info *t, struct guard_conn *gs,
                                      u64 buf, u32 n);

static __always_inline void guard_ssl_write(struct pt_regs *ctx, struct track_info *t, u64 buf, u64 n)
{
    if (!(cfg(AW_CFG_FLAGS) & AW_FLAG_ENFORCE))
        return;
    u32 tid = bpf_get_current_pid_tgid();
    struct ssl_undo *open = ssl_undo.lookup(&tid);
    if (open) {   // a write inside another, or after one whose return never came
        struct guard_conn *was = ssl_streams.lookup(&open->key);
        if (was && was->state != AW_PG_OTHER)
            was->state = AW_PG_JOINED;
        ssl_undo.delete(&tid);
        ssl_unjudged(t, AW_UNJUDGED_NESTED);
        return;
    }
    if (n == 0)
        return;
    if (n > 0x7fffffff) {   // SSL_write_ex's size_t: the framing counts in 32 bits (red team: 2^32 + k)
        ssl_unjudged(t, AW_UNJUDGED_HUGE);
        return;
    }
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
    struct ssl_undo undo = {.key = key, .old = *gs, .n = n, .sp = PT_REGS_SP(ctx), .fresh = fresh};
    if (ssl_undo.update(&tid, &undo) != 0) {   // no room to undo it: its framing could not be trusted
        ssl_unjudged(t, AW_UNJUDGED_FULL);
        return;
    }
    if (gs->state == AW_PG_OTHER)
        return;
    struct ssl_retry *r = ssl_retry.lookup(&key);
    if (r) {   // the write after a failed one: its retry (as many bytes or more, the same first), or killed
        struct ssl_retry was = *r;
        ssl_retry.delete(&key);
        struct digest_job *j = n >= was.n ? digest_begin(&key, buf, was.n, t->session) : 0;
        if (j) {
            j->verify = 1;
            j->want = was.digest;
            ssl_progs.call(ctx, AW_PROG_SSL_DIGEST);
        }
        gs->state = AW_PG_JOINED;
        ssl_unjudged(t, AW_UNJUDGED_RETRY);
        return;
    }
    ssl_frame(ctx, t, gs, buf, n);
}

// Frame one write of a stream (gs) and judge what it holds: the matchers by tail call.
static __always_inline void ssl_frame(struct pt_regs *ctx, struct track_info *t, struct guard_conn *gs,
                                      u64 buf, u32 n)
{
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
    u8 r0 = e->text[0], c0 = r0 | 0x20;
    if (gs->state == AW_HTTP_LOOSE || (gs->state == AW_PG_UNKNOWN && ((c0 >= 'a' && c0 <= 'z') || r0 == ' ' ||
                                                                      r0 == '\t' || r0 == 0x0b || r0 == 0x0c))) {
        // each write that starts a request line is judged alone; one whose method the matcher does
        // not read by aw_ssl_unread, under a rule that denies or holds (red team: PROPFIND over TLS)
        u32 first = gs->state == AW_PG_UNKNOWN;   // the connection's first write: where a preface goes
        gs->state = AW_HTTP_LOOSE;
        if (first && h2_preface_start(e->text, len) && (cfg(AW_CFG_HTTP_DENY) & session_mask(t->session)))
            ssl_unjudged(t, AW_UNJUDGED_HTTP2);   // HTTP/2 after ALPN h2 (guard_http.bpf.c h2_preface)
        else if (http_method_len(e->text) > 0)
            ssl_progs.call(ctx, AW_PROG_HTTP_SSL);
        else if (cfg(AW_CFG_HTTP_DENY) & session_mask(t->session))
            ssl_progs.call(ctx, AW_PROG_SSL_UNREAD);
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

// SSL_free, and SSL_clear (an SSL object made ready for another connection: red team, a stream set to
// "not Postgres" by junk to one server, cleared and connected to Postgres, kept that state)
int aw_ssl_free(struct pt_regs *ctx)
{
    u64 ssl = PT_REGS_PARM1(ctx);
    struct ssl_key key = ssl_key_of(ssl);
    ssl_streams.delete(&key);
    ssl_retry.delete(&key);
    u64 fkey = ((u64)(bpf_get_current_pid_tgid() >> 32) << 32) ^ ssl;
    ssl_fds.delete(&fkey);   // the capture's socket of it (tls.bpf.c): the address will be reused
    ssl_socks.delete(&fkey);
    // OpenSSL clears an object itself when a handshake starts, and SSL_write starts one when no
    // SSL_connect came first: that write is the new connection's first, yet it was framed against
    // the old stream's state at its entry (red team: "not Postgres" kept, or a StartupMessage cut
    // across writes read afresh).  Killed in a session under SQL/HTTP rules.
    u32 tid = bpf_get_current_pid_tgid();
    struct ssl_undo *open = ssl_undo.lookup(&tid);
    if (open && open->key.ssl == ssl) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        struct track_info *t = tracked.lookup(&tgid);
        ssl_undo.delete(&tid);
        if (t)
            ssl_unjudged(t, AW_UNJUDGED_HANDSHAKE);
    }
    return 0;
}

// The digest of a failed write's bytes (at its return: kept for its retry), or of its retry's
// first as many (at the retry's entry: compared, then framed from where the failed write began),
// AW_RETRY_STEP bytes a run.
int aw_ssl_digest(struct pt_regs *ctx)
{
    u32 zero = 0;
    struct digest_job *j = digest_jobs.lookup(&zero);
    if (!j)
        return 0;
    int ok = digest_step(j);
    if (ok && j->off < j->n) {
        ssl_progs.call(ctx, AW_PROG_SSL_DIGEST);
        ok = 0;   // (the tail call failed)
    }
    struct ssl_key key = j->key;
    if (!j->verify) {
        struct ssl_retry r = {.digest = j->h, .n = j->n};
        if (!ok || ssl_retry.update(&key, &r) != 0)
            ssl_lost(&key, j->session);   // its retry cannot be checked
        return 0;
    }
    if (ok && j->h == j->want)
        ssl_progs.call(ctx, AW_PROG_SSL_FRAME);
    ssl_lost(&key, j->session);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = tracked.lookup(&tgid);
    if (t)
        ssl_unjudged(t, AW_UNJUDGED_RETRY);
    return 0;
}

// A retry that begins with the failed write's bytes: framed from where that write began.
int aw_ssl_frame(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    struct ssl_key key = ssl_key_of(PT_REGS_PARM1(ctx));
    struct guard_conn *gs = ssl_streams.lookup(&key);
    u64 n = PT_REGS_PARM3(ctx);
    if (gs && n <= 0x7fffffff)
        ssl_frame(ctx, t, gs, PT_REGS_PARM2(ctx), n);
    return 0;
}

// SSL_sendfile (kTLS: the kernel encrypts a file's bytes, which no uprobe sees) and early data
// (SSL_write_early_data): refused in a session under SQL/HTTP rules, the caller killed.
int aw_ssl_refuse(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 0;
    struct track_info *t = tracked.lookup(&tgid);
    if (t && (cfg(AW_CFG_FLAGS) & AW_FLAG_ENFORCE))
        ssl_unjudged(t, AW_UNJUDGED_SENDFILE);
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

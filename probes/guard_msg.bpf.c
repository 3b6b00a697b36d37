// guard_msg.bpf.c: the stream router on TCP sends.  sock_ops puts an agent's TCP sockets in a
// sockhash; aw_sk_msg runs on each of their sends, copies a window and routes it: Postgres is
// framed message by message (aw_msg_route, past the window aw_msg_beyond, cut messages
// aw_msg_ambig, then the matcher aw_sql_msg), HTTP request by request (aw_http_next,
// aw_http_length, aw_http_body, aw_http_copy, then aw_http_msg).  A send that cannot be judged
// yet is corked; one that cannot be judged at all is refused.
// Uses guard.bpf.c, guard_stream.bpf.c, guard_sql.bpf.c, guard_http.bpf.c.

// A connection of a session under stream rules that the guard cannot hold (its sockhash is full,
// AW_GUARD_SOCKS connections; or no memory for its state): its sends would go unjudged.  Fail
// closed: the mark makes nftables answer its first segment with a reset (the client reads
// ECONNRESET; enforce/quarantine.py), and the daemon records why.
static __always_inline int sockops_unguarded(struct bpf_sock_ops *skops, u64 session, u32 why)
{
    u32 mark = AW_UNGUARDED_MARK;
    bpf_setsockopt(skops, AW_SOL_SOCKET, AW_SO_MARK, &mark, sizeof(mark));
    struct guard_event *e = guard_begin_session(AW_G_UNJUDGED, session);
    if (e) {
        e->done = AW_DONE_REFUSED;
        e->target = why;
        guard_send(e);
    }
    return 1;
}

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
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return 1;
    u64 cookie = bpf_get_socket_cookie(skops);
    struct guard_conn *st = guard_sk.sk_storage_get(sk, 0, 0);   // written at connect (aw_connect4/6)
    if (!st) {
        struct guard_conn *adopted = guard_conns.lookup(&cookie);
        if (!adopted)
            return 1;    // not a connection of a session under stream rules
        u64 session = adopted->session;
        st = guard_sk.sk_storage_get(sk, adopted, BPF_SK_STORAGE_GET_F_CREATE);
        guard_conns.delete(&cookie);
        if (!st)
            return sockops_unguarded(skops, session, AW_UNJUDGED_FULL);
    }
#if AW_BTF
    // A send that entered tcp_sendmsg before this moment (another thread's, or one that blocks
    // waiting for the handshake: sk_stream_wait_connect counts it in sk_write_pending) goes on
    // with the protocol it entered with, past sk_msg (red team: a non-blocking connect, then a
    // blocking sendall).  Its bytes would reach the server unjudged: the connection is reset.
    // Likewise bytes queued or sent before this moment (TCP Fast Open, whose setsockopt a 32-bit
    // call makes past the cgroup hook): queued ones are past the sequence sent (write_seq), sent
    // ones in the SYN are not acknowledged yet (a server without Fast Open drops them, and they are
    // sent again).
    struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
    int pending = 0;
    u32 write_seq = skops->snd_nxt;
    if (tp) {
        bpf_probe_read_kernel(&pending, sizeof(pending), (void *)tp + AW_OFF_SK_WRITE_PENDING);
        bpf_probe_read_kernel(&write_seq, sizeof(write_seq), (void *)tp + AW_OFF_TCP_WRITE_SEQ);
    }
    if (pending > 0 || write_seq != skops->snd_nxt || skops->snd_una != skops->snd_nxt)
        return sockops_unguarded(skops, st->session, AW_UNJUDGED_EARLY);
#endif
    long err = guard_socks.sock_hash_update(skops, &cookie, BPF_ANY);
    if (err == -AW_EBUSY) {
        u32 zero = 0;
        u64 *busy = succession.lookup(&zero);
        if (busy && *busy)
            return 1;    // an earlier daemon's guard holds it (both run while one succeeds the other)
        return sockops_unguarded(skops, st->session, AW_UNJUDGED_HELD);   // someone else's sk_msg
    }
    if (err != 0)
        return sockops_unguarded(skops, st->session, AW_UNJUDGED_FULL);
    return 1;
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

// A Postgres connection that went TLS (AW_PG_TLS) is read at SSL_write's entry, by the uprobes on
// the OpenSSL it calls (guard_tls.bpf.c), and nowhere else: every send on it must be made inside a
// call of an OpenSSL they watch, on this thread (ssl_vouch, tls.bpf.c).  Any other sender's
// statements would reach the server unread: another TLS library's (Go's crypto/tls, Java, rustls;
// Node's and asyncio's, which encrypt into memory and write later), or a libssl the uprobes are
// not on (red team: a copy loaded, then deleted from disk).  Refused.
static __always_inline int tls_send(struct sk_msg_md *msg, struct guard_conn *gc)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = pid_tgid, tgid = pid_tgid >> 32;
    struct ssl_vouch *v = ssl_vouch.lookup(&tid);
    if (v && v->open && bpf_ktime_get_boot_ns() - v->ts < AW_VOUCH_NS) {
        // and on the socket of the object the outermost call is on, once that is known (its
        // first ClientHello goes out before the capture has seen it: tls.bpf.c vouch_outer)
        u64 *outer = vouch_outer.lookup(&tid);
        u64 key = outer ? (((u64)tgid << 32) ^ *outer) : 0;
        u64 *sock = outer ? ssl_socks.lookup(&key) : 0;
        if (!sock || *sock == (u64)msg->sk)
            return SK_PASS;
    }
    struct track_info *t = tracked.lookup(&tgid);
    struct track_info anon = {.session = gc->session};
    unjudged(t ? t : &anon, AW_UNJUDGED_TLS);
    return SK_DROP;
}

int aw_sk_msg(struct sk_msg_md *msg)
{
    struct guard_conn *gc = msg_conn(msg);
    if (!gc)
        return SK_PASS;
    struct bpf_sock *msk = msg->sk;
    u64 flags = send_flags(msk ? (u64)msk : 0);
    if ((flags & (AW_MSG_OOB | AW_FLAGS_UNREAD)) || gc->state == AW_PG_JOINED) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        struct track_info *t = tracked.lookup(&tgid);
        struct track_info anon = {.session = gc->session};
        unjudged(t ? t : &anon, gc->state == AW_PG_JOINED ? AW_UNJUDGED_JOINED :
                 (flags & AW_FLAGS_UNREAD) ? AW_UNJUDGED_UNREAD : AW_UNJUDGED_OOB);
        return SK_DROP;
    }
    if (gc->state == AW_PG_OTHER)
        return SK_PASS;
    if (gc->state == AW_PG_TLS)
        return tls_send(msg, gc);
    u32 total = msg->size;
    u32 skip = gc->skip;
    if ((gc->state == AW_PG_STREAM || gc->state == AW_TLS_HELLO) && skip >= total) {
        gc->skip = skip - total;   // inside a message (a TLS record)
        return SK_PASS;
    }
    u32 zero = 0;
    struct guard_event *e = guard_scratch.lookup(&zero);
    struct scan_state *s = scan_states.lookup(&zero);
    if (!e || !s)
        return SK_PASS;
    s->body_peek = 0;
    s->body_then = 0;
    if (gc->state == AW_HTTP && skip >= total) {
        // inside a request's body; a server whose handler does not read a body it did not want
        // (Python's http.server) reads it as the next request, so a body that starts with a
        // request line is refused (aw_http_body)
        gc->skip = skip - total;
        s->session = gc->session;
        msg_progs.call(msg, AW_PROG_HTTP_BODY);
        return SK_PASS;
    }
    // HTTP: the next request starts where the body ends (Postgres frames from the send's start)
    u32 from = gc->state == AW_HTTP ? skip : 0;
    s->from = from;
    copy_window(msg, e, from, total);
    // the rest runs as its own program: verified once, not once per copied length
    msg_progs.call(msg, AW_PROG_MSG_ROUTE);
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
    msg_progs.call(msg, AW_PROG_HTTP_COPY);
    return out_of_calls(gc);   // the rest of this send was not judged
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
    if (s->body_then) {   // past a body looked into (aw_http_length, aw_http_copy)
        next = s->body_then;
        s->body_then = 0;
        s->body_peek = 0;
    } else if (s->advance) {
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
        msg_progs.call(msg, AW_PROG_HTTP_LENGTH);   // the Content-Length value, in a program of its own
        return out_of_calls(gc);
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
    u64 next = (u64)s->from + hend + body;
    if (body && (u64)s->from + hend < msg->size && next < 0xffffffffULL) {
        // The body starts in this send: a server whose handler reads no body (Python's
        // http.server) reads it as the next request, so aw_http_copy looks into it (red team: a
        // DELETE as the body of a GET, in one send); a body like any other, the framing goes on
        // past it (aw_http_next)
        s->from += hend;
        s->body_then = next;
        s->body_peek = 1;
        msg_progs.call(msg, AW_PROG_HTTP_COPY);
        return out_of_calls(gc);
    }
    return http_go_on(msg, s, gc, next);
}

// A body that starts like a request line (a method, blanks, '/') whose line does not end in the
// window: a server that reads no body would read it, with what comes next, as a request the guard
// cannot read whole (red team: "DELETE /adm" at the end of a send, "in/x HTTP/1.1" in the next).
// A body that starts with a whole request line is refused too: such a server reads it, and every
// request behind it in the body, as requests, and the framing does not look inside a body.
static __always_inline int cut_request(const char *t, u32 line)
{
    u32 ml = http_method_len(t);
    return ml && !line && (t[(ml + 1) & AW_SCAN_MASK] == '/' || t[(ml + 1) & AW_SCAN_MASK] == ' ' ||
                           t[(ml + 1) & AW_SCAN_MASK] == '\t');
}

static __always_inline int refuse_cut(struct guard_conn *gc)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = tracked.lookup(&tgid);
    struct track_info anon = {.session = gc->session};
    unjudged(t ? t : &anon, AW_UNJUDGED_CUT);
    return SK_DROP;
}

// A send inside a request's body: refused when it starts with a whole HTTP/1 request line, or like
// one cut while the body goes on (cut_request); else a body like any other.
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
    struct guard_conn *bc = msg_conn(msg);
    if (bc && bc->skip && cut_request(e->text, line))   // the body goes on past this send
        return refuse_cut(bc);
    if (!http_method_len(e->text) || !line || line >= AW_HTTP_HEAD)
        return SK_PASS;   // a body like any other
    // a whole HTTP/1 request line: a server that reads no body takes it, and what follows it in
    // the body, for requests the framing does not see (red team: two requests in one body)
    return bc ? refuse_cut(bc) : SK_DROP;
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
    s->cork = !s->body_peek;   // a request must start here, unless this is a body looked into
    struct guard_conn *gc = msg_conn(msg);
    if (!gc)
        return SK_DROP;
    if (s->cork && h2_refused(e->text, e->len, s->session, gc))
        return SK_DROP;   // HTTP/2's preface after a framed request (an Upgrade: h2c)
    s->h_line = http1_line_end(e->text, e->len);
    asm volatile("" ::: "memory");
    u32 line = s->h_line;
    http_classify(e->text, line, s);
    if (s->body_peek) {
        // a body that starts with a whole HTTP/1 request line, or one cut at the end of the send
        // while the body goes on: refused (the requests a server that reads no body would find in
        // it are not framed); any other is a body ("SELECT 1"), and the framing goes on past it
        if ((http_method_len(e->text) && line && line < AW_HTTP_HEAD) ||
            (s->body_then > msg->size && cut_request(e->text, line)))
            return refuse_cut(gc);
        msg_progs.call(msg, AW_PROG_HTTP_NEXT);
        return out_of_calls(gc);
    }
    msg_progs.call(msg, AW_PROG_HTTP_MSG);
    return out_of_calls(gc);
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

// Where aw_msg_hello's walk is, in map memory: in registers every position is a verifier state of
// its own (past the 1M), as in the HTTP framing (scan_state).
struct hello_walk {
    u32 pos;
    u32 end;
    u32 short_run;   // aw_msg_route's: the kernel's message filled before a cork was met
    u32 rec;         // AW_TLS_HELLO: where the next record starts in this send (aw_msg_tlsrec)
    u32 base;        // where the ClientHello's record starts (aw_msg_hello)
    u32 apos, aend;  // its ALPN protocol names (0, 0: none)
    u32 vpos, vend;  // its supported_versions (0, 0: none)
    u32 early;       // it offers early data (0-RTT)
    u32 rend;        // where its record ends
};
BPF_PERCPU_ARRAY(hello_walks, struct hello_walk, 1);

// A connection's first bytes that look like TLS and cannot be read for what they open: refused in a
// session under SQL rules (aw_msg_hello), else let be as before.
static __always_inline int hello_unread(struct guard_conn *gc)
{
    if (!(cfg(AW_CFG_FLAGS) & AW_FLAG_SQL)) {
        gc->state = AW_PG_OTHER;
        return SK_PASS;
    }
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = tracked.lookup(&tgid);
    struct track_info anon = {.session = gc->session};
    unjudged(t ? t : &anon, AW_UNJUDGED_HELLO);
    return SK_DROP;
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
    if (gc->state == AW_TLS_HELLO) {   // the records after a ClientHello: aw_msg_hello
        u32 hz = 0;
        struct hello_walk *w = hello_walks.lookup(&hz);
        if (w) {
            w->short_run = short_run;
            w->rec = skip;
        }
        msg_progs.call(msg, AW_PROG_MSG_TLSREC);
        return hello_unread(gc);
    }
    // After an SSLRequest or a GSSENCRequest the server's answer is not seen here; what the client
    // sends next tells.  A TLS handshake (a record of type 22): TLS from now on, sent from inside a
    // watched OpenSSL or refused (tls_send).  Else only a StartupMessage in the clear (the server
    // said 'N') may follow: anything else is encrypted by something no guard reads (GSSAPI, or a
    // TLS whose first record is not a handshake), and is refused rather than let through unread.
    if (gc->state == AW_PG_TLS_ASKED || gc->state == AW_PG_GSS_ASKED) {
        if (gc->state == AW_PG_TLS_ASKED && len > 0 && (u8)e->text[0] == 22) {
            gc->state = AW_PG_TLS;
            return tls_send(msg, gc);
        }
        if (total < 8 && !short_run)
            return cork(msg, gc, 8);
        u32 code = len >= 8 ? be32(&e->text[4]) : 0;
        if (total == 8 && (code == 80877103 || code == 80877104)) {   // refused one, asks the other
            gc->state = code == 80877103 ? AW_PG_TLS_ASKED : AW_PG_GSS_ASKED;
            return SK_PASS;
        }
        if ((code >> 16) != 3) {
            struct track_info anon = {.session = gc->session};
            u32 tgid = bpf_get_current_pid_tgid() >> 32;
            struct track_info *t = tracked.lookup(&tgid);
            unjudged(t ? t : &anon, gc->state == AW_PG_GSS_ASKED ? AW_UNJUDGED_GSS : AW_UNJUDGED_TLS);
            return SK_DROP;
        }
        gc->state = AW_PG_UNKNOWN;   // the StartupMessage, framed as any connection's first
    }
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
            if (gc->state == AW_PG_UNKNOWN && h2_refused(e->text, len, gc->session, gc))
                return SK_DROP;   // HTTP/2's preface as a connection's first bytes
            http_classify(e->text, http1_line_end(e->text, len), hs);
            msg_progs.call(msg, AW_PROG_HTTP_MSG);
        }
        return SK_PASS;
    }
    if (gc->state == AW_PG_UNKNOWN) {
        // StartupMessage (protocol 3.0) starts a plain stream.  SSLRequest and
        // GSSENCRequest ask first: refused ('N'), the StartupMessage follows in
        // the clear; accepted, a TLS handshake follows (the SSL_write uprobe
        // covers TLS) and is not a StartupMessage, so the stream is let be.
        u32 code = len >= 8 ? be32(&e->text[4]) : 0;
        if (total == 8 && (code == 80877103 || code == 80877104)) {
            gc->state = code == 80877103 ? AW_PG_TLS_ASKED : AW_PG_GSS_ASKED;
            return SK_PASS;
        }
        if ((code == 80877103 || code == 80877104) && be32(&e->text[0]) == 8) {
            // more behind the request in the same send: read by a server that says 'N' as the
            // StartupMessage and what follows (fixed servers refuse it: CVE-2021-23214)
            struct track_info anon = {.session = gc->session};
            u32 tgid = bpf_get_current_pid_tgid() >> 32;
            struct track_info *t = tracked.lookup(&tgid);
            unjudged(t ? t : &anon, code == 80877103 ? AW_UNJUDGED_TLS : AW_UNJUDGED_GSS);
            return SK_DROP;
        }
        if ((u8)e->text[0] == 22) {   // a TLS handshake record: aw_msg_hello
            // its ClientHello is read whole, so a first send short of the record's header and the
            // hello's own waits for them (red team: a first send of one byte, 0x16, was judged on
            // what the scratch held after it)
            if (total < 9 && !short_run)
                return cork(msg, gc, 9);
            u32 hz = 0;
            struct hello_walk *w = hello_walks.lookup(&hz);
            if (w) {
                w->short_run = short_run;
                w->base = 0;
            }
            msg_progs.call(msg, AW_PROG_MSG_HELLO);
            return hello_unread(gc);
        }
        if ((code >> 16) != 3) {   // protocol 3.x: the server negotiates any minor (red team: 3.1)
            // capital letters the HTTP matcher does not take for a method (8 or more of them, '-',
            // '_': PROPFIND, M-SEARCH), which servers do: HTTP whose framing is not read, each send
            // that starts a request line judged alone (red team: a DELETE kept alive behind a
            // PROPFIND went unread, the connection taken for neither Postgres nor HTTP)
            // Lower case too (`get /x HTTP/1.1`: Go serves any token as a method).  This first send
            // is judged as any send of such a connection (aw_http_msg: refused when it is a request
            // line whose method the matcher does not read, under a rule that denies or holds)
            u8 r0 = e->text[0], c0 = r0 | 0x20;   // blanks first too: Python's http.server strips them
            gc->state = (c0 >= 'a' && c0 <= 'z') || r0 == ' ' || r0 == '\t' || r0 == 0x0b || r0 == 0x0c
                        ? AW_HTTP_LOOSE : AW_PG_OTHER;
            u32 hz = 0;
            struct scan_state *hs = scan_states.lookup(&hz);
            if (hs && gc->state == AW_HTTP_LOOSE) {
                hs->session = gc->session;
                hs->len = len;
                hs->cork = 0;
                http_classify(e->text, http1_line_end(e->text, len), hs);
                msg_progs.call(msg, AW_PROG_HTTP_MSG);
            }
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
        msg_progs.call(msg, AW_PROG_MSG_BEYOND);   // frames on past the window, then judges
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
    msg_progs.call(msg, AW_PROG_MSG_AMBIG);   // aw_msg_ambig, then the matcher
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
        msg_progs.call(msg, AW_PROG_MSG_AMBIG);
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
    msg_progs.call(msg, AW_PROG_SQL_MSG);
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
        msg_progs.call(msg, AW_PROG_SQL_MSG);
        s->unread = 1;    // out of tail calls: what is left was not read
    }
    if (s->unread)
        s->over |= cfg(AW_CFG_SQL_OPAQUE);
    struct op_result res = {};
    if (!sql_decide(s, &res))
        return SK_PASS;
    e = op_event(AW_G_SQL, &res, AW_DONE_REFUSED, s->session);
    if (e) {
        note_peer(e, msg);
        guard_send(e);
    }
    return SK_DROP;
}

// PostgreSQL 17's direct TLS (sslnegotiation=direct): the connection's first bytes are a
// ClientHello, with no SSLRequest before it, and the server takes it only when its ALPN offers
// "postgresql" (RFC 7301; the server refuses a direct handshake without it, so a client cannot
// leave it out).  Such a connection is Postgres over TLS (AW_PG_TLS): sent from inside a watched
// OpenSSL call, or refused (tls_send), as after an SSLRequest (red team: before, it was "not
// Postgres", and a Go or Node client's statements went through unread).  Any other ClientHello
// starts another protocol (HTTPS: its uprobes read it where its OpenSSL is watched), let be as
// before.  The offer is read from a ClientHello the guard reads whole, walked as a server walks it
// (session id, cipher suites, compression, then each extension to ALPN's protocol names): one
// record, in this send and in the window.  TLS lets a handshake message run across records (a
// server joins them), which could cut the offer in two, so a ClientHello that is not whole, or
// whose extensions the walk does not reach the end of, is refused in a session under SQL rules
// (hello_unread): a false refusal only of a client that cuts its ClientHello, which OpenSSL, Go,
// rustls, Java and Node do not.
#define AW_HELLO_EXTS 48     // extensions walked (Chrome sends about 18)
#define AW_ALPN_NAMES 16     // protocol names of ALPN read
static __always_inline u32 be16_at(const u8 *t, u32 pos)
{
    return ((u32)t[pos & AW_SCAN_MASK] << 8) | t[(pos + 1) & AW_SCAN_MASK];
}

// A HelloRetryRequest makes the client send a second ClientHello, in the clear, and the server
// takes that one's ALPN (red team: a first one offering nothing, then "postgresql", went through as
// "not Postgres").  So the records after the first ClientHello are walked until the client's first
// application data (TLS 1.3's Finished, or TLS 1.2's data: after it nothing is a ClientHello in the
// clear), and a ClientHello among them is read by aw_msg_hello as the first was.  Its own program:
// with the walk's offsets depending on where the record starts, aw_msg_hello went past the 1M.
int aw_msg_tlsrec(struct sk_msg_md *msg)
{
    struct guard_conn *gc = msg_conn(msg);
    u32 zero = 0;
    struct guard_event *e = guard_scratch.lookup(&zero);
    struct hello_walk *w = hello_walks.lookup(&zero);
    if (!gc || !e || !w)
        return SK_PASS;
    const u8 *t = (const u8 *)e->text;
    u32 len = e->len, total = msg->size;
    if (len > AW_SCAN)
        return hello_unread(gc);
    for (u32 k = 0; k < 8; k++) {
        u32 p = w->rec;
        if (p >= total) {                       // the send ends in (or at the end of) a record
            gc->skip = p - total;
            return SK_PASS;
        }
        if (p + 6 > len)                        // a record header the window does not hold
            return hello_unread(gc);
        u8 type = t[p & AW_SCAN_MASK];
        if (type == 23) {                       // application data: the handshake is over
            gc->state = AW_PG_OTHER;
            gc->skip = 0;
            return SK_PASS;
        }
        if (type == 22 && t[(p + 5) & AW_SCAN_MASK] == 1) {
            // a ClientHello, which must be whole in its record (aw_msg_hello): a server joins one
            // cut across records (red team: its first 4 bytes in a record of their own)
            w->base = p;
            msg_progs.call(msg, AW_PROG_MSG_HELLO);
            return hello_unread(gc);
        }
        w->rec = p + 5 + be16_at(t, p + 3);
    }
    return hello_unread(gc);                    // more records in one send than the walk reads
}

// A connection's first ClientHello (AW_PG_UNKNOWN, w->base 0), or a later one (AW_TLS_HELLO,
// w->base where its record starts, from aw_msg_tlsrec).
int aw_msg_hello(struct sk_msg_md *msg)
{
    struct guard_conn *gc = msg_conn(msg);
    u32 zero = 0;
    struct guard_event *e = guard_scratch.lookup(&zero);
    struct hello_walk *w = hello_walks.lookup(&zero);
    if (!gc || !e || !w)
        return SK_PASS;
    const u8 *t = (const u8 *)e->text;
    u32 len = e->len, total = msg->size;
    if (len > AW_SCAN)
        return hello_unread(gc);
    u32 base = 0;
    if (gc->state == AW_TLS_HELLO) {
        base = w->base & AW_SCAN_MASK;
    } else {
        if (len < 9)
            return hello_unread(gc);            // cut short of 9 bytes, and the kernel's message is full
        // not TLS: a record's major version is 3, and a server takes a ClientHello first (its type,
        // 1, is the record's first byte whatever the record holds of it; only an empty record
        // puts it in the next).  Neither Postgres nor HTTP: a MySQL client's handshake of 790
        // bytes starts 16 03 00 01 (its length, its number), and was refused under SQL rules.
        if (t[1] != 3 || (be16_at(t, 3) != 0 && t[5] != 1)) {
            gc->state = AW_PG_OTHER;
            return SK_PASS;
        }
    }
    u32 rec = be16_at(t, base + 3);
    u32 hs = ((u32)t[(base + 6) & AW_SCAN_MASK] << 16) | be16_at(t, base + 7);
    u32 rend = base + 5 + rec;                  // the record's end
    // the record cut across sends: it waits for the rest, when that fits the window
    if (rend > total && rend <= AW_SCAN && !w->short_run)
        return cork(msg, gc, rend);
    // a ClientHello fills its record exactly: one cut across records, or with more behind it in
    // the record (red team: a second hello, sent ahead in the first one's record, read by the
    // server after its HelloRetryRequest) is refused
    if (t[(base + 5) & AW_SCAN_MASK] != 1 || rend > len || hs + 4 != rec)
        return hello_unread(gc);
    u32 pos = base + 9 + 2 + 32;                // past the version and the random: the session id
    pos += 1 + t[pos & AW_SCAN_MASK];
    pos += 2 + be16_at(t, pos);                 // cipher suites
    pos += 1 + t[pos & AW_SCAN_MASK];           // compression methods
    w->pos = pos + 2;                           // past the extensions' length
    w->end = base + 9 + hs;                     // the ClientHello's end
    w->apos = w->aend = w->vpos = w->vend = w->early = 0;
    for (u32 k = 0; k < AW_HELLO_EXTS; k++) {
        u32 p = w->pos;
        if (p + 4 > w->end)
            break;
        u32 type = be16_at(t, p), elen = be16_at(t, p + 2);
        u32 stop = p + 4 + elen;                // (past the ClientHello: malformed, and refused by servers)
        stop = stop < w->end ? stop : w->end;
        if (type == 16) {                       // application_layer_protocol_negotiation: past its list's length
            w->apos = p + 6;
            w->aend = stop;
        } else if (type == 43) {                // supported_versions: past its list's length
            w->vpos = p + 5;
            w->vend = stop;
        } else if (type == 42) {                // early_data
            w->early = 1;
        }
        w->pos = p + 4 + elen;
    }
    if (w->pos + 4 <= w->end)
        return hello_unread(gc);                // more extensions than the walk reads
    w->rend = rend;
    msg_progs.call(msg, AW_PROG_MSG_ALPN);      // its own program: in this one, past the 1M
    return hello_unread(gc);
}

// What the ClientHello aw_msg_hello walked offers: "postgresql" among its ALPN names, early data,
// TLS 1.3; and so what the connection is.
int aw_msg_alpn(struct sk_msg_md *msg)
{
    struct guard_conn *gc = msg_conn(msg);
    u32 zero = 0;
    struct guard_event *e = guard_scratch.lookup(&zero);
    struct hello_walk *w = hello_walks.lookup(&zero);
    if (!gc || !e || !w)
        return SK_PASS;
    const u8 *t = (const u8 *)e->text;
    u32 total = msg->size, rend = w->rend;
    for (u32 n = 0; n < AW_ALPN_NAMES; n++) {   // each name, its length byte first
        u32 at = w->apos;
        if (at >= w->aend)
            break;
        u32 nl = t[at & AW_SCAN_MASK];
        if (nl == 10 && *(const u64 *)&t[(at + 1) & AW_SCAN_MASK] == 0x7365726774736f70ULL &&
            t[(at + 9) & AW_SCAN_MASK] == 'q' && t[(at + 10) & AW_SCAN_MASK] == 'l') {   // "postgresql"
            gc->state = AW_PG_TLS;
            return tls_send(msg, gc);
        }
        w->apos = at + 1 + nl;
    }
    if (w->apos < w->aend)
        return hello_unread(gc);                // more names than the walk reads
    // Early data (0-RTT) rejected by a server that then sent a HelloRetryRequest is skipped by it,
    // so the records after such a hello are not the client's alone to read (red team: an early
    // application-data record ended the watch below, and a second ClientHello offering
    // "postgresql" followed).  No client of a Postgres or HTTPS server the agent reaches needs
    // it: refused in a session under SQL rules.
    if (w->early)
        return hello_unread(gc);
    // Only TLS 1.3 has a HelloRetryRequest: a hello that does not offer it is followed by no
    // other ClientHello in the clear
    for (u32 n = 0; n < 16; n++) {
        u32 at = w->vpos;
        if (at + 2 > w->vend || (t[at & AW_SCAN_MASK] == 3 && t[(at + 1) & AW_SCAN_MASK] == 4))
            break;
        w->vpos = at + 2;
    }
    if (w->vpos + 2 > w->vend) {   // no 0x0304 among them (more than 16 read: taken as offered)
        gc->state = AW_PG_OTHER;
        return SK_PASS;
    }
    // no "postgresql" offered: HTTPS or another protocol, whose next records are walked in turn
    gc->state = AW_TLS_HELLO;
    gc->skip = 0;
    if (rend >= total)
        return SK_PASS;
    w->rec = rend;                              // more records in this send: walked from there
    msg_progs.call(msg, AW_PROG_MSG_TLSREC);
    return hello_unread(gc);
}

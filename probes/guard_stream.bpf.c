// guard_stream.bpf.c: what the SQL and HTTP matchers share.  Hashing (the same FNV-1a as
// enforce/sqlnorm.py), the matcher state carried between tail calls (scan_state, one per CPU),
// the tail-call slots of the sk_msg programs (msg_progs) and of the SSL_write uprobe
// (ssl_progs), which guard_msg.bpf.c and guard_tls.bpf.c enter, and the verdict of an
// operation, a statement or a request (op_result, op_event).
// Uses guard.bpf.c.

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
    u32 body_peek;   // aw_http_copy: looking into a body that starts in the send its headers came in
    u32 body_then;   // aw_http_copy: where that body ends: the framing goes on there (aw_http_next)
    u32 h_absolute;  // http_candidates: the target is in absolute form      (map memory, not registers:
    u32 h_known;     // http_candidates: a Host header with a name in it was read    a register live
    u32 h_http1;     // http_classify: " HTTP/1.x" at the line's end, or a target that is a path, '*'
                     // or has a scheme: an HTTP request, not a line protocol's (`SET k v`)
    u32 h_version;   // http_classify: the first line ends in " HTTP/1.x" (aw_http_unread)
    u32 h_line;      // http1_line_end of the request at hand (map memory: its exits, one state)
                     // across its loops doubled the verifier's states, past its 1M)
    u64 wh;          // hash of the current word (upper case)
    u64 first;       // hash of the statement's first word
};
BPF_PERCPU_ARRAY(scan_states, struct scan_state, 1);
// The tail-call slots of the stream programs: the sk_msg ones (the entry aw_sk_msg calls into them)
// and those of the SSL_write uprobe.  probes/guard.py MSG_PROGRAMS and SSL_PROGRAMS name the
// programs the loader puts in each slot, in this order (tests/test_twins.py compares them).
enum aw_msg_prog {
    AW_PROG_SQL_MSG = 0, AW_PROG_HTTP_MSG = 1, AW_PROG_MSG_ROUTE = 2, AW_PROG_MSG_BEYOND = 3,
    AW_PROG_MSG_AMBIG = 4, AW_PROG_HTTP_NEXT = 5, AW_PROG_HTTP_COPY = 6, AW_PROG_HTTP_LENGTH = 7,
    AW_PROG_HTTP_BODY = 8, AW_PROG_MSG_HELLO = 9, AW_PROG_MSG_TLSREC = 10, AW_PROG_MSG_ALPN = 11,
    AW_PROG_HTTP_UNREAD = 12,
};
enum aw_ssl_prog {
    AW_PROG_SQL_SSL = 0, AW_PROG_HTTP_SSL = 1, AW_PROG_SSL_AMBIG = 2, AW_PROG_SSL_DIGEST = 3, AW_PROG_SSL_FRAME = 4,
    AW_PROG_SSL_UNREAD = 5,
};
BPF_PROG_ARRAY(msg_progs, 13);
BPF_PROG_ARRAY(ssl_progs, 6);

// An operation the matchers judged, a statement or a request: the rule that decided, its action,
// and the hash an approval lets through (the statement's, or the request's key).
struct op_result {
    int rule;
    u32 action;
    u64 hash;
};

// The guard record of a judged operation, in the per-CPU scratch record (the caller adds the
// text and sends it).
static __always_inline struct guard_event *op_event(u32 what, struct op_result *res, u32 done,
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

// guard_http.bpf.c: the HTTP matcher.  A request's method, Host and path against the rules
// (http_candidates), git's judged transports, and the entries for one request in a send
// (aw_http_msg) and in SSL_write's plaintext (aw_http_ssl).
// Uses guard.bpf.c, guard_stream.bpf.c, guard_sql.bpf.c (the verdict record).

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

// A request line whose method http_method_len does not read (it reads 3 to 7 capital letters then
// a space or tab), as servers split it: Python's http.server on any whitespace its str.split()
// knows (a vertical tab, a form feed, 0x1c-0x1f, 0x85, 0xa0 too), Go and h11 any token for a method
// (`get`, `GET!`, `PROP~FIND`).  Refused (aw_http_unread) when its line ends in " HTTP/1.x"
// (http_classify's h_version), or its method is capital letters, '-' and '_' (PROPFIND,
// M-SEARCH) and its target a path or '*' (HTTP/0.9), or the whole send is such a method of 8 or
// more alone (red team: `PROPFIND` in one send, its target in the next).  Its host and path are not
// read in the kernel, so in a session under an HTTP rule that denies or holds it is refused whatever
// they are (red team: each of these reached a denied host).  A line of a text protocol with no
// "HTTP/" in it (memcached's `get /page/home`, a mail line with a URL, a body) is left alone.
// What each byte is to unread_request (probes/guard.py char_classes() fills it at the start): a
// table, so that the per-byte tests are loads and masks, not comparisons clang turns into branches
// (each a fork for the verifier: 24 bytes of them took it past 1M instructions)
#define AW_CH_BLANK 1   // whitespace to Python's str.split(), but CR and LF
#define AW_CH_TCHAR 2   // RFC 9110 tchar: a method's byte
#define AW_CH_UPPER 4   // A-Z, '-', '_': a method as nginx and WebDAV spell it
#define AW_CH_SYM 8     // '-', '_'
#define AW_CH_NL 16     // LF
struct char_classes { u8 c[256]; };
BPF_ARRAY(char_classes, struct char_classes, 1);
#define AW_UNREAD_METHOD 24   // bytes looked at for blanks, the method and the blank after it

static __always_inline u64 aw_zero(u64 d)   // 1 when d == 0, with no branch
{
    u64 nd = 0 - d;
    asm volatile("" : "+r"(nd));
    return ((d | nd) >> 63) ^ 1;
}

static __always_inline int unread_request(const char *t, u32 len, u64 version)
{
    u32 zero = 0;
    struct char_classes *cl = char_classes.lookup(&zero);
    if (!cl)
        return 0;
    u64 n = len;
    // blanks first (Python's http.server strips them), the method, the blank after it
    u64 ml = 0, bad = 0, seen = 0, upper = 1, dashed = 0, started = 0, lead = 0;
#pragma unroll
    for (u64 i = 0; i < AW_UNREAD_METHOD; i++) {
        u64 k = cl->c[(u8)t[i]];
        u64 inside = ((i - n) >> 63) & 1;   // i < n
        u64 blank = k & AW_CH_BLANK;
        u64 lead_blank = blank & (started ^ 1) & inside;
        lead += lead_blank;
        started |= (blank ^ 1) & inside;
        u64 before = (seen ^ 1) & inside & started;
        u64 word = before & (blank ^ 1);
        ml |= (0 - (blank & before)) & i;
        bad |= word & (((k >> 1) & 1) ^ 1);
        upper &= (word & (((k >> 2) & 1) ^ 1)) ^ 1;
        dashed |= word & (k >> 3);
        seen |= (blank & started) | (inside ^ 1);
        asm volatile("" : "+r"(ml), "+r"(bad), "+r"(seen), "+r"(upper), "+r"(dashed), "+r"(started), "+r"(lead));
    }
    if (!started)
        return 0;   // blanks only
    if (bad)
        return 0;
    if (!ml)   // no blank: a method alone in its send, its target to follow in the next
        return (((n - AW_UNREAD_METHOD - 1) >> 63) & upper & ((((7 + lead - n) >> 63) | dashed) & 1)) != 0;
    u64 ps = ml + 1;
#pragma unroll
    for (u32 q = 0; q < 4; q++) {
        ps += cl->c[(u8)t[ps & AW_SCAN_MASK]] & AW_CH_BLANK;
        asm volatile("" : "+r"(ps));
    }
    u64 t0 = (u8)t[ps & AW_SCAN_MASK];
    u64 slash = aw_zero(t0 ^ '/') | aw_zero(t0 ^ '*');
    return ((version & 1) | (upper & slash)) & 1;
}

// one small function per map: bcc rewrites map calls only outside macros
static __always_inline u64 method_rules(u64 k) { u64 *m = http_methods.lookup(&k); return m ? *m : 0; }
static __always_inline u64 host_rules(u64 k) { u64 *m = http_hosts.lookup(&k); return m ? *m : 0; }
static __always_inline u64 path_rules(u64 k) { u64 *m = http_paths.lookup(&k); return m ? *m : 0; }
static __always_inline u64 prefix_rules(u64 k) { u64 *m = http_prefixes.lookup(&k); return m ? *m : 0; }
static __always_inline u64 suffix_rules(u64 k) { u64 *m = http_suffixes.lookup(&k); return m ? *m : 0; }

// What http_candidates reads of a request it cannot read as an origin-form HTTP/1 request, set by
// the programs that hand it one (the matcher itself is at the verifier's limit), from where its
// request line ends (http1_line_end, which they have computed).  h_http1: an HTTP request, whose
// Host is read or else unknown (below; a line protocol's `SET k v` is not one).  h_absolute: its target
// does not start with '/' (or '*'): the absolute form (`DELETE http://host/x`, RFC 9112 3.2.2; any
// scheme, as nginx and Go take), whose host a server takes over the Host header and whose path
// follows the host, or more blanks before it than the matcher skips.  Neither is read in the
// kernel: its host and path are unknown, so every denying rule's host and path are taken to match
// (red team: read as a path, "http://a/admin/x" met no path rule and went through; so did
// "ftp://" and four blanks).  Only clients of a forward proxy send the absolute form.  CONNECT's
// authority form is left to its Host header: what goes through the tunnel is judged as it goes.
static __always_inline void http_classify(const char *t, u32 line, struct scan_state *s)
{
    u32 http1 = line && line < AW_HTTP_HEAD;
    u32 ml = http_method_len(t);
    u32 ps = ml + 1;
#pragma unroll
    for (u32 q = 0; q < 3; q++) {
        char c = t[ps & AW_SCAN_MASK];
        ps += c == ' ' || c == '\t';
    }
    u8 t0 = t[ps & AW_SCAN_MASK];
    u32 blank = (t0 == ' ') | (t0 == '\t');
    // "://" after a scheme of up to 8 characters: a target in absolute form, whatever ends the line
    // (red team: `GET http://secrets.internal/x HTTP/1.1 `, a blank after the version, which nginx
    // takes and routes by the target's host).  Arithmetic the compiler cannot turn into branches:
    // a branch here doubled aw_msg_route's verifier states, past the 1M.
    u64 scheme = 0;
#pragma unroll
    for (u32 k = 1; k < 9; k++) {
        u64 d = (*(const u32 *)&t[(ps + k) & AW_SCAN_MASK] & 0xffffff) ^ 0x2f2f3a;   // "://"
        u64 nd = 0 - d;
        asm volatile("" : "+r"(nd));
        scheme |= ((d | nd) >> 63) ^ 1;
    }
    u32 other = (t0 != '/') & (t0 != '*') & ((ml != 7) | (t[0] != 'C') | (t[1] != 'O'));
    // An HTTP request, whose Host is read or else unknown: its first line ends in " HTTP/1.x", or its
    // target is a path or '*' (whatever follows it: red team, HTTP/0.9's `GET /x`, `HTTP/2.0`,
    // `HTTP/001.1`, a blank after the version, a line longer than the window, each served with
    // the Host after it or without one), or has a scheme.  A line protocol's `SET k v` is none.
    u64 o1 = (u64)(t0 ^ '/'), o2 = (u64)(t0 ^ '*');
    u64 n1 = 0 - o1, n2 = 0 - o2;
    asm volatile("" : "+r"(n1), "+r"(n2));
    u64 origin = (((o1 | n1) >> 63) ^ 1) | (((o2 | n2) >> 63) ^ 1);
    s->h_http1 = http1 | (u32)origin | (u32)scheme;
    s->h_version = http1;
    s->h_absolute = ml && (blank | (http1 & other) | (u32)scheme);
}

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
    // the target's kind and whether this is an HTTP/1 request: the callers' (http_classify), in
    // map memory; what they decide is applied branch-free below
    u32 zero = 0;
    struct scan_state *hv = scan_states.lookup(&zero);
    if (!hv)
        return 0;
    hv->h_known = 0;
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
    // the Host header: a line starting "host:" (any case), blanks, the name up to ':' or a
    // blank or control byte.  One pass whose index is the loop counter: a second loop starting
    // where this one stopped would be verified once per possible start.  Not found in the first
    // AW_HTTP_HEAD bytes (red team: Host after 300 bytes of another header), or not there at all
    // (red team: a server's default site answers a request that names none), or empty: the host
    // is unknown, and every denying rule's host is taken to match.  A trailing dot ("a.b." is
    // "a.b" to DNS and nginx) is in the rule maps as a spelling of its own (enforce/kernel.py).
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
            if (t[k + 1] == '\r' || t[k + 1] == '\n')
                break;   // the blank line: no Host header, so no host is known (below)
            if ((t[k + 1] | 0x20) == 'h' && (t[k + 2] | 0x20) == 'o' && (t[k + 3] | 0x20) == 's' &&
                (t[k + 4] | 0x20) == 't' && t[k + 5] == ':')
                mode = 1;
        } else if (mode == 1) {
            if (c == ':')
                mode = 2;
        } else {
            if (mode == 2 && (c == ' ' || c == '\t'))
                continue;
            // any blank or control byte ends the name, as servers trim the blanks after it (red
            // team: "secrets.internal<TAB>"); an empty value is not a known host (red team: the
            // value folded onto the next line, which Python's http.server joins)
            if (c <= ' ' || c == ':') {
                hosts = host_rules(hh);
                hkey = hh;
                hv->h_known = mode == 3;
                break;
            }
            mode = 3;
            hh = fnv(hh, (c >= 'A' && c <= 'Z') ? c + 32 : c);
        }
    }
    // branch-free: a branch here doubled the states of all that follows (first_rule's loop)
    // and only the rules that deny or hold: an allowing rule is never met by what was not read
    u64 absolute = hv->h_absolute & 1, unknown = absolute | ((hv->h_http1 & 1) & ((hv->h_known & 1) ^ 1));
    u64 deny = cfg(AW_CFG_HTTP_DENY);
    paths |= (0 - absolute) & deny;
    hosts |= (0 - unknown) & deny;
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

// A send the guard ran out of tail calls on (33 a send: about eight pipelined requests): what is
// left of it was not judged, so it is refused, not let through (red team: eight GETs, then a
// DELETE, in one send).
static __always_inline int out_of_calls(struct guard_conn *gc)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = tracked.lookup(&tgid);
    struct track_info anon = {.session = gc->session};
    gc->state = AW_HTTP_LOOSE;
    unjudged(t ? t : &anon, AW_UNJUDGED_DEPTH);
    return SK_DROP;
}

// HTTP/2's connection preface ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n": prior knowledge, after an
// Upgrade to h2c, and over TLS once ALPN chose h2) starts with these 8 bytes (a little-endian load).
// What follows it are frames whose headers are HPACK-coded (Huffman strings, a table each
// connection builds): the matcher reads none of them, so before this every HTTP/2 request passed
// the HTTP rules and was judged after the fact (red team: `curl https://…/admin/x`, which offers h2
// by default, reached a denied path).  In a session under an HTTP rule that denies or holds the
// preface is refused (AW_UNJUDGED_HTTP2), so no request of the connection goes out.  Where a request
// or the connection starts only: a body that starts with those bytes is not a preface (red team: a
// chunked body, and a TLS write of a body, were refused as one).  Over TLS, where each write is
// judged alone, a connection's first write that is the preface's start cut short is refused as the
// whole would be ("PRI * H", or "P", then the rest in later writes reached a denied path: red team):
// a false refusal only of a client whose first write is a method's first letters alone.
#define AW_H2_PREFACE 0x5448202a20495250ULL   // "PRI * HT"
static __always_inline int h2_preface(const char *t, u32 len)   // over TCP a start under 8 bytes is corked
{
    return len >= 8 && *(const u64 *)t == AW_H2_PREFACE;
}

// The preface at a request start of a send, in a session under an HTTP rule that denies or holds:
// refused (aw_msg_route for a connection's first bytes, aw_http_copy for a start after a framed
// body; not in aw_http_msg, at the verifier's limit).
static __always_inline int h2_refused(const char *t, u32 len, u32 session, struct guard_conn *gc)
{
    if (!h2_preface(t, len) || !(cfg(AW_CFG_HTTP_DENY) & session_mask(session)))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t0 = tracked.lookup(&tgid);
    struct track_info anon = {.session = gc->session};
    gc->state = AW_HTTP_LOOSE;
    unjudged(t0 ? t0 : &anon, AW_UNJUDGED_HTTP2);
    return 1;
}

static __always_inline int h2_preface_start(const char *t, u32 len)   // over TLS: a write is judged alone
{
    u64 mask = len >= 8 ? ~0ULL : (1ULL << ((len & 7) * 8)) - 1;
    return len >= 1 && ((*(const u64 *)t ^ AW_H2_PREFACE) & mask) == 0;
}

// A send that does not start with a method the matcher reads: aw_http_unread judges it, in a
// session under a rule that denies or holds (a program of its own: aw_http_msg is at the
// verifier's limit).
static __always_inline int unread_method(struct sk_msg_md *msg, struct scan_state *s, struct guard_conn *gc)
{
    if (!(cfg(AW_CFG_HTTP_DENY) & session_mask(s->session)))
        return SK_PASS;
    msg_progs.call(msg, AW_PROG_HTTP_UNREAD);
    return out_of_calls(gc);
}

int aw_http_unread(struct sk_msg_md *msg)
{
    u32 zero = 0;
    struct guard_event *e = guard_scratch.lookup(&zero);
    struct guard_conn *gc = msg_conn(msg);
    struct scan_state *s = scan_states.lookup(&zero);
    if (!e || !gc || !s || !unread_request(e->text, s->len, s->h_version))
        return SK_PASS;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_info *t = tracked.lookup(&tgid);
    struct track_info anon = {.session = gc->session};
    unjudged(t ? t : &anon, AW_UNJUDGED_METHOD);
    return SK_DROP;
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
            msg_progs.call(msg, AW_PROG_HTTP_NEXT);
            return out_of_calls(gc);
        }
        if ((rest < 8 && could_start(e->text, s->len)) ||
            (rest < AW_HTTP_HEAD && http_incomplete(e->text, s->len))) {
            gc->cork = msg->size + 1;   // the request line or headers go on in the next send
            bpf_msg_cork_bytes(msg, msg->size + 1);
            return SK_PASS;
        }
        if (!http_method_len(e->text)) {
            gc->state = AW_HTTP_LOOSE;   // not a request line where one must start
            return unread_method(msg, s, gc);
        }
    } else if (!http_method_len(e->text)) {
        return unread_method(msg, s, gc);
    }
    struct guard_rule r = {};
    u64 key = 0;
    int idx = http_decide(e->text, s->len, s->session, &r, &key);
    if (idx >= 0) {
        struct op_result res = {.rule = idx, .action = r.action, .hash = key};
        e = op_event(AW_G_HTTP, &res, AW_DONE_REFUSED, s->session);
        if (e) {
            note_peer(e, msg);
            guard_send(e);
        }
        return SK_DROP;
    }
    if (s->cork) {
        s->advance = 0;
        msg_progs.call(msg, AW_PROG_HTTP_NEXT);   // where the next request starts
        return out_of_calls(gc);
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
    struct op_result res = {.rule = idx, .action = r.action, .hash = key};
    e = op_event(AW_G_HTTP_TLS, &res, AW_DONE_KILLED, s->session);
    if (e)
        guard_send(e);
    return 0;
}

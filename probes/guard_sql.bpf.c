// guard_sql.bpf.c: the SQL matcher.  Statements scanned word by word (their first words' hashes
// against the rules' commands, the whole statement's hash for approvals), Postgres messages
// framed into regions, and the verdict record.  Transport-free: guard_msg.bpf.c runs it on a
// TCP send, guard_tls.bpf.c on SSL_write's plaintext.
// Uses guard.bpf.c, guard_stream.bpf.c.

static __always_inline void flag_statement(struct scan_state *s, u64 any)
{
    u64 c2 = s->cand | any;
    if (!s->nonempty || !c2)
        return;
    u32 k = s->nflag;
    if (k < AW_MAX_FLAGGED) {
        s->fl_cand[k & (AW_MAX_FLAGGED - 1)] = c2;
        s->fl_hash[k & (AW_MAX_FLAGGED - 1)] = s->h;
        s->nflag = k + 1;
    } else {
        s->over |= c2;
    }
}

#define AW_H_COPY 0x2011c49c7ce10124ULL      // fnv("COPY"), checked by tests/test_kernel_plan.py
#define AW_H_PROGRAM 0xbdd0373600e34f6bULL   // fnv("PROGRAM")

static __always_inline void end_word(struct scan_state *s)
{
    if (!s->in_word)
        return;
    s->in_word = 0;
    s->words++;
    if (s->words == 1)
        s->first = s->wh;
    else if (s->first == AW_H_COPY && s->wh == AW_H_PROGRAM)
        s->cand |= cfg(AW_CFG_SQL_OPAQUE);   // COPY ... PROGRAM runs a shell command on the server
    if (s->head && s->words <= 3) {
        u64 h = s->h;
        u64 *m = sql_cmds.lookup(&h);
        if (m)
            s->cand |= *m;
    }
}

static __always_inline void new_statement(struct scan_state *s)
{
    s->words = 0; s->head = 1; s->pend = 0; s->nonempty = 0; s->h = AW_FNV_OFF; s->cand = 0;
    s->in_word = 0;
}

// Statement text normalised as enforce/sqlnorm.py does: comments and whitespace
// runs become one space, words outside quotes are upper-cased, `;` splits
// statements.  The hash of a statement's leading words (up to three) selects
// candidate rules; the hash of the whole statement identifies it for approvals.
// Scans text[pos, pos + AW_CHUNK_SCAN) of the regions (Query text, or Parse text
// after the statement name).  Returns 1 when there is more to scan.
static __always_inline int scan_chunk(struct scan_state *s, const char *b)
{
    u64 any = cfg(AW_CFG_SQL_ANY);
    u32 start = s->pos;
    for (u32 k = 0; k < AW_CHUNK_SCAN; k++) {
        u32 i = start + k;
        if (i >= s->len || i >= AW_SCAN)
            break;
        s->pos = i + 1;
        if (!s->in_reg) {
            u32 r = s->reg;
            if (r >= s->nregions || r >= AW_MAX_MSGS)
                return 0;
            u32 packed = s->regions[r & (AW_MAX_MSGS - 1)];
            if (i < (packed & 0xffff))
                continue;
            s->in_reg = 1;
            s->name = packed >> 31;
            s->reg_end = (packed >> 16) & 0x7fff;
            s->reg = r + 1;
            s->st = 0; s->depth = 0; s->skip = 0;
            new_statement(s);
        }
        u32 at = i;
        asm volatile("" : "+r"(at));   // keep the mask: the verifier needs it, clang thinks not
        u8 c = b[at & AW_SCAN_MASK];
        // never past the text: no NUL is written after it (a write indexed by the
        // length would make the verifier walk the rest once per possible length)
        u8 n = i + 1 < s->len ? b[(at & AW_SCAN_MASK) + 1] : 0;
        int end = c == 0 || i + 1 >= s->reg_end;
        u32 st = s->st;
        if (s->skip) {
            s->skip = 0;
        } else if (s->name) {
            if (c == 0) {
                s->name = 0;
                end = i + 1 >= s->reg_end;
            }
        } else if (st == 0) {
            // `$` continues an identifier (x$$ is a name, as in PostgreSQL's lexer): no dollar quote
            int w = word_char(c) | ((c == '$') & (s->in_word != 0));
            if (!w)
                end_word(s);
            if (c == 0 || c == ';') {
                // the statement ends below
            } else if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
                s->pend = s->nonempty;
            } else if ((c == '-' && n == '-') || (c == '/' && n == '*')) {
                s->pend = s->nonempty;
                s->st = c == '-' ? 3 : 4;
                s->depth = 1;
                s->skip = 1;
            } else {
                if (!w)
                    s->head = 0;
                u64 h = s->h;
                if (s->pend) {
                    h = fnv(h, ' ');
                    s->pend = 0;
                }
                if (w && !s->in_word)
                    s->wh = AW_FNV_OFF;
                if (w)
                    s->wh = fnv(s->wh, (c >= 'a' && c <= 'z') ? c - 32 : c);
                s->in_word |= w;
                h = fnv(h, (c >= 'a' && c <= 'z') ? c - 32 : c);
                s->nonempty = 1;
                if (c == '\'')
                    s->st = 1;
                else if (c == '"')
                    s->st = 2;
                else if (c == '$' && n == '$' && !w) {
                    s->st = 5;
                    h = fnv(h, '$');
                    s->skip = 1;
                }
                s->h = h;
            }
            if (c == ';' || end) {
                end_word(s);
                flag_statement(s, any);
                new_statement(s);
            }
        } else if (st == 1 || st == 2 || st == 5) {
            if (c) {
                u64 h = fnv(s->h, c);
                if ((st == 1 && c == '\'') || (st == 2 && c == '"'))
                    s->st = 0;
                if (st == 5 && c == '$' && n == '$') {
                    h = fnv(h, '$');
                    s->skip = 1;
                    s->st = 0;
                }
                s->h = h;
            }
        } else if (st == 3) {
            if (c == '\n' || c == '\r')   // the server's comment ends at either (red team: CR)
                s->st = 0;
        } else if (st == 4) {
            if (c == '*' && n == '/') {
                s->skip = 1;
                if (--s->depth == 0)
                    s->st = 0;
            } else if (c == '/' && n == '*') {
                s->depth++;
                s->skip = 1;
            }
        }
        if (end) {
            if (s->st != 0 || s->name) {   // text ended inside a quote or comment: still a statement
                end_word(s);
                flag_statement(s, any);
                new_statement(s);
            }
            s->in_reg = 0;
        }
    }
    return s->pos < s->len && s->pos < AW_SCAN && s->reg <= s->nregions &&
           (s->in_reg || s->reg < s->nregions);
}


// The flagged statements, in order: the first one an exact rule denies (and no
// approval covers) decides.
static __always_inline int sql_decide(struct scan_state *s, struct op_result *res)
{
    u64 mask = session_mask(s->session);
    u64 now = bpf_ktime_get_boot_ns();
    for (int k = 0; k < AW_MAX_FLAGGED + 1; k++) {
        u64 c2, hh = 0;
        if (k < AW_MAX_FLAGGED) {
            if (k >= s->nflag)
                continue;
            c2 = s->fl_cand[k];
            hh = s->fl_hash[k];
        } else {
            c2 = s->over;
        }
        c2 &= mask;
        struct guard_rule r = {};
        u32 exact = 0;
        int idx = first_rule(c2, &r, &exact);
        if (idx < 0 || !exact || !denies(r.action))
            continue;
        if (hh) {
            struct allow_key ak = {.session = s->session, .hash = hh};
            u64 *until = sql_allow.lookup(&ak);
            if (until && *until > now)
                continue;
        }
        res->rule = idx;
        res->action = r.action;
        res->hash = hh;
        return 1;
    }
    return 0;
}

#define AW_PG_MAX_MSG 0x40000000   // PostgreSQL's own limit on a message (MaxAllocSize)

// Frame the Postgres messages of one send held in e->text[0..len) into s->regions;
// `skip` bytes belong to a message begun in an earlier send.  Returns the bytes
// the last message still owes to the next send.
//
// An agent cuts its messages where a matcher reading one send at a time would lose them
// (red team: a header cut after its type byte, one byte a send, a statement behind a message
// longer than the window).  So the framing never guesses: a send that ends inside a header,
// or inside a Query/Parse that fits in the window, sets s->cork (the size the send must reach,
// which sk_msg waits for with bpf_msg_cork_bytes); a header past the copied window sets
// s->beyond (sk_msg reads it there); a statement past the window, or a length no client sends,
// sets s->unread (opaque: it meets every denying rule).
static __always_inline u32 pg_regions(struct guard_event *e, struct scan_state *s, u32 len, u32 total,
                                      u32 skip)
{
    u32 off = skip;
    u32 owed = 0;
    s->nregions = 0;
    s->cork = 0;
    s->beyond = 0;
    s->q_lo = 0;
    s->q_hi = 0;
    for (int k = 0; k < AW_MAX_MSGS; k++) {
        if (off >= total)
            break;
        if (off + 5 > len) {
            if (len >= total)
                s->cork = off + 5;   // the send ends inside a header
            else
                s->beyond = off;     // the copied window does
            break;
        }
        u8 type = e->text[off & AW_SCAN_MASK];
        u32 mlen = be32(&e->text[(off + 1) & AW_SCAN_MASK]);
        if (mlen - 4 > AW_PG_MAX_MSG - 4) {   // below 4 or above the limit
            s->nregions = 0;
            s->unread = 1;         // not a Postgres stream as the server reads it
            return 0;
        }
        u32 next = off + 1 + mlen;
        u32 end = next < len ? next : len;
        int text = type == 'Q' || type == 'P';
        if (text && next > len) {
            if (next > total && next <= AW_SCAN) {
                s->cork = next;        // a statement that ends in a later send, and fits: wait for it
                owed = next - total;   // (a TLS write cannot wait: it frames on from here)
                break;
            }
            s->unread = 1;   // the statement continues past what was copied
        }
        // only statements are regions: a region of nothing to scan would stop the scan there
        // (red team: `Sync` then `Query` in one send hid the Query)
        if (type == 'Q') {   // only a Query can hold more than one statement
            if (!s->q_hi)
                s->q_lo = off + 5;
            s->q_hi = end;
        }
        if (text) {
            u32 r = s->nregions;
            s->regions[r & (AW_MAX_MSGS - 1)] =
                ((off + 5) & 0xffff) | ((end & 0x7fff) << 16) | (type == 'P' ? 0x80000000u : 0);
            s->nregions = r + 1;
        }
        if (next > total) {
            owed = next - total;
            break;
        }
        off = next;
        if (k == AW_MAX_MSGS - 1 && off < total)
            s->unread = 1;   // more messages than the matcher frames
    }
    return owed;
}

static __always_inline struct scan_state *scan_begin(u64 session, u32 len)
{
    u32 zero = 0;
    struct scan_state *s = scan_states.lookup(&zero);
    if (!s)
        return NULL;
    s->session = session;
    s->over = 0;
    s->reg = 0; s->in_reg = 0; s->name = 0; s->reg_end = 0;
    s->pos = 0; s->len = len; s->nflag = 0;
    s->st = 0; s->depth = 0; s->skip = 0;
    s->unread = 0; s->wh = 0; s->first = 0;
    s->cork = 0; s->beyond = 0;
    s->h_http1 = 0;   // over TLS a request is judged alone and as before (no http_classify)
    s->h_absolute = 0;
    new_statement(s);
    return s;
}

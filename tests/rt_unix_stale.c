// False kill: a thread's Unix connect failed (ENOENT: no marker removal), then the same thread makes a
// TCP connect that blocks (a full accept queue); another thread forks.
//   rt_unix_stale PATH
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile int state;
static char *path;
static struct sockaddr_in lsa;
static void *client(void *a)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    int r = connect(s, (struct sockaddr *)&sa, sizeof sa);
    fprintf(stderr, "unix connect %d errno %d\n", r, errno);
    close(s);
    state = 1;
    int t = socket(AF_INET, SOCK_STREAM, 0);
    r = connect(t, (struct sockaddr *)&lsa, sizeof lsa);   // blocks: the accept queue is full
    fprintf(stderr, "tcp connect %d errno %d\n", r, errno);
    return a;
}

int main(int argc, char **argv)
{
    path = argv[1];
    (void)argc;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    lsa.sin_family = AF_INET;
    lsa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(l, (struct sockaddr *)&lsa, sizeof lsa);
    socklen_t sl = sizeof lsa;
    getsockname(l, (struct sockaddr *)&lsa, &sl);
    listen(l, 0);
    for (int i = 0; i < 3; i++) {    // fill the accept queue
        int f = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        connect(f, (struct sockaddr *)&lsa, sizeof lsa);
    }
    usleep(100000);
    pthread_t t;
    pthread_create(&t, 0, client, 0);
    while (!state)
        ;
    usleep(300000);
    pid_t c = fork();
    if (c == 0)
        _exit(0);
    int st = 0;
    waitpid(c, &st, 0);
    printf("child status %d\n", st);
    fflush(stdout);
    _exit(0);
}

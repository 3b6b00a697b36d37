// False kill: a thread's connect() to a Unix socket failed (no server: ECONNREFUSED/ENOENT) and it
// computes (no system call since); another thread forks a child: the fork check reads the saved
// orig_ax (42) of the computing thread and an unconnected socket, and would kill the child (it does
// not: a timer interrupt in user mode rewrites the saved orig_ax).
//   rt_unix_failed PATH
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile int failed, stop;
static char *path;
static void *client(void *a)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    int r = connect(s, (struct sockaddr *)&sa, sizeof sa);
    failed = r ? errno : -1;
    while (!stop)          // work before the retry (no system call)
        __asm__ volatile("" ::: "memory");
    close(s);
    return a;
}

int main(int argc, char **argv)
{
    path = argv[1];
    pthread_t t;
    pthread_create(&t, 0, client, 0);
    while (!failed)
        ;
    usleep(100000);
    pid_t c = fork();
    if (c == 0)
        _exit(0);
    int st = 0;
    waitpid(c, &st, 0);
    stop = 1;
    pthread_join(t, 0);
    printf("connect errno %d child status %d\n", failed, st);
    return 0;
}

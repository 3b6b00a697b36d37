// False refusals: an ordinary threaded client of a Unix stream server (not Postgres).
//   rt_unix_churn PATH N churn   one thread creates and joins threads in a loop (a thread pool's churn)
//                      while the main thread makes N connects: copy_process counts the new
//                      thread in files->count before nr_threads
//   rt_unix_churn PATH N lsof    single-threaded N connects while the test reads /proc/PID/fd/* (lsof, ss -p)
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static volatile int stop;
static void *nothing(void *a) { return a; }
static void *churn(void *a)
{
    while (!stop) {
        pthread_t t;
        if (pthread_create(&t, 0, nothing, 0) == 0)
            pthread_join(t, 0);
    }
    return a;
}

int main(int argc, char **argv)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, argv[1], sizeof sa.sun_path - 1);
    int n = atoi(argv[2]);
    pthread_t th;
    if (!strcmp(argv[3], "churn"))
        pthread_create(&th, 0, churn, 0);
    else
        usleep(500000);
    int ok = 0, eperm = 0, other = 0;
    for (int i = 0; i < n; i++) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0)
            ok++;
        else if (errno == EPERM)
            eperm++;
        else
            other++;
        close(s);
    }
    stop = 1;
    printf("ok %d eperm %d other %d\n", ok, eperm, other);
    return 0;
}

// False kill: a process whose threads block in a 32-bit socketcall (int $0x80, any operation: here
// accept on a TCP listener) is read by the fork check as two threads "in connect"; a fork kills the child.
//   rt_unix_compat NTHREADS
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned *args;
static void *acceptor(void *a)
{
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(102), "b"(5), "c"(args) : "memory");
    return a;
}

int main(int argc, char **argv)
{
    int n = atoi(argv[1]);
    (void)argc;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(l, (struct sockaddr *)&sa, sizeof sa);
    listen(l, 8);
    args = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    args[0] = l;
    args[1] = 0;
    args[2] = 0;
    pthread_t t;
    for (int i = 0; i < n; i++)
        pthread_create(&t, 0, acceptor, 0);
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

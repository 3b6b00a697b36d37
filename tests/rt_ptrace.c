// A tracked agent's tracer: seize an outside process, stop it (PTRACE_INTERRUPT), rewrite its
// registers to execve("/usr/bin/touch", {"touch", PATH}), then let it run again either by
// PTRACE_DETACH (mode detach: the waker is the tracked tracer) or by simply exiting (mode exit:
// the kernel wakes the tracee from the tracer's exit_notify, after sched_process_exit removed
// the tracer from `tracked`).
// usage: ptx PID detach|exit PATH
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

static void poke_bytes(pid_t pid, uint64_t addr, const void *p, size_t n)
{
    for (size_t i = 0; i < n; i += 8) {
        uint64_t w = 0;
        memcpy(&w, (const char *)p + i, n - i < 8 ? n - i : 8);
        if (ptrace(PTRACE_POKEDATA, pid, addr + i, w) != 0) { perror("poke"); exit(1); }
    }
}

int main(int argc, char **argv)
{
    pid_t pid = atoi(argv[1]);
    const char *mode = argv[2], *path = argv[3];
    if (ptrace(PTRACE_SEIZE, pid, 0, 0) != 0) { perror("seize"); return 1; }
    if (ptrace(PTRACE_INTERRUPT, pid, 0, 0) != 0) { perror("interrupt"); return 1; }
    int st;
    if (waitpid(pid, &st, __WALL) != pid) { perror("waitpid"); return 1; }
    struct user_regs_struct r;
    ptrace(PTRACE_GETREGS, pid, 0, &r);
    errno = 0;
    uint64_t ins = ptrace(PTRACE_PEEKTEXT, pid, r.rip - 2, 0);
    printf("stopped: status %#x rip %#llx insn %#x orig_rax %lld\n", st, r.rip, (unsigned)(ins & 0xffff), r.orig_rax);
    if ((ins & 0xffff) != 0x050f) { printf("not after a syscall\n"); return 1; }
    uint64_t base = (r.rsp - 8192) & ~15ULL;
    const char *prog = "/usr/bin/touch", *a0 = "touch";
    uint64_t p_prog = base, p_a0 = base + 64, p_path = base + 128, p_argv = base + 1024;
    poke_bytes(pid, p_prog, prog, strlen(prog) + 1);
    poke_bytes(pid, p_a0, a0, strlen(a0) + 1);
    poke_bytes(pid, p_path, path, strlen(path) + 1);
    uint64_t av[3] = {p_a0, p_path, 0};
    poke_bytes(pid, p_argv, av, sizeof(av));
    r.rip -= 2;
    r.rax = 59;
    r.orig_rax = -1;
    r.rdi = p_prog;
    r.rsi = p_argv;
    r.rdx = 0;
    r.rsp = base - 256;
    if (ptrace(PTRACE_SETREGS, pid, 0, &r) != 0) { perror("setregs"); return 1; }
    printf("registers set, resuming by %s\n", mode);
    fflush(stdout);
    if (!strcmp(mode, "detach"))
        ptrace(PTRACE_DETACH, pid, 0, 0);
    _exit(0);   // mode exit: the kernel detaches and wakes the tracee in our exit
}

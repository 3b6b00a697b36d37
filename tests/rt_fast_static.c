/* A static program with no libc that creates TARGET at its first instruction, and PAD MiB of code
   (the daemon hashes a new program's code before it decides: the decision comes that much later). */
#ifndef PAD
#define PAD 1
#endif
#define STR2(x) #x
#define STR(x) STR2(x)
asm(".section .text.pad,\"ax\",@progbits\n.fill " STR(PAD) "*1048576,1,0x90\n.text\n");
static long sys3(long n, long a, long b, long c) {
    long r;
    asm volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
void _start(void) {
    sys3(85 /* creat */, (long)TARGET, 0644, 0);
    sys3(60 /* exit */, 0, 0, 0);
}

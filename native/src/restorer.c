/* The restorer blob: position-independent, no libc, no data, no relocations.
 *
 * Built by native/build.py into a flat binary whose first byte is restorer_entry, copied into a
 * stopped stub's scratch mapping, and entered by the tracer with rdi = the argument block and rsp
 * at the top of a stack in the same mapping. It runs the syscall program in the block (see
 * restorer.h) and ends in int3 — never returns — whether the program succeeded or not; the tracer
 * reads `failed_op`/`result` to learn which.
 */
#include "restorer.h"

static inline long raw_syscall6(long nr, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

#define NR_PREAD64 17
#define NR_LSEEK 8
#define NR_CLOSE 3
#define NR_OPENAT 257
#define NR_DUP3 292
#define AT_FDCWD_ (-100)
#define O_CLOEXEC_ 02000000
#define EINTR_ 4

static long pread_fully(long fd, uint64_t addr, uint64_t len, uint64_t off)
{
    while (len) {
        long n = raw_syscall6(NR_PREAD64, fd, (long)addr, (long)len, (long)off, 0, 0);
        if (n == -EINTR_)
            continue;
        if (n < 0)
            return n;
        if (n == 0)
            return -5; /* EIO: the segment ended before the VMA was filled */
        addr += (uint64_t)n;
        off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

/* open + move to the captured fd number (open may already return that number) + seek */
static long open_fd(uint64_t path, long flags, long fd, long pos)
{
    long got = raw_syscall6(NR_OPENAT, AT_FDCWD_, (long)path, flags, 0, 0, 0);
    if (got < 0)
        return got;
    if (got != fd) {
        long r = raw_syscall6(NR_DUP3, got, fd, flags & O_CLOEXEC_, 0, 0, 0);
        raw_syscall6(NR_CLOSE, got, 0, 0, 0, 0, 0);
        if (r < 0)
            return r;
    }
    long r = raw_syscall6(NR_LSEEK, fd, pos, 0 /* SEEK_SET */, 0, 0, 0);
    return r < 0 && r != -29 /* ESPIPE: not seekable, nothing to restore */ ? r : 0;
}

static long run_op(const struct thaw_restorer_op *op, long saved)
{
    long a0 = (op->flags & THAW_OPF_ARG0_SAVED) ? saved : (long)op->args[0];
    if (op->kind == THAW_OP_PREAD)
        return pread_fully(a0, op->args[1], op->args[2], op->args[3]);
    if (op->kind == THAW_OP_PAUSE) {
        __asm__ volatile("int3" ::: "memory");
        return 0;
    }
    if (op->kind == THAW_OP_OPEN_FD)
        return open_fd(op->args[0], (long)op->args[1], (long)op->args[2], (long)op->args[3]);
    return raw_syscall6((long)op->nr, a0, (long)op->args[1], (long)op->args[2], (long)op->args[3],
                        (long)op->args[4], (long)op->args[5]);
}

__attribute__((section(".text.entry"), noreturn, used)) void restorer_entry(struct thaw_restorer_args *a)
{
    const struct thaw_restorer_op *ops = (const struct thaw_restorer_op *)a->ops;
    long saved = 0;
    a->failed_op = -1;
    a->result = 0;
    for (uint64_t i = 0; i < a->nops; i++) {
        const struct thaw_restorer_op *op = &ops[i];
        long r = run_op(op, saved);
        if (r < 0 && r > -4096 && !(op->flags & THAW_OPF_ALLOW_ERROR)) {
            a->failed_op = (int64_t)i;
            a->result = r;
            break;
        }
        if (op->flags & THAW_OPF_SAVE)
            saved = r;
        if (op->flags & THAW_OPF_STORE32)
            *(volatile uint32_t *)op->store = (uint32_t)r;
        a->done = i + 1;
    }
    for (;;)
        __asm__ volatile("int3");
}

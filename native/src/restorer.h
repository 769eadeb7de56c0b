/* The restorer's argument block, shared by the blob (restorer.c) and Python (snapshot/restore.py).
 *
 * The restore is a *program of syscalls* the tracer writes into the stub's scratch area: the blob
 * runs it from start to end in the stub itself and stops with int3, so a restore costs the same
 * few ptrace round trips whether the template has 50 VMAs or 5000 (CRIU's restorer, reduced to
 * its essence). Pointers in the block are addresses in the stub (scratch base + offset).
 */
#ifndef THAW_RESTORER_H
#define THAW_RESTORER_H

#include <stdint.h>

/* A stub may map the restorer's scratch area itself before it stops (anonymous, read/write/exec,
 * exactly here and this large): a restore whose plan chose this address then skips one injected
 * mmap, a ptrace round trip. Both stubs thaw ships (thaw-stub and the sandbox agent's) do. */
#define THAW_STUB_SCRATCH 0x200000000000ULL
#define THAW_STUB_SCRATCH_SIZE (4ULL << 20)

#define THAW_RESTORER_MAGIC 0x74686177726f7031ULL /* "thawrop1" */

enum thaw_restorer_op_kind {
    THAW_OP_SYSCALL = 1, /* result = syscall(nr, args[0..5]) */
    THAW_OP_PREAD = 2,   /* read args[2] bytes of fd args[0] at offset args[3] into args[1], fully */
    THAW_OP_OPEN_FD = 3, /* open path args[0] with flags args[1] as fd args[2], at position args[3] */
    THAW_OP_PAUSE = 4,   /* int3, then go on when the tracer resumes (it starts the pager here) */
};

#define THAW_OPF_ALLOW_ERROR 1u /* a -errno result is not a failure */
#define THAW_OPF_SAVE 2u        /* keep the result in the saved slot */
#define THAW_OPF_ARG0_SAVED 4u  /* args[0] = the saved slot */
#define THAW_OPF_STORE32 8u     /* write the result as a 32-bit value at `store` */

struct thaw_restorer_op {
    uint32_t kind;
    uint32_t flags;
    uint64_t nr;
    uint64_t args[6];
    uint64_t store;
};

struct thaw_restorer_args {
    uint64_t magic;
    uint64_t nops;
    uint64_t ops; /* address of nops struct thaw_restorer_op */
    int64_t failed_op; /* out: index of the op that failed, -1 when all ran */
    int64_t result;    /* out: that op's result (-errno) */
    uint64_t done;     /* out: ops completed */
};

#endif

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
/* Where a stub holds the fds a restore needs: the template segment, the files it maps, the cache
 * (snapshot/template.py, Template.restore_fds, orders them). */
#define THAW_FIRST_RESTORE_FD 1000

#define THAW_STUB_SCRATCH 0x200000000000ULL
#define THAW_STUB_SCRATCH_SIZE (4ULL << 20)

#define THAW_RESTORER_MAGIC 0x74686177726f7031ULL /* "thawrop1" */

enum thaw_restorer_op_kind {
    THAW_OP_SYSCALL = 1, /* result = syscall(nr, args[0..5]) */
    THAW_OP_PREAD = 2,   /* read args[2] bytes of fd args[0] at offset args[3] into args[1], fully */
    THAW_OP_OPEN_FD = 3, /* open path args[0] with flags args[1] as fd args[2], at position args[3] */
    THAW_OP_PAUSE = 4,   /* int3, then go on when the tracer resumes (it starts the pager here) */
    THAW_OP_CLEAN_STUB = 5,   /* args[0] = struct thaw_stub_clean *: make room for the template */
    THAW_OP_DROP_BOUNDING = 6, /* drop capabilities 0..args[0] that are still in the bounding set */
    THAW_OP_THREADS = 7,       /* args[0] = struct thaw_threads *: recreate the template's other threads */
    THAW_OP_THREADS_GO = 8,    /* args[0] = struct thaw_threads *: let them run (after the credentials) */
    THAW_OP_PIPE = 9, /* a new pipe, read end as fd args[0] (flags args[2]), write end as fd args[1]
                         (flags args[3]); fds from args[4] up are free for the moves */
    THAW_OP_RECEIVE_FDS = 10, /* args[0] = a socket, args[1] = struct thaw_receive_fds *: take the
                                 restore fds from it (below) */
};

/* THAW_OP_RECEIVE_FDS: a stub that waited in an idle sandbox (forked before anyone knew which
 * template it would become) holds no restore fds, only one end of a hand-off socket; the daemon
 * sends them, in one SCM_RIGHTS message, as it chooses the stub, so a thaw does not wait for a
 * fork. The blob receives the message, dup3s each fd where `moves` says, closes the received fds
 * and the socket. Received fds take the lowest free numbers: the stub keeps 0-3 taken (/dev/null)
 * and its socket below THAW_FIRST_RESTORE_FD, so they land between the two, clear of every place
 * they go. A message that does not carry exactly `nfds` fds fails the op with -EBADMSG. */
struct thaw_fd_move {
    int32_t index; /* which received fd */
    int32_t to;    /* the fd it becomes */
};

struct thaw_receive_fds {
    uint64_t nfds;
    uint64_t nmoves;
    uint64_t moves;        /* struct thaw_fd_move[nmoves] */
    uint64_t control;      /* room for the control message: 16 + 4 * nfds bytes, rounded up to 8 */
    uint64_t control_size;
};

/* THAW_OP_THREADS: the template's other threads, recreated by the blob (CRIU's restorer does the
 * same), so a restore costs the same ptrace round trips with 1 thread or 64. For each thread in
 * turn, clone3 with set_tid gives it its captured TID (glibc caches TIDs in struct pthread) and
 * its fs_base (CLONE_SETTLS) and tid address (CLONE_CHILD_CLEARTID); the new thread runs its own
 * program on a stack in the scratch area (robust list, rseq, name, pending signals, and dropping
 * what is left of the capabilities: it inherits the main thread's ids, groups and no_new_privs,
 * dropped before it was made; the main thread's seccomp filter reaches it by TSYNC), copies its
 * signal frame below its captured stack pointer, and waits for `go`. The main thread makes them
 * all, then sleeps once: each thread says READY or FAILED in its `state` and counts itself in
 * `ready`, and the last one wakes the main thread. A thread that fails exits, and the op fails
 * with its result (-EEXIST from clone3: its TID is taken).
 *
 * THAW_OP_THREADS_GO comes after the main thread's own credentials and seccomp filter: until
 * then no thread may run code of the function's (its memory is shared with a main thread that is
 * still privileged, and whose program lies in the writable scratch area). It sets `go`, and each
 * thread returns to its captured registers, xstate, signal mask and alternate stack with
 * rt_sigreturn, run at a `syscall` instruction of the restored image. The tracer unmaps the
 * scratch area after the blob ends, so the op waits until no thread is inside it. A thread leaves
 * with one instruction, a `call` from the blob's first bytes to that `syscall`: the call pushes
 * its return address into the frame's uc_flags word (rt_sigreturn reads the frame 8 bytes below
 * the stack pointer it finds), so the word changes exactly when the thread's pc leaves the
 * scratch area, and the main thread reads it instead of asking /proc. The return address is
 * scratch + 7 (the scratch area is page-aligned): to the kernel, uc_flags UC_FP_XSTATE |
 * UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS, what the frame held, and address bits it has no flag
 * for. A thread that runs its own code before the main thread looks may write over the word,
 * rarely with the very value it held: a thread whose word has not changed after a while is
 * looked up in /proc/self/task/TID/syscall instead (its pc is exact: while the restore runs,
 * every thread shares the main thread's one CPU, native/tracer.py, same_cpu; running elsewhere
 * counts as inside). Then each thread gets `affinity` (every CPU the cpuset allows). */
#define THAW_THREAD_SETTING_UP 0u
#define THAW_THREAD_READY 1u
#define THAW_THREAD_FAILED 2u

struct thaw_thread {
    uint64_t tid;           /* its TID, kept */
    uint64_t tls;           /* its fs_base */
    uint64_t clear_tid;     /* its tid address, 0: none */
    uint64_t stack;         /* [stack, stack + stack_size): for its program, in the scratch area */
    uint64_t stack_size;
    uint64_t nops;          /* its program */
    uint64_t ops;
    uint64_t frame;         /* its signal frame (fpstate and struct rt_sigframe), built by Python */
    uint64_t frame_size;
    uint64_t frame_at;      /* where the frame goes: below the captured stack pointer and red zone */
    uint64_t sigreturn_sp;  /* the stack pointer rt_sigreturn wants: just past the frame's pretcode */
    int64_t failed_op;      /* out: index of its op that failed, -1 */
    int64_t result;         /* out: that op's result (or clone3's) */
    uint32_t state;         /* out, a futex word: THAW_THREAD_* */
    uint32_t pad;
};

#define THAW_AFFINITY_BYTES 128

struct thaw_threads {
    uint64_t nthreads;
    uint64_t threads;      /* struct thaw_thread[nthreads] */
    uint64_t syscall_insn; /* a `syscall` instruction of the restored image */
    uint64_t scratch;      /* [scratch, scratch_end): the area the threads must have left */
    uint64_t scratch_end;
    int64_t failed_thread; /* out: index of the thread that failed, -1 */
    uint32_t go;           /* a futex word: 1 once the threads may run */
    uint32_t ready;        /* a futex word: how many threads said READY or FAILED */
    uint8_t affinity[THAW_AFFINITY_BYTES];
};

/* THAW_OP_CLEAN_STUB: the stub-specific start of every restore, done by the blob itself so the
 * tracer never reads the stub's maps. It unregisters the stub's rseq, finds the kernel's special
 * mappings ([vvar], [vvar_vclock], [vdso]) in the stub, unmaps everything else but the scratch
 * area, and moves the specials to the template's addresses (through `park` when the moves
 * overlap). The tracer writes what it knows of the stub into `stub` before the run: its rseq
 * registration and, from the stub's report (below), its specials; without a report the blob
 * reads /proc/self/maps. A stub whose specials differ in names or sizes from the template's
 * fails the op with THAW_SPECIALS_DIFFER: the template was captured under another kernel. */
#define THAW_SPECIALS_MAX 4
#define THAW_SPECIALS_DIFFER 18 /* -EXDEV */

struct thaw_special {
    char name[16];
    uint64_t start;
    uint64_t end;
};

struct thaw_stub_facts {
    uint64_t rseq_pointer; /* 0: no rseq registered */
    uint32_t rseq_size;
    uint32_t rseq_signature;
    uint64_t nspecials; /* 0: unknown */
    struct thaw_special specials[THAW_SPECIALS_MAX];
};

struct thaw_stub_clean {
    uint64_t keep_start; /* the scratch area, [keep_start, keep_end) */
    uint64_t keep_end;
    uint64_t park;
    uint64_t nspecials;
    struct thaw_special specials[THAW_SPECIALS_MAX]; /* the template's */
    struct thaw_stub_facts stub;                      /* written in by the tracer */
};

/* A stub that pre-maps the scratch area also leaves, in its last page, where the kernel put its
 * special mappings (it reads its own maps before it stops, off any restore's path). The tracer
 * reads the report before it copies the restorer in. */
#define THAW_STUB_REPORT (THAW_STUB_SCRATCH + THAW_STUB_SCRATCH_SIZE - 4096)
#define THAW_STUB_REPORT_MAGIC 0x6275747377616874ULL /* "thawstub" */

struct thaw_stub_report {
    uint64_t magic;
    uint64_t nspecials;
    struct thaw_special specials[THAW_SPECIALS_MAX];
};

#define THAW_OPF_ALLOW_ERROR 1u /* a -errno result is not a failure */
#define THAW_OPF_SAVE 2u        /* keep the result in the saved slot */
#define THAW_OPF_ARG0_SAVED 4u  /* args[0] = the saved slot */
#define THAW_OPF_STORE32 8u     /* write the result as a 32-bit value at `store` */
#define THAW_OPF_ARG1_SAVED 16u /* args[1] = the saved slot */
/* args[0] points to memory the kernel will read and then write (an rseq area: the kernel reads
 * rseq_cs and writes cpu_id on the way back to user space): the blob takes its page with one
 * write fault first, one copy-on-write where a read fault and then a write fault would be two. */
#define THAW_OPF_WRITE_ARG0 32u

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

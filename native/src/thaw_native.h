/* thaw's C boundary: the declarations native/build.py hands to cffi.
 *
 * Only what Python 3.11 cannot do itself lives here: syscalls glibc does not wrap (or wraps
 * with varargs cffi cannot call cleanly), ioctls on structs from kernel headers, and hot loops
 * that must not run in the interpreter. Every function returns -1 and leaves errno set on
 * failure, so the Python side can raise OSError naming the syscall.
 */
#ifndef THAW_NATIVE_H
#define THAW_NATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Not in glibc 2.36's <sys/ptrace.h>; the layout is the kernel's (linux/ptrace.h). */
struct thaw_rseq_config {
    uint64_t rseq_abi_pointer;
    uint32_t rseq_abi_size;
    uint32_t signature;
    uint32_t flags;
    uint32_t pad;
};

/* ptrace: one non-variadic entry point. errno is cleared first so PEEK* results of -1 can be
 * told apart from failures. */
long thaw_ptrace(long request, pid_t pid, uintptr_t addr, uintptr_t data);
long thaw_ptrace_getregset(pid_t pid, unsigned long type, void *buf, size_t *len);
long thaw_ptrace_setregset(pid_t pid, unsigned long type, void *buf, size_t len);

/* Syscalls glibc 2.36 does not export. */
int thaw_pidfd_open(pid_t pid, unsigned int flags);
int thaw_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
int thaw_pidfd_send_signal(int pidfd, int sig, unsigned int flags);
int thaw_userfaultfd_syscall(int flags);
int thaw_userfaultfd_dev(int flags);
long thaw_mbind(uintptr_t addr, unsigned long len, int mode, const unsigned long *nodemask,
                unsigned long maxnode, unsigned int flags);
long thaw_set_mempolicy(int mode, const unsigned long *nodemask, unsigned long maxnode);
long thaw_get_mempolicy(int *mode, unsigned long *nodemask, unsigned long maxnode, uintptr_t addr,
                        unsigned long flags);
long thaw_move_pages(pid_t pid, unsigned long count, const uintptr_t *pages, const int *nodes,
                     int *status, int flags);
int thaw_pivot_root(const char *new_root, const char *put_old);
/* open_tree(OPEN_TREE_CLONE) of `path`, made read-only/nosuid/nodev: a detached mount to hand to
 * another mount namespace (move_mount there). */
int thaw_detached_bind(const char *path, int readonly);
long thaw_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
long thaw_statfs_type(const char *path);

/* userfaultfd ioctls (linux/userfaultfd.h). */
int thaw_uffdio_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls);
int thaw_uffdio_register(int fd, uintptr_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls);
int thaw_uffdio_unregister(int fd, uintptr_t start, uint64_t len);
int64_t thaw_uffdio_copy(int fd, uintptr_t dst, uintptr_t src, uint64_t len, uint64_t mode);
int64_t thaw_uffdio_zeropage(int fd, uintptr_t start, uint64_t len, uint64_t mode);
int thaw_uffdio_wake(int fd, uintptr_t start, uint64_t len);

/* Memory helpers. */
uintptr_t thaw_mmap(uintptr_t addr, size_t len, int prot, int flags, int fd, off_t offset);
int thaw_munmap(uintptr_t addr, size_t len);
uint64_t thaw_touch(uintptr_t addr, size_t len, size_t stride, int write);

/* A template's cold image (cold.c): compressed chunks inside the template segment, each
 * inflating to the `len` bytes at `seg_off` in the segment's layout. */
enum { THAW_CODEC_LZ4 = 1, THAW_CODEC_ZSTD = 2, THAW_CODEC_DEFLATE = 3 };
#define THAW_COLD_MAX_CHUNK (1UL << 20)
struct thaw_cold_chunk {
    uint64_t seg_off;
    uint64_t comp_off; /* from the start of the mapped segment */
    uint32_t len;
    uint32_t comp_len;
};
struct thaw_cold;
struct thaw_cold_ctx;
struct thaw_cold *thaw_cold_open(int codec, const void *src, const struct thaw_cold_chunk *chunks, size_t n,
                                 const void *dict, size_t dict_len);
void thaw_cold_free(struct thaw_cold *c);
ssize_t thaw_cold_find(const struct thaw_cold *c, uint64_t seg_off);
const struct thaw_cold_chunk *thaw_cold_chunk_at(const struct thaw_cold *c, size_t i);
struct thaw_cold_ctx *thaw_cold_ctx_new(const struct thaw_cold *c);
void thaw_cold_ctx_free(struct thaw_cold_ctx *x);
int thaw_cold_decompress(struct thaw_cold *c, struct thaw_cold_ctx *x, size_t i, void *dst);
int thaw_cold_resident(const struct thaw_cold *c, size_t i);
int thaw_cold_fill_cache(struct thaw_cold *c, struct thaw_cold_ctx *x, size_t i, int cache_fd, uint64_t cache_base,
                         int faulted);
int64_t thaw_cold_punch(struct thaw_cold *c, int cache_fd, uint64_t cache_base, uint64_t cutoff_ns);
void thaw_cold_stats(const struct thaw_cold *c, uint64_t *out);

/* The restore pager (pager.c). A range maps [start, start+len) of the instance to the template
 * segment at seg_off: its pages are plain (copied from the segment) or cold (in the cold image). */
enum { THAW_RANGE_PLAIN = 0, THAW_RANGE_COLD = 1 };
struct thaw_pager_range {
    uint64_t start;
    uint64_t len;
    uint64_t seg_off;
    uint64_t kind;
};
struct thaw_pager;
struct thaw_pager *thaw_pager_start(int uffd, int pidfd, const struct thaw_pager_range *ranges, size_t nranges,
                                    const void *src, int cache_fd, uint64_t cache_base, struct thaw_cold *cold,
                                    size_t seg_size, size_t block, const uint32_t *prefetch, size_t nprefetch);
int thaw_pager_stop(struct thaw_pager *p);
size_t thaw_pager_working_set(const struct thaw_pager *p, uint32_t *out, size_t cap);
void thaw_pager_stats(const struct thaw_pager *p, uint64_t *out);
void thaw_pager_free(struct thaw_pager *p);

/* The restorer blob (restorer.c), built flat by native/build.py and embedded here. */
const unsigned char *thaw_restorer_blob(size_t *len);

/* The tracer's side of a restore (tracer.c): each call is one stretch of ptrace work with no
 * Python in between, so a restore costs its round trips and little else. All calls for a
 * tracee come from the thread that seized it. They return 0, or -1 with `err` saying which step
 * failed, with what errno or wait status; `trips` counts the stops waitpid saw either way. */
enum {
    THAW_TRACE_SEIZE = 1,       /* PTRACE_SEIZE/INTERRUPT/CONT failed: errno */
    THAW_TRACE_NOT_STOPPED = 2, /* the process was not in a stop (status) */
    THAW_TRACE_EXITED = 3,      /* it exited or was killed (status) */
    THAW_TRACE_REGS = 4,        /* GETREGS/SETREGS/rseq configuration failed: errno */
    THAW_TRACE_WRITE = 5,       /* writing the image into the tracee failed: errno */
    THAW_TRACE_RESUME = 6,      /* PTRACE_CONT/SINGLESTEP failed: errno */
    THAW_TRACE_STRAY_STOP = 7,  /* a stop other than the blob's int3 or the single-step's trap */
    THAW_TRACE_READ = 8,        /* reading the argument block back failed: errno */
    THAW_TRACE_INJECTED = 9,    /* an injected syscall returned -errno (err; status: its number) */
    THAW_TRACE_FINAL = 10,      /* setting the signal mask, registers or xstate failed: errno */
    THAW_TRACE_DETACH = 11,     /* PTRACE_DETACH failed: errno */
};
struct thaw_trace_error {
    int32_t step;
    int32_t err;
    int32_t status;
    uint32_t trips;
    uint64_t rip; /* where a stray stop happened */
};
/* A file a template maps, as captured, and the fd the template holds it by (what the restore
 * maps): one fstat shows a change in place (size, mtime) or a file deleted or replaced under its
 * name (no links left). */
struct thaw_file_check {
    int64_t fd;
    uint64_t dev;
    uint64_t ino;
    int64_t size;
    int64_t mtime_ns;
};
struct thaw_blob_run {
    const void *image;
    size_t len;
    uint64_t scratch; /* where the image goes; the blob's entry is its first byte */
    uint64_t args;    /* the argument block's address in the tracee */
    uint64_t stack_top;
    int64_t stub_at; /* image offset of thaw_stub_clean.stub (the tracer fills it in), -1 if none */
    const struct thaw_file_check *files;
    size_t nfiles;
    int64_t changed_file; /* out: index of the first file that is not as captured, -1 if none */
};
struct thaw_restore_end {
    uint64_t syscall_insn; /* a `syscall` instruction of the restored image */
    int64_t close_fd;      /* an fd the tracee must close first, -1 if none */
    uint64_t unmap_start;  /* the scratch area */
    uint64_t unmap_len;
    uint64_t sigmask;
    const void *regs; /* struct user_regs_struct */
    const void *xstate;
    size_t xstate_len;
    struct thaw_pin *pin; /* the stub gets its own CPUs back as it is let go (once); may be NULL */
};
/* Waking a halted vCPU costs ~50 us in a VM, once per round trip when tracer and tracee sit on
 * different CPUs: for the restore both are pinned to the tracer's CPU (one in both masks), and
 * put back after. */
struct thaw_pin {
    uint64_t stub_mask[16];
    uint64_t self_mask[16];
    int32_t cpu; /* -1: not pinned (no CPU both may use) */
    int32_t stub_pinned;
};
int thaw_trace_pin(pid_t pid, struct thaw_pin *pin);
void thaw_trace_unpin_stub(pid_t pid, struct thaw_pin *pin); /* once: later calls do nothing */
void thaw_trace_unpin_self(const struct thaw_pin *pin);
void thaw_trace_repin_self(const struct thaw_pin *pin); /* after a thread was started unpinned */
int thaw_trace_seize_stopped(pid_t pid, struct thaw_trace_error *err);
int thaw_trace_run_blob(pid_t pid, struct thaw_blob_run *run, void *outcome, size_t outcome_len,
                        struct thaw_trace_error *err);
int thaw_trace_resume_blob(pid_t pid, uint64_t args, void *outcome, size_t outcome_len, struct thaw_trace_error *err);
int thaw_trace_end_restore(pid_t pid, const struct thaw_restore_end *end, struct thaw_trace_error *err);

/* Microbenchmark hot loops (bench.c). Times are CLOCK_MONOTONIC nanoseconds. */
uint64_t thaw_now_ns(void);
uint64_t thaw_bench_read(const void *buf, size_t len);
void thaw_bench_copy(void *dst, const void *src, size_t len);
void thaw_bench_chase_init(void *buf, size_t nslots, size_t slot_size, uint64_t seed);
uint64_t thaw_bench_chase(const void *buf, size_t steps);
int64_t thaw_bench_map_touch(int fd, off_t offset, size_t len, size_t page, int flags, int write);

#endif

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

/* The lazy-restore pager (pager.c). A range maps [start, start+len) of the instance to the
 * template segment at seg_off. */
struct thaw_pager_range {
    uint64_t start;
    uint64_t len;
    uint64_t seg_off;
};
struct thaw_pager;
struct thaw_pager *thaw_pager_start(int uffd, const struct thaw_pager_range *ranges, size_t nranges,
                                    const void *src, void *cache, size_t seg_size, size_t block,
                                    const uint32_t *prefetch, size_t nprefetch);
int thaw_pager_stop(struct thaw_pager *p);
size_t thaw_pager_working_set(const struct thaw_pager *p, uint32_t *out, size_t cap);
void thaw_pager_stats(const struct thaw_pager *p, uint64_t *out);
void thaw_pager_free(struct thaw_pager *p);

/* The restorer blob (restorer.c), built flat by native/build.py and embedded here. */
const unsigned char *thaw_restorer_blob(size_t *len);

/* Microbenchmark hot loops (bench.c). Times are CLOCK_MONOTONIC nanoseconds. */
uint64_t thaw_now_ns(void);
uint64_t thaw_bench_read(const void *buf, size_t len);
void thaw_bench_copy(void *dst, const void *src, size_t len);
void thaw_bench_chase_init(void *buf, size_t nslots, size_t slot_size, uint64_t seed);
uint64_t thaw_bench_chase(const void *buf, size_t steps);
int64_t thaw_bench_map_touch(int fd, off_t offset, size_t len, size_t page, int flags, int write);

#endif

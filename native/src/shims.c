/* Syscall shims for native/: thin, errno-preserving, no policy. See thaw_native.h. */
#define _GNU_SOURCE
#include "thaw_native.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/mount.h>
#include <linux/userfaultfd.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

long thaw_ptrace(long request, pid_t pid, uintptr_t addr, uintptr_t data)
{
    errno = 0;
    return ptrace((enum __ptrace_request)request, pid, (void *)addr, (void *)data);
}

long thaw_ptrace_getregset(pid_t pid, unsigned long type, void *buf, size_t *len)
{
    /* The kernel shrinks iov_len to what it wrote; hand that back. */
    struct iovec iov = {.iov_base = buf, .iov_len = *len};
    long r = ptrace(PTRACE_GETREGSET, pid, (void *)type, &iov);
    if (r == 0)
        *len = iov.iov_len;
    return r;
}

long thaw_ptrace_setregset(pid_t pid, unsigned long type, void *buf, size_t len)
{
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    return ptrace(PTRACE_SETREGSET, pid, (void *)type, &iov);
}

int thaw_pidfd_open(pid_t pid, unsigned int flags)
{
    return (int)syscall(SYS_pidfd_open, pid, flags);
}

int thaw_pidfd_getfd(int pidfd, int targetfd, unsigned int flags)
{
    return (int)syscall(SYS_pidfd_getfd, pidfd, targetfd, flags);
}

int thaw_pidfd_send_signal(int pidfd, int sig, unsigned int flags)
{
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, flags);
}

int thaw_userfaultfd_syscall(int flags)
{
    return (int)syscall(SYS_userfaultfd, flags);
}

int thaw_userfaultfd_dev(int flags)
{
    /* /dev/userfaultfd hands out uffds to whoever may open the node, independent of
     * vm.unprivileged_userfaultfd. Its fd is only a factory; close it straight away. */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -1;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int saved = errno;
    close(dev);
    errno = saved;
    return fd;
}

long thaw_mbind(uintptr_t addr, unsigned long len, int mode, const unsigned long *nodemask,
                unsigned long maxnode, unsigned int flags)
{
    return syscall(SYS_mbind, addr, len, mode, nodemask, maxnode, flags);
}

long thaw_set_mempolicy(int mode, const unsigned long *nodemask, unsigned long maxnode)
{
    return syscall(SYS_set_mempolicy, mode, nodemask, maxnode);
}

long thaw_get_mempolicy(int *mode, unsigned long *nodemask, unsigned long maxnode, uintptr_t addr,
                        unsigned long flags)
{
    return syscall(SYS_get_mempolicy, mode, nodemask, maxnode, addr, flags);
}

long thaw_move_pages(pid_t pid, unsigned long count, const uintptr_t *pages, const int *nodes,
                     int *status, int flags)
{
    return syscall(SYS_move_pages, pid, count, pages, nodes, status, flags);
}

int thaw_pivot_root(const char *new_root, const char *put_old)
{
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}

int thaw_detached_bind(const char *path, int readonly)
{
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (fd < 0 || !readonly)
        return fd;
    struct mount_attr attr = {.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV};
    if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH, &attr, sizeof attr) < 0) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    return fd;
}

long thaw_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)
{
    return prctl(option, a2, a3, a4, a5);
}

long thaw_statfs_type(const char *path)
{
    struct statfs st;
    if (statfs(path, &st) < 0)
        return -1;
    return (long)st.f_type;
}

int thaw_uffdio_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls)
{
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -1;
    *out_features = api.features;
    *out_ioctls = api.ioctls;
    return 0;
}

int thaw_uffdio_register(int fd, uintptr_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls)
{
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -1;
    *out_ioctls = reg.ioctls;
    return 0;
}

int thaw_uffdio_unregister(int fd, uintptr_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_UNREGISTER, &range);
}

int64_t thaw_uffdio_copy(int fd, uintptr_t dst, uintptr_t src, uint64_t len, uint64_t mode)
{
    struct uffdio_copy copy = {.dst = dst, .src = src, .len = len, .mode = mode};
    /* On EAGAIN the kernel may have copied part of the range: report that progress (errno
     * stays set) so the caller resumes after it instead of retrying into EEXIST. */
    if (ioctl(fd, UFFDIO_COPY, &copy) < 0)
        return copy.copy > 0 ? copy.copy : -1;
    return copy.copy;
}

int64_t thaw_uffdio_zeropage(int fd, uintptr_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_zeropage zp = {.range = {.start = start, .len = len}, .mode = mode};
    if (ioctl(fd, UFFDIO_ZEROPAGE, &zp) < 0)
        return zp.zeropage > 0 ? zp.zeropage : -1; /* partial progress, as for COPY */
    return zp.zeropage;
}

int thaw_uffdio_wake(int fd, uintptr_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_WAKE, &range);
}

uintptr_t thaw_mmap(uintptr_t addr, size_t len, int prot, int flags, int fd, off_t offset)
{
    void *p = mmap((void *)addr, len, prot, flags, fd, offset);
    return p == MAP_FAILED ? (uintptr_t)-1 : (uintptr_t)p;
}

int thaw_munmap(uintptr_t addr, size_t len)
{
    return munmap((void *)addr, len);
}

uint64_t thaw_touch(uintptr_t addr, size_t len, size_t stride, int write)
{
    if (stride == 0)
        return 0;
    /* volatile: every access must reach memory (it is the fault we want, not the value). */
    volatile uint8_t *p = (volatile uint8_t *)addr;
    uint64_t sum = 0;
    for (size_t off = 0; off < len; off += stride) {
        if (write)
            p[off] = (uint8_t)(p[off] + 1);
        sum += p[off];
    }
    return sum;
}

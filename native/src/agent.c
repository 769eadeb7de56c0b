/* thaw-agent: pid 1 of a sandbox. Builds the sandbox's rootfs, then serves the daemon.
 *
 *   thaw-agent --control FD --root DIR [--ro PATH]... [--cgroup-fd FD]... [--hostname NAME]
 *              [--uid UID --gid GID] [--tmp OPTIONS] [--userns HOSTUID:HOSTGID]
 *
 * The process the daemon starts (in the host's namespaces) writes "0" into each --cgroup-fd (the
 * agent's own cgroup.procs files, so the agent lives apart from the instance cgroup), unshares
 * mount, uts, ipc, net and pid namespaces,
 * and forks the agent, which is pid 1 of the new pid namespace; the starter stays as its parent
 * (outside that namespace) and exits with the agent's status, so no orphan is left to init.
 *
 * The agent mounts a tmpfs skeleton on DIR: every --ro PATH bind-mounted read-only at the same
 * path (intermediate directories created 0755, so a 0700 home on the host does not hide a leaf;
 * a symlink is recreated as the same symlink), an empty /function, a tmpfs /tmp, its own /proc, a
 * minimal /dev and an /etc with passwd, group and hosts. It pivots into it, remounts / read-only,
 * and reports READY on the control socket. From then on it reaps every child (reporting EXITED)
 * and answers the requests of agent.h: fork a stopped stub or exec a guest (each joins the
 * instance cgroup, gets its fds, and a guest drops to UID/GID without capabilities and with
 * no_new_privs, then installs the seccomp filter it was sent), swap the function mount, replace
 * /tmp, set the hostname, hand out a netlink socket of the sandbox's network namespace. A stub
 * gets no filter: its restore needs what the filter denies, and the restorer installs it last. Single-threaded; when the daemon closes the control
 * socket the agent exits, and the kernel kills everything left in its pid namespace.
 *
 * With --userns the sandbox also gets a user namespace: root inside is HOSTUID:HOSTGID outside (an
 * unprivileged host id), and UID/GID (the guests' ids) map to themselves, so a guest runs as the
 * same uid inside and out and a template's recorded uid means the same in every sandbox. See
 * enter_user_namespaces() for the order this needs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/close_range.h>
#include <linux/filter.h>
#include <linux/mount.h>
#include <linux/netlink.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"
#include "stub_prepare.h"

#define MAX_PATHS 64
#define MAX_CGROUPS 8
#define FD_PARKING 500 /* received fds move here before they take their numbers */

struct config {
    int control;
    const char *root;
    const char *ro[MAX_PATHS];
    int nro;
    int cgroup_fds[MAX_CGROUPS];
    int ncgroups;
    const char *hostname;
    unsigned uid, gid;
    const char *tmp_options;
    int userns;                      /* also a user namespace (--userns) */
    unsigned userns_uid, userns_gid; /* the host ids root inside maps to */
    int netns_fd;                    /* --netns-fd: join this network namespace instead of a new one */
};

static int control = -1;
static const struct config *settings;
static struct thaw_stub_report specials; /* the agent's, which its stubs share (forks) */
static int instance_cgroups[MAX_CGROUPS];
static int ninstance_cgroups;

/* -- messages -------------------------------------------------------------------------------- */

static int send_msg(uint32_t op, int32_t value, const void *payload, uint32_t len, const int *fds, int nfds,
                    pid_t cred_pid)
{
    struct thaw_agent_msg head = {.op = op, .value = value, .len = len};
    struct iovec iov[2] = {{&head, sizeof head}, {(void *)payload, len}};
    union {
        char buf[CMSG_SPACE(sizeof(int) * THAW_AGENT_MAX_FDS) + CMSG_SPACE(sizeof(struct ucred))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1, .msg_control = u.buf};
    size_t controllen = 0;
    struct cmsghdr *c = (struct cmsghdr *)u.buf;
    if (nfds > 0) {
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
        controllen += CMSG_SPACE(sizeof(int) * nfds);
        c = (struct cmsghdr *)(u.buf + controllen);
    }
    if (cred_pid > 0) {
        struct ucred cred = {.pid = cred_pid, .uid = geteuid(), .gid = getegid()};
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_CREDENTIALS;
        c->cmsg_len = CMSG_LEN(sizeof cred);
        memcpy(CMSG_DATA(c), &cred, sizeof cred);
        controllen += CMSG_SPACE(sizeof cred);
    }
    msg.msg_controllen = controllen;
    if (!controllen)
        msg.msg_control = NULL;
    return sendmsg(control, &msg, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

static void reply_error(int err, const char *fmt, ...)
{
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if (n >= (int)sizeof text)
        n = sizeof text - 1;
    send_msg(THAW_AGENT_ERROR, err, text, (uint32_t)n, NULL, 0, 0);
}

static void reply_ok(int32_t value, pid_t cred_pid) { send_msg(THAW_AGENT_OK, value, NULL, 0, NULL, 0, cred_pid); }

/* Receive one request; returns the payload length, 0 with *op = 0 at end of stream, -1 on error. */
static ssize_t recv_msg(struct thaw_agent_msg *head, char *payload, int *fds, int *nfds)
{
    struct iovec iov[2] = {{head, sizeof *head}, {payload, THAW_AGENT_MAX_PAYLOAD}};
    union {
        char buf[CMSG_SPACE(sizeof(int) * THAW_AGENT_MAX_FDS)];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    *nfds = 0;
    ssize_t n = recvmsg(control, &msg, MSG_CMSG_CLOEXEC);
    if (n <= 0) {
        head->op = 0;
        return n;
    }
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds + *nfds, CMSG_DATA(c), sizeof(int) * count);
            *nfds += count;
        }
    }
    if ((size_t)n < sizeof *head || head->len != (size_t)n - sizeof *head) {
        errno = EPROTO;
        return -1;
    }
    payload[head->len] = 0;
    return (ssize_t)head->len;
}

/* -- the rootfs ------------------------------------------------------------------------------ */

static char failure[512]; /* what went wrong while building, for the daemon */

static int fail(const char *fmt, ...)
{
    int err = errno;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(failure, sizeof failure, fmt, ap);
    va_end(ap);
    if (n > 0 && (size_t)n < sizeof failure)
        snprintf(failure + n, sizeof failure - n, ": %s", strerror(err));
    errno = err;
    return -1;
}

static int mkdirs(const char *path)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return errno = ENAMETOOLONG, fail("path %s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return fail("mkdir %s", buf);
        *p = '/';
    }
    if (mkdir(buf, 0755) < 0 && errno != EEXIST)
        return fail("mkdir %s", buf);
    return 0;
}

static int write_file(const char *path, const char *text, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0)
        return fail("create %s", path);
    size_t len = strlen(text);
    ssize_t n = write(fd, text, len);
    close(fd);
    return n == (ssize_t)len ? 0 : fail("write %s", path);
}

static int bind_readonly(const char *source, const char *target)
{
    if (mount(source, target, NULL, MS_BIND, NULL) < 0)
        return fail("bind mount of %s", source);
    if (mount(NULL, target, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
        return fail("read-only remount of %s", target);
    return 0;
}

/* Put host PATH at ROOT/PATH: a symlink as the same symlink, a directory or file bind-mounted. */
static int add_leaf(const char *root, const char *path, int readonly)
{
    char target[4096], dir[4096];
    struct stat st;
    if (path[0] != '/' || snprintf(target, sizeof target, "%s%s", root, path) >= (int)sizeof target)
        return errno = EINVAL, fail("leaf %s (want an absolute path)", path);
    if (lstat(path, &st) < 0)
        return fail("leaf %s", path);
    snprintf(dir, sizeof dir, "%s", target);
    *strrchr(dir, '/') = 0;
    if (mkdirs(dir) < 0)
        return -1;
    if (S_ISLNK(st.st_mode)) {
        char link[4096];
        ssize_t n = readlink(path, link, sizeof link - 1);
        if (n < 0)
            return fail("readlink %s", path);
        link[n] = 0;
        if (symlink(link, target) < 0 && errno != EEXIST)
            return fail("symlink %s", target);
        return 0;
    }
    if (S_ISDIR(st.st_mode)) {
        if (mkdir(target, 0755) < 0 && errno != EEXIST)
            return fail("mkdir %s", target);
    } else {
        int fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0)
            return fail("mountpoint %s", target);
        close(fd);
    }
    if (!readonly)
        return mount(path, target, NULL, MS_BIND, NULL) < 0 ? fail("bind mount of %s", path) : 0;
    return bind_readonly(path, target);
}

static int build_dev(const char *root)
{
    static const char *const nodes[] = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"};
    static const char *const links[][2] = {
        {"/proc/self/fd", "fd"}, {"/proc/self/fd/0", "stdin"}, {"/proc/self/fd/1", "stdout"},
        {"/proc/self/fd/2", "stderr"}};
    char path[4096];
    snprintf(path, sizeof path, "%s/dev", root);
    if (mkdirs(path) < 0)
        return -1;
    if (mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k") < 0)
        return fail("tmpfs on /dev");
    for (size_t i = 0; i < sizeof nodes / sizeof *nodes; i++)
        if (add_leaf(root, nodes[i], 0) < 0)
            return -1;
    for (size_t i = 0; i < sizeof links / sizeof *links; i++) {
        snprintf(path, sizeof path, "%s/dev/%s", root, links[i][1]);
        if (symlink(links[i][0], path) < 0)
            return fail("symlink %s", path);
    }
    snprintf(path, sizeof path, "%s/dev/shm", root);
    if (mkdir(path, 01777) < 0 || mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m") < 0)
        return fail("/dev/shm");
    return 0;
}

static int build_etc(const char *root, unsigned uid, unsigned gid, const char *hostname)
{
    char path[4096], text[1024];
    snprintf(path, sizeof path, "%s/etc", root);
    if (mkdirs(path) < 0)
        return -1;
    snprintf(text, sizeof text, "root:x:0:0:root:/:/bin/sh\nsandbox:x:%u:%u:thaw sandbox:/tmp:/bin/sh\n", uid, gid);
    snprintf(path, sizeof path, "%s/etc/passwd", root);
    if (write_file(path, text, 0644) < 0)
        return -1;
    snprintf(text, sizeof text, "root:x:0:\nsandbox:x:%u:\n", gid);
    snprintf(path, sizeof path, "%s/etc/group", root);
    if (write_file(path, text, 0644) < 0)
        return -1;
    snprintf(text, sizeof text, "127.0.0.1 localhost\n::1 localhost\n127.0.1.1 %s\n", hostname);
    snprintf(path, sizeof path, "%s/etc/hosts", root);
    return write_file(path, text, 0644);
}

static int mount_tmp(const char *path, const char *options)
{
    return mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options) < 0 ? fail("tmpfs on %s", path) : 0;
}

/* The skeleton on cfg->root: a tmpfs with the mount points, /tmp (a tmpfs unless `tmp_later`: then
 * a plain directory that leaves under /tmp go into, see finish_tmp), the leaves, /dev and /etc. */
static int build_skeleton(const struct config *cfg, int tmp_later)
{
    const char *root = cfg->root;
    char path[4096], options[64] = "mode=0755,size=16m";
    if (cfg->userns) /* root inside owns /, so the agent may remove /.oldroot from it */
        snprintf(options, sizeof options, "mode=0755,size=16m,uid=%u,gid=%u", cfg->userns_uid, cfg->userns_gid);
    if (mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, options) < 0)
        return fail("tmpfs on %s", root);
    static const char *const dirs[] = {THAW_AGENT_FUNCTION_DIR, "/tmp", "/proc", "/.oldroot"};
    for (size_t i = 0; i < sizeof dirs / sizeof *dirs; i++) {
        snprintf(path, sizeof path, "%s%s", root, dirs[i]);
        if (mkdirs(path) < 0)
            return -1;
    }
    snprintf(path, sizeof path, "%s/tmp", root);
    if (!tmp_later && mount_tmp(path, cfg->tmp_options) < 0) /* first: leaves under /tmp go on it */
        return -1;
    for (int i = 0; i < cfg->nro; i++)
        if (add_leaf(root, cfg->ro[i], 1) < 0)
            return -1;
    return build_dev(root) < 0 ? -1 : build_etc(root, cfg->uid, cfg->gid, cfg->hostname);
}

/* Enter the root the cwd is at: mount /proc (before the host's root goes: the kernel mounts a proc
 * only where one is fully visible already), pivot_root, detach the host's root, remount / read-only.
 * Paths are relative to the cwd, which a process in a user namespace may be unable to look up. */
static int enter_root(void)
{
    if (mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        return fail("mounting /proc");
    if (syscall(SYS_pivot_root, ".", ".oldroot") < 0)
        return fail("pivot_root");
    if (chdir("/") < 0 || umount2("/.oldroot", MNT_DETACH) < 0 || rmdir("/.oldroot") < 0)
        return fail("detaching the host's root");
    if (mount(NULL, "/", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
        return fail("read-only remount of /");
    return 0;
}

/* With a user namespace: the skeleton (cwd) came from the host's user namespace, so here each of
 * its mounts is locked, and pivot_root onto a locked mount would lock the host's root in its turn
 * (it could then not be detached). A bind made here is not locked: clone the skeleton, attach the
 * clone over it and go into that. */
static int own_skeleton(void)
{
    int tree = (int)syscall(SYS_open_tree, AT_FDCWD, ".", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
    if (tree < 0)
        return fail("open_tree of the skeleton");
    int ok = syscall(SYS_move_mount, tree, "", AT_FDCWD, ".", MOVE_MOUNT_F_EMPTY_PATH) == 0 && fchdir(tree) == 0;
    int err = errno;
    close(tree);
    errno = err;
    return ok ? 0 : fail("attaching the skeleton's clone");
}

static int new_tmp(const char *options, int replace, const char **what);

/* In the agent, pid 1: the whole rootfs, or with a user namespace what the starter left to do
 * (/tmp is mounted here then, so that release can replace it: a locked mount cannot be unmounted). */
static int build_rootfs(const struct config *cfg)
{
    const char *what = "";
    if (!cfg->userns) {
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
            return fail("making / private");
        if (build_skeleton(cfg, 0) < 0)
            return -1;
        if (chdir(cfg->root) < 0)
            return fail("chdir %s", cfg->root);
        if (enter_root() < 0)
            return -1;
    } else if (own_skeleton() < 0 || enter_root() < 0) {
        return -1;
    } else if (new_tmp(cfg->tmp_options, 0, &what) < 0) {
        return fail("%s (the first /tmp)", what);
    }
    if (sethostname(cfg->hostname, strlen(cfg->hostname)) < 0)
        return fail("sethostname %s", cfg->hostname);
    return 0;
}

/* -- processes ------------------------------------------------------------------------------- */

/* Close every fd above 3 except [first, first + count) and `keep`. */
static void close_others(int first, int count, int keep)
{
    int lo = 4;
    if (count > 0) {
        if (first > lo)
            syscall(SYS_close_range, lo, first - 1, 0);
        lo = first + count;
    }
    if (keep >= lo) {
        if (keep > lo)
            syscall(SYS_close_range, lo, keep - 1, 0);
        lo = keep + 1;
    }
    syscall(SYS_close_range, lo, ~0U, 0);
}

/* In a new child: join the instance cgroup, take the fds (log -> 0-2, control -> 3, the rest from
 * `first`), close everything else but `keep`. */
static int child_setup(const int *fds, int nfds, int first, int keep)
{
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int i = 0; i < ninstance_cgroups; i++)
        if (pwrite(instance_cgroups[i], "0", 1, 0) != 1)
            return -1;
    setsid();
    int parked[THAW_AGENT_MAX_FDS];
    for (int i = 0; i < nfds; i++)
        if ((parked[i] = fcntl(fds[i], F_DUPFD, FD_PARKING)) < 0)
            return -1;
    for (int i = 0; i < nfds; i++) {
        int target = i == 0 ? 0 : i == 1 ? 3 : first + i - 2;
        if (dup2(parked[i], target) < 0)
            return -1;
        if (i == 0 && (dup2(parked[i], 1) < 0 || dup2(parked[i], 2) < 0))
            return -1;
    }
    close_others(first, nfds - 2, keep);
    return 0;
}

/* Where the next fork's pid is counted from, in this pid namespace. Guests start from 2, so
 * their threads' TIDs are small; stubs from STUB_PIDS_FROM, so a stub's own pid never takes a TID
 * that a template's thread must get back (a restore recreates threads with their captured TIDs).
 * Best effort: without it, pids keep counting up and a taken TID fails that restore, named. */
#define STUB_PIDS_FROM 16384

static void count_pids_from(long last)
{
    int fd = open("/proc/sys/kernel/ns_last_pid", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    char text[24];
    int n = snprintf(text, sizeof text, "%ld", last);
    if (write(fd, text, (size_t)n) < 0) {
        /* pid_max below the range, or not ours to set: pids go on from where they are */
    }
    close(fd);
}

static void do_stub(const struct thaw_agent_msg *req, const int *fds, int nfds)
{
    if (nfds < 2)
        return reply_error(EINVAL, "a stub needs at least the log and control fds, got %d", nfds);
    count_pids_from(STUB_PIDS_FROM);
    pid_t pid = fork();
    if (pid < 0)
        return reply_error(errno, "fork of a stub");
    if (pid == 0) {
        if (child_setup(fds, nfds, req->value, -1) < 0)
            _exit(THAW_AGENT_EXEC_FAILED);
        thaw_stub_prepare(&specials);
        syscall(SYS_kill, getpid(), SIGSTOP); /* rests after a `syscall`, as restore expects */
        _exit(111);                           /* resumed without a restore */
    }
    int status = 0;
    if (waitpid(pid, &status, WUNTRACED) < 0 || !WIFSTOPPED(status))
        return reply_error(EIO, "the stub failed before it stopped (wait status %#x)", status);
    reply_ok(pid, pid);
}

/* Read the seccomp program a spawn was sent (fd `fd`) into `prog`; returns 0, or -1 with errno
 * and *what set. Read here, in the agent, so a bad program is refused before any fork. */
static int read_seccomp(int fd, struct sock_fprog *prog, const char **what)
{
    static struct sock_filter filter[BPF_MAXINSNS];
    struct stat st;
    *what = "the seccomp program";
    if (fstat(fd, &st) < 0)
        return -1;
    if (st.st_size <= 0 || st.st_size % (off_t)sizeof *filter || st.st_size > (off_t)sizeof filter) {
        *what = "the seccomp program (not 1 to 4096 BPF instructions)";
        return errno = EINVAL, -1;
    }
    ssize_t got = pread(fd, filter, (size_t)st.st_size, 0);
    if (got != st.st_size) {
        if (got >= 0)
            errno = EIO;
        return -1;
    }
    prog->len = (unsigned short)(st.st_size / (off_t)sizeof *filter);
    prog->filter = filter;
    return 0;
}

/* The payload: uid, gid, cwd, then value = argc strings of argv, then the environment. */
static void do_spawn(const struct thaw_agent_msg *req, char *payload, const int *fds, int nfds)
{
    enum { MAX_STRINGS = 1024 };
    char *strings[MAX_STRINGS], *argv[MAX_STRINGS + 1], *envp[MAX_STRINGS + 1];
    int n = 0;
    for (char *p = payload; p < payload + req->len && n < MAX_STRINGS; p += strlen(p) + 1)
        strings[n++] = p;
    int argc = req->value;
    if (nfds != 3 || argc < 1 || n < 3 + argc)
        return reply_error(EINVAL, "spawn wants 3 fds (log, control, seccomp program) and uid, gid, cwd, argv "
                                   "(got %d fds, %d strings)", nfds, n);
    struct sock_fprog seccomp;
    const char *what;
    if (read_seccomp(fds[2], &seccomp, &what) < 0)
        return reply_error(errno, "reading %s", what);
    unsigned uid = (unsigned)strtoul(strings[0], NULL, 10), gid = (unsigned)strtoul(strings[1], NULL, 10);
    memcpy(argv, strings + 3, sizeof(char *) * argc);
    argv[argc] = NULL;
    memcpy(envp, strings + 3 + argc, sizeof(char *) * (n - 3 - argc));
    envp[n - 3 - argc] = NULL;
    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0)
        return reply_error(errno, "pipe");
    count_pids_from(1);
    pid_t pid = fork();
    if (pid < 0) {
        close(report[0]);
        close(report[1]);
        return reply_error(errno, "fork of %s", argv[0]);
    }
    if (pid == 0) {
        const char *step = "setting up fds and cgroups";
        int keep = fcntl(report[1], F_DUPFD_CLOEXEC, FD_PARKING + THAW_AGENT_MAX_FDS);
        if (keep < 0 || child_setup(fds, 2, 4, keep) < 0) /* the seccomp fd (read already) is closed */
            goto failed;
        step = "dropping privileges";
        for (int cap = 0; cap <= 63; cap++)
            prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
        if (setgroups(0, NULL) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0 ||
            prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
            goto failed;
        step = "installing the seccomp filter"; /* after no_new_privs, which an unprivileged install needs */
        if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &seccomp) < 0)
            goto failed;
        step = "chdir";
        if (chdir(strings[2]) < 0)
            goto failed;
        step = "execve";
        execve(argv[0], argv, envp);
    failed:;
        char msg[64];
        int len = snprintf(msg, sizeof msg, "%d %s", errno, step);
        if (keep >= 0 && write(keep, msg, (size_t)len) < 0)
            _exit(THAW_AGENT_EXEC_FAILED);
        _exit(THAW_AGENT_EXEC_FAILED);
    }
    close(report[1]);
    char msg[64];
    ssize_t got = read(report[0], msg, sizeof msg - 1);
    close(report[0]);
    if (got > 0) {
        msg[got] = 0;
        int status;
        waitpid(pid, &status, 0); /* reaped here: no EXITED event for a process that never ran */
        int err = atoi(msg);
        const char *step = strchr(msg, ' ');
        return reply_error(err, "%s of %s failed: %s", step ? step + 1 : "spawn", argv[0], strerror(err));
    }
    reply_ok(pid, pid);
}

static void do_mount_function(const int *fds, int nfds)
{
    if (umount2(THAW_AGENT_FUNCTION_DIR, MNT_DETACH) < 0 && errno != EINVAL)
        return reply_error(errno, "unmounting the previous function");
    if (nfds == 1 && syscall(SYS_move_mount, fds[0], "", AT_FDCWD, THAW_AGENT_FUNCTION_DIR,
                             MOVE_MOUNT_F_EMPTY_PATH) < 0)
        return reply_error(errno, "move_mount of the function onto %s", THAW_AGENT_FUNCTION_DIR);
    reply_ok(0, 0);
}

static int under_tmp(const char *path) { return strncmp(path, "/tmp/", 5) == 0; }

/* A new tmpfs on /tmp (replacing the one there if `replace`). Leaves that live under /tmp on the
 * host (thaw checked out there) are carried over: cloned (open_tree) before the old /tmp goes,
 * attached (move_mount) on the new. Returns -1 with errno and `what` failed. */
static int new_tmp(const char *options, int replace, const char **what)
{
    int clones[MAX_PATHS];
    static char links[MAX_PATHS][256];
    int n = settings->nro;
    for (int i = 0; i < n; i++) {
        clones[i] = -1;
        links[i][0] = 0;
        struct stat st;
        if (!under_tmp(settings->ro[i]) || lstat(settings->ro[i], &st) < 0)
            continue;
        if (S_ISLNK(st.st_mode)) {
            ssize_t len = readlink(settings->ro[i], links[i], sizeof links[i] - 1);
            links[i][len > 0 ? len : 0] = 0;
        } else {
            clones[i] = (int)syscall(SYS_open_tree, AT_FDCWD, settings->ro[i], OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
        }
    }
    int err = 0;
    if (replace && umount2("/tmp", MNT_DETACH) < 0)
        err = errno, *what = "unmounting /tmp";
    else if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options) < 0)
        err = errno, *what = "a new tmpfs on /tmp";
    for (int i = 0; i < n && !err; i++) {
        if (!under_tmp(settings->ro[i]))
            continue;
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", settings->ro[i]);
        *strrchr(dir, '/') = 0;
        struct stat st;
        if (mkdirs(dir) < 0)
            err = errno, *what = failure;
        else if (clones[i] < 0) { /* a symlink leaf: the same link again */
            if (links[i][0] && symlink(links[i], settings->ro[i]) < 0)
                err = errno, *what = "a symlink leaf under /tmp";
        } else if (fstat(clones[i], &st) < 0)
            err = errno, *what = "fstat of a leaf under /tmp";
        else if (S_ISDIR(st.st_mode) ? mkdir(settings->ro[i], 0755) < 0
                                     : close(open(settings->ro[i], O_WRONLY | O_CREAT | O_CLOEXEC, 0644)) < 0)
            err = errno, *what = "a mount point for a leaf under /tmp";
        else if (syscall(SYS_move_mount, clones[i], "", AT_FDCWD, settings->ro[i], MOVE_MOUNT_F_EMPTY_PATH) < 0)
            err = errno, *what = "move_mount of a leaf under /tmp";
    }
    for (int i = 0; i < n; i++)
        if (clones[i] >= 0)
            close(clones[i]);
    errno = err;
    return err ? -1 : 0;
}

static void do_fresh_tmp(const char *options)
{
    const char *what = "";
    if (new_tmp(options, 1, &what) < 0)
        return reply_error(errno, "%s (fresh /tmp with %s)", what, options);
    reply_ok(0, 0);
}

static void do_netlink(void)
{
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0)
        return reply_error(errno, "netlink socket");
    send_msg(THAW_AGENT_OK, 0, NULL, 0, &fd, 1, 0);
    close(fd);
}

static void do_cgroups(const int *fds, int nfds)
{
    if (nfds > MAX_CGROUPS)
        return reply_error(EINVAL, "at most %d cgroup.procs files, got %d", MAX_CGROUPS, nfds);
    for (int i = 0; i < ninstance_cgroups; i++)
        close(instance_cgroups[i]);
    for (int i = 0; i < nfds; i++)
        instance_cgroups[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
    ninstance_cgroups = nfds;
    reply_ok(0, 0);
}

static void handle(const struct thaw_agent_msg *req, char *payload, const int *fds, int nfds)
{
    switch (req->op) {
    case THAW_AGENT_PING:
        return reply_ok(0, 0);
    case THAW_AGENT_STUB:
        return do_stub(req, fds, nfds);
    case THAW_AGENT_SPAWN:
        return do_spawn(req, payload, fds, nfds);
    case THAW_AGENT_MOUNT_FUNCTION:
        return do_mount_function(fds, nfds);
    case THAW_AGENT_FRESH_TMP:
        return do_fresh_tmp(payload);
    case THAW_AGENT_HOSTNAME:
        if (sethostname(payload, req->len) < 0)
            return reply_error(errno, "sethostname %s", payload);
        return reply_ok(0, 0);
    case THAW_AGENT_NETLINK:
        return do_netlink();
    case THAW_AGENT_CGROUPS:
        return do_cgroups(fds, nfds);
    default:
        return reply_error(EINVAL, "unknown request %u", req->op);
    }
}

static void reap(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG | __WALL)) > 0) {
        int32_t raw = status;
        send_msg(THAW_AGENT_EXITED, pid, &raw, sizeof raw, NULL, 0, 0);
    }
}

static int serve(void)
{
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        return 1;
    static char payload[THAW_AGENT_MAX_PAYLOAD + 1];
    for (;;) {
        struct pollfd p[2] = {{control, POLLIN, 0}, {sfd, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (p[1].revents) {
            struct signalfd_siginfo info;
            while (read(sfd, &info, sizeof info) > 0) {
            }
            reap();
        }
        if (!p[0].revents)
            continue;
        struct thaw_agent_msg req;
        int fds[THAW_AGENT_MAX_FDS], nfds;
        ssize_t n = recv_msg(&req, payload, fds, &nfds);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && req.op != 0) {
            reply_error(errno, "malformed request");
        } else if (req.op == 0) {
            return 0; /* the daemon is gone: so is the sandbox */
        } else {
            handle(&req, payload, fds, nfds);
        }
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        reap();
    }
}

/* -- start ----------------------------------------------------------------------------------- */

static int parse(int argc, char **argv, struct config *cfg)
{
    *cfg = (struct config){.control = -1, .hostname = "sandbox", .uid = 65534, .gid = 65534,
                           .tmp_options = "mode=1777,size=64m", .netns_fd = -1};
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--control"))
            cfg->control = atoi(v);
        else if (!strcmp(k, "--root"))
            cfg->root = v;
        else if (!strcmp(k, "--ro") && cfg->nro < MAX_PATHS)
            cfg->ro[cfg->nro++] = v;
        else if (!strcmp(k, "--cgroup-fd") && cfg->ncgroups < MAX_CGROUPS)
            cfg->cgroup_fds[cfg->ncgroups++] = atoi(v);
        else if (!strcmp(k, "--hostname"))
            cfg->hostname = v;
        else if (!strcmp(k, "--uid"))
            cfg->uid = (unsigned)atoi(v);
        else if (!strcmp(k, "--gid"))
            cfg->gid = (unsigned)atoi(v);
        else if (!strcmp(k, "--tmp"))
            cfg->tmp_options = v;
        else if (!strcmp(k, "--userns") && sscanf(v, "%u:%u", &cfg->userns_uid, &cfg->userns_gid) == 2)
            cfg->userns = 1;
        else if (!strcmp(k, "--netns-fd"))
            cfg->netns_fd = atoi(v);
        else {
            fprintf(stderr, "thaw-agent: unknown option %s\n", k);
            return -1;
        }
    }
    if (cfg->control < 0 || !cfg->root || (argc - 1) % 2) {
        fprintf(stderr, "usage: thaw-agent --control FD --root DIR [--ro PATH]... [--cgroup-fd FD]... "
                        "[--hostname NAME] [--uid UID --gid GID] [--tmp OPTIONS] [--userns HOSTUID:HOSTGID] "
                        "[--netns-fd FD]\n");
        return -1;
    }
    return 0;
}

static int wait_status(pid_t pid)
{
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return 1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

#define SANDBOX_NAMESPACES (CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID)

/* Write `text` into a /proc file in one write(2), as the id map files want. */
static int write_proc(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return fail("open %s", path);
    ssize_t n = write(fd, text, strlen(text));
    int err = errno;
    close(fd);
    errno = err;
    return n == (ssize_t)strlen(text) ? 0 : fail("write %s", path);
}

/* Root inside is the host's userns_uid/gid; the guests' uid and gid map to themselves. */
static int write_id_maps(pid_t pid, const struct config *cfg)
{
    char path[64], map[128];
    snprintf(map, sizeof map, "0 %u 1\n%u %u 1\n", cfg->userns_uid, cfg->uid, cfg->uid);
    snprintf(path, sizeof path, "/proc/%d/uid_map", (int)pid);
    if (write_proc(path, map) < 0)
        return -1;
    snprintf(map, sizeof map, "0 %u 1\n%u %u 1\n", cfg->userns_gid, cfg->gid, cfg->gid);
    snprintf(path, sizeof path, "/proc/%d/gid_map", (int)pid);
    return write_proc(path, map);
}

/* Unshare a user namespace and become its root. The kernel lets a map of more than one id be
 * written only by a process with CAP_SETUID over the *parent* namespace, which we no longer are
 * once inside: a helper forked before (still host root) writes it, and reports "errno text". */
static int new_user_namespace(const struct config *cfg)
{
    int go[2], done[2];
    if (pipe2(go, O_CLOEXEC) < 0 || pipe2(done, O_CLOEXEC) < 0)
        return fail("pipe");
    pid_t self = getpid(), helper = fork();
    if (helper < 0)
        return fail("fork of the id map writer");
    if (helper == 0) {
        char c, report[sizeof failure + 16];
        if (read(go[0], &c, 1) == 1 && write_id_maps(self, cfg) < 0) {
            int len = snprintf(report, sizeof report, "%d %s", errno, failure);
            if (write(done[1], report, (size_t)len) < 0)
                _exit(1);
        }
        _exit(0);
    }
    close(go[0]);
    close(done[1]);
    int unshared = unshare(CLONE_NEWUSER), err = errno;
    if (unshared == 0 && write(go[1], "g", 1) != 1) /* else EOF: the helper exits without writing */
        err = errno, unshared = -1;
    close(go[1]);
    char report[sizeof failure + 16];
    ssize_t n = read(done[0], report, sizeof report - 1); /* the report, or EOF once the helper exits */
    close(done[0]);
    waitpid(helper, NULL, 0);
    if (unshared < 0)
        return errno = err, fail("unshare(CLONE_NEWUSER)");
    if (n > 0) {
        report[n] = 0;
        const char *text = strchr(report, ' ');
        snprintf(failure, sizeof failure, "%.500s", text ? text + 1 : report);
        errno = atoi(report);
        return -1;
    }
    /* Drop the host's supplementary groups (root's): they would still count outside. */
    if (setresgid(0, 0, 0) < 0 || setgroups(0, NULL) < 0 || setresuid(0, 0, 0) < 0)
        return fail("becoming root of the user namespace");
    return 0;
}

static int enter_namespaces(void)
{
    /* A sandbox made for a container joined the pod's network namespace already (join_netns). */
    int flags = settings->netns_fd >= 0 ? SANDBOX_NAMESPACES & ~CLONE_NEWNET : SANDBOX_NAMESPACES;
    return unshare(flags) < 0 ? fail("unshare") : 0;
}

/* --netns-fd: a sandbox made for a container (containerd-shim-thaw-v2) lives in the network
 * namespace its OCI spec names (the pod's, set up by the CNI) instead of a new one. Joined first,
 * as host root in the host's user namespace: from inside a new user namespace, setns into a
 * namespace the host's owns is refused (EPERM). */
static int join_netns(const struct config *cfg)
{
    if (cfg->netns_fd < 0)
        return 0;
    if (setns(cfg->netns_fd, CLONE_NEWNET) < 0)
        return fail("setns into the container's network namespace (--netns-fd %d)", cfg->netns_fd);
    close(cfg->netns_fd);
    return 0;
}

/* With a user namespace the order matters. The skeleton is built first, as host root in a mount
 * namespace of the host's user namespace: host paths are reached with host root's rights (a leaf
 * under a 0700 home stays reachable, though the agent will be an unprivileged host uid). Then the
 * user namespace, then the others, which are owned by the new one: that ownership is what lets the
 * agent (root inside) mount, set the hostname and hand out a working netlink socket. */
static int enter_user_namespaces(const struct config *cfg)
{
    if (unshare(CLONE_NEWNS) < 0)
        return fail("unshare(CLONE_NEWNS) for the skeleton");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        return fail("making / private");
    if (build_skeleton(cfg, 1) < 0)
        return -1;
    if (chdir(cfg->root) < 0) /* the agent finds its root as its cwd: see enter_root */
        return fail("chdir %s", cfg->root);
    return new_user_namespace(cfg) < 0 ? -1 : enter_namespaces();
}

int main(int argc, char **argv)
{
    struct config cfg;
    if (parse(argc, argv, &cfg) < 0)
        return 2;
    control = cfg.control;
    settings = &cfg;
    for (int i = 0; i < cfg.ncgroups; i++) {
        if (pwrite(cfg.cgroup_fds[i], "0", 1, 0) != 1) {
            fail("joining the agent's cgroup");
            reply_error(errno, "%s", failure);
            return 1;
        }
        close(cfg.cgroup_fds[i]);
    }
    if (join_netns(&cfg) < 0 || (cfg.userns ? enter_user_namespaces(&cfg) : enter_namespaces()) < 0) {
        reply_error(errno, "%s", failure);
        return 1;
    }
    pid_t agent = fork();
    if (agent < 0) {
        reply_error(errno, "fork of the agent");
        return 1;
    }
    if (agent > 0) { /* stay as the agent's parent in the host's pid namespace: the daemon reaps us */
        close(control);
        return wait_status(agent);
    }
    prctl(PR_SET_NAME, "thaw-agent");
    if (build_rootfs(&cfg) < 0) {
        reply_error(errno, "%s", failure);
        return 1;
    }
    thaw_read_specials(&specials); /* once, for every stub (see stub_prepare.h) */
    thaw_empty_bounding_set();
    syscall(SYS_close_range, 3, control > 3 ? control - 1 : 3, 0);
    syscall(SYS_close_range, control + 1, ~0U, 0);
    if (send_msg(THAW_AGENT_READY, 0, NULL, 0, NULL, 0, getpid()) < 0)
        return 1;
    return serve();
}

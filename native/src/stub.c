/* thaw-stub: the minimal process a restore turns into an instance, for use without a sandbox.
 *
 *   thaw-stub [--bare] [--unshare FLAGS] SRC:DST...
 *
 * Moves each inherited fd SRC to DST (3: the control socket; the restorer's fds go to >= 1000),
 * closes every other fd but 0-3 (0-2: the log pipe), prepares what saves a restore work
 * (stub_prepare.h; not with --bare, which makes it a stub like any other program that stops
 * itself) and stops itself with SIGSTOP; the tracer takes it from there. With CLONE_NEWPID in FLAGS it unshares, forks a reaper that is pid 1 of the new
 * namespace, and that reaper forks the stub (pid 2: a pid 1 ignores its own SIGSTOP). The
 * launcher's process waits for the reaper and exits with the stub's status, so the caller sees
 * the instance's exit code. It is exec'd fresh, never a fork of the multi-threaded daemon.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "stub_prepare.h"

#define CONTROL_FD 3

static int status_code(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 1;
}

/* Wait for `child`, reaping everything else meanwhile (we may be pid 1); return its exit code. */
static int reap_until(pid_t child)
{
    for (;;) {
        int status;
        pid_t got = waitpid(-1, &status, __WALL);
        if (got == child)
            return status_code(status);
        if (got < 0 && errno != EINTR)
            return 1;
    }
}

static int bare;

/* Place each SRC at its DST. Every source is first copied above the highest destination: a source
 * may itself hold a number another move needs (a parent with more than a thousand fds open, or
 * the control socket), and moving one straight to its place would close it. */
static int become_stub(int nmoves, char **moves)
{
    int top = THAW_FIRST_RESTORE_FD - 1, src[nmoves > 0 ? nmoves : 1], dst[nmoves > 0 ? nmoves : 1];
    for (int i = 0; i < nmoves; i++) {
        if (sscanf(moves[i], "%d:%d", &src[i], &dst[i]) != 2 ||
            (dst[i] != CONTROL_FD && dst[i] < THAW_FIRST_RESTORE_FD)) {
            fprintf(stderr, "thaw-stub: bad fd move %s (want SRC:3 or SRC:DST with DST >= %d)\n", moves[i],
                    THAW_FIRST_RESTORE_FD);
            return 2;
        }
        if (dst[i] > top)
            top = dst[i];
    }
    for (int i = 0; i < nmoves; i++) {
        src[i] = fcntl(src[i], F_DUPFD, top + 1);
        if (src[i] < 0) {
            perror("thaw-stub: fcntl(F_DUPFD)");
            return 2;
        }
    }
    for (int i = 0; i < nmoves; i++) {
        if (dup2(src[i], dst[i]) < 0) {
            perror("thaw-stub: dup2");
            return 2;
        }
    }
    syscall(SYS_close_range, 4, THAW_FIRST_RESTORE_FD - 1, 0);
    syscall(SYS_close_range, top + 1, ~0U, 0);
    if (!bare)
        thaw_stub_prepare(NULL);
    /* A direct kill(2): the stub then rests right after a `syscall` instruction, where the
     * tracer's first injected syscall can reuse it. */
    syscall(SYS_kill, getpid(), SIGSTOP);
    fprintf(stderr, "thaw-stub: resumed without a restore\n");
    return 111;
}

int main(int argc, char **argv)
{
    int flags = 0, first = 1;
    if (argc > first && strcmp(argv[first], "--bare") == 0) {
        bare = 1;
        first++;
    }
    if (argc > first + 1 && strcmp(argv[first], "--unshare") == 0) {
        flags = (int)strtol(argv[first + 1], NULL, 0);
        first += 2;
    }
    if (flags && unshare(flags) < 0) {
        perror("thaw-stub: unshare");
        return 2;
    }
    if (!(flags & CLONE_NEWPID))
        return become_stub(argc - first, argv + first);
    pid_t reaper = fork();
    if (reaper < 0) {
        perror("thaw-stub: fork");
        return 2;
    }
    if (reaper > 0) {
        syscall(SYS_close_range, 3, ~0U, 0); /* only the stub keeps the control socket and fds */
        return reap_until(reaper);
    }
    pid_t stub = fork(); /* the reaper is pid 1 here; the stub is pid 2 */
    if (stub < 0)
        _exit(2);
    if (stub == 0)
        _exit(become_stub(argc - first, argv + first));
    syscall(SYS_close_range, 3, ~0U, 0);
    _exit(reap_until(stub));
}

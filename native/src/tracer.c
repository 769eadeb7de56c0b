/* The tracer's side of a restore, in C (see thaw_native.h and snapshot/restore.py).
 *
 * Python decides what a restore does; these functions do the ptrace work of its stretches
 * between decisions without returning to the interpreter: seize a parked stub, copy the
 * restorer in and run it to its int3, then unmap the restorer with an injected syscall, set the
 * final thread state and detach. Each ptrace request costs a microsecond or two here, against
 * tens through Python, and the restore is mostly ptrace requests.
 */
#define _GNU_SOURCE
#include "thaw_native.h"
#include "restorer.h"

#include <elf.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PTRACE_GET_RSEQ_CONFIGURATION
#define PTRACE_GET_RSEQ_CONFIGURATION 0x420f
#endif

int thaw_trace_pin(pid_t pid, struct thaw_pin *pin)
{
    cpu_set_t stub, self, both, one;
    pin->cpu = -1;
    pin->stub_pinned = 0;
    if (sched_getaffinity(pid, sizeof stub, &stub) < 0 || sched_getaffinity(0, sizeof self, &self) < 0)
        return -1;
    memcpy(pin->stub_mask, &stub, sizeof pin->stub_mask);
    memcpy(pin->self_mask, &self, sizeof pin->self_mask);
    CPU_AND(&both, &stub, &self);
    int cpu = sched_getcpu();
    if (cpu < 0 || !CPU_ISSET(cpu, &both)) {
        for (cpu = 0; cpu < CPU_SETSIZE && !CPU_ISSET(cpu, &both); cpu++)
            ;
        if (cpu == CPU_SETSIZE)
            return 0; /* no CPU in common: go on unpinned */
    }
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    if (sched_setaffinity(0, sizeof one, &one) < 0)
        return 0;
    pin->cpu = cpu;
    pin->stub_pinned = sched_setaffinity(pid, sizeof one, &one) == 0;
    return 0;
}

void thaw_trace_unpin_stub(pid_t pid, struct thaw_pin *pin)
{
    /* Once: after that the process is the instance's, which may set its own affinity. */
    if (pin->stub_pinned)
        sched_setaffinity(pid, sizeof pin->stub_mask, (const cpu_set_t *)pin->stub_mask);
    pin->stub_pinned = 0;
}

void thaw_trace_unpin_self(const struct thaw_pin *pin)
{
    if (pin->cpu >= 0)
        sched_setaffinity(0, sizeof pin->self_mask, (const cpu_set_t *)pin->self_mask);
}

void thaw_trace_repin_self(const struct thaw_pin *pin)
{
    cpu_set_t one;
    CPU_ZERO(&one);
    if (pin->cpu < 0)
        return;
    CPU_SET(pin->cpu, &one);
    sched_setaffinity(0, sizeof one, &one);
}

static int fail(struct thaw_trace_error *e, int step, int err)
{
    e->step = step;
    e->err = err;
    return -1;
}

/* waitpid for the tracee, counting the stop; 0 or -1 with errno. */
static int wait_for(pid_t pid, int *status, struct thaw_trace_error *e)
{
    for (;;) {
        pid_t got = waitpid(pid, status, __WALL);
        if (got == pid) {
            e->trips++;
            e->status = *status;
            return 0;
        }
        if (got < 0 && errno != EINTR)
            return -1;
    }
}

static int event_of(int status)
{
    return status >> 16;
}

int thaw_trace_seize_stopped(pid_t pid, struct thaw_trace_error *e)
{
    /* A seized tracee in group-stop re-enters it whenever resumed. SIGCONT ends the group-stop;
     * the tracee then dequeues it and, traced, reports its signal-delivery-stop before running
     * any code of its own: the stop restores start from (the SIGCONT is never delivered). */
    int status = 0;
    if (ptrace(PTRACE_SEIZE, pid, 0, 0) < 0 || ptrace(PTRACE_INTERRUPT, pid, 0, 0) < 0)
        return fail(e, THAW_TRACE_SEIZE, errno);
    do {
        if (wait_for(pid, &status, e) < 0)
            return fail(e, THAW_TRACE_SEIZE, errno);
        /* the plain job-control report a parent gets comes first: the ptrace one follows */
    } while (WIFSTOPPED(status) && event_of(status) == 0 && WSTOPSIG(status) == SIGSTOP);
    if (!WIFSTOPPED(status))
        return fail(e, THAW_TRACE_EXITED, 0);
    if (event_of(status) != PTRACE_EVENT_STOP)
        return fail(e, THAW_TRACE_NOT_STOPPED, 0);
    if (kill(pid, SIGCONT) < 0 || ptrace(PTRACE_CONT, pid, 0, 0) < 0)
        return fail(e, THAW_TRACE_SEIZE, errno);
    for (;;) {
        if (wait_for(pid, &status, e) < 0)
            return fail(e, THAW_TRACE_SEIZE, errno);
        if (!WIFSTOPPED(status))
            return fail(e, THAW_TRACE_EXITED, 0);
        if (WSTOPSIG(status) == SIGCONT && event_of(status) == 0)
            return 0;
        if (ptrace(PTRACE_CONT, pid, 0, 0) < 0) /* the leftover interrupt's stop */
            return fail(e, THAW_TRACE_SEIZE, errno);
    }
}

static int64_t first_changed(const struct thaw_file_check *files, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct stat st;
        const struct thaw_file_check *f = &files[i];
        if (fstat((int)f->fd, &st) < 0 || st.st_nlink == 0 || (uint64_t)st.st_dev != f->dev ||
            (uint64_t)st.st_ino != f->ino || (int64_t)st.st_size != f->size ||
            (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec != f->mtime_ns)
            return (int64_t)i;
    }
    return -1;
}

/* Wait for the restorer's int3 and read its argument block back. */
static int wait_blob(pid_t pid, uint64_t args, void *outcome, size_t outcome_len, struct thaw_trace_error *e)
{
    int status = 0;
    if (wait_for(pid, &status, e) < 0)
        return fail(e, THAW_TRACE_STRAY_STOP, errno);
    if (!WIFSTOPPED(status))
        return fail(e, THAW_TRACE_EXITED, 0);
    if (WSTOPSIG(status) != SIGTRAP || event_of(status) != 0) {
        struct user_regs_struct regs;
        if (ptrace(PTRACE_GETREGS, pid, 0, &regs) == 0)
            e->rip = regs.rip;
        return fail(e, THAW_TRACE_STRAY_STOP, 0);
    }
    struct iovec local = {outcome, outcome_len}, remote = {(void *)args, outcome_len};
    if (process_vm_readv(pid, &local, 1, &remote, 1, 0) != (ssize_t)outcome_len)
        return fail(e, THAW_TRACE_READ, errno);
    return 0;
}

/* What the restorer's first op needs to know of the stub: its rseq registration, and its
 * special mappings from the report it left (none: the blob reads its maps). */
static int stub_facts(pid_t pid, struct thaw_stub_facts *facts, struct thaw_trace_error *e)
{
    struct thaw_rseq_config conf;
    struct thaw_stub_report report;
    if (ptrace(PTRACE_GET_RSEQ_CONFIGURATION, pid, sizeof conf, &conf) < 0)
        return fail(e, THAW_TRACE_REGS, errno);
    memset(facts, 0, sizeof *facts);
    facts->rseq_pointer = conf.rseq_abi_pointer;
    facts->rseq_size = conf.rseq_abi_size;
    facts->rseq_signature = conf.signature;
    struct iovec local = {&report, sizeof report}, remote = {(void *)THAW_STUB_REPORT, sizeof report};
    if (process_vm_readv(pid, &local, 1, &remote, 1, 0) == (ssize_t)sizeof report &&
        report.magic == THAW_STUB_REPORT_MAGIC && report.nspecials <= THAW_SPECIALS_MAX) {
        facts->nspecials = report.nspecials;
        memcpy(facts->specials, report.specials, sizeof facts->specials);
    }
    return 0;
}

/* Copy the image in, with the stub's facts written into it at `stub_at`. */
static int write_image(pid_t pid, const struct thaw_blob_run *run, struct thaw_trace_error *e)
{
    struct iovec local[3], remote = {(void *)run->scratch, run->len};
    size_t n = 1;
    local[0] = (struct iovec){(void *)run->image, run->len};
    struct thaw_stub_facts facts;
    if (run->stub_at >= 0) {
        size_t at = (size_t)run->stub_at;
        if (at + sizeof facts > run->len)
            return fail(e, THAW_TRACE_WRITE, EINVAL);
        if (stub_facts(pid, &facts, e) < 0)
            return -1;
        local[0].iov_len = at;
        local[1] = (struct iovec){&facts, sizeof facts};
        local[2] = (struct iovec){(char *)run->image + at + sizeof facts, run->len - at - sizeof facts};
        n = 3;
    }
    ssize_t written = process_vm_writev(pid, local, n, &remote, 1, 0);
    if (written != (ssize_t)run->len) /* short: the scratch area ends early */
        return fail(e, THAW_TRACE_WRITE, written < 0 ? errno : EFAULT);
    return 0;
}

int thaw_trace_run_blob(pid_t pid, struct thaw_blob_run *run, void *outcome, size_t outcome_len,
                        struct thaw_trace_error *e)
{
    struct user_regs_struct regs;
    run->changed_file = -1;
    if (ptrace(PTRACE_GETREGS, pid, 0, &regs) < 0)
        return fail(e, THAW_TRACE_REGS, errno);
    if (write_image(pid, run, e) < 0)
        return -1;
    regs.rip = run->scratch;
    regs.rdi = run->args;
    regs.rsp = run->stack_top - 8; /* as if called: rsp % 16 == 8 at a function's first instruction */
    regs.orig_rax = (unsigned long long)-1;
    if (ptrace(PTRACE_SETREGS, pid, 0, &regs) < 0)
        return fail(e, THAW_TRACE_REGS, errno);
    if (ptrace(PTRACE_CONT, pid, 0, 0) < 0)
        return fail(e, THAW_TRACE_RESUME, errno);
    run->changed_file = first_changed(run->files, run->nfiles);
    return wait_blob(pid, run->args, outcome, outcome_len, e);
}

int thaw_trace_resume_blob(pid_t pid, uint64_t args, void *outcome, size_t outcome_len, struct thaw_trace_error *e)
{
    if (ptrace(PTRACE_CONT, pid, 0, 0) < 0)
        return fail(e, THAW_TRACE_RESUME, errno);
    return wait_blob(pid, args, outcome, outcome_len, e);
}

/* Run one syscall in the stopped tracee at `insn` by a single step. */
static int inject(pid_t pid, const struct user_regs_struct *base, uint64_t insn, long nr, uint64_t a0, uint64_t a1,
                  struct thaw_trace_error *e)
{
    struct user_regs_struct regs = *base;
    regs.rax = (unsigned long long)nr;
    regs.orig_rax = (unsigned long long)-1;
    regs.rip = insn;
    regs.rdi = a0;
    regs.rsi = a1;
    int status = 0;
    if (ptrace(PTRACE_SETREGS, pid, 0, &regs) < 0)
        return fail(e, THAW_TRACE_REGS, errno);
    if (ptrace(PTRACE_SINGLESTEP, pid, 0, 0) < 0)
        return fail(e, THAW_TRACE_RESUME, errno);
    if (wait_for(pid, &status, e) < 0)
        return fail(e, THAW_TRACE_STRAY_STOP, errno);
    if (!WIFSTOPPED(status))
        return fail(e, THAW_TRACE_EXITED, 0);
    if (ptrace(PTRACE_GETREGS, pid, 0, &regs) < 0)
        return fail(e, THAW_TRACE_REGS, errno);
    if (WSTOPSIG(status) != SIGTRAP) {
        e->rip = regs.rip;
        return fail(e, THAW_TRACE_STRAY_STOP, 0);
    }
    long ret = (long)regs.rax;
    if (ret < 0 && ret > -4096) {
        e->status = (int32_t)nr; /* which call failed */
        return fail(e, THAW_TRACE_INJECTED, (int)-ret);
    }
    return 0;
}

int thaw_trace_end_restore(pid_t pid, const struct thaw_restore_end *end, struct thaw_trace_error *e)
{
    struct user_regs_struct base;
    if (ptrace(PTRACE_GETREGS, pid, 0, &base) < 0)
        return fail(e, THAW_TRACE_REGS, errno);
    if (end->close_fd >= 0 && inject(pid, &base, end->syscall_insn, SYS_close, (uint64_t)end->close_fd, 0, e) < 0)
        return -1;
    if (inject(pid, &base, end->syscall_insn, SYS_munmap, end->unmap_start, end->unmap_len, e) < 0)
        return -1;
    /* Set from outside, the mask takes effect when the tracee resumes: no signal slips in. */
    uint64_t mask = end->sigmask;
    struct iovec xstate = {(void *)end->xstate, end->xstate_len};
    if (ptrace(PTRACE_SETSIGMASK, pid, sizeof mask, &mask) < 0 || ptrace(PTRACE_SETREGS, pid, 0, end->regs) < 0 ||
        ptrace(PTRACE_SETREGSET, pid, NT_X86_XSTATE, &xstate) < 0)
        return fail(e, THAW_TRACE_FINAL, errno);
    if (ptrace(PTRACE_DETACH, pid, 0, 0) < 0)
        return fail(e, THAW_TRACE_DETACH, errno);
    if (end->pin)
        thaw_trace_unpin_stub(pid, end->pin);
    return 0;
}

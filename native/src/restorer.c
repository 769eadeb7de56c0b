/* The restorer blob: position-independent, no libc, no data, no relocations.
 *
 * Built by native/build.py into a flat binary whose first instruction jumps to restorer_entry,
 * copied into a stopped stub's scratch mapping, and entered by the tracer with rdi = the argument
 * block and rsp at the top of a stack in the same mapping. It runs the syscall program in the
 * block (see restorer.h) and ends in int3 — never returns — whether the program succeeded or not;
 * the tracer reads `failed_op`/`result` to learn which.
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
#define NR_READ 0
#define NR_MUNMAP 11
#define NR_MREMAP 25
#define NR_PRCTL 157
#define NR_RSEQ 334
#define PR_CAPBSET_READ_ 23
#define PR_CAPBSET_DROP_ 24
#define MREMAP_MAYMOVE_ 1
#define MREMAP_FIXED_ 2
#define RSEQ_FLAG_UNREGISTER_ 1
#define EXDEV_ 18
#define TASK_TOP_ ((1ULL << 47) - 4096)
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

/* -- THAW_OP_CLEAN_STUB (see restorer.h) ------------------------------------------------------ */
/* No arrays of pointers: they would need relocations. The names, NUL-separated, end with "". */
static const char special_names[] = "[vvar]\0[vvar_vclock]\0[vdso]\0";

struct mapping {
    uint64_t start;
    uint64_t end;
};

static int same(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static int is_special(const char *name)
{
    for (const char *known = special_names; *known;) {
        if (same(known, name))
            return 1;
        while (*known++)
            ;
    }
    return 0;
}

static uint64_t hex(const char **p, const char *end)
{
    uint64_t v = 0;
    for (; *p < end; (*p)++) {
        char c = **p;
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0)
            break;
        v = v << 4 | (uint64_t)d;
    }
    return v;
}

/* Note where the stub's special mapping `name` is. -EXDEV when the template lacks it or has it
 * in another size. */
static long note_special(const char *name, uint64_t start, uint64_t stop, const struct thaw_stub_clean *c,
                         struct mapping *seen, uint64_t *nseen)
{
    for (uint64_t i = 0; i < c->nspecials; i++) {
        if (!same(c->specials[i].name, name))
            continue;
        if (stop - start != c->specials[i].end - c->specials[i].start)
            return -EXDEV_;
        seen[i].start = start;
        seen[i].end = stop;
        (*nseen)++;
        return 0;
    }
    return -EXDEV_;
}

/* One line of /proc/self/maps, "start-end perms offset dev inode   path". */
static long note_line(const char *p, const char *end, const struct thaw_stub_clean *c, struct mapping *seen,
                      uint64_t *nseen)
{
    uint64_t start = hex(&p, end);
    p++;
    uint64_t stop = hex(&p, end);
    for (int field = 0; field < 4; field++) { /* perms, offset, dev, inode */
        while (p < end && *p == ' ')
            p++;
        while (p < end && *p != ' ')
            p++;
    }
    while (p < end && *p == ' ')
        p++;
    char name[16];
    uint64_t len = (uint64_t)(end - p);
    if (len == 0 || len >= sizeof name || *p != '[' || start >= TASK_TOP_)
        return 0;
    for (uint64_t i = 0; i < len; i++)
        name[i] = p[i];
    name[len] = 0;
    return is_special(name) ? note_special(name, start, stop, c, seen, nseen) : 0;
}

static long read_specials(const struct thaw_stub_clean *c, struct mapping *seen)
{
    char buf[8192];
    uint64_t have = 0, nseen = 0;
    int skipping = 0; /* inside a line too long to be a special's */
    long fd = raw_syscall6(NR_OPENAT, AT_FDCWD_, (long)"/proc/self/maps", O_CLOEXEC_, 0, 0, 0);
    if (fd < 0)
        return fd;
    long r = 0;
    for (;;) {
        long n = raw_syscall6(NR_READ, fd, (long)(buf + have), (long)(sizeof buf - have), 0, 0, 0);
        if (n == -EINTR_)
            continue;
        if (n < 0) {
            r = n;
            break;
        }
        uint64_t end = have + (uint64_t)n, line = 0;
        for (uint64_t i = have; i < end && r == 0; i++) {
            if (buf[i] != '\n')
                continue;
            if (!skipping)
                r = note_line(buf + line, buf + i, c, seen, &nseen);
            skipping = 0;
            line = i + 1;
        }
        if (r < 0)
            break;
        if (n == 0)
            break; /* maps ends with a newline: nothing is left over */
        if (line == 0 && end == sizeof buf) { /* no newline in a full buffer */
            skipping = 1;
            have = 0;
            continue;
        }
        for (uint64_t i = line; i < end; i++)
            buf[i - line] = buf[i];
        have = end - line;
    }
    raw_syscall6(NR_CLOSE, fd, 0, 0, 0, 0, 0);
    if (r == 0 && nseen != c->nspecials)
        r = -EXDEV_;
    return r;
}

/* Unmap [0, TASK_TOP) but for the `n` mappings in `keep`, which this sorts. */
static long unmap_all_but(struct mapping *keep, uint64_t n)
{
    for (uint64_t i = 1; i < n; i++)
        for (uint64_t j = i; j > 0 && keep[j].start < keep[j - 1].start; j--) {
            struct mapping t = keep[j];
            keep[j] = keep[j - 1];
            keep[j - 1] = t;
        }
    uint64_t cursor = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (keep[i].start > cursor) {
            long r = raw_syscall6(NR_MUNMAP, (long)cursor, (long)(keep[i].start - cursor), 0, 0, 0, 0);
            if (r < 0)
                return r;
        }
        if (keep[i].end > cursor)
            cursor = keep[i].end;
    }
    return raw_syscall6(NR_MUNMAP, (long)cursor, (long)(TASK_TOP_ - cursor), 0, 0, 0, 0);
}

static long move(struct mapping *m, uint64_t to)
{
    uint64_t size = m->end - m->start;
    long r = raw_syscall6(NR_MREMAP, (long)m->start, (long)size, (long)size, MREMAP_MAYMOVE_ | MREMAP_FIXED_,
                          (long)to, 0);
    if (r < 0)
        return r;
    m->start = to;
    m->end = to + size;
    return 0;
}

/* mremap cannot move a mapping onto one it overlaps: then every special goes to `park` first. */
static long move_specials(const struct thaw_stub_clean *c, struct mapping *seen)
{
    int moved = 0, overlap = 0;
    for (uint64_t i = 0; i < c->nspecials; i++) {
        moved |= seen[i].start != c->specials[i].start;
        for (uint64_t j = 0; j < c->nspecials; j++)
            overlap |= seen[i].start < c->specials[j].end && c->specials[j].start < seen[i].end;
    }
    if (!moved)
        return 0;
    uint64_t park = c->park;
    for (uint64_t i = 0; overlap && i < c->nspecials; i++) {
        long r = move(&seen[i], park);
        if (r < 0)
            return r;
        park = seen[i].end;
    }
    for (uint64_t i = 0; i < c->nspecials; i++) {
        long r = move(&seen[i], c->specials[i].start);
        if (r < 0)
            return r;
    }
    return 0;
}

/* The stub's specials, from its report when the tracer passed one, else from its maps. */
static long find_specials(const struct thaw_stub_clean *c, struct mapping *seen)
{
    uint64_t n = c->stub.nspecials, nseen = 0;
    if (n == 0)
        return read_specials(c, seen);
    for (uint64_t i = 0; i < n && i < THAW_SPECIALS_MAX; i++) {
        const struct thaw_special *s = &c->stub.specials[i];
        long r = note_special(s->name, s->start, s->end, c, seen, &nseen);
        if (r < 0)
            return r;
    }
    return n == c->nspecials && nseen == n ? 0 : -EXDEV_;
}

static long clean_stub(const struct thaw_stub_clean *c)
{
    if (c->nspecials > THAW_SPECIALS_MAX)
        return -EXDEV_;
    if (c->stub.rseq_pointer) {
        long r = raw_syscall6(NR_RSEQ, (long)c->stub.rseq_pointer, c->stub.rseq_size, RSEQ_FLAG_UNREGISTER_,
                              c->stub.rseq_signature, 0, 0);
        if (r < 0)
            return r;
    }
    struct mapping seen[THAW_SPECIALS_MAX + 1], keep[THAW_SPECIALS_MAX + 1];
    long r = find_specials(c, seen);
    if (r < 0)
        return r;
    for (uint64_t i = 0; i < c->nspecials; i++)
        keep[i] = seen[i];
    keep[c->nspecials].start = c->keep_start;
    keep[c->nspecials].end = c->keep_end;
    r = unmap_all_but(keep, c->nspecials + 1);
    return r < 0 ? r : move_specials(c, seen);
}

/* -- THAW_OP_DROP_BOUNDING: a drop costs a credentials commit, a read does not ------------------ */
static long drop_bounding(long last_cap)
{
    long failed = 0;
    for (long cap = 0; cap <= last_cap; cap++) {
        if (raw_syscall6(NR_PRCTL, PR_CAPBSET_READ_, cap, 0, 0, 0, 0) != 1)
            continue;
        long r = raw_syscall6(NR_PRCTL, PR_CAPBSET_DROP_, cap, 0, 0, 0, 0);
        if (r < 0)
            failed = r;
    }
    return failed;
}

/* -- THAW_OP_THREADS (see restorer.h) --------------------------------------------------------- */
#define NR_CLONE3 435
#define NR_FUTEX 202
#define NR_EXIT 60
#define NR_RT_SIGRETURN 15
#define FUTEX_WAIT_PRIVATE_ 128
#define FUTEX_WAKE_PRIVATE_ 129
#define CLONE_THREAD_FLAGS_ 0x000d0f00ULL /* VM | FS | FILES | SIGHAND | THREAD | SYSVSEM | SETTLS */
#define CLONE_CHILD_CLEARTID_ 0x00200000ULL

struct clone_args_ {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid, set_tid_size,
        cgroup;
};

static long run_program(const struct thaw_restorer_op *ops, uint64_t nops, int64_t *failed_op, int64_t *result,
                        uint64_t *done);

/* rep movsb: a C loop may become a call to memcpy, and there is no libc; a volatile byte loop
 * would copy a frame (~3 KiB with AVX-512 state) a byte at a time. */
static void copy_bytes(uint64_t to, uint64_t from, uint64_t n)
{
    __asm__ volatile("rep movsb" : "+D"(to), "+S"(from), "+c"(n) : : "memory");
}

/* The blob's first bytes (restorer.lds puts .text.head first): a jump to the entry, then the one
 * instruction by which a thread leaves the scratch area (restorer.h, THAW_OP_THREADS_GO). The
 * `.org`s fail the build unless the call is at offset 5 and returns to offset 7: the uc_flags the
 * kernel reads is scratch + 7. */
__asm__(".pushsection .text.head, \"ax\", @progbits\n"
        "    jmp restorer_entry\n"
        "    .org 5, 0xcc\n"
        "thaw_leave:\n"
        "    call *%rsi\n"
        "    .org 7\n"
        ".popsection\n");

/* Thread `t` is READY or FAILED; the last of them to say so wakes the main thread. */
static void say(struct thaw_thread *t, struct thaw_threads *ts, uint32_t state)
{
    __atomic_store_n(&t->state, state, __ATOMIC_RELEASE);
    if (__atomic_add_fetch(&ts->ready, 1, __ATOMIC_ACQ_REL) == ts->nthreads)
        raw_syscall6(NR_FUTEX, (long)&ts->ready, FUTEX_WAKE_PRIVATE_, 1, 0, 0, 0);
}

/* A new thread starts here, on its stack in the scratch area, and never comes back. */
__attribute__((used, noinline, noreturn)) static void thread_main(struct thaw_thread *t, struct thaw_threads *ts)
{
    uint64_t done = 0;
    run_program((const struct thaw_restorer_op *)t->ops, t->nops, &t->failed_op, &t->result, &done);
    if (t->failed_op >= 0) {
        say(t, ts, THAW_THREAD_FAILED);
        for (;;)
            raw_syscall6(NR_EXIT, 0, 0, 0, 0, 0, 0);
    }
    copy_bytes(t->frame_at, t->frame, t->frame_size);
    say(t, ts, THAW_THREAD_READY);
    while (__atomic_load_n(&ts->go, __ATOMIC_ACQUIRE) == 0)
        raw_syscall6(NR_FUTEX, (long)&ts->go, FUTEX_WAIT_PRIVATE_, 0, 0, 0, 0);
    /* The frame is on the thread's own stack and the syscall instruction is the restored
     * image's: once the call at thaw_leave has pushed its return address (over the frame's
     * uc_flags, which the stack pointer 8 above the frame's puts there), nothing of the scratch
     * area is used. */
    __asm__ volatile("lea 8(%%rdi), %%rsp\n\t"
                     "mov %[nr], %%eax\n\t"
                     "jmp thaw_leave\n\t"
                     :
                     : "D"(t->sigreturn_sp), "S"(ts->syscall_insn), [nr] "i"(NR_RT_SIGRETURN)
                     : "memory");
    __builtin_unreachable();
}

/* clone3 onto `args->stack`; the child calls thread_main(t, ts) (r12 and r13 survive the
 * syscall in both), the parent gets the child's TID or -errno. */
static long clone_thread(struct clone_args_ *args, struct thaw_thread *t, struct thaw_threads *ts)
{
    long ret;
    register long r12 __asm__("r12") = (long)t;
    register long r13 __asm__("r13") = (long)ts;
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "mov %%r12, %%rdi\n\t"
                     "mov %%r13, %%rsi\n\t"
                     "call thread_main\n\t"
                     "ud2\n\t"
                     "1:\n\t"
                     : "=a"(ret)
                     : "a"(NR_CLONE3), "D"(args), "S"(sizeof *args), "r"(r12), "r"(r13)
                     : "rcx", "r11", "memory");
    return ret;
}

static long make_threads(struct thaw_threads *ts)
{
    struct thaw_thread *threads = (struct thaw_thread *)ts->threads;
    ts->failed_thread = -1;
    ts->ready = 0;
    for (uint64_t i = 0; i < ts->nthreads; i++) {
        struct thaw_thread *t = &threads[i];
        int tid = (int)t->tid;
        struct clone_args_ args = {0};
        args.flags = CLONE_THREAD_FLAGS_ | (t->clear_tid ? CLONE_CHILD_CLEARTID_ : 0);
        args.child_tid = t->clear_tid;
        args.stack = t->stack;
        args.stack_size = t->stack_size;
        args.tls = t->tls;
        args.set_tid = (uint64_t)&tid;
        args.set_tid_size = 1;
        t->failed_op = -1;
        t->state = THAW_THREAD_SETTING_UP;
        long r = clone_thread(&args, t, ts);
        if (r < 0) { /* those made already wait for `go`, which never comes: the stub is killed */
            t->result = r;
            ts->failed_thread = (int64_t)i;
            return r;
        }
    }
    /* All made first, then waited for once: on the one CPU they share, each runs its program
     * while the main thread sleeps, which wakes when the last has said READY or FAILED. */
    uint32_t ready;
    while ((ready = __atomic_load_n(&ts->ready, __ATOMIC_ACQUIRE)) < ts->nthreads)
        raw_syscall6(NR_FUTEX, (long)&ts->ready, FUTEX_WAIT_PRIVATE_, ready, 0, 0, 0);
    for (uint64_t i = 0; i < ts->nthreads; i++) {
        struct thaw_thread *t = &threads[i];
        if (__atomic_load_n(&t->state, __ATOMIC_ACQUIRE) != THAW_THREAD_READY) {
            ts->failed_thread = (int64_t)i;
            return t->result < 0 ? t->result : -EINTR_;
        }
    }
    return 0;
}

#define NR_SCHED_YIELD 24
#define NR_SCHED_SETAFFINITY 203
#define OUT_TRIES 100000

#define NR_GETDENTS64 217
#define NR_READLINK 89
#define O_DIRECTORY_ 0200000

/* 1 while the thread /proc/self/task/`tid` may still be inside [lo, hi): its pc there, or running
 * (on another CPU, when the tracer could not pin the stub) so that its pc is not known; 0 once it
 * is out. `tid` is a name from /proc/self/task: a TID as that /proc's pid namespace counts. */
static int still_inside(const char *tid, uint64_t lo, uint64_t hi)
{
    char path[64] = "/proc/self/task/";
    char *p = path + 16;
    for (int i = 0; tid[i] && i < 20; i++)
        *p++ = tid[i];
    for (const char *tail = "/syscall"; *tail;)
        *p++ = *tail++;
    *p = 0;
    long fd = raw_syscall6(NR_OPENAT, AT_FDCWD_, (long)path, O_CLOEXEC_, 0, 0, 0);
    if (fd == -2 /* ENOENT */ || fd == -3 /* ESRCH */)
        return 0; /* it exited */
    if (fd < 0)
        return 1;
    char buf[256];
    long n = raw_syscall6(NR_READ, fd, (long)buf, sizeof buf - 1, 0, 0, 0);
    raw_syscall6(NR_CLOSE, fd, 0, 0, 0, 0, 0);
    if (n <= 0 || buf[0] == 'r') /* "running" */
        return 1;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        n--;
    long start = n;
    while (start > 0 && buf[start - 1] != ' ')
        start--;
    const char *q = buf + start + 2; /* past "0x" */
    uint64_t pc = hex(&q, buf + n);
    return pc >= lo && pc < hi;
}

/* This thread's name in /proc/self/task ("PID/task/TID" is what /proc/thread-self points to). */
static long own_task(char *name, long size)
{
    char link[64];
    long n = raw_syscall6(NR_READLINK, (long)"/proc/thread-self", (long)link, sizeof link - 1, 0, 0, 0);
    if (n <= 0)
        return n < 0 ? n : -2;
    long start = n;
    while (start > 0 && link[start - 1] != '/')
        start--;
    long len = n - start < size - 1 ? n - start : size - 1;
    for (long i = 0; i < len; i++)
        name[i] = link[start + i];
    name[len] = 0;
    return 0;
}

/* Wait, yielding the CPU, until every other thread listed in /proc/self/task is out of [lo, hi).
 * The list comes from /proc, not from the TIDs the threads were given: those count in the
 * instance's pid namespace, which need not be the one this /proc shows (a stub without one). */
static long wait_out_of(uint64_t lo, uint64_t hi)
{
    char self[24];
    long r = own_task(self, sizeof self);
    if (r < 0)
        return r;
    /* The threads just woken cannot have left before they ran: let them run first, so most are
     * out at the first look (each look costs a /proc read). */
    raw_syscall6(NR_SCHED_YIELD, 0, 0, 0, 0, 0, 0);
    long dir = raw_syscall6(NR_OPENAT, AT_FDCWD_, (long)"/proc/self/task", O_DIRECTORY_ | O_CLOEXEC_, 0, 0, 0);
    if (dir < 0)
        return dir;
    char buf[2048];
    for (;;) {
        long n = raw_syscall6(NR_GETDENTS64, dir, (long)buf, sizeof buf, 0, 0, 0);
        if (n <= 0) {
            r = n;
            break;
        }
        for (long at = 0; at < n;) {
            uint16_t reclen = *(uint16_t *)(buf + at + 16);
            const char *name = buf + at + 19; /* struct linux_dirent64: ino, off, reclen, type, name */
            at += reclen;
            if (name[0] < '0' || name[0] > '9' || same(name, self))
                continue;
            for (int tries = 0; tries < OUT_TRIES && still_inside(name, lo, hi); tries++)
                raw_syscall6(NR_SCHED_YIELD, 0, 0, 0, 0, 0, 0);
        }
    }
    raw_syscall6(NR_CLOSE, dir, 0, 0, 0, 0, 0);
    return r;
}

/* 1 once thread `t` has run the call at thaw_leave: the word it pushed has replaced its frame's
 * uc_flags (restorer.h, THAW_OP_THREADS_GO). */
static int has_left(const struct thaw_thread *t)
{
    uint64_t was = *(const uint64_t *)(t->frame + (t->sigreturn_sp - t->frame_at)); /* the frame as built */
    return __atomic_load_n((const uint64_t *)t->sigreturn_sp, __ATOMIC_ACQUIRE) != was;
}

/* How often the main thread yields to a thread whose word has not changed before it asks /proc:
 * on the one CPU they share, the threads woken run before the main thread or as it yields, and
 * have nearly always left by the time it looks. */
#define LEAVE_TRIES 64

static long threads_go(struct thaw_threads *ts)
{
    struct thaw_thread *threads = (struct thaw_thread *)ts->threads;
    __atomic_store_n(&ts->go, 1, __ATOMIC_RELEASE);
    raw_syscall6(NR_FUTEX, (long)&ts->go, FUTEX_WAKE_PRIVATE_, 0x7fffffff, 0, 0, 0);
    int unsure = 0;
    for (uint64_t i = 0; i < ts->nthreads && !unsure; i++)
        for (int tries = 0; !has_left(&threads[i]); tries++) {
            if (tries == LEAVE_TRIES) {
                unsure = 1;
                break;
            }
            raw_syscall6(NR_SCHED_YIELD, 0, 0, 0, 0, 0, 0);
        }
    long r = unsure ? wait_out_of(ts->scratch, ts->scratch_end) : 0;
    if (r < 0)
        return r;
    for (uint64_t i = 0; i < ts->nthreads; i++) {
        r = raw_syscall6(NR_SCHED_SETAFFINITY, (long)threads[i].tid, THAW_AFFINITY_BYTES, (long)ts->affinity, 0, 0,
                         0);
        if (r < 0 && r != -3 /* ESRCH: it exited already */)
            return r;
    }
    return 0;
}

/* -- THAW_OP_PIPE: made at the lowest free fds, then moved above every captured fd (`spare`) so
 * neither end lands on the other's number, then to their own. */
#define NR_PIPE2 293
#define NR_FCNTL 72
#define F_DUPFD_ 0
#define F_SETFL_ 4
#define O_ACCMODE_ 3

static long place_fd(long from, long to, long flags)
{
    long r = raw_syscall6(NR_DUP3, from, to, flags & O_CLOEXEC_, 0, 0, 0);
    raw_syscall6(NR_CLOSE, from, 0, 0, 0, 0, 0);
    if (r < 0)
        return r;
    return raw_syscall6(NR_FCNTL, to, F_SETFL_, flags & ~(O_CLOEXEC_ | O_ACCMODE_), 0, 0, 0);
}

static long make_pipe(long read_fd, long write_fd, long read_flags, long write_flags, long spare)
{
    int ends[2];
    long r = raw_syscall6(NR_PIPE2, (long)ends, 0, 0, 0, 0, 0);
    if (r < 0)
        return r;
    long moved[2];
    for (int i = 0; i < 2; i++) {
        moved[i] = raw_syscall6(NR_FCNTL, ends[i], F_DUPFD_, spare, 0, 0, 0);
        raw_syscall6(NR_CLOSE, ends[i], 0, 0, 0, 0, 0);
        if (moved[i] < 0)
            return moved[i];
    }
    r = place_fd(moved[0], read_fd, read_flags);
    return r < 0 ? r : place_fd(moved[1], write_fd, write_flags);
}

#define NR_RECVMSG 47
#define SOL_SOCKET_ 1
#define SCM_RIGHTS_ 1
#define MSG_CTRUNC_ 8
#define EBADMSG_ 74

struct iovec_ {
    void *base;
    uint64_t len;
};

struct msghdr_ { /* the kernel's struct user_msghdr */
    void *name;
    int32_t namelen;
    struct iovec_ *iov;
    uint64_t iovlen;
    void *control;
    uint64_t controllen;
    uint32_t flags;
};

struct cmsghdr_ {
    uint64_t len;
    int32_t level;
    int32_t type;
};

/* THAW_OP_RECEIVE_FDS (restorer.h). Fields are set one by one: an initializer could become a
 * memset call, and there is no libc here. */
static long receive_fds(long sock, const struct thaw_receive_fds *r)
{
    char byte;
    struct iovec_ iov;
    struct msghdr_ msg;
    iov.base = &byte;
    iov.len = 1;
    msg.name = 0;
    msg.namelen = 0;
    msg.iov = &iov;
    msg.iovlen = 1;
    msg.control = (void *)r->control;
    msg.controllen = r->control_size;
    msg.flags = 0;
    long n;
    do
        n = raw_syscall6(NR_RECVMSG, sock, (long)&msg, 0, 0, 0, 0);
    while (n == -EINTR_);
    raw_syscall6(NR_CLOSE, sock, 0, 0, 0, 0, 0);
    if (n < 0)
        return n;
    const struct cmsghdr_ *c = (const struct cmsghdr_ *)r->control;
    const int32_t *fds = (const int32_t *)(c + 1);
    uint64_t got = 0;
    if (msg.controllen >= sizeof *c && c->level == SOL_SOCKET_ && c->type == SCM_RIGHTS_)
        got = (c->len - sizeof *c) / sizeof *fds;
    long result = (n == 0 || (msg.flags & MSG_CTRUNC_) || got != r->nfds) ? -EBADMSG_ : 0;
    const struct thaw_fd_move *moves = (const struct thaw_fd_move *)r->moves;
    for (uint64_t i = 0; result == 0 && i < r->nmoves; i++)
        if (moves[i].index < 0 || (uint64_t)moves[i].index >= got)
            result = -EBADMSG_;
        else if ((result = raw_syscall6(NR_DUP3, fds[moves[i].index], moves[i].to, 0, 0, 0, 0)) > 0)
            result = 0;
    for (uint64_t i = 0; i < got; i++)
        raw_syscall6(NR_CLOSE, fds[i], 0, 0, 0, 0, 0);
    return result;
}

static long run_op(const struct thaw_restorer_op *op, long saved)
{
    long a0 = (op->flags & THAW_OPF_ARG0_SAVED) ? saved : (long)op->args[0];
    long a1 = (op->flags & THAW_OPF_ARG1_SAVED) ? saved : (long)op->args[1];
    if (op->flags & THAW_OPF_WRITE_ARG0) /* a write that changes nothing: the CPU faults for writing */
        __asm__ volatile("lock orl $0, (%0)" : : "r"(a0) : "memory");
    if (op->kind == THAW_OP_PREAD)
        return pread_fully(a0, op->args[1], op->args[2], op->args[3]);
    if (op->kind == THAW_OP_PAUSE) {
        __asm__ volatile("int3" ::: "memory");
        return 0;
    }
    if (op->kind == THAW_OP_CLEAN_STUB)
        return clean_stub((const struct thaw_stub_clean *)a0);
    if (op->kind == THAW_OP_DROP_BOUNDING)
        return drop_bounding(a0);
    if (op->kind == THAW_OP_OPEN_FD)
        return open_fd(op->args[0], (long)op->args[1], (long)op->args[2], (long)op->args[3]);
    if (op->kind == THAW_OP_THREADS)
        return make_threads((struct thaw_threads *)a0);
    if (op->kind == THAW_OP_THREADS_GO)
        return threads_go((struct thaw_threads *)a0);
    if (op->kind == THAW_OP_PIPE)
        return make_pipe(a0, a1, (long)op->args[2], (long)op->args[3], (long)op->args[4]);
    if (op->kind == THAW_OP_RECEIVE_FDS)
        return receive_fds(a0, (const struct thaw_receive_fds *)a1);
    return raw_syscall6((long)op->nr, a0, a1, (long)op->args[2], (long)op->args[3], (long)op->args[4],
                        (long)op->args[5]);
}

/* Run `nops` ops in order, stopping at the first that fails (its index and result go out). */
static long run_program(const struct thaw_restorer_op *ops, uint64_t nops, int64_t *failed_op, int64_t *result,
                        uint64_t *done)
{
    long saved = 0;
    *failed_op = -1;
    *result = 0;
    for (uint64_t i = 0; i < nops; i++) {
        const struct thaw_restorer_op *op = &ops[i];
        long r = run_op(op, saved);
        if (r < 0 && r > -4096 && !(op->flags & THAW_OPF_ALLOW_ERROR)) {
            *failed_op = (int64_t)i;
            *result = r;
            return r;
        }
        if (op->flags & THAW_OPF_SAVE)
            saved = r;
        if (op->flags & THAW_OPF_STORE32)
            *(volatile uint32_t *)op->store = (uint32_t)r;
        *done = i + 1;
    }
    return 0;
}

__attribute__((section(".text.entry"), noreturn, used)) void restorer_entry(struct thaw_restorer_args *a)
{
    run_program((const struct thaw_restorer_op *)a->ops, a->nops, &a->failed_op, &a->result, &a->done);
    for (;;)
        __asm__ volatile("int3");
}

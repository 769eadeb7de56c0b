/* The restore pager: serves an instance's page faults from a template through userfaultfd, on
 * its own thread, off the Python interpreter.
 *
 * Two ways to answer a fault (thaw_pager_start's `cache_fd`):
 * - shared: write the pages into the template's *cache* segment (a sparse pool file laid out like
 *   the template; the instance maps it MAP_PRIVATE) with pwrite and UFFDIO_WAKE the faulting
 *   thread. The retried fault finds the page in the page cache and maps it, so every later
 *   instance shares it and never faults on it at all. pwrite, not memcpy into a shared mapping:
 *   shmem writes a page under its page lock, so nobody maps a half-written page (see cold.c).
 * - private (cache_fd -1): UFFDIO_COPY the pages into the instance (no sharing; for backends
 *   without a cache, and for copy-mode restores of compressed templates).
 * A range's pages are plain (the template segment holds them: lazy restores) or cold (the
 * template's compressed image holds them, cold.c: the chunk holding the faulting page is
 * decompressed and installed whole). A plain fault is answered a block at a time (64 KiB by
 * default: one fault instead of sixteen for a sequential scan).
 *
 * The pages each fault installed are recorded, the faulting page first, in order: the template's
 * working set, which later restores hand back as `prefetch` to be loaded (and decompressed) in
 * the pager's idle time, before the instance asks.
 *
 * The pager follows the instance: mremap of a registered range (UFFD_EVENT_REMAP) moves its
 * range, and a fork (UFFD_EVENT_FORK) adds the child's userfaultfd, so neither ever reads a hole
 * of the cache segment as zeros.
 */
#define _GNU_SOURCE
#include "thaw_native.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX_UFFDS 64
#define MSG_BATCH 32
#define PREFETCH_BATCH 64

struct thaw_pager {
    int stop_fd;
    int uffds[MAX_UFFDS];
    int nuffds;
    const uint8_t *src;
    int pidfd; /* the instance, killed when a fault cannot be served; -1: none */
    int cache_fd; /* -1: private fills */
    uint64_t cache_base;
    struct thaw_cold *cold;
    struct thaw_cold_ctx *cold_ctx;
    uint8_t *bounce; /* private cold fills: the chunk decompressed last */
    uint8_t *staging; /* shared plain fills: the block, copied out of the template first (see fill) */
    ssize_t bounce_chunk, last_prefetched_chunk;
    struct thaw_pager_range *ranges;
    size_t nranges, ranges_cap;
    size_t block;
    uint32_t *prefetch;
    size_t nprefetch, next_prefetch;
    uint8_t *seen;
    size_t seg_pages;
    uint32_t *ws;
    size_t ws_len;
    uint64_t faults, pages, prefetched, errors, cold_faults;
    pthread_t thread;
};

static int by_start(const void *a, const void *b)
{
    const struct thaw_pager_range *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

static struct thaw_pager_range *range_of_addr(struct thaw_pager *p, uint64_t addr)
{
    size_t lo = 0, hi = p->nranges;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        struct thaw_pager_range *r = &p->ranges[mid];
        if (addr < r->start)
            hi = mid;
        else if (addr >= r->start + r->len)
            lo = mid + 1;
        else
            return r;
    }
    return NULL;
}

static struct thaw_pager_range *range_of_offset(struct thaw_pager *p, uint64_t off)
{
    for (size_t i = 0; i < p->nranges; i++) /* prefetch only: a linear scan per batch is fine */
        if (off >= p->ranges[i].seg_off && off < p->ranges[i].seg_off + p->ranges[i].len)
            return &p->ranges[i];
    return NULL;
}

static void record(struct thaw_pager *p, uint64_t seg_off)
{
    size_t idx = seg_off / PAGE;
    if (idx < p->seg_pages && !p->seen[idx]) {
        p->seen[idx] = 1;
        p->ws[p->ws_len++] = (uint32_t)idx;
    }
}

static int wake(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(uffd, UFFDIO_WAKE, &range);
}

static int write_cache(struct thaw_pager *p, const uint8_t *from, uint64_t seg_off, uint64_t len)
{
    for (uint64_t done = 0; done < len;) {
        ssize_t n = pwrite(p->cache_fd, from + done, len - done, (off_t)(p->cache_base + seg_off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        done += (uint64_t)n;
    }
    return 0;
}

/* Private fill: UFFDIO_COPY `len` bytes at `from` to `start` in the instance. */
static int copy_in(int uffd, uint64_t start, const uint8_t *from, uint64_t len, int do_wake)
{
    struct uffdio_copy copy = {.dst = start, .src = (uint64_t)(uintptr_t)from, .len = len,
                               .mode = do_wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE};
    if (ioctl(uffd, UFFDIO_COPY, &copy) == 0)
        return 0;
    if (errno != EEXIST) /* EEXIST: part of the block is there already (an earlier block or prefetch) */
        return -1;
    return do_wake ? wake(uffd, start, len) : 0;
}

/* Install [start, start+len) of plain range r into the instance behind `uffd`.
 *
 * A shared fill goes through `staging`, never straight from the template's mapping: pwrite
 * copies from the source without faulting it in, and when a source page is not mapped in this
 * process yet the copy comes up short. shmem then zero-fills the rest of the new cache page,
 * marks it up to date and unlocks it before pwrite faults the source in and writes the rest, and
 * an instance thread faulting on that page in between maps it and reads zeros (seen as wrong
 * results when two threads fault at once). staging is this process's own memory, touched when
 * it was allocated: the copy into the cache page is whole the first time. */
static int fill(struct thaw_pager *p, int uffd, const struct thaw_pager_range *r, uint64_t start, uint64_t len,
                int do_wake)
{
    uint64_t off = r->seg_off + (start - r->start);
    if (p->cache_fd >= 0) {
        for (uint64_t done = 0; done < len;) {
            uint64_t n = len - done < p->block ? len - done : p->block;
            memcpy(p->staging, p->src + off + done, n);
            if (write_cache(p, p->staging, off + done, n) < 0)
                return -1;
            done += n;
        }
        return do_wake ? wake(uffd, start, len) : 0;
    }
    return copy_in(uffd, start, p->src + off, len, do_wake);
}

/* Whether the cache segment holds data (not a hole) all through [seg_off, seg_off+len). */
static int cached(struct thaw_pager *p, uint64_t seg_off, uint64_t len)
{
    off_t at = (off_t)(p->cache_base + seg_off);
    return lseek(p->cache_fd, at, SEEK_DATA) == at && lseek(p->cache_fd, at, SEEK_HOLE) >= at + (off_t)len;
}

/* Install cold chunk i, clipped to range r, into the instance behind `uffd`. */
static int fill_cold(struct thaw_pager *p, int uffd, const struct thaw_pager_range *r, size_t i, int do_wake)
{
    const struct thaw_cold_chunk *k = thaw_cold_chunk_at(p->cold, i);
    uint64_t lo = k->seg_off > r->seg_off ? k->seg_off : r->seg_off;
    uint64_t hi = k->seg_off + k->len < r->seg_off + r->len ? k->seg_off + k->len : r->seg_off + r->len;
    uint64_t start = r->start + (lo - r->seg_off), len = hi - lo;
    if (p->cache_fd >= 0) {
        /* Resident: another instance's pager filled it after our fault was raised; only wake. But
         * trust the mark only if the page is there: a cache truncated behind the image's back
         * would otherwise have the instance fault on it forever. */
        if (!thaw_cold_resident(p->cold, i) || !cached(p, lo, len)) {
            if (thaw_cold_fill_cache(p->cold, p->cold_ctx, i, p->cache_fd, p->cache_base, do_wake) < 0)
                return -1;
        }
        return do_wake ? wake(uffd, start, len) : 0;
    }
    if (p->bounce_chunk != (ssize_t)i) {
        p->bounce_chunk = -1;
        if (thaw_cold_decompress(p->cold, p->cold_ctx, i, p->bounce) < 0)
            return -1;
        p->bounce_chunk = (ssize_t)i;
    }
    return copy_in(uffd, start, p->bounce + (lo - k->seg_off), len, do_wake);
}

/* A page we cannot serve (a chunk that does not decompress, a failed write): the instance is
 * killed, never left running on wrong memory; the page gets zeros only so that no thread hangs
 * while the kill lands. Counted as an error. */
static void fail_fault(struct thaw_pager *p, int uffd, uint64_t addr)
{
    /* Counted before the kill: whoever sees the instance die asks the stats why. */
    __atomic_add_fetch(&p->errors, 1, __ATOMIC_RELEASE);
    if (p->pidfd >= 0)
        syscall(SYS_pidfd_send_signal, p->pidfd, SIGKILL, NULL, 0);
    struct uffdio_zeropage zp = {.range = {.start = addr, .len = PAGE}};
    if (ioctl(uffd, UFFDIO_ZEROPAGE, &zp) < 0)
        wake(uffd, addr, PAGE);
}

static void serve_cold_fault(struct thaw_pager *p, int uffd, const struct thaw_pager_range *r, uint64_t addr)
{
    uint64_t seg_off = r->seg_off + (addr - r->start);
    ssize_t i = p->cold ? thaw_cold_find(p->cold, seg_off) : -1;
    p->cold_faults++;
    if (i < 0 || fill_cold(p, uffd, r, (size_t)i, 1) < 0) {
        fail_fault(p, uffd, addr);
        return;
    }
    p->pages += thaw_cold_chunk_at(p->cold, (size_t)i)->len / PAGE;
    record(p, seg_off);
}

static void serve_fault(struct thaw_pager *p, int uffd, uint64_t addr)
{
    addr &= ~(PAGE - 1);
    struct thaw_pager_range *r = range_of_addr(p, addr);
    p->faults++;
    if (!r) { /* not ours (cannot happen while ranges follow remaps) */
        fail_fault(p, uffd, addr);
        return;
    }
    if (r->kind == THAW_RANGE_COLD) {
        serve_cold_fault(p, uffd, r, addr);
        return;
    }
    uint64_t start = addr & ~((uint64_t)p->block - 1), end = start + p->block;
    if (start < r->start)
        start = r->start;
    if (end > r->start + r->len)
        end = r->start + r->len;
    if (fill(p, uffd, r, start, end - start, 1) < 0) {
        /* the block failed as a whole: answer the faulting page alone */
        if (fill(p, uffd, r, addr, PAGE, 1) < 0)
            fail_fault(p, uffd, addr);
    }
    p->pages += (end - start) / PAGE;
    /* The faulting page first, then the rest of the block: the instance may use any of them
     * without another fault, so all are its working set (compress keeps them hot). */
    record(p, r->seg_off + (addr - r->start));
    for (uint64_t at = start; at < end; at += PAGE)
        record(p, r->seg_off + (at - r->start));
}

static void add_range(struct thaw_pager *p, struct thaw_pager_range r)
{
    if (p->nranges == p->ranges_cap) {
        size_t cap = p->ranges_cap * 2 + 8;
        struct thaw_pager_range *grown = realloc(p->ranges, cap * sizeof *grown);
        if (!grown) {
            p->errors++;
            return;
        }
        p->ranges = grown;
        p->ranges_cap = cap;
    }
    p->ranges[p->nranges++] = r;
}

/* mremap moved [from, from+len) to `to`: move the parts of our ranges inside it. */
static void remap(struct thaw_pager *p, uint64_t from, uint64_t to, uint64_t len)
{
    size_t n = p->nranges;
    for (size_t i = 0; i < n; i++) {
        struct thaw_pager_range r = p->ranges[i];
        uint64_t lo = r.start > from ? r.start : from;
        uint64_t hi = r.start + r.len < from + len ? r.start + r.len : from + len;
        if (lo >= hi)
            continue;
        p->ranges[i].len = 0; /* replaced by up to three pieces */
        if (lo > r.start)
            add_range(p, (struct thaw_pager_range){r.start, lo - r.start, r.seg_off, r.kind});
        add_range(p, (struct thaw_pager_range){to + (lo - from), hi - lo, r.seg_off + (lo - r.start), r.kind});
        if (hi < r.start + r.len)
            add_range(p, (struct thaw_pager_range){hi, r.start + r.len - hi, r.seg_off + (hi - r.start), r.kind});
    }
    size_t kept = 0;
    for (size_t i = 0; i < p->nranges; i++)
        if (p->ranges[i].len)
            p->ranges[kept++] = p->ranges[i];
    p->nranges = kept;
    qsort(p->ranges, p->nranges, sizeof *p->ranges, by_start);
}

/* Drain one userfaultfd; returns -1 when it is finished (its process is gone). */
static int serve_uffd(struct thaw_pager *p, int uffd)
{
    struct uffd_msg msgs[MSG_BATCH];
    ssize_t n = read(uffd, msgs, sizeof msgs);
    if (n < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    if (n == 0)
        return -1;
    for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
        struct uffd_msg *m = &msgs[i];
        if (m->event == UFFD_EVENT_PAGEFAULT)
            serve_fault(p, uffd, m->arg.pagefault.address);
        else if (m->event == UFFD_EVENT_REMAP)
            remap(p, m->arg.remap.from, m->arg.remap.to, m->arg.remap.len);
        else if (m->event == UFFD_EVENT_FORK && p->nuffds < MAX_UFFDS)
            p->uffds[p->nuffds++] = (int)m->arg.fork.ufd;
        else if (m->event == UFFD_EVENT_FORK)
            p->errors++;
    }
    return 0;
}

static void prefetch_page(struct thaw_pager *p, uint64_t off)
{
    struct thaw_pager_range *r = range_of_offset(p, off);
    if (!r)
        return; /* a page this restore maps from the segment (a hot page of a compressed template) */
    if (r->kind == THAW_RANGE_PLAIN) {
        if (fill(p, p->uffds[0], r, r->start + (off - r->seg_off), PAGE, 0) == 0)
            p->prefetched++;
        return;
    }
    ssize_t i = p->cold ? thaw_cold_find(p->cold, off) : -1;
    if (i < 0 || i == p->last_prefetched_chunk) /* working-set pages come in runs: each chunk once */
        return;
    p->last_prefetched_chunk = i;
    if (p->cache_fd >= 0 && thaw_cold_resident(p->cold, (size_t)i))
        return;
    if (fill_cold(p, p->uffds[0], r, (size_t)i, 0) == 0)
        p->prefetched += thaw_cold_chunk_at(p->cold, (size_t)i)->len / PAGE;
}

static void prefetch_batch(struct thaw_pager *p)
{
    size_t end = p->next_prefetch + PREFETCH_BATCH;
    if (end > p->nprefetch)
        end = p->nprefetch;
    for (; p->next_prefetch < end; p->next_prefetch++)
        prefetch_page(p, (uint64_t)p->prefetch[p->next_prefetch] * PAGE);
}

static void *pager_main(void *arg)
{
    struct thaw_pager *p = arg;
    pthread_setname_np(pthread_self(), "thaw-pager");
    for (;;) {
        struct pollfd fds[MAX_UFFDS + 1];
        fds[0] = (struct pollfd){.fd = p->stop_fd, .events = POLLIN};
        for (int i = 0; i < p->nuffds; i++)
            fds[i + 1] = (struct pollfd){.fd = p->uffds[i], .events = POLLIN};
        int more_prefetch = p->next_prefetch < p->nprefetch;
        int n = poll(fds, (nfds_t)p->nuffds + 1, more_prefetch ? 0 : -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 || fds[0].revents)
            break;
        for (int i = 0; i < p->nuffds; i++)
            if (fds[i + 1].revents & (POLLIN | POLLERR | POLLHUP))
                serve_uffd(p, p->uffds[i]);
        if (n == 0 && more_prefetch) /* faults first: prefetch only when none wait */
            prefetch_batch(p);
    }
    return NULL;
}

struct thaw_pager *thaw_pager_start(int uffd, int pidfd, const struct thaw_pager_range *ranges, size_t nranges,
                                    const void *src, int cache_fd, uint64_t cache_base, struct thaw_cold *cold,
                                    size_t seg_size, size_t block, const uint32_t *prefetch, size_t nprefetch)
{
    if (block < PAGE || (block & (block - 1))) {
        errno = EINVAL;
        return NULL;
    }
    struct thaw_pager *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->uffds[0] = uffd;
    p->pidfd = pidfd;
    p->nuffds = 1;
    p->src = src;
    p->cache_fd = cache_fd;
    p->cache_base = cache_base;
    p->cold = cold;
    p->bounce_chunk = p->last_prefetched_chunk = -1;
    p->block = block;
    p->seg_pages = seg_size / PAGE;
    p->stop_fd = eventfd(0, EFD_CLOEXEC);
    p->ranges = malloc((nranges + 1) * sizeof *ranges);
    p->ranges_cap = nranges + 1;
    p->prefetch = malloc((nprefetch + 1) * sizeof *prefetch);
    p->seen = calloc(p->seg_pages + 1, 1);
    p->ws = malloc((p->seg_pages + 1) * sizeof *p->ws);
    if (p->stop_fd < 0 || !p->ranges || !p->prefetch || !p->seen || !p->ws)
        goto fail;
    if (cold && (!(p->cold_ctx = thaw_cold_ctx_new(cold)) || !(p->bounce = malloc(THAW_COLD_MAX_CHUNK))))
        goto fail;
    if (cache_fd >= 0) {
        if (!(p->staging = malloc(block)))
            goto fail;
        memset(p->staging, 0, block); /* touched now: never short of a page while it is read */
    }
    memcpy(p->ranges, ranges, nranges * sizeof *ranges);
    p->nranges = nranges;
    qsort(p->ranges, p->nranges, sizeof *p->ranges, by_start);
    memcpy(p->prefetch, prefetch, nprefetch * sizeof *prefetch);
    p->nprefetch = nprefetch;
    int err = pthread_create(&p->thread, NULL, pager_main, p);
    if (err) {
        errno = err;
        goto fail;
    }
    return p;
fail:
    err = errno;
    thaw_pager_free(p);
    errno = err;
    return NULL;
}

int thaw_pager_stop(struct thaw_pager *p)
{
    uint64_t one = 1;
    if (write(p->stop_fd, &one, sizeof one) != sizeof one)
        return -1;
    int err = pthread_join(p->thread, NULL);
    if (err) {
        errno = err;
        return -1;
    }
    for (int i = 1; i < p->nuffds; i++) /* forked children's fds are ours; the first is the caller's */
        close(p->uffds[i]);
    p->nuffds = 1;
    return 0;
}

size_t thaw_pager_working_set(const struct thaw_pager *p, uint32_t *out, size_t cap)
{
    size_t n = p->ws_len < cap ? p->ws_len : cap;
    memcpy(out, p->ws, n * sizeof *out);
    return p->ws_len;
}

void thaw_pager_stats(const struct thaw_pager *p, uint64_t *out)
{
    out[0] = __atomic_load_n(&p->faults, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&p->pages, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&p->prefetched, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&p->errors, __ATOMIC_RELAXED);
    out[4] = __atomic_load_n(&p->cold_faults, __ATOMIC_RELAXED);
}

void thaw_pager_free(struct thaw_pager *p)
{
    if (!p)
        return;
    if (p->stop_fd >= 0)
        close(p->stop_fd);
    free(p->ranges);
    free(p->prefetch);
    free(p->seen);
    free(p->ws);
    thaw_cold_ctx_free(p->cold_ctx);
    free(p->bounce);
    free(p->staging);
    free(p);
}

/* Hot loops of scripts/bench_numa. They run with the GIL released (cffi API mode), on whatever
 * CPU the caller pinned itself to, over memory the caller placed. */
#define _GNU_SOURCE
#include "thaw_native.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

uint64_t thaw_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t thaw_bench_read(const void *buf, size_t len)
{
    /* Four independent accumulators so the loop is bound by memory, not by one add chain. */
    const uint64_t *p = buf;
    size_t n = len / sizeof(uint64_t);
    uint64_t a = 0, b = 0, c = 0, d = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        a += p[i];
        b += p[i + 1];
        c += p[i + 2];
        d += p[i + 3];
    }
    for (; i < n; i++)
        a += p[i];
    return a + b + c + d;
}

void thaw_bench_copy(void *dst, const void *src, size_t len)
{
    memcpy(dst, src, len);
}

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void thaw_bench_chase_init(void *buf, size_t nslots, size_t slot_size, uint64_t seed)
{
    /* Sattolo's algorithm gives one cycle through every slot, so the chase visits the whole
     * buffer in an order the prefetcher cannot guess. Each slot stores the byte offset of the
     * next slot (offsets, not pointers, so the buffer can be built here and mapped elsewhere). */
    uint8_t *base = buf;
    if (nslots < 2 || slot_size < sizeof(uint64_t) || slot_size % sizeof(uint64_t))
        return; /* the Python wrapper refuses these; never index out of the buffer */
    for (size_t i = 0; i < nslots; i++)
        *(uint64_t *)(base + i * slot_size) = i;
    for (size_t i = nslots - 1; i > 0; i--) {
        size_t j = (size_t)(splitmix64(&seed) % i);
        uint64_t *a = (uint64_t *)(base + i * slot_size);
        uint64_t *b = (uint64_t *)(base + j * slot_size);
        uint64_t t = *a;
        *a = *b;
        *b = t;
    }
    for (size_t i = 0; i < nslots; i++) {
        uint64_t *slot = (uint64_t *)(base + i * slot_size);
        *slot *= slot_size;
    }
}

uint64_t thaw_bench_chase(const void *buf, size_t steps)
{
    /* Each load's address depends on the previous load: latency, not bandwidth. */
    const uint8_t *base = buf;
    uint64_t off = 0;
    for (size_t i = 0; i < steps; i++)
        off = *(const volatile uint64_t *)(base + off);
    return off;
}

int64_t thaw_bench_map_touch(int fd, off_t offset, size_t len, size_t page, int flags, int write)
{
    if (page == 0) {
        errno = EINVAL;
        return -1;
    }
    uint64_t t0 = thaw_now_ns();
    int prot = write ? PROT_READ | PROT_WRITE : PROT_READ;
    uint8_t *p = mmap(NULL, len, prot, flags, fd, offset);
    if (p == MAP_FAILED)
        return -1;
    volatile uint8_t *v = p;
    uint8_t sink = 0;
    for (size_t off = 0; off < len; off += page) {
        if (write)
            v[off] = (uint8_t)(v[off] + 1);
        else
            sink ^= v[off];
    }
    (void)sink;
    uint64_t t1 = thaw_now_ns();
    munmap(p, len);
    return (int64_t)(t1 - t0);
}

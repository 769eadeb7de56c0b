/* A template's cold image: compressed chunks of pages, decompressed on fault by the pager.
 *
 * The image lives inside the template segment (mapped read-only at `src`): every chunk is an
 * independent lz4 block, zstd frame (optionally with a dictionary) or raw deflate stream that
 * inflates to `len` bytes, the pages at `seg_off` in the segment's layout. One thaw_cold is shared
 * by the pagers of every instance of the template; each pager brings its own thaw_cold_ctx
 * (decompression contexts and a bounce buffer), so the fault path takes no lock.
 *
 * Shared fills go through pwrite() into the template's cache segment, never a memcpy into a
 * shared mapping: shmem copies a whole page under the page lock and a concurrent fault waits on
 * that lock, so no instance (another instance of the template, or another thread of this one)
 * can map a half-written page. Punching (fallocate PUNCH_HOLE) is per page as well, so a punch
 * racing a fill leaves each page either whole or a hole, and a hole only costs a refault.
 *
 * filled_ns[i] is when chunk i was last written to the cache (0: not resident as far as we
 * know). A pager that finds it set only wakes the faulting thread: another instance's pager has
 * filled the chunk since the fault was raised. thaw_cold_punch() clears it *before* punching, so
 * a set value always means the whole chunk is in the cache or a punch is about to make the
 * instance fault again.
 */
#define _GNU_SOURCE
#include "thaw_native.h"

#include <errno.h>
#include <fcntl.h>
#include <lz4.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#define DEFLATE_WBITS (-15) /* raw deflate; a 15-bit window reads streams written with any smaller one */

struct thaw_cold {
    int codec;
    const uint8_t *src;
    struct thaw_cold_chunk *chunks;
    size_t n;
    size_t max_len;
    ZSTD_DDict *ddict;
    uint64_t *filled_ns;
    uint8_t *state; /* 1: filled, 2: punched since: an instance faulting on it again uses it */
    uint64_t decompressions, refills, punched, decompress_ns;
};

struct thaw_cold_ctx {
    ZSTD_DCtx *zstd;
    z_stream z;
    int z_ready;
    uint8_t *bounce;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

struct thaw_cold *thaw_cold_open(int codec, const void *src, const struct thaw_cold_chunk *chunks, size_t n,
                                 const void *dict, size_t dict_len)
{
    if (codec < THAW_CODEC_LZ4 || codec > THAW_CODEC_DEFLATE || (dict_len && codec != THAW_CODEC_ZSTD)) {
        errno = EINVAL;
        return NULL;
    }
    for (size_t i = 0; i < n; i++) { /* sorted, page-aligned, non-overlapping: thaw_cold_find bisects */
        if (!chunks[i].len || chunks[i].len > THAW_COLD_MAX_CHUNK || (chunks[i].seg_off | chunks[i].len) % 4096 ||
            (i && chunks[i].seg_off < chunks[i - 1].seg_off + chunks[i - 1].len)) {
            errno = EINVAL;
            return NULL;
        }
    }
    struct thaw_cold *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->codec = codec;
    c->src = src;
    c->n = n;
    c->chunks = malloc((n + 1) * sizeof *chunks);
    c->filled_ns = calloc(n + 1, sizeof *c->filled_ns);
    c->state = calloc(n + 1, 1);
    if (!c->chunks || !c->filled_ns || !c->state)
        goto fail;
    memcpy(c->chunks, chunks, n * sizeof *chunks);
    for (size_t i = 0; i < n; i++)
        if (chunks[i].len > c->max_len)
            c->max_len = chunks[i].len;
    if (dict_len) {
        c->ddict = ZSTD_createDDict(dict, dict_len);
        if (!c->ddict) {
            errno = EINVAL;
            goto fail;
        }
    }
    return c;
fail:;
    int err = errno;
    thaw_cold_free(c);
    errno = err;
    return NULL;
}

void thaw_cold_free(struct thaw_cold *c)
{
    if (!c)
        return;
    ZSTD_freeDDict(c->ddict);
    free(c->chunks);
    free(c->filled_ns);
    free(c->state);
    free(c);
}

ssize_t thaw_cold_find(const struct thaw_cold *c, uint64_t seg_off)
{
    size_t lo = 0, hi = c->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const struct thaw_cold_chunk *k = &c->chunks[mid];
        if (seg_off < k->seg_off)
            hi = mid;
        else if (seg_off >= k->seg_off + k->len)
            lo = mid + 1;
        else
            return (ssize_t)mid;
    }
    return -1;
}

const struct thaw_cold_chunk *thaw_cold_chunk_at(const struct thaw_cold *c, size_t i)
{
    return i < c->n ? &c->chunks[i] : NULL;
}

struct thaw_cold_ctx *thaw_cold_ctx_new(const struct thaw_cold *c)
{
    struct thaw_cold_ctx *x = calloc(1, sizeof *x);
    if (!x)
        return NULL;
    x->bounce = malloc(c->max_len ? c->max_len : 1);
    if (!x->bounce)
        goto fail;
    if (c->codec == THAW_CODEC_ZSTD && !(x->zstd = ZSTD_createDCtx()))
        goto fail;
    if (c->codec == THAW_CODEC_DEFLATE) {
        if (inflateInit2(&x->z, DEFLATE_WBITS) != Z_OK)
            goto fail;
        x->z_ready = 1;
    }
    return x;
fail:
    thaw_cold_ctx_free(x);
    errno = ENOMEM;
    return NULL;
}

void thaw_cold_ctx_free(struct thaw_cold_ctx *x)
{
    if (!x)
        return;
    ZSTD_freeDCtx(x->zstd);
    if (x->z_ready)
        inflateEnd(&x->z);
    free(x->bounce);
    free(x);
}

static int inflate_exact(struct thaw_cold_ctx *x, const uint8_t *in, size_t in_len, uint8_t *out, size_t len)
{
    if (inflateReset(&x->z) != Z_OK)
        return -1;
    x->z.next_in = (Bytef *)in;
    x->z.avail_in = (uInt)in_len;
    x->z.next_out = out;
    x->z.avail_out = (uInt)len;
    int rc = inflate(&x->z, Z_FINISH);
    return rc == Z_STREAM_END && x->z.avail_out == 0 && x->z.avail_in == 0 ? 0 : -1;
}

/* Chunk i into dst (exactly its length). -1 with EBADMSG when the stream is corrupt. */
int thaw_cold_decompress(struct thaw_cold *c, struct thaw_cold_ctx *x, size_t i, void *dst)
{
    if (i >= c->n) {
        errno = EINVAL;
        return -1;
    }
    const struct thaw_cold_chunk *k = &c->chunks[i];
    const uint8_t *in = c->src + k->comp_off;
    uint64_t t0 = now_ns();
    int ok;
    switch (c->codec) {
    case THAW_CODEC_LZ4:
        ok = LZ4_decompress_safe((const char *)in, dst, (int)k->comp_len, (int)k->len) == (int)k->len;
        break;
    case THAW_CODEC_ZSTD: {
        size_t got = c->ddict ? ZSTD_decompress_usingDDict(x->zstd, dst, k->len, in, k->comp_len, c->ddict)
                              : ZSTD_decompressDCtx(x->zstd, dst, k->len, in, k->comp_len);
        ok = !ZSTD_isError(got) && got == k->len;
        break;
    }
    default:
        ok = inflate_exact(x, in, k->comp_len, dst, k->len) == 0;
    }
    __atomic_add_fetch(&c->decompress_ns, now_ns() - t0, __ATOMIC_RELAXED);
    __atomic_add_fetch(&c->decompressions, 1, __ATOMIC_RELAXED);
    if (!ok) {
        errno = EBADMSG;
        return -1;
    }
    return 0;
}

int thaw_cold_resident(const struct thaw_cold *c, size_t i)
{
    return i < c->n && __atomic_load_n(&c->filled_ns[i], __ATOMIC_ACQUIRE) != 0;
}

/* Decompress chunk i into the cache segment (fd, base offset of the segment in it); `faulted`:
 * an instance asked for it (not a prefetch), so a chunk punched before counts as a refill. */
int thaw_cold_fill_cache(struct thaw_cold *c, struct thaw_cold_ctx *x, size_t i, int cache_fd, uint64_t cache_base,
                         int faulted)
{
    if (thaw_cold_decompress(c, x, i, x->bounce) < 0)
        return -1;
    const struct thaw_cold_chunk *k = &c->chunks[i];
    for (size_t done = 0; done < k->len;) {
        ssize_t n = pwrite(cache_fd, x->bounce + done, k->len - done, (off_t)(cache_base + k->seg_off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        done += (size_t)n;
    }
    uint64_t before = __atomic_exchange_n(&c->filled_ns[i], now_ns(), __ATOMIC_ACQ_REL);
    int punched_before = __atomic_load_n(&c->state[i], __ATOMIC_RELAXED) == 2;
    __atomic_store_n(&c->state[i], 1, __ATOMIC_RELAXED);
    if (before == 0 && faulted && punched_before)
        __atomic_add_fetch(&c->refills, 1, __ATOMIC_RELAXED);
    return 0;
}

/* Take chunk i out of the resident set if it was filled before cutoff_ns (0: any time). */
static int claim(struct thaw_cold *c, size_t i, uint64_t cutoff_ns)
{
    uint64_t at = __atomic_load_n(&c->filled_ns[i], __ATOMIC_ACQUIRE);
    return at && (!cutoff_ns || at < cutoff_ns) &&
           __atomic_compare_exchange_n(&c->filled_ns[i], &at, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

/* Punch chunks filled before cutoff_ns (0: all) out of the cache; returns the bytes punched. */
int64_t thaw_cold_punch(struct thaw_cold *c, int cache_fd, uint64_t cache_base, uint64_t cutoff_ns)
{
    int64_t bytes = 0;
    uint64_t run_start = 0, run_len = 0; /* one fallocate per stretch of adjacent chunks */
    for (size_t i = 0; i <= c->n; i++) {
        int take = i < c->n && claim(c, i, cutoff_ns);
        const struct thaw_cold_chunk *k = take ? &c->chunks[i] : NULL;
        if (run_len && (!take || k->seg_off != run_start + run_len)) {
            if (fallocate(cache_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(cache_base + run_start),
                          (off_t)run_len) < 0)
                return -1;
            bytes += (int64_t)run_len;
            run_len = 0;
        }
        if (!take)
            continue;
        __atomic_store_n(&c->state[i], 2, __ATOMIC_RELAXED);
        __atomic_add_fetch(&c->punched, 1, __ATOMIC_RELAXED);
        if (!run_len)
            run_start = k->seg_off;
        run_len += k->len;
    }
    return bytes;
}

void thaw_cold_stats(const struct thaw_cold *c, uint64_t *out)
{
    uint64_t resident = 0;
    for (size_t i = 0; i < c->n; i++)
        resident += __atomic_load_n(&c->filled_ns[i], __ATOMIC_RELAXED) != 0;
    out[0] = c->n;
    out[1] = resident;
    out[2] = __atomic_load_n(&c->decompressions, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&c->refills, __ATOMIC_RELAXED);
    out[4] = __atomic_load_n(&c->punched, __ATOMIC_RELAXED);
    out[5] = __atomic_load_n(&c->decompress_ns, __ATOMIC_RELAXED);
}

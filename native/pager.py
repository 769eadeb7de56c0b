"""The restore pager (src/pager.c): a C thread serving an instance's userfaultfd faults, and the
cold image (src/cold.c) it decompresses compressed template pages from.

Python sets them up and reads the results; the fault path never enters the interpreter. See
pager.c for the two ways a fault is answered (shared through the cache segment, or private
UFFDIO_COPY) and for how the working set is recorded; cold.c for how decompressed chunks enter
the cache segment and are punched out of it again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from native._native import ffi, lib
from native.errors import raise_oserror

DEFAULT_BLOCK = 64 << 10
MAX_COLD_CHUNK = int(lib.THAW_COLD_MAX_CHUNK)
RANGE_PLAIN, RANGE_COLD = int(lib.THAW_RANGE_PLAIN), int(lib.THAW_RANGE_COLD)
CODEC_IDS = {"lz4": int(lib.THAW_CODEC_LZ4), "zstd": int(lib.THAW_CODEC_ZSTD), "deflate": int(lib.THAW_CODEC_DEFLATE)}


@dataclass(frozen=True)
class PagerStats:
    faults: int
    pages_served: int
    prefetched: int
    errors: int
    cold_faults: int


class ColdChunk(NamedTuple):
    seg_off: int  # where its pages sit in the template's layout
    comp_off: int  # where its compressed bytes sit, from the start of the segment
    length: int
    comp_length: int


@dataclass(frozen=True)
class ColdStats:
    chunks: int
    resident: int  # chunks in the cache segment now
    decompressions: int
    refills: int  # fills of a chunk that had been punched out: pages still in use
    punched: int
    decompress_ns: int


class ColdImage:
    """A template's compressed chunks, readable at `src` (the template segment, mapped) for as
    long as this object lives. `codec` is "lz4", "zstd" or "deflate" (IAA's deflate streams are
    read by the deflate decoder). Shared by the pagers of every instance of the template."""

    def __init__(self, codec: str, src: int, chunks: Sequence[ColdChunk], dictionary: bytes = b"") -> None:
        if codec not in CODEC_IDS:
            raise ValueError(f"the pager decompresses {', '.join(CODEC_IDS)}, not {codec!r}")
        raw = ffi.new("struct thaw_cold_chunk[]", max(len(chunks), 1))
        for i, chunk in enumerate(chunks):
            raw[i].seg_off, raw[i].comp_off, raw[i].len, raw[i].comp_len = chunk
        handle = lib.thaw_cold_open(
            CODEC_IDS[codec], ffi.cast("void *", src), raw, len(chunks), dictionary or ffi.NULL, len(dictionary)
        )
        if handle == ffi.NULL:
            raise_oserror("thaw_cold_open", f"opening a cold image of {len(chunks)} {codec} chunks")
        self.handle: Any = handle
        self.codec, self.chunks = codec, list(chunks)

    def decompress(self, index: int) -> bytes:
        """Chunk `index`, decompressed (for checks and benchmarks; the pager does this itself)."""
        ctx = lib.thaw_cold_ctx_new(self.handle)
        if ctx == ffi.NULL:
            raise MemoryError("no memory for a decompression context")
        try:
            out = ffi.new("uint8_t[]", self.chunks[index].length)
            if lib.thaw_cold_decompress(self.handle, ctx, index, out) < 0:
                raise_oserror("thaw_cold_decompress", f"decompressing {self.codec} chunk {index}")
            return bytes(ffi.buffer(out))
        finally:
            lib.thaw_cold_ctx_free(ctx)

    def punch(self, cache_fd: int, cache_base: int, older_than: float = 0.0) -> int:
        """Punch chunks decompressed more than `older_than` seconds ago out of the cache segment
        (writable fd); returns the bytes freed. Instances using them fault again and are refilled."""
        cutoff = 0 if older_than <= 0 else max(1, int(lib.thaw_now_ns()) - int(older_than * 1e9))
        freed = int(lib.thaw_cold_punch(self.handle, cache_fd, cache_base, cutoff))
        if freed < 0:
            raise_oserror("fallocate", "punching cold chunks out of the cache segment")
        return freed

    def stats(self) -> ColdStats:
        out = ffi.new("uint64_t[6]")
        lib.thaw_cold_stats(self.handle, out)
        return ColdStats(*(int(x) for x in out))

    def close(self) -> None:
        """Only once no pager uses it any more."""
        if self.handle != ffi.NULL:
            lib.thaw_cold_free(self.handle)
            self.handle = ffi.NULL


class PagerRange(NamedTuple):
    start: int  # in the instance
    length: int
    seg_off: int  # where its pages sit in the template's layout
    kind: int = RANGE_PLAIN  # RANGE_COLD: in the cold image


class Pager:
    """Takes ownership of `uffd` and `pidfd` (the instance's, or -1). Serves faults on `ranges`
    from the template segment mapped at `src` (plain ranges) or from `cold` (cold ranges). With
    `cache` (a writable fd of the cache segment and the segment's offset in it) pages are filled
    there and shared; without it they
    are copied into the instance privately. A fault it cannot serve (a corrupt chunk) kills the
    instance through `pidfd` rather than let it run on wrong memory."""

    def __init__(
        self,
        uffd: int,
        pidfd: int,
        ranges: Sequence[PagerRange],
        src: int,
        segment_size: int,
        cache: tuple[int, int] | None = None,
        cold: ColdImage | None = None,
        block: int = DEFAULT_BLOCK,
        prefetch: Sequence[int] = (),
    ) -> None:
        raw = ffi.new("struct thaw_pager_range[]", max(len(ranges), 1))
        for i, r in enumerate(ranges):
            raw[i].start, raw[i].len, raw[i].seg_off, raw[i].kind = r
        pages = ffi.new("uint32_t[]", list(prefetch) or [0])
        cache_fd, cache_base = cache if cache is not None else (-1, 0)
        cold_handle = cold.handle if cold is not None else ffi.NULL
        handle = lib.thaw_pager_start(
            uffd,
            pidfd,
            raw,
            len(ranges),
            ffi.cast("void *", src),
            cache_fd,
            cache_base,
            cold_handle,
            segment_size,
            block,
            pages,
            len(prefetch),
        )
        if handle == ffi.NULL:
            raise_oserror("pager", f"starting the pager for uffd {uffd}")
        self._handle: Any = handle
        self.uffd, self.pidfd = uffd, pidfd
        self._stopped = False
        self.segment_pages = segment_size // 4096

    def stats(self) -> PagerStats:
        out = ffi.new("uint64_t[5]")
        lib.thaw_pager_stats(self._handle, out)
        return PagerStats(*(int(x) for x in out))

    def stop(self) -> None:
        """Stop serving. Only once the instance is gone: its unserved faults would wait forever."""
        if self._stopped:
            return
        if lib.thaw_pager_stop(self._handle) == -1:
            raise_oserror("pager", "stopping the pager")
        self._stopped = True

    def working_set(self) -> list[int]:
        """Segment page indices in the order they were first faulted."""
        out = ffi.new("uint32_t[]", self.segment_pages + 1)
        n = int(lib.thaw_pager_working_set(self._handle, out, self.segment_pages + 1))
        return list(out[0:n])

    def close(self) -> None:
        if self._handle == ffi.NULL:
            return
        self.stop()
        lib.thaw_pager_free(self._handle)
        self._handle = ffi.NULL
        os.close(self.uffd)
        if self.pidfd >= 0:
            os.close(self.pidfd)

    def __del__(self) -> None:
        if getattr(self, "_handle", ffi.NULL) != ffi.NULL and self._stopped:
            lib.thaw_pager_free(self._handle)

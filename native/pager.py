"""The lazy-restore pager (src/pager.c): a C thread serving an instance's userfaultfd faults.

Python sets it up and reads the results; the fault path never enters the interpreter. See
pager.c for the two ways a fault is answered (shared through the cache segment, or private
UFFDIO_COPY) and for how the working set is recorded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from native._native import ffi, lib
from native.errors import raise_oserror

DEFAULT_BLOCK = 64 << 10


@dataclass(frozen=True)
class PagerStats:
    faults: int
    pages_served: int
    prefetched: int
    errors: int


class Pager:
    """Takes ownership of `uffd`. Serves faults on `ranges` ((address, length, segment offset) in the instance) from the
    template segment mapped at `src`; with `cache` (the cache segment, mapped shared and
    writable) pages are filled there and shared, without it they are copied privately."""

    def __init__(
        self,
        uffd: int,
        ranges: Sequence[tuple[int, int, int]],
        src: int,
        segment_size: int,
        cache: int | None = None,
        block: int = DEFAULT_BLOCK,
        prefetch: Sequence[int] = (),
    ) -> None:
        raw = ffi.new("struct thaw_pager_range[]", max(len(ranges), 1))
        for i, (start, length, offset) in enumerate(ranges):
            raw[i].start, raw[i].len, raw[i].seg_off = start, length, offset
        pages = ffi.new("uint32_t[]", list(prefetch) or [0])
        cache_ptr = ffi.cast("void *", cache) if cache is not None else ffi.NULL
        handle = lib.thaw_pager_start(
            uffd, raw, len(ranges), ffi.cast("void *", src), cache_ptr, segment_size, block, pages, len(prefetch)
        )
        if handle == ffi.NULL:
            raise_oserror("pager", f"starting the pager for uffd {uffd}")
        self._handle: Any = handle
        self.uffd = uffd
        self._stopped = False
        self.segment_pages = segment_size // 4096

    def stats(self) -> PagerStats:
        out = ffi.new("uint64_t[4]")
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

    def __del__(self) -> None:
        if getattr(self, "_handle", ffi.NULL) != ffi.NULL and self._stopped:
            lib.thaw_pager_free(self._handle)

"""The C hot loops of the microbenchmarks (bench.c). They run with the GIL released.

Safety: every address must stay mapped, with the given length, for the duration of the call.
"""

from __future__ import annotations

from native._native import ffi, lib
from native.errors import raise_oserror


def now_ns() -> int:
    return int(lib.thaw_now_ns())


def read_sum(addr: int, length: int) -> int:
    """Sequentially read `length` bytes (8-byte words, four accumulators)."""
    return int(lib.thaw_bench_read(ffi.cast("void *", addr), length))


def copy(dst: int, src: int, length: int) -> None:
    lib.thaw_bench_copy(ffi.cast("void *", dst), ffi.cast("void *", src), length)


def chase_init(addr: int, slots: int, slot_size: int, seed: int) -> None:
    """Write one random cycle through `slots` slots of `slot_size` bytes (next slot's offset per slot)."""
    if slots < 2 or slot_size < 8 or slot_size % 8:
        raise ValueError(f"chase needs >= 2 slots of a multiple of 8 bytes, not {slots} x {slot_size}")
    lib.thaw_bench_chase_init(ffi.cast("void *", addr), slots, slot_size, seed)


def chase(addr: int, steps: int) -> int:
    """Follow `steps` dependent loads from the slot at offset 0; returns the offset it ended at."""
    return int(lib.thaw_bench_chase(ffi.cast("void *", addr), steps))


def map_touch_ns(fd: int, offset: int, length: int, page_size: int, flags: int, write: bool) -> int:
    """mmap `length` bytes of `fd` with `flags`, read or write one byte per page; ns for both (munmap excluded)."""
    ns = int(lib.thaw_bench_map_touch(fd, offset, length, page_size, flags, int(write)))
    if ns < 0:
        raise_oserror("mmap", f"fd {fd} {length} bytes")
    return ns

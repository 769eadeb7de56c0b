"""The pool's tensor store: layout, atomic publish, and refusal of anything corrupt or partial."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest

from native import memory
from shmpool.errors import PoolFull, SegmentCorrupt, SegmentNotFound
from shmpool.pool import Pool
from shmpool.tensors import HEADER_SIZE, StoreCorrupt, TensorIndex, TensorSource, open_store, write_store
from tests.damage import segment_path, write_behind

pytestmark = pytest.mark.privileged


def floats(n: int, start: float = 0.0) -> bytes:
    return struct.pack(f"<{n}f", *(start + i * 0.5 for i in range(n)))


def test_tensors_round_trip_aligned_and_readable_from_the_fd_alone(tmpfs_pool: Pool) -> None:
    sources = [
        TensorSource("w", "F32", (3, 5), floats(15)),
        TensorSource("b", "F16", (7,), bytes(14)),
        TensorSource("blob", "U8", (3,), lambda: b"abc"),  # produced on demand, like a dequantized tensor
        TensorSource("empty", "F32", (0, 4), b""),
    ]
    index = write_store(tmpfs_pool, "model.x", sources, meta={"config": {"hidden_size": 5}}, align=64)
    with open_store(tmpfs_pool, "model.x") as store:
        assert store.index.meta["config"] == {"hidden_size": 5}
        again = TensorIndex.read(os.dup(store.fd), store.base)  # what a worker does with a passed fd
        assert again.tensors == index.tensors
        w = store.index.tensors["w"]
        assert (w.shape, w.stride, w.dtype, w.nbytes) == ((3, 5), (5, 1), "F32", 60)
        assert all(e.offset % 64 == 0 and e.offset >= HEADER_SIZE for e in store.index.tensors.values())
        view = store.segment.map(private=True, writable=False)
        assert view[w.offset : w.offset + w.nbytes] == floats(15)
        blob = store.index.tensors["blob"]
        assert view[blob.offset : blob.offset + 3] == b"abc"
        view.close()


def test_bad_sources_publish_nothing(tmpfs_pool: Pool) -> None:
    with pytest.raises(ValueError, match="is 24 bytes, its data is 20"):
        write_store(tmpfs_pool, "bad", [TensorSource("w", "F32", (2, 3), floats(5))])
    with pytest.raises(ValueError, match="unknown dtype 'F8'"):
        write_store(tmpfs_pool, "bad", [TensorSource("w", "F8", (2,), b"xx")])
    with pytest.raises(ValueError, match="appears twice"):
        write_store(tmpfs_pool, "bad", [TensorSource("w", "U8", (1,), b"x"), TensorSource("w", "U8", (1,), b"y")])
    with pytest.raises(SegmentNotFound):
        open_store(tmpfs_pool, "bad")
    assert tmpfs_pool.list(include_all=True) == []


def test_a_store_larger_than_the_pool_says_so_and_leaves_nothing(tmpfs_pool: Pool) -> None:
    big = TensorSource("w", "U8", (80 << 20,), lambda: bytes(80 << 20))
    with pytest.raises(PoolFull):
        write_store(tmpfs_pool, "big", [big])
    assert tmpfs_pool.list(include_all=True) == []
    assert tmpfs_pool.status().used < (1 << 20)


def _corrupt(pool: Pool, name: str, offset: int, data: bytes) -> None:
    """Write into a published segment's storage behind the pool's back (a flipped bit in memory)."""
    write_behind(segment_path(pool, name), offset, data)


def test_a_corrupt_index_or_header_is_never_used(tmpfs_pool: Pool) -> None:
    write_store(tmpfs_pool, "m", [TensorSource("w", "F32", (4,), floats(4))])
    with open_store(tmpfs_pool, "m") as store:
        data_end = max(e.offset + e.nbytes for e in store.index.tensors.values())
    _corrupt(tmpfs_pool, "m", data_end + 4096 - data_end % 4096 + 2, b"#")  # inside the index JSON
    with pytest.raises(SegmentCorrupt):  # per-chunk checksum on open
        open_store(tmpfs_pool, "m")
    with pytest.raises(StoreCorrupt, match="SHA-256"):  # a worker holding only the fd checks the header's hash
        open_store(tmpfs_pool, "m", verify=False)

    write_store(tmpfs_pool, "n", [TensorSource("w", "F32", (4,), floats(4))])
    _corrupt(tmpfs_pool, "n", 0, b"NOTTHAW!")
    with pytest.raises(StoreCorrupt, match="not a tensor store"):
        open_store(tmpfs_pool, "n", verify=False)


def _smaps_field(address: int, field: str) -> int:
    """A field (kB) of the mapping holding `address`, from /proc/self/smaps."""
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        lo, hi = (int(x, 16) for x in block.split(" ", 1)[0].split("-"))
        if lo <= address < hi:
            found = re.search(rf"^{field}:\s+(\d+) kB", block, re.M)
            return int(found[1]) if found else 0
    raise AssertionError(f"no mapping holds {address:#x}")


def _thp_for_tmpfs() -> bool:
    setting = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    return setting.exists() and "[deny]" not in setting.read_text()


def test_stores_live_in_huge_pages_and_map_as_such(tmpfs_pool: Pool) -> None:
    """A worker maps a whole model: on the pool's huge=within_size mount that is one fault per 2 MiB."""
    if not _thp_for_tmpfs():
        pytest.skip("needs transparent huge pages for tmpfs (shmem_enabled is deny or missing)")
    n = 4 << 20  # 16 MiB of F32
    write_store(tmpfs_pool, "big", [TensorSource("w", "F32", (n,), struct.pack(f"<{n}f", *([1.5] * n)))])
    (record,) = [r for r in tmpfs_pool.list() if r.name == "big"]
    assert record.storage_key.startswith("huge/")
    with open_store(tmpfs_pool, "big") as store:
        view = store.segment.map(private=True, writable=False)
        try:
            e = store.index.tensors["w"]
            assert sum(view[off] for off in range(e.offset, e.offset + e.nbytes, 4096)) >= 0  # touch every page
            assert _smaps_field(memory.address_of(view), "ShmemPmdMapped") > 0
        finally:
            view.close()

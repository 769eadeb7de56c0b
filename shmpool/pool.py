"""A pool: a backend's storage plus the catalog, and the segments in it.

    pool = Pool.create("/var/lib/thaw/pool", backend="tmpfs", node=0, size=8 << 30)
    with pool.create_segment("hello", size=1 << 20) as w:
        w.write(0, b"...")
        w.publish()
    with pool.open_segment("hello") as seg:       # checksums verified on open
        view = seg.map(private=True)              # copy-on-write view of the pool's pages

Publishing is atomic: bytes go to storage under a temporary key, are read back and checksummed
per chunk, then the rename and the catalog update commit in one transaction. Until then nobody
can open the segment by name; if the writer dies, garbage collection frees what it wrote.
"""

from __future__ import annotations

import builtins
import contextlib
import mmap
import os
import re
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from native import memory
from native.constants import MapFlag
from shmpool.backends import (
    SMALL_PAGE,
    Backend,
    Capabilities,
    PoolConfig,
    StorageWriter,
    backend_for,
    check_node,
    round_up,
)
from shmpool.catalog import Catalog, GcReport, Holder, ObjectRecord
from shmpool.errors import (
    InvalidName,
    PoolError,
    PoolExists,
    PoolFull,
    PoolNotFound,
    SegmentCorrupt,
    SegmentExists,
    SegmentNotFound,
    UnsupportedMapping,
)

DEFAULT_ROOT = "/var/lib/thaw/pool"
DEFAULT_CHUNK = 256 << 10
DEFAULT_LEASE_TTL = 60.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")
_TMP_PREFIX = ".writing-"


def checksum(data: bytes | memoryview) -> int:
    """Per-chunk checksum: CRC-32 (catches flipped bytes; not a defence against an attacker)."""
    return zlib.crc32(data)


@dataclass(frozen=True)
class PoolStatus:
    root: str
    backend: str
    node: int
    capacity: int
    used: int
    segments: int
    segment_bytes: int
    page_size: int
    capabilities: Capabilities


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidName(f"segment name {name!r} must be 1-200 of [A-Za-z0-9._:+-], not starting with a symbol")


class Pool:
    """An attached pool. One per process per pool root; it is also this process's lease holder."""

    def __init__(self, root: str | Path, lease_ttl: float = DEFAULT_LEASE_TTL) -> None:
        self.root = Path(root)
        config_file = self.root / "pool.json"
        if not config_file.exists():
            raise PoolNotFound(f"no pool at {self.root} (create one with `python -m shmpool create`)")
        self.config = PoolConfig.from_json(config_file.read_text())
        self.backend: Backend = backend_for(self.config)
        if not self.backend.is_ready():
            raise PoolNotFound(f"pool {self.root} is not (fully) mounted: destroyed, or the machine rebooted")
        self.catalog = Catalog(self.root / "catalog.db")
        self.holder = Holder.me()
        self.lease_ttl = lease_ttl
        self.renew()

    # -- lifetime -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | Path = DEFAULT_ROOT,
        backend: str = "tmpfs",
        node: int = 0,
        size: int = 1 << 30,
        page_size: int | None = None,
        device: str | None = None,
    ) -> Pool:
        """Mount and initialise a new pool at `root` bound to NUMA `node`."""
        root = Path(root)
        check_node(node)
        if (root / "pool.json").exists() or (root.exists() and os.path.ismount(root)):
            raise PoolExists(f"{root} already holds a pool (or another mount)")
        default_page = (2 << 20) if backend == "hugetlbfs" else SMALL_PAGE
        config = PoolConfig(str(root), backend, node, size, page_size or default_page, device)
        impl = backend_for(config)
        try:
            impl.setup()
        except BaseException:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if setup left it empty and unmounted
            raise
        try:
            tmp = root / "pool.json.tmp"
            tmp.write_text(config.to_json())
            tmp.rename(root / "pool.json")
            Catalog(root / "catalog.db").close()
        except BaseException:
            impl.teardown()
            raise
        return cls(root)

    @classmethod
    def open_or_create(cls, root: str | Path = DEFAULT_ROOT, **kwargs: Any) -> Pool:
        try:
            return cls(root)
        except PoolNotFound:
            return cls.create(root, **kwargs)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def destroy(self) -> None:
        """Unmount everything the pool mounted, give back its hugepages and remove its root."""
        self.catalog.close()
        self.backend.teardown()
        with contextlib.suppress(OSError):
            self.root.rmdir()

    def renew(self) -> None:
        """Extend this process's lease (a holder that stops renewing is treated as crashed)."""
        self.catalog.renew(self.holder, self.lease_ttl)

    # -- information ----------------------------------------------------------------------------
    @property
    def caps(self) -> Capabilities:
        return self.backend.caps

    def status(self) -> PoolStatus:
        objs = self.catalog.list()
        return PoolStatus(
            str(self.root),
            self.config.backend,
            self.config.node,
            self.backend.capacity(),
            self.backend.used(),
            len(objs),
            sum(o.size for o in objs),
            self.config.page_size,
            self.caps,
        )

    def list(self, include_all: bool = False) -> list[ObjectRecord]:
        return self.catalog.list(include_all)

    # -- segments -------------------------------------------------------------------------------
    def create_segment(
        self, name: str, size: int, kind: str = "blob", chunk_size: int = DEFAULT_CHUNK, huge: bool = False
    ) -> SegmentWriter:
        """A writer for a new segment. `huge`: store it in huge pages where the backend has an area
        for that (tensor stores: read whole, never copy-on-write at 4 KiB granularity)."""
        _check_name(name)
        if size <= 0:
            raise ValueError(f"segment {name!r}: size must be positive, not {size}")
        if chunk_size % SMALL_PAGE:
            raise ValueError(f"chunk size {chunk_size} is not a multiple of {SMALL_PAGE}")
        self.renew()
        prefix = (self.backend.huge_prefix() or "") if huge else ""
        tmp_key = f"{prefix}{_TMP_PREFIX}{uuid.uuid4().hex}"
        oid = self.catalog.begin_write(name, kind, tmp_key, size, chunk_size, self.holder)
        try:
            storage = self.backend.create(tmp_key, size)
        except BaseException:
            self.backend.remove(tmp_key)
            self.catalog.abort_write(oid)
            raise
        return SegmentWriter(self, oid, name, tmp_key, storage, size, chunk_size, prefix)

    def open_segment(self, name: str, verify: bool = True) -> Segment:
        """Open a published segment, holding a lease ref on it until `close()`."""
        self.renew()
        record = self.catalog.acquire(name, self.holder, pin=False)
        try:
            fd, base = self.backend.open(record.storage_key)
        except BaseException:
            self.catalog.release(record.id, self.holder, pin=False)
            raise
        seg = Segment(self, record, fd, base)
        if verify:
            try:
                seg.verify()
            except BaseException:
                seg.close()
                raise
        return seg

    def open_cache(self, name: str, size: int) -> Segment:
        """A *mutable* segment, created empty (sparse) on first use: the page cache a lazy restore
        fills on demand. It has no checksums (its bytes change); it is pinned like a template.
        Only backends with sparse, writable files (tmpfs) can hold one."""
        caps = self.caps
        if not caps.sparse or caps.write_by_mmap or caps.per_process:
            raise UnsupportedMapping(f"the {self.config.backend} backend cannot hold a mutable cache segment")
        for _ in range(2):  # lost a race with another creator: open theirs
            try:
                return self.open_segment(name, verify=False)
            except SegmentNotFound:
                pass
            try:
                with self.create_segment(name, size, kind="cache") as writer:
                    writer.publish(meta={"mutable": True}, checksums=False)
            except SegmentExists:
                continue
        return self.open_segment(name, verify=False)

    def pin(self, name: str) -> None:
        self.catalog.acquire(name, self.holder, pin=True)

    def delete(self, name: str, force: bool = False) -> None:
        """Remove `name`; its bytes are freed as soon as no open user refers to it. SegmentInUse
        while a published segment needs it, unless `force` (a quarantine: the segments that need
        it go too, and keep its bytes until they are freed)."""
        self.catalog.delete(name, force)
        self.gc()

    def needed_by(self, name: str) -> builtins.list[str]:
        """The published segments that need `name` (layered templates on it)."""
        return self.catalog.needed_by(name)

    def gc(self) -> GcReport:
        return self.catalog.collect(self.backend.keys, self.backend.remove)

    # -- placement ------------------------------------------------------------------------------
    def placement(self, name: str) -> Counter[int]:
        """How many of the segment's stored pages sit on each NUMA node (by move_pages)."""
        with self.open_segment(name, verify=False) as seg:
            return seg.placement()


class SegmentWriter:
    """Fills a new segment; `publish()` makes it visible, leaving the `with` block unpublished aborts."""

    def __init__(
        self,
        pool: Pool,
        oid: int,
        name: str,
        tmp_key: str,
        storage: StorageWriter,
        size: int,
        chunk_size: int,
        key_prefix: str = "",
    ) -> None:
        self.pool, self.id, self.name, self.tmp_key, self.key_prefix = pool, oid, name, tmp_key, key_prefix
        self.storage, self.size, self.chunk_size = storage, size, chunk_size
        self.record: ObjectRecord | None = None
        self._open = True

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            self.storage.write(offset, data)
        except PoolFull as e:
            self.abort()
            raise PoolFull(f"segment {self.name!r} ({self.size} bytes) does not fit: {e}") from e

    def _checksums(self) -> list[int]:
        """Read back what storage holds (not what we meant to write) and checksum each chunk."""
        reader = ChunkReader(
            self.storage.fd, self.storage.base, self.size, self.pool.caps.write_by_mmap, self.pool.config.page_size
        )
        try:
            return [checksum(reader.read(o, self.chunk_size)) for o in range(0, self.size, self.chunk_size)]
        finally:
            reader.close()

    def publish(
        self,
        meta: dict[str, Any] | None = None,
        pin: bool = True,
        checksums: bool = True,
        needs: list[str] | None = None,
    ) -> ObjectRecord:
        """Checksum, rename and record atomically. `pin=False` leaves only this holder's lease ref;
        `checksums=False` is for mutable segments (caches), whose bytes change after publishing;
        `needs`: published segments this one cannot live without (Catalog: needs)."""
        if not self._open:
            raise PoolError(f"segment {self.name!r} was already published or aborted")
        sums = self._checksums() if checksums else []
        self.storage.close()
        self._open = False
        final_key = f"{self.key_prefix}{self.name}-{uuid.uuid4().hex[:12]}"
        try:
            self.pool.catalog.finish_write(
                self.id,
                final_key,
                sums,
                meta or {},
                self.pool.holder,
                pin,
                lambda: self.pool.backend.publish(self.tmp_key, final_key, immutable=checksums),
                needs,
            )
        except BaseException:
            self.pool.backend.remove(self.tmp_key)
            self.pool.catalog.abort_write(self.id)
            raise
        self.record = self.pool.catalog.lookup(self.name)
        return self.record

    def abort(self) -> None:
        if not self._open:
            return
        self._open = False
        self.storage.close()
        self.pool.backend.remove(self.tmp_key)
        self.pool.catalog.abort_write(self.id)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.abort()


class ChunkReader:
    """Reads stored bytes without allocating: pread where the filesystem has read(2) (a tmpfs hole
    reads as zeros and stays a hole; touching it through a shared mapping would allocate it), a
    shared mapping where it has not (hugetlbfs, devdax)."""

    def __init__(self, fd: int, base: int, size: int, by_mmap: bool, page_size: int) -> None:
        self.fd, self.base, self.size = fd, base, size
        # Map whole pages: munmap of a hugetlb mapping with an unaligned length fails (EINVAL),
        # and Python's mmap.close() would leave the mapping behind without a word.
        length = round_up(size, page_size)
        self._view = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=base) if by_mmap else None

    def read(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if self._view is not None:
            return self._view[offset : offset + length]
        return os.pread(self.fd, length, self.base + offset)

    def close(self) -> None:
        if self._view is not None:
            self._view.close()


class Segment:
    """An open, published segment: an fd + base offset into the backend's storage."""

    def __init__(self, pool: Pool, record: ObjectRecord, fd: int, base: int) -> None:
        self.pool, self.record, self.fd, self.base = pool, record, fd, base
        self._closed = False
        self._reader = ChunkReader(fd, base, record.size, pool.caps.write_by_mmap, pool.config.page_size)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def chunk_count(self) -> int:
        return len(self.record.sums)

    def read_chunk(self, index: int, verify: bool = True) -> bytes:
        """Bytes of chunk `index`, checked against its recorded checksum (no other chunk is read)."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"segment {self.name!r} has {self.chunk_count} chunks, not {index + 1}")
        start = index * self.record.chunk_size
        data = self._reader.read(start, self.record.chunk_size)
        if verify and checksum(data) != self.record.sums[index]:
            raise SegmentCorrupt(
                f"segment {self.name!r} chunk {index} (bytes {start}..{start + len(data)}) does not match "
                f"its checksum: the pool's copy is corrupt"
            )
        return data

    def verify(self) -> None:
        for i in range(self.chunk_count):
            self.read_chunk(i)

    @property
    def mutable(self) -> bool:
        return bool(self.record.meta.get("mutable"))

    def map(self, private: bool = True, writable: bool = True) -> mmap.mmap:
        """Map the segment: private = copy-on-write over the pool's pages (if the backend can).
        Only a mutable segment (a cache) can be mapped shared and writable."""
        if not private and writable and not self.mutable:
            raise PoolError(f"segment {self.name!r} is published and immutable: map it private or read-only")
        if private and not self.pool.caps.private_cow:
            raise UnsupportedMapping(f"the {self.pool.config.backend} backend cannot map {self.name!r} privately")
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        if private and self.pool.config.backend == "hugetlbfs":
            # Without NORESERVE a private hugetlb mapping reserves a copy of every page up front
            # (ENOMEM on a full pool). With it, copies are taken on write, from the mount's budget.
            flags |= MapFlag.NORESERVE
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        length = round_up(self.size, self.pool.config.page_size)
        return mmap.mmap(self.fd, length, flags, prot, offset=self.base)

    def data_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of the parts that hold pages (holes skipped where the backend is sparse)."""
        if not self.pool.caps.sparse:
            return [(0, self.size)]
        ranges, pos = [], 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            ranges.append((start, end - start))
            pos = end
        return ranges

    def placement(self) -> Counter[int]:
        """Node of every stored page, counted (map shared, read each stored page, ask move_pages)."""
        page = self.pool.config.page_size
        with self.map(private=False, writable=False) as view:
            base = memory.address_of(view)
            pages = [base + off for start, length in self.data_ranges() for off in range(start, start + length, page)]
            for addr in pages:
                memory.touch(addr, 1, 1, write=False)
            return Counter(memory.move_pages(0, pages)) if pages else Counter()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reader.close()
        os.close(self.fd)
        self.pool.catalog.release(self.record.id, self.pool.holder, pin=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Where a pool's bytes live: tmpfs on a node (default), hugetlbfs, a devdax device, or memfds.

Every pool has a small tmpfs at its root holding `pool.json` and the catalog; the backend decides
where segment bytes go and declares what its mappings can do (`Capabilities`), so callers refuse
a restore mode a backend cannot serve instead of failing deep inside a restore.

Some facts about the kernel that shape the backends:

- tmpfs `mpol=bind:N` binds every page of every file in the mount to node N, whoever faults it.
  Files are sparse: a never-written page costs nothing and reads as zero.
- hugetlbfs has no write(2): bytes go in through a MAP_SHARED mapping. Pages come from the
  hugepage pool at fault/fallocate time, under the faulting thread's mempolicy; a mount with
  `min_size` reserves its pages up front, so a write can fail cleanly with ENOSPC at fallocate
  instead of SIGBUS at first touch. Copy-on-write copies made in MAP_PRIVATE mappings of a
  hugetlbfs file are charged to that mount's size too (its subpool): a hugetlbfs pool must have
  room for the private copies its instances will make, or their writes die with SIGBUS.
- devdax refuses MAP_PRIVATE (EINVAL) and needs mappings aligned to the device's `align`. It has
  no files, so segments are extents handed out by an allocation table.
- A memfd lives as long as some process holds it; others reach it only through fd passing
  (`pidfd_getfd` here), so memfd segments die with their owner.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import psutil

from native import fileattr, memory, mounts, pidfd
from native.constants import Mempolicy, MfdFlag, MountFlag, UmountFlag
from native.kerndat import kerndat
from shmpool.errors import HugepagesUnavailable, PoolError, PoolFull, SegmentNotFound, UnknownNode

SMALL_PAGE = mmap.PAGESIZE
META_TMPFS_SIZE = 64 << 20  # catalog + pool.json of backends whose data lives elsewhere


@dataclass(frozen=True)
class Capabilities:
    """What mappings of this backend's segments can do."""

    private_cow: bool  # MAP_PRIVATE works: copy-on-write restore straight from the pool
    sparse: bool  # never-written pages cost nothing
    uffd: bool  # userfaultfd MISSING faults on its mappings (lazy restore)
    page_size: int  # granule of mappings and of copy-on-write
    write_by_mmap: bool  # no write(2): fill through a shared mapping
    per_process: bool  # segments reachable only by fd passing from their owner


@dataclass
class PoolConfig:
    """A pool's identity, persisted as `<root>/pool.json`."""

    root: str
    backend: str
    node: int
    size: int
    page_size: int = SMALL_PAGE
    device: str | None = None
    hugepages_reserved: int = 0  # pages this pool added to its node's pool; given back on destroy
    version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PoolConfig:
        return cls(**json.loads(text))


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def check_node(node: int) -> None:
    """Raise UnknownNode unless `node` is online and has memory."""
    known = kerndat().node_ids
    if node not in known:
        raise UnknownNode(f"NUMA node {node} is not an online node with memory (this machine has {known})")


def is_mountpoint(path: Path) -> bool:
    return path.is_dir() and os.path.ismount(path)


def _mount_tmpfs(path: Path, size: int, node: int, huge: str = "never") -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0700,mpol=bind:{node},huge={huge}"
    mounts.mount("thaw-pool", str(path), "tmpfs", MountFlag.NOSUID | MountFlag.NODEV, opts)


def _umount(path: Path) -> None:
    # Lazy detach: another process with the catalog or a segment open must not make destroy
    # fail halfway; the kernel frees the mount when the last user lets go.
    if is_mountpoint(path):
        mounts.umount2(str(path), UmountFlag.NOFOLLOW | UmountFlag.DETACH)


@contextmanager
def thread_bound_to(node: int) -> Iterator[None]:
    """Allocate this thread's new pages on `node` for the duration (restores the old policy)."""
    old_mode, old_nodes = memory.get_mempolicy()
    memory.set_mempolicy(Mempolicy.BIND, [node])
    try:
        yield
    finally:
        memory.set_mempolicy(old_mode, old_nodes)


class StorageWriter:
    """Writes into one segment's storage: pwrite where the filesystem has write(2), else a mapping."""

    def __init__(
        self, fd: int, base: int, size: int, by_mmap: bool, pool_root: str, bind_node: int | None = None
    ) -> None:
        self.fd, self.base, self.size, self.pool_root = fd, base, size, pool_root
        self.bind_node = bind_node  # place pages by binding the writing thread (no mount policy)
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=base) if by_mmap and size else None

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset} outside a {self.size}-byte segment")
        if self.bind_node is not None:
            with thread_bound_to(self.bind_node):
                self._write(offset, data)
        else:
            self._write(offset, data)

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._map is not None:
            self._map[offset : offset + len(data)] = data
            return
        view = memoryview(data)
        while view:
            try:
                done = os.pwrite(self.fd, view, self.base + offset)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise PoolFull(f"pool {self.pool_root} is full while writing a segment") from e
                raise
            view, offset = view[done:], offset + done

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        os.close(self.fd)


class Backend(ABC):
    """One way of storing segment bytes. Keys are opaque storage names chosen by the pool."""

    name: ClassVar[str]

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.root = Path(config.root)

    @property
    @abstractmethod
    def caps(self) -> Capabilities: ...

    # -- lifetime -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Mount / reserve what the pool needs. Called once by `Pool.create`."""
        _mount_tmpfs(self.root, META_TMPFS_SIZE, self.config.node)

    def teardown(self) -> None:
        _umount(self.root)

    def is_ready(self) -> bool:
        return is_mountpoint(self.root)

    # -- space ----------------------------------------------------------------------------------
    @abstractmethod
    def capacity(self) -> int: ...

    @abstractmethod
    def used(self) -> int: ...

    # -- storage --------------------------------------------------------------------------------
    @abstractmethod
    def create(self, key: str, size: int) -> StorageWriter:
        """Make writable storage for `size` bytes; PoolFull if there is no room."""

    @abstractmethod
    def publish(self, tmp_key: str, key: str, immutable: bool = True) -> None:
        """Give finished storage its final name (atomic) and, unless it is a mutable cache, make
        it unwritable through any path where the backend can."""

    @abstractmethod
    def open(self, key: str) -> tuple[int, int]:
        """(read-only fd, base offset) of stored bytes; the caller closes the fd."""

    @abstractmethod
    def remove(self, key: str) -> None: ...

    @abstractmethod
    def keys(self) -> set[str]:
        """Every storage key that holds bytes now (for orphan collection)."""

    def huge_prefix(self) -> str | None:
        """The key prefix of storage in huge pages, for big read-mostly segments (tensor stores),
        or None where the backend has no such area (every page is huge already, or none can be)."""
        return None


# ---------------------------------------------------------------------------------------------
# File backends


def seal_file(path: Path) -> None:
    """Make a published segment file unwritable: read-only modes for everybody, and the immutable
    inode flag where the filesystem has it (tmpfs), which refuses writes from root too. hugetlbfs
    has no inode flags: there the modes keep thaw's own processes out, the scrubber the rest."""
    os.chmod(path, 0o444)
    fileattr.set_immutable(path, True)


class FileBackend(Backend):
    """Segments are files in `<root>/segments`."""

    @property
    def data_dir(self) -> Path:
        return self.root / "segments"

    def setup(self) -> None:
        super().setup()
        self.data_dir.mkdir(mode=0o700, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.data_dir / key

    def _statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.data_dir)

    def capacity(self) -> int:
        st = self._statvfs()
        return st.f_blocks * st.f_frsize

    def used(self) -> int:
        """Bytes the data mount holds (holes excluded; the catalog lives on another mount)."""
        st = self._statvfs()
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def free(self) -> int:
        st = self._statvfs()
        return st.f_bavail * st.f_frsize

    def publish(self, tmp_key: str, key: str, immutable: bool = True) -> None:
        os.rename(self._path(tmp_key), self._path(key))  # an immutable inode cannot be renamed: flag it after
        if immutable:
            seal_file(self._path(key))

    def open(self, key: str) -> tuple[int, int]:
        try:
            return os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC), 0
        except FileNotFoundError as e:
            raise SegmentNotFound(f"segment storage {key} is missing from {self.data_dir}") from e

    def remove(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except PermissionError:  # a published segment: immutable until we let go of it
            fileattr.set_immutable(path, False)
            path.unlink(missing_ok=True)

    def keys(self) -> set[str]:
        return {p.name for p in self.data_dir.iterdir()}


HUGE_PREFIX = "huge/"


class TmpfsBackend(FileBackend):
    """The default: segments on a tmpfs mounted with mpol=bind:N and the pool's size.

    The catalog sits on the small metadata tmpfs at the root, apart from the data mount, so a
    full pool can still record deletes and aborts. Templates need 4 KiB pages (sparse images,
    4 KiB copy-on-write), so the data mount has huge=never. Tensor stores are read whole by every
    worker: they go to a second mount, `<root>/huge`, with huge=within_size, where a 540 MB model
    maps in ~270 faults instead of ~8,600 (mapping + one pass over 530 MB: 17 ms against 30 ms).
    Keys there start with `huge/`. Each mount is limited to the pool's size."""

    name = "tmpfs"

    @property
    def huge_dir(self) -> Path:
        return self.root / "huge"

    def huge_prefix(self) -> str | None:
        # Pools created before the huge mount existed keep every segment on 4 KiB pages.
        return HUGE_PREFIX if is_mountpoint(self.huge_dir) else None

    def _path(self, key: str) -> Path:
        if key.startswith(HUGE_PREFIX):
            return self.huge_dir / key.removeprefix(HUGE_PREFIX)
        return self.data_dir / key

    def _mounts(self) -> list[Path]:
        return [self.data_dir, *([self.huge_dir] if is_mountpoint(self.huge_dir) else [])]

    def capacity(self) -> int:
        st = os.statvfs(self.data_dir)
        return st.f_blocks * st.f_frsize

    def used(self) -> int:
        """Bytes both data mounts hold (holes excluded; the catalog lives on another mount)."""
        return sum((st.f_blocks - st.f_bfree) * st.f_frsize for st in map(os.statvfs, self._mounts()))

    def _free_for(self, key: str) -> int:
        st = os.statvfs(self._path(key).parent)
        return st.f_bavail * st.f_frsize

    def keys(self) -> set[str]:
        found = {p.name for p in self.data_dir.iterdir()}
        if is_mountpoint(self.huge_dir):
            found |= {HUGE_PREFIX + p.name for p in self.huge_dir.iterdir()}
        return found

    @property
    def caps(self) -> Capabilities:
        kd = kerndat()
        return Capabilities(True, True, kd.uffd and kd.uffd_missing_shmem, SMALL_PAGE, False, False)

    def setup(self) -> None:
        super().setup()
        try:
            _mount_tmpfs(self.data_dir, self.config.size, self.config.node)
            _mount_tmpfs(self.huge_dir, self.config.size, self.config.node, huge="within_size")
        except BaseException:
            _umount(self.data_dir)
            _umount(self.root)
            raise

    def teardown(self) -> None:
        _umount(self.huge_dir)
        _umount(self.data_dir)
        super().teardown()

    def is_ready(self) -> bool:
        return super().is_ready() and is_mountpoint(self.data_dir)

    def create(self, key: str, size: int) -> StorageWriter:
        free = self._free_for(key)
        if size > free:
            raise PoolFull(f"pool {self.root} is full: {size} bytes asked, {free} free")
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        # Sparse: pages are allocated only as they are written. Whole pages, so the last partial
        # page can be mapped (mmap refuses a length beyond the end of the file).
        os.ftruncate(fd, round_up(size, SMALL_PAGE))
        return StorageWriter(fd, 0, size, False, str(self.root))


class HugetlbfsBackend(FileBackend):
    """hugetlbfs with pages reserved on the pool's node; metadata on a small tmpfs at the root."""

    name = "hugetlbfs"

    @property
    def caps(self) -> Capabilities:
        kd = kerndat()
        return Capabilities(True, False, kd.uffd and kd.uffd_missing_hugetlbfs, self.config.page_size, True, False)

    def _node_pool_file(self, name: str) -> Path:
        kib = self.config.page_size // 1024
        return Path(f"/sys/devices/system/node/node{self.config.node}/hugepages/hugepages-{kib}kB/{name}")

    def setup(self) -> None:
        if self.config.page_size // 1024 not in kerndat().hugepage_sizes_kib:
            raise HugepagesUnavailable(f"this kernel has no {self.config.page_size // 1024} KiB hugepages")
        pages = round_up(self.config.size, self.config.page_size) // self.config.page_size
        self._reserve(pages)
        try:
            super().setup()
            opts = f"pagesize={self.config.page_size},size={pages * self.config.page_size}"
            opts += f",min_size={pages * self.config.page_size},mode=0700"
            try:
                mounts.mount("thaw-pool", str(self.data_dir), "hugetlbfs", MountFlag.NOSUID | MountFlag.NODEV, opts)
            except OSError as e:
                raise HugepagesUnavailable(f"mount hugetlbfs at {self.data_dir} ({opts})") from e
        except BaseException:
            _umount(self.root)
            self._give_back()
            raise

    def _reserve(self, pages: int) -> None:
        nr_file = self._node_pool_file("nr_hugepages")
        with _hugepage_lock(nr_file):
            before = int(nr_file.read_text())
            nr_file.write_text(str(before + pages))
            after = int(nr_file.read_text())
        self.config.hugepages_reserved = after - before
        if after - before < pages:
            self._give_back()
            kib = self.config.page_size // 1024
            raise HugepagesUnavailable(
                f"asked node {self.config.node} for {pages} more {kib} KiB hugepages, the kernel found "
                f"{after - before} (memory fragmented or too small)"
            )

    def _give_back(self) -> None:
        if self.config.hugepages_reserved:
            nr_file = self._node_pool_file("nr_hugepages")
            with _hugepage_lock(nr_file):
                nr_file.write_text(str(max(0, int(nr_file.read_text()) - self.config.hugepages_reserved)))
            self.config.hugepages_reserved = 0

    def teardown(self) -> None:
        try:
            _umount(self.data_dir)
            super().teardown()
        finally:
            self._give_back()

    def is_ready(self) -> bool:
        return super().is_ready() and is_mountpoint(self.data_dir)

    def create(self, key: str, size: int) -> StorageWriter:
        rounded = round_up(size, self.config.page_size)
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, rounded)
            with thread_bound_to(self.config.node):
                os.posix_fallocate(fd, 0, rounded)  # take the pages now: ENOSPC here, never SIGBUS later
        except OSError as e:
            os.close(fd)
            self.remove(key)
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                raise PoolFull(f"hugetlbfs pool {self.root} is full: {rounded} bytes asked") from e
            raise
        return StorageWriter(fd, 0, rounded, True, str(self.root))


@contextmanager
def _hugepage_lock(nr_file: Path) -> Iterator[None]:
    """nr_hugepages is read-modify-written: serialise pools created or destroyed at the same time
    (flock on the sysfs file itself, so no lock file is left behind)."""
    fd = os.open(nr_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Backends without files: an allocation table under flock in the metadata tmpfs


@contextmanager
def locked_table(path: Path) -> Iterator[dict[str, Any]]:
    """A small JSON table shared between processes: read-modify-write under a lock file, replaced
    by rename so a crash mid-update leaves the old table, never an empty one."""
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        before = json.dumps(table, sort_keys=True)
        yield table
        after = json.dumps(table, sort_keys=True)
        if after != before:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(after)
            tmp.rename(path)
    finally:
        os.close(lock)


class DevdaxBackend(Backend):
    """A device-DAX character device (real CXL memory shows up this way). MAP_SHARED only."""

    name = "devdax"

    @property
    def device(self) -> str:
        if not self.config.device:
            raise PoolError("a devdax pool needs a device (/dev/daxX.Y)")
        return self.config.device

    def _dax_info(self) -> tuple[int, int]:
        sys_dir = Path("/sys/bus/dax/devices") / Path(self.device).name
        try:
            return int((sys_dir / "size").read_text()), int((sys_dir / "align").read_text() or SMALL_PAGE)
        except OSError as e:
            raise PoolError(f"{self.device} is not a devdax device ({sys_dir} unreadable)") from e

    @property
    def caps(self) -> Capabilities:
        return Capabilities(False, False, False, self.config.page_size, True, False)

    def setup(self) -> None:
        size, align = self._dax_info()
        self.config.size = min(self.config.size or size, size)
        self.config.page_size = align
        super().setup()

    @property
    def _table(self) -> Path:
        return self.root / "extents.json"

    def capacity(self) -> int:
        return self.config.size

    def used(self) -> int:
        with locked_table(self._table) as t:
            return sum(length for _, length in t.values())

    def create(self, key: str, size: int) -> StorageWriter:
        align = self.config.page_size
        length = round_up(size, align)
        with locked_table(self._table) as t:
            offset = _first_fit(sorted(t.values()), length, self.config.size)
            if offset is None:
                raise PoolFull(f"devdax pool {self.device} has no free extent of {length} bytes")
            t[key] = [offset, length]
        fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        return StorageWriter(fd, offset, length, True, str(self.root))

    def publish(self, tmp_key: str, key: str, immutable: bool = True) -> None:
        # A device has no per-extent protection: published extents are kept unchanged by thaw
        # opening them read-only, and the scrubber catches what changes them anyway.
        with locked_table(self._table) as t:
            t[key] = t.pop(tmp_key)

    def open(self, key: str) -> tuple[int, int]:
        with locked_table(self._table) as t:
            if key not in t:
                raise SegmentNotFound(f"no extent {key} on {self.device}")
            offset = int(t[key][0])
        return os.open(self.device, os.O_RDONLY | os.O_CLOEXEC), offset

    def remove(self, key: str) -> None:
        with locked_table(self._table) as t:
            t.pop(key, None)

    def keys(self) -> set[str]:
        with locked_table(self._table) as t:
            return set(t)


def _first_fit(extents: list[list[int]], length: int, capacity: int) -> int | None:
    cursor = 0
    for offset, size in extents:
        if offset - cursor >= length:
            return cursor
        cursor = max(cursor, offset + size)
    return cursor if capacity - cursor >= length else None


class MemfdBackend(Backend):
    """Segments are memfds owned by the process that wrote them; others get them by pidfd_getfd.

    The table maps a key to (owner pid, owner fd, owner start time, size). A segment dies with its
    owner; garbage collection then drops the row.
    """

    name = "memfd"

    def __init__(self, config: PoolConfig) -> None:
        super().__init__(config)
        self._owned: dict[str, int] = {}  # key -> our fd, for the segments this attachment wrote

    @property
    def caps(self) -> Capabilities:
        kd = kerndat()
        return Capabilities(True, True, kd.uffd and kd.uffd_missing_shmem, SMALL_PAGE, False, True)

    @property
    def _table(self) -> Path:
        return self.root / "memfds.json"

    @staticmethod
    def _alive(row: list[int]) -> bool:
        pid, _fd, started, _size = row
        try:
            return abs(psutil.Process(pid).create_time() - started) < 0.01
        except psutil.NoSuchProcess:
            return False

    def capacity(self) -> int:
        return self.config.size

    def used(self) -> int:
        with locked_table(self._table) as t:
            return sum(row[3] for row in t.values() if self._alive(row))

    def create(self, key: str, size: int) -> StorageWriter:
        with locked_table(self._table) as t:
            live = sum(row[3] for row in t.values() if self._alive(row))
            if live + size > self.config.size:
                raise PoolFull(f"memfd pool {self.root} is full: {size} bytes asked, {self.config.size - live} free")
            fd = memory.memfd_create(f"thaw:{key}", MfdFlag.CLOEXEC | MfdFlag.ALLOW_SEALING)
            os.ftruncate(fd, round_up(size, SMALL_PAGE))
            t[key] = [os.getpid(), fd, psutil.Process().create_time(), size]
        self._owned[key] = fd
        return StorageWriter(os.dup(fd), 0, size, False, str(self.root), bind_node=self.config.node)

    def publish(self, tmp_key: str, key: str, immutable: bool = True) -> None:
        # Published segments are immutable: seal the memfd so no holder of it can change it.
        if immutable:
            seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
            fcntl.fcntl(self._owned[tmp_key], fcntl.F_ADD_SEALS, seals)
        with locked_table(self._table) as t:
            t[key] = t.pop(tmp_key)
        self._owned[key] = self._owned.pop(tmp_key)

    def open(self, key: str) -> tuple[int, int]:
        if key in self._owned:
            return os.dup(self._owned[key]), 0
        with locked_table(self._table) as t:
            row = t.get(key)
        gone = SegmentNotFound(f"memfd segment {key} is gone (its owner exited)")
        if row is None:
            raise gone
        try:
            pfd = pidfd.pidfd_open(row[0])
        except ProcessLookupError:
            raise gone from None
        try:
            # Check the start time only now that the pidfd pins the process: the pid cannot
            # have been reused by a stranger between the check and pidfd_getfd.
            if not self._alive(row):
                raise gone
            return pidfd.pidfd_getfd(pfd, row[1]), 0
        finally:
            os.close(pfd)

    def remove(self, key: str) -> None:
        with locked_table(self._table) as t:
            t.pop(key, None)
        fd = self._owned.pop(key, None)
        if fd is not None:
            os.close(fd)

    def keys(self) -> set[str]:
        with locked_table(self._table) as t:
            for key in [k for k, row in t.items() if not self._alive(row)]:
                del t[key]  # the owner died and took the memory with it
            live = set(t)
        for key in [k for k in self._owned if k not in live]:
            os.close(self._owned.pop(key))  # another process removed a segment we own
        return live


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TmpfsBackend, HugetlbfsBackend, DevdaxBackend, MemfdBackend)}


def backend_for(config: PoolConfig) -> Backend:
    try:
        cls = BACKENDS[config.backend]
    except KeyError:
        raise PoolError(f"unknown backend {config.backend!r} (known: {', '.join(BACKENDS)})") from None
    return cls(config)

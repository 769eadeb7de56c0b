"""A published template, opened for restoring: its segment, manifest and the files it re-maps.

    template = Template.open(pool, "hello")     # checksums of every chunk + the manifest verified
    fds = template.restore_fds("cow")           # what a stub must hold at fd 1000, 1001, ...
    ...
    template.close()

Besides the template segment `NAME`, a template may own two more segments in the pool:
`NAME.cache` (the shared page cache that lazy restores, and the pager of a compressed template,
fill on demand; mutable) and `NAME.ws` (the recorded working set: segment page indices in
first-fault order, little-endian uint32). `Template.delete` removes all.

A layered template (snapshot/pages.py) keeps some pages in its ancestors' segments: `open`
opens them too (verified like its own, and checked to be the very images it was captured
against, else ParentUnusable), and a restore's stub holds them right after its own segment.

A compressed template (snapshot/compress.py) has a `cold` section in its manifest: its cold pages
are chunks of a compressed image in the segment, which the pager decompresses into the cache on
fault (`cold_image`), and `punch_cold` takes out of the cache again after a while.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Mapping
from typing import Any, Self

from native import memory
from native.pager import ColdChunk, ColdImage
from native.tracer import FileChecks
from shmpool import Pool, Segment, SegmentNotFound
from shmpool.errors import PoolError
from snapshot.errors import FileChanged, ParentUnusable
from snapshot.files import FileIdentity
from snapshot.image import image_id, read_manifest
from snapshot.manifest import Manifest
from snapshot.pages import Ancestor, digest
from snapshot.vocabulary import RestoreMode

MODES = tuple(RestoreMode)
PAGE = 4096
SEGMENT_SLOT = 0  # restore fd slots: the segment, its ancestors' segments, every file of the manifest, the cache


def cache_name(name: str) -> str:
    return f"{name}.cache"


def working_set_name(name: str) -> str:
    return f"{name}.ws"


class Template:
    def __init__(
        self,
        pool: Pool,
        segment: Segment,
        manifest: Manifest,
        file_fds: list[int],
        mounts: Mapping[str, str] | None = None,
        layers: list[Segment] | None = None,
    ) -> None:
        self.pool, self.segment, self.manifest, self.file_fds = pool, segment, manifest, file_fds
        self.layers = layers or []  # the ancestors' segments, parent first (manifest.memory.layers)
        self._digests: dict[bytes, int] | None = None
        self.mounts = dict(mounts or {})
        self._cache: Segment | None = None
        self._cache_writer: int | None = None
        self._cold: ColdImage | None = None
        self._cold_spans: list[tuple[int, int]] | None = None
        self._host_paths: list[str] | None = None
        self._file_checks: FileChecks | None = None
        self._source_view: mmap.mmap | None = None
        self._working_set: list[int] | None = None
        # restore.py's per-template restore programs, built once per (mode, fd base, seccomp filter)
        self.restore_plans: dict[tuple[Any, ...], Any] = {}  # keyed as restore.py's _plan keys them

    @property
    def name(self) -> str:
        return self.segment.name

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, pool: Pool, name: str, verify: bool = True, mounts: Mapping[str, str] | None = None) -> Template:
        """Open template `name`; with `verify` every chunk checksum is checked first.

        `mounts` maps directories as the guest saw them to where they are on this host, for a
        guest captured inside a sandbox whose files are bind mounts at other paths (the
        function's directory at /function): {"/function": "/var/lib/thaw/functions/f/rev-1"}."""
        segment = pool.open_segment(name, verify=verify)
        fds: list[int] = []
        layers: list[Segment] = []
        try:
            manifest, offset = read_manifest(segment)
            if manifest.cold is not None:
                manifest.cold.check(image_end=offset)
            for layer in manifest.memory.layers:
                layers.append(_open_layer(pool, name, layer.name, layer.image, verify))
            for ident in manifest.files.identities:
                fds.append(_open_identical(host_path(ident.path, mounts or {}), ident))
            return cls(pool, segment, manifest, fds, mounts, layers)
        except BaseException:
            for fd in fds:
                os.close(fd)
            for seg in layers:
                seg.close()
            segment.close()
            raise

    @property
    def image(self) -> str:
        """The SHA-256 of this image's manifest: what a child records of its parent."""
        return image_id(self.segment)

    @property
    def ancestor_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.manifest.memory.layers)

    @property
    def parent(self) -> str | None:
        layers = self.manifest.memory.layers
        return layers[0].name if layers else None

    def host_paths(self) -> list[str]:
        """Where the files this template maps are, seen from here (its mounts resolved)."""
        if self._host_paths is None:
            self._host_paths = [host_path(ident.path, self.mounts) for ident in self.manifest.files.identities]
        return self._host_paths

    def file_checks(self) -> FileChecks:
        """The files' captured identities with the fds this template holds them by, for the
        tracer's check at every restore: one fstat each (a file changed in place, or deleted or
        replaced under its name). `check_files` then names the change, by path."""
        if self._file_checks is None:
            files = self.manifest.files.identities
            self._file_checks = FileChecks(
                [(fd, f.dev, f.ino, f.size, f.mtime_ns) for f, fd in zip(files, self.file_fds, strict=True)]
            )
        return self._file_checks

    def check_files(self) -> None:
        """The files this template maps are still the captured ones (run at every restore).

        One stat of each path: a file modified in place shows a new size/mtime there as well as
        on the fd we hold, and a file replaced under its name shows another device/inode."""
        for ident, path in zip(self.manifest.files.identities, self.host_paths(), strict=True):
            st = _stat_or_none(path)
            if st is None:
                raise FileChanged(f"{ident.path}, which template {self.name!r} maps, no longer exists")
            change = ident.describe_change(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if change:
                raise FileChanged(f"template {self.name!r} cannot be restored: {change}")

    # -- what a restore needs --------------------------------------------------------------------
    def restore_fds(self, mode: str) -> list[int]:
        """The fds a stub must hold, in order from fd 1000, for a restore in `mode`."""
        if mode not in MODES:
            raise ValueError(f"restore mode must be one of {', '.join(MODES)}, not {mode!r}")
        fds = [self.segment.fd, *(seg.fd for seg in self.layers), *self.file_fds]
        if self.uses_cache(mode):
            fds.append(self.cache().fd)
        return fds

    @property
    def shares_lazily(self) -> bool:
        """Paged restores fill a shared cache segment (tmpfs) rather than private pages."""
        caps = self.pool.caps
        return caps.sparse and not caps.write_by_mmap and not caps.per_process

    def paged(self, mode: str) -> bool:
        """A restore in `mode` has a pager: lazy restores, and every restore of a compressed template."""
        return mode == "lazy" or self.manifest.cold is not None

    def uses_cache(self, mode: str) -> bool:
        """The pager fills the shared cache segment (copy mode stays private: its pages are copies)."""
        return self.paged(mode) and mode != "copy" and self.shares_lazily

    def cache(self) -> Segment:
        if self._cache is None:
            self._cache = self.pool.open_cache(cache_name(self.name), self.segment.size)
        return self._cache

    def cache_target(self) -> tuple[int, int]:
        """(writable fd, base offset) of the cache segment, for the pager's writes and punches."""
        cache = self.cache()
        if self._cache_writer is None:  # segments open read-only
            self._cache_writer = os.open(f"/proc/self/fd/{cache.fd}", os.O_RDWR | os.O_CLOEXEC)
        return self._cache_writer, cache.base

    # -- layers ----------------------------------------------------------------------------------
    def ancestors(self) -> list[Ancestor]:
        """This template and its own ancestors, as a capture of an instance thawed from it sees
        them (a child's layers: this one first). Duplicates are looked for in this one's pages;
        the deeper ancestors' pages are found by pagemap only (what the parent left of them)."""
        chain = [(self.name, self.segment, self.page_digests())]
        chain += [(layer.name, seg, {}) for layer, seg in zip(self.manifest.memory.layers, self.layers, strict=True)]
        return [_ancestor(i, name, seg, digests) for i, (name, seg, digests) in enumerate(chain, 1)]

    def page_digests(self) -> dict[bytes, int]:
        """Content digest -> offset of every page in this template's page area (zero pages and
        stacks aside): what a child's capture finds duplicates in."""
        if self._digests is None:
            digests: dict[bytes, int] = {}
            with memoryview(self.source_view()) as view:
                for _, run in self.manifest.memory.own_runs(with_stacks=False):
                    for off in range(run.offset, run.offset + run.length, PAGE):
                        digests.setdefault(digest(view[off : off + PAGE]), off)
            digests.pop(digest(bytes(PAGE)), None)
            self._digests = digests
        return self._digests

    # -- cold pages ------------------------------------------------------------------------------
    def cold_spans(self) -> list[tuple[int, int]]:
        """Sorted (segment offset, length) of the cold pages, adjacent chunks merged."""
        if self._cold_spans is None:
            spans: list[tuple[int, int]] = []
            for seg_off, _, length, _ in self.manifest.cold.chunks if self.manifest.cold else ():
                if spans and spans[-1][0] + spans[-1][1] == seg_off:
                    spans[-1] = (spans[-1][0], spans[-1][1] + length)
                else:
                    spans.append((seg_off, length))
            self._cold_spans = spans
        return self._cold_spans

    def cold_image(self) -> ColdImage:
        """The compressed chunks, for the pagers of this template's instances (one for all)."""
        cold = self.manifest.cold
        if cold is None:
            raise ValueError(f"template {self.name!r} is not compressed")
        if self._cold is None:
            offset, length = cold.dictionary
            dictionary = os.pread(self.segment.fd, length, self.segment.base + offset) if length else b""
            codec = "deflate" if cold.codec == "iaa" else cold.codec  # IAA writes raw deflate
            chunks = [ColdChunk(*c) for c in cold.chunks]
            self._cold = ColdImage(codec, self.source_address(), chunks, dictionary)
        return self._cold

    def punch_cold(self, older_than: float = 0.0) -> int:
        """Free cold pages decompressed into the cache more than `older_than` seconds ago; returns
        bytes freed. Instances still using them fault again and the pager refills them: that
        refault (`cold_image().stats().refills`) is how their use is observed."""
        if self.manifest.cold is None or self._cold is None or not self.shares_lazily:
            return 0
        fd, base = self.cache_target()
        return self._cold.punch(fd, base, older_than)

    def source_address(self) -> int:
        """Where the template segment is mapped (shared, read-only) in this process, for the pager."""
        return memory.address_of(self.source_view())

    def source_view(self) -> mmap.mmap:
        if self._source_view is None:
            self._source_view = self.segment.map(private=False, writable=False)
        return self._source_view

    # -- working set -----------------------------------------------------------------------------
    def working_set(self) -> list[int]:
        """Segment page indices in first-fault order, as recorded by a lazy restore (or empty)."""
        if self._working_set is None:
            self._working_set = self._load_working_set()
        return self._working_set

    def _load_working_set(self) -> list[int]:
        try:
            with self.pool.open_segment(working_set_name(self.name)) as seg:
                raw = b"".join(seg.read_chunk(i) for i in range(seg.chunk_count))[: seg.record.meta["count"] * 4]
        except SegmentNotFound:
            return []
        return list(struct.unpack(f"<{len(raw) // 4}I", raw))

    def save_working_set(self, pages: list[int]) -> None:
        if not pages:
            return
        name = working_set_name(self.name)
        with contextlib.suppress(SegmentNotFound):
            self.pool.delete(name)
        raw = struct.pack(f"<{len(pages)}I", *pages)
        with self.pool.create_segment(name, len(raw), kind="workingset") as writer:
            writer.write(0, raw)
            writer.publish(meta={"count": len(pages), "template": self.name})
        self._working_set = list(pages)

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        if self._cold is not None:  # the pagers using it are stopped: instances close first
            self._cold.close()
            self._cold = None
        if self._source_view is not None:
            self._source_view.close()
            self._source_view = None
        if self._cache_writer is not None:
            os.close(self._cache_writer)
            self._cache_writer = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        for fd in self.file_fds:
            os.close(fd)
        self.file_fds = []
        self._file_checks = None
        for seg in self.layers:
            seg.close()
        self.layers = []
        self.segment.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def delete(pool: Pool, name: str) -> None:
        """Remove template `name` with its cache and working set (freed once no instance maps them)."""
        for seg in (working_set_name(name), cache_name(name), name):
            with contextlib.suppress(SegmentNotFound):
                pool.delete(seg)


def host_path(path: str, mounts: Mapping[str, str]) -> str:
    """Where `path`, as the guest saw it, is on this host."""
    for inside, outside in mounts.items():
        if path == inside or path.startswith(inside.rstrip("/") + "/"):
            return outside.rstrip("/") + path[len(inside.rstrip("/")) :]
    return path


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _open_layer(pool: Pool, child: str, name: str, image: str, verify: bool) -> Segment:
    """An ancestor's segment, checked to be the image `child` was captured against."""
    try:
        segment = pool.open_segment(name, verify=verify)
    except SegmentNotFound:
        raise ParentUnusable(f"template {child!r} is layered on {name!r}, which is not in the pool") from None
    except PoolError as e:
        raise ParentUnusable(f"template {child!r} is layered on {name!r}, which cannot be used: {e}") from e
    try:
        found = image_id(segment)
    except BaseException:
        segment.close()
        raise
    if found != image:
        segment.close()
        raise ParentUnusable(f"template {child!r} is layered on another image of {name!r} than the pool holds")
    return segment


def _ancestor(layer: int, name: str, segment: Segment, digests: dict[bytes, int]) -> Ancestor:
    st = os.fstat(segment.fd)

    def read(offset: int) -> bytes:
        return os.pread(segment.fd, PAGE, segment.base + offset)

    return Ancestor(name, layer, st.st_dev, st.st_ino, segment.base, segment.size, read, digests)


def _open_identical(path: str, ident: FileIdentity) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileChanged(f"{path}, which the template maps, no longer exists") from None
    st = os.fstat(fd)
    change = ident.describe_change(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if change:
        os.close(fd)
        raise FileChanged(f"the template cannot be used: {change}")
    return fd

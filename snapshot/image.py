"""The template image: the one owner of how a template lies in its pool segment.

    offset 0        header: magic, format version, manifest offset and length, its SHA-256
    offset 4096     the page area: dumped pages, one run after another at page-aligned offsets
                    (the segment offsets VmaRecord runs name); holes where pages are cold
    tail            what follows the page area: a compressed template's cold image and dictionary
    manifest        JSON (snapshot/manifest.py), 8-byte aligned, last

Capture, compression and expansion write images through `ImageWriter`; `read_manifest` is how
every reader gets the manifest back. The pool checksums the whole segment per chunk when it is
published and when it is opened; the header's SHA-256 covers the manifest once more, so a
manifest is never trusted before it has been checked. A reader refuses any other magic, and a
template of an older format version as "captured by an older thaw" (templates are captured again,
not migrated).
"""

from __future__ import annotations

import hashlib
import os
import struct
from types import TracebackType
from typing import Any, Self

from shmpool import Pool, Segment, SegmentWriter
from shmpool.backends import round_up
from snapshot.errors import TemplateCorrupt, TemplateTooOld
from snapshot.manifest import HEADER_SIZE, VERSION, Manifest

MAGIC = b"THAWTPL\0"
HEADER = struct.Struct("<8sIIQQ32s")
PAGE = 4096
KIND = "template"


def page_area_end(manifest: Manifest) -> int:
    """Where the page area ends: the tail (or the manifest) starts here."""
    return HEADER_SIZE + manifest.memory.data_bytes


class ImageWriter:
    """Writes one template image: pages into the page area, bytes into the tail, then the header
    and the manifest on `publish` (atomic, like every pool segment). Leaving the `with` block
    unpublished leaves nothing behind."""

    def __init__(self, pool: Pool, name: str, manifest: Manifest, tail_size: int = 0) -> None:
        self.manifest = manifest
        self.raw = manifest.to_json()
        self.tail_at = page_area_end(manifest)
        self.manifest_at = round_up(self.tail_at + tail_size, 8)
        size = round_up(self.manifest_at + len(self.raw), PAGE)
        self.writer: SegmentWriter = pool.create_segment(name, size, kind=KIND)

    def page(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Pages at segment `offset`, inside the page area."""
        if not offset >= HEADER_SIZE and offset + len(data) <= self.tail_at:
            raise ValueError(f"{len(data)} bytes at {offset:#x} fall outside the page area")
        self.writer.write(offset, data)

    def tail(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Bytes at segment `offset`, between the page area and the manifest."""
        if not self.tail_at <= offset and offset + len(data) <= self.manifest_at:
            raise ValueError(f"{len(data)} bytes at {offset:#x} fall outside the image's tail")
        self.writer.write(offset, data)

    def publish(self, meta: dict[str, Any], needs: list[str] | None = None) -> None:
        """`needs`: the ancestors whose pages the image refers to (the pool keeps them while it lives)."""
        self.writer.write(0, _pack_header(self.manifest_at, self.raw))
        self.writer.write(self.manifest_at, self.raw)
        self.writer.publish(meta={"comm": self.manifest.threads.main.name, **meta}, needs=needs)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.writer.abort()


def read_manifest(segment: Segment) -> tuple[Manifest, int]:
    """The manifest of the image in `segment` (checked against the header's SHA-256), and where
    the manifest starts (the end of the tail)."""
    if segment.record.kind != KIND:
        raise TemplateCorrupt(f"segment {segment.name!r} is a {segment.record.kind}, not a template")
    header = os.pread(segment.fd, HEADER_SIZE, segment.base)
    offset, length, digest = _unpack_header(header, segment.size)
    raw = os.pread(segment.fd, length, segment.base + offset)
    if hashlib.sha256(raw).digest() != digest:
        raise TemplateCorrupt("manifest does not match the SHA-256 in the template header")
    return Manifest.from_json(raw), offset


def image_id(segment: Segment) -> str:
    """The SHA-256 of the image's manifest, from its header: names this image exactly (a layered
    template records its ancestors' so it is never restored over another image of the name)."""
    header = os.pread(segment.fd, HEADER_SIZE, segment.base)
    return _unpack_header(header, segment.size)[2].hex()


def _pack_header(manifest_offset: int, manifest: bytes) -> bytes:
    raw = HEADER.pack(MAGIC, VERSION, 0, manifest_offset, len(manifest), hashlib.sha256(manifest).digest())
    return raw + bytes(HEADER_SIZE - len(raw))


def _unpack_header(raw: bytes, segment_size: int) -> tuple[int, int, bytes]:
    """(manifest offset, length, sha256) from a header page, refusing anything inconsistent."""
    if len(raw) < HEADER.size:
        raise TemplateCorrupt(f"header is {len(raw)} bytes, shorter than {HEADER.size}")
    magic, version, _flags, offset, length, digest = HEADER.unpack(raw[: HEADER.size])
    if magic != MAGIC:
        raise TemplateCorrupt(f"not a thaw template (magic {magic!r})")
    if 0 < version < VERSION:
        raise TemplateTooOld(f"template format {version}: captured by an older thaw: capture it again")
    if version != VERSION:
        raise TemplateCorrupt(f"template format version {version}, this thaw reads {VERSION}")
    if offset < HEADER_SIZE or offset + length > segment_size:
        raise TemplateCorrupt(f"manifest at {offset}+{length} lies outside the {segment_size}-byte segment")
    return offset, length, digest

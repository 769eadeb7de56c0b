"""Compress a template's cold pages: CodeCrunch/Sabre on thaw templates (DESIGN.md, "Compression of
cold regions").

    compressed = compress(pool, "hello", get_codec("zstd"))     # publishes "hello.z"
    instance = restore(compressed, stub, "cow")                  # every mode works as before
    again = expand(pool, "hello.z", "hello")                    # and back, when it is hot again

Which pages are hot comes from the template's recorded working set (the pages its first lazy
restore faulted, `Template.working_set`, each with the rest of the 64 KiB block the pager
answered it with) or from `hot=`. Hot pages stay in the page area of a new
template segment at their old offsets, so cow restores map them exactly as before; every other
dumped page (stacks excepted: a restore reads them by pread) is cold. Cold pages become holes
there, and their bytes go into the cold image further on in the same segment: chunks of at most
`chunk_size` bytes, each compressed on its own and never spanning two runs, so a chunk inflates
straight into the cache segment at the chunk's own offsets. At restore, cold ranges are mapped
from the cache segment and registered with userfaultfd; the pager (native/src/pager.c) inflates a
chunk on its first fault and every later instance shares the result.

The new segment is published like any template (header, checksums, manifest SHA-256), under a
new name; the source template is left as it is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator

from native.pager import MAX_COLD_CHUNK
from shmpool import Pool
from shmpool.codecs import DEFAULT_CHUNK, Codec, ZstdCodec, check_chunk_size, train_zstd_dictionary
from snapshot.errors import SnapshotError
from snapshot.image import ImageWriter, page_area_end
from snapshot.manifest import ColdSection, Manifest
from snapshot.template import Template

PAGE = 4096
WRITE_BATCH = 4 << 20
DICTIONARY_SAMPLES = 2000


class CompressError(SnapshotError):
    """A template that cannot be compressed as asked (already compressed, bad chunk size, no pool room)."""


def compressed_name(name: str) -> str:
    return f"{name}.z"


def compress(
    pool: Pool,
    name: str,
    codec: Codec,
    target: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    hot: Iterable[int] | None = None,
    dictionary_size: int = 0,
) -> Template:
    """Publish template `name` compressed as `target` (default NAME.z) and open it.

    `hot`: segment page indices to keep uncompressed (default: the recorded working set; with
    none recorded every page is cold). `dictionary_size`: with zstd, train a dictionary of that
    many bytes on the cold chunks first."""
    check_chunk_size(chunk_size)
    if chunk_size > MAX_COLD_CHUNK:
        raise CompressError(f"chunk size {chunk_size} is larger than the pager's {MAX_COLD_CHUNK} bytes")
    if dictionary_size and not isinstance(codec, ZstdCodec):
        raise CompressError(f"a dictionary is a zstd feature; codec {codec.name} has none")
    with Template.open(pool, name) as source:
        if source.manifest.cold is not None:
            raise CompressError(f"template {name!r} is compressed already (from {source.manifest.cold.source!r})")
        hot_pages = set(source.working_set() if hot is None else hot)
        cold = list(_stretches(source.manifest, lambda page: page not in hot_pages, with_stacks=False))
        extents = list(_chunk_extents(cold, chunk_size))
        cold_pages = {off // PAGE + i for off, length in cold for i in range(length // PAGE)}
        hot_extents = list(_stretches(source.manifest, lambda page: page not in cold_pages, with_stacks=True))
        with source.segment.map(private=False, writable=False) as mapped, memoryview(mapped) as view:
            pieces = [view[off : off + length] for off, length in extents]
            try:
                if dictionary_size:
                    codec = ZstdCodec(codec.level, dictionary=_train(pieces, dictionary_size))
                packed = codec.compress_many(pieces)
                _write(
                    pool, target or compressed_name(name), source, view, extents, hot_extents, packed, codec, chunk_size
                )
            finally:
                for piece in pieces:  # the mapping closes only once no view of it is left
                    piece.release()
    return Template.open(pool, target or compressed_name(name), verify=False, mounts=source.mounts)


def _stretches(manifest: Manifest, keep: Callable[[int], bool], with_stacks: bool) -> Iterator[tuple[int, int]]:
    """(segment offset, length) of each stretch of pages inside one run whose index `keep` takes."""
    for _, run in manifest.memory.own_runs(with_stacks):  # an ancestor's pages are its own business
        start = None
        for off in range(run.offset, run.offset + run.length, PAGE):
            if not keep(off // PAGE):
                if start is not None:
                    yield start, off - start
                start = None
            elif start is None:
                start = off
        if start is not None:
            yield start, run.offset + run.length - start


def _chunk_extents(extents: Iterable[tuple[int, int]], chunk_size: int) -> Iterator[tuple[int, int]]:
    for off, length in extents:
        for at in range(off, off + length, chunk_size):
            yield at, min(chunk_size, off + length - at)


def _train(pieces: list[memoryview], size: int) -> bytes:
    step = max(1, len(pieces) // DICTIONARY_SAMPLES)
    return train_zstd_dictionary(pieces[::step], size)


def _write(
    pool: Pool,
    target: str,
    source: Template,
    view: memoryview,
    extents: list[tuple[int, int]],
    hot_extents: list[tuple[int, int]],
    packed: list[bytes],
    codec: Codec,
    chunk_size: int,
) -> None:
    m = source.manifest
    image_at = page_area_end(m)  # the cold image is the tail: after the page area
    chunks, at = [], image_at
    for (off, length), data in zip(extents, packed, strict=True):
        chunks.append((off, at, length, len(data)))
        at += len(data)
    dictionary = codec.dictionary if isinstance(codec, ZstdCodec) and codec.dictionary else b""
    dict_at = at
    cold_pages = sum(length for _, length in extents) // PAGE
    cold = ColdSection(
        codec=codec.name,
        level=codec.level,
        chunk_size=chunk_size,
        chunks=tuple(chunks),
        dictionary=(dict_at, len(dictionary)) if dictionary else (0, 0),
        source=source.name,
        hot_pages=sum(r.length for _, r in m.memory.own_runs()) // PAGE - cold_pages,
        cold_pages=cold_pages,
        compressed_bytes=at - image_at,
    )
    with ImageWriter(pool, target, _with_cold(m, cold), tail_size=dict_at + len(dictionary) - image_at) as image:
        for off, length in hot_extents:
            for done in range(0, length, WRITE_BATCH):
                image.page(off + done, view[off + done : off + min(length, done + WRITE_BATCH)])
        for (_, comp_off, _, _), data in zip(chunks, packed, strict=True):
            image.tail(comp_off, data)
        if dictionary:
            image.tail(dict_at, dictionary)
        image.publish(
            {
                "data_bytes": m.data_bytes,
                "compressed_from": source.name,
                "codec": codec.name,
                "cold_pages": cold_pages,
            },
            needs=[layer.name for layer in m.memory.layers],
        )


def _with_cold(manifest: Manifest, cold: ColdSection) -> Manifest:
    return dataclasses.replace(manifest, cold=cold)


def expand(pool: Pool, name: str, target: str) -> Template:
    """Publish compressed template `name` uncompressed again as `target` (every page in the page
    area, no cold image) and open it: for a function that has become busy again."""
    with Template.open(pool, name) as z:
        cold = z.manifest.cold
        if cold is None:
            raise CompressError(f"template {name!r} is not compressed")
        m = dataclasses.replace(z.manifest, cold=None)
        cold_image = z.cold_image()
        cold_pages = {off // PAGE + i for off, length in z.cold_spans() for i in range(length // PAGE)}
        with ImageWriter(pool, target, m) as image:
            for off, length in _stretches(m, lambda page: page not in cold_pages, with_stacks=True):
                image.page(off, os.pread(z.segment.fd, length, z.segment.base + off))
            for index, (seg_off, _, _, _) in enumerate(cold.chunks):
                image.page(seg_off, cold_image.decompress(index))
            needs = [layer.name for layer in m.memory.layers]
            image.publish({"data_bytes": m.data_bytes, "expanded_from": name}, needs=needs)
        mounts = z.mounts
    return Template.open(pool, target, verify=False, mounts=mounts)

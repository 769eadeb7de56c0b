"""Codecs for cold template pages: one interface over lz4, zstd, deflate, and deflate on Intel IAA.

Some facts that shape this module:

- Cold pages are compressed in chunks (64 KiB by default, always whole 4 KiB pages), each an
  independent stream, so the pager inflates only the chunk that holds a faulting page.
- The chunk table records every chunk's uncompressed length, so codecs store no sizes of their
  own (lz4 blocks without `store_size`) and decompress to exactly that length: any other length
  is corruption, reported as `CodecError` naming the codec.
- `deflate` uses a 4 KiB window (zlib `wbits=-12`) because IAA's deflate keeps a 4 KiB history:
  then the software and the IAA codec read each other's streams, and a template compressed where
  there is an IAA restores where there is none, and the reverse. (A zlib stream with the default
  32 KiB window can refer further back than IAA can see.)
- A 64 KiB chunk is too short for zstd to learn much about its data; a dictionary trained on
  samples of similar pages (`train_zstd_dictionary`) gives it that knowledge up front.
- `measure` reports each codec's ratio and speed on given data, chunked as the pager would.
"""

from __future__ import annotations

import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import lz4.block
import zstandard

from native.qpl import PathName, Qpl, QplError, QplLevel, QplUnavailable
from shmpool.errors import PoolError

PAGE_SIZE = 4096  # chunks hold whole x86-64 base pages: the pager fills the cache a page at a time
DEFAULT_CHUNK = 64 << 10
DEFLATE_WBITS = -12  # raw deflate (no zlib header), 2^12 = 4 KiB window: IAA's
Buffer = bytes | bytearray | memoryview


class CodecError(PoolError):
    """Compressed bytes that do not decompress to what the chunk table says (corrupt, truncated, or
    the wrong length), or a codec library that failed. The message starts with the codec's name."""


def _describe(levels: Sequence[int]) -> str:
    if isinstance(levels, range):
        return f"{levels.start}..{levels.stop - 1}"
    return " or ".join(str(level) for level in levels)


class Codec(ABC):
    """Compresses one chunk into one self-contained stream, and back to exactly its length."""

    name: ClassVar[str]
    levels: ClassVar[Sequence[int]]
    default_level: ClassVar[int]
    errors: ClassVar[tuple[type[Exception], ...]]  # what the library raises on bad input

    def __init__(self, level: int | None = None) -> None:
        if level is None:
            level = self.default_level
        if isinstance(level, bool) or not isinstance(level, int) or level not in self.levels:
            raise ValueError(f"{self.name} level must be {_describe(self.levels)}, not {level!r}")
        self.level = level

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} level {self.level}>"

    @abstractmethod
    def _compress(self, data: memoryview) -> bytes: ...

    @abstractmethod
    def _decompress(self, data: Buffer, size: int) -> bytes: ...

    def compress(self, data: Buffer) -> bytes:
        view = memoryview(data).cast("B")  # any C-contiguous buffer, counted in bytes
        try:
            return self._compress(view)
        except self.errors as e:
            raise CodecError(f"{self.name}: compressing {view.nbytes} bytes failed: {e}") from e

    def decompress(self, data: Buffer, size: int) -> bytes:
        """Decompress `data`, which must come to exactly `size` bytes."""
        if size < 0:
            raise ValueError(f"size must be non-negative, not {size}")
        try:
            out = self._decompress(data, size)
        except self.errors as e:
            raise CodecError(f"{self.name}: corrupt data ({len(data)} bytes, expected {size} out): {e}") from e
        if len(out) != size:
            got = f"more than {size}" if len(out) > size else str(len(out))
            raise CodecError(f"{self.name}: decompressed to {got} bytes, expected {size}")
        return out

    def compress_many(self, items: Sequence[Buffer]) -> list[bytes]:
        """`compress` of each item; codecs with an asynchronous device override this."""
        return [self.compress(item) for item in items]

    def decompress_many(self, items: Sequence[tuple[Buffer, int]]) -> list[bytes]:
        return [self.decompress(data, size) for data, size in items]


# ---------------------------------------------------------------------------------------------
# The codecs


class Lz4Codec(Codec):
    """LZ4 blocks. Level 1 is LZ4's default (fast) mode; 2..12 are LZ4HC's levels, as `lz4 -N`."""

    name = "lz4"
    levels = range(1, 13)
    default_level = 1
    errors = (lz4.block.LZ4BlockError,)

    def _compress(self, data: memoryview) -> bytes:
        if self.level == 1:
            return bytes(lz4.block.compress(data, store_size=False))
        return bytes(lz4.block.compress(data, mode="high_compression", compression=self.level, store_size=False))

    def _decompress(self, data: Buffer, size: int) -> bytes:
        # `uncompressed_size` is a bound: a shorter result comes back short (the length check sees it).
        return bytes(lz4.block.decompress(data, uncompressed_size=size))


class ZstdCodec(Codec):
    """Zstandard frames, optionally with a dictionary (the bytes `train_zstd_dictionary` returns)."""

    name = "zstd"
    levels = range(1, 23)
    default_level = 3
    errors = (zstandard.ZstdError,)

    def __init__(self, level: int | None = None, dictionary: bytes | None = None) -> None:
        super().__init__(level)
        self.dictionary = dictionary
        self._dict = zstandard.ZstdCompressionDict(dictionary) if dictionary else None
        self._local = threading.local()

    def _contexts(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        # zstd contexts are reusable but not shareable across threads, and making one loads the
        # dictionary: keep one pair per thread.
        pair: tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor] | None = getattr(self._local, "pair", None)
        if pair is None:
            pair = (
                zstandard.ZstdCompressor(level=self.level, dict_data=self._dict),
                zstandard.ZstdDecompressor(dict_data=self._dict),
            )
            self._local.pair = pair
        return pair

    def _compress(self, data: memoryview) -> bytes:
        return self._contexts()[0].compress(data)

    def _decompress(self, data: Buffer, size: int) -> bytes:
        return self._contexts()[1].decompress(data, max_output_size=size)


def train_zstd_dictionary(samples: Sequence[Buffer], size: int) -> bytes:
    """A zstd dictionary of at most `size` bytes trained on `samples` (e.g. cold chunks of a template).

    zstd needs a good number of samples (hundreds) totalling well over `size`; it raises otherwise.
    """
    try:
        trained = zstandard.train_dictionary(size, [bytes(s) for s in samples])
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd: training a {size}-byte dictionary on {len(samples)} samples failed: {e}") from e
    return trained.as_bytes()


class DeflateCodec(Codec):
    """Raw deflate with a 4 KiB window (zlib `wbits=-12`): the stream shape IAA writes and reads."""

    name = "deflate"
    levels = range(1, 10)
    default_level = 6
    errors = (zlib.error,)

    def _compress(self, data: memoryview) -> bytes:
        deflater = zlib.compressobj(self.level, zlib.DEFLATED, DEFLATE_WBITS)
        return deflater.compress(data) + deflater.flush()

    def _decompress(self, data: Buffer, size: int) -> bytes:
        inflater = zlib.decompressobj(DEFLATE_WBITS)
        # Room for one byte more than expected: getting it means the stream is too long (and a
        # limit of 0 would mean no limit at all).
        out = inflater.decompress(data, size + 1)
        if len(out) <= size and not inflater.eof:
            raise CodecError(f"{self.name}: stream ends early (truncated?) after {len(out)} of {size} bytes")
        if inflater.unused_data:
            raise CodecError(f"{self.name}: {len(inflater.unused_data)} bytes follow the end of the stream")
        return out


class IaaCodec(Codec):
    """Raw deflate (4 KiB window) through Intel QPL: on IAA for path "hardware", or "auto" when
    there is one; on the CPU for "software". Raises `QplUnavailable` when libqpl is missing.
    Untested on real IAA hardware (see native/qpl.py); tested against a stand-in libqpl."""

    name = "iaa"
    levels = (int(QplLevel.DEFAULT), int(QplLevel.HIGH))  # IAA itself has only the default level
    default_level = int(QplLevel.DEFAULT)
    errors = (QplError,)

    def __init__(self, level: int | None = None, path: PathName = "auto", library: str | None = None) -> None:
        super().__init__(level)
        self.path: PathName = path
        self.qpl = Qpl.load(library)

    def _compress(self, data: memoryview) -> bytes:
        return self.qpl.compress(data, self.path, QplLevel(self.level))

    def _decompress(self, data: Buffer, size: int) -> bytes:
        return self.qpl.decompress(data, size, self.path)

    def compress_many(self, items: Sequence[Buffer]) -> list[bytes]:
        """All items in flight on the device at once (in windows of QPL's batch depth)."""
        views = [memoryview(item).cast("B") for item in items]
        try:
            return self.qpl.compress_many(views, self.path, QplLevel(self.level))
        except QplError as e:
            raise CodecError(f"{self.name}: compressing {len(views)} chunks failed: {e}") from e

    def decompress_many(self, items: Sequence[tuple[Buffer, int]]) -> list[bytes]:
        try:
            return self.qpl.decompress_many(items, self.path)
        except QplError as e:
            raise CodecError(f"{self.name}: corrupt data in a batch of {len(items)} chunks: {e}") from e


# ---------------------------------------------------------------------------------------------
# Registry

CODECS: dict[str, type[Codec]] = {c.name: c for c in (Lz4Codec, ZstdCodec, DeflateCodec, IaaCodec)}


def get_codec(name: str, level: int | None = None) -> Codec:
    """A codec by name at `level` (its default when None). For a zstd dictionary or an IAA path
    use `ZstdCodec(level, dictionary=...)` / `IaaCodec(level, path=...)` directly."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}: thaw has {', '.join(CODECS)}") from None
    return cls(level)


def available_codecs() -> list[str]:
    """The codecs that work here: all but iaa always, iaa when libqpl loads."""
    names = [name for name in CODECS if name != IaaCodec.name]
    try:
        Qpl.load().close()
    except QplUnavailable:
        return names
    return [*names, IaaCodec.name]


# ---------------------------------------------------------------------------------------------
# Chunks


class Chunk(NamedTuple):
    offset: int  # in the uncompressed data
    length: int  # uncompressed
    data: bytes  # compressed


def check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % PAGE_SIZE:
        raise ValueError(f"chunk size must be a positive multiple of {PAGE_SIZE} (whole pages), not {chunk_size!r}")
    return chunk_size


def compress_chunks(codec: Codec, data: Buffer, chunk_size: int = DEFAULT_CHUNK) -> list[Chunk]:
    """Compress `data` in `chunk_size` pieces (the last may be shorter), each on its own."""
    check_chunk_size(chunk_size)
    view = memoryview(data).cast("B")
    offsets = range(0, view.nbytes, chunk_size)
    pieces = [view[offset : offset + chunk_size] for offset in offsets]
    packed = codec.compress_many(pieces)
    return [Chunk(o, p.nbytes, c) for o, p, c in zip(offsets, pieces, packed, strict=True)]


def decompress_chunks(codec: Codec, chunks: Sequence[tuple[int, int, bytes]]) -> bytes:
    """The data `compress_chunks` was given, from its chunks (which must cover it without gaps)."""
    at = 0
    for offset, length, _ in chunks:
        if offset != at:
            raise CodecError(f"{codec.name}: chunk table has a chunk at {offset}, expected one at {at}")
        at += length
    return b"".join(codec.decompress_many([(data, length) for _, length, data in chunks]))


# ---------------------------------------------------------------------------------------------
# Ratio and speed


@dataclass(frozen=True)
class CodecReport:
    codec: str
    level: int
    chunk_size: int
    size: int
    compressed: int
    ratio: float  # size / compressed
    compress_mb_s: float  # MB (10^6 bytes) of uncompressed data per second
    decompress_mb_s: float


def measure(codec: Codec, data: Buffer, chunk_size: int = DEFAULT_CHUNK) -> CodecReport:
    """Compress `data` in chunks and back (checking the round trip), timing each direction."""
    view = memoryview(data).cast("B")
    if not view.nbytes:
        raise ValueError("measure needs some data")
    start = time.perf_counter()
    chunks = compress_chunks(codec, view, chunk_size)
    middle = time.perf_counter()
    back = decompress_chunks(codec, chunks)
    end = time.perf_counter()
    if back != view:
        raise CodecError(f"{codec.name}: the round trip changed the data")
    compressed = sum(len(c.data) for c in chunks)
    mb = view.nbytes / 1e6
    return CodecReport(
        codec=codec.name,
        level=codec.level,
        chunk_size=chunk_size,
        size=view.nbytes,
        compressed=compressed,
        ratio=view.nbytes / max(compressed, 1),
        compress_mb_s=mb / max(middle - start, 1e-9),
        decompress_mb_s=mb / max(end - middle, 1e-9),
    )

"""The tensor store: named tensors in one aligned pool segment, with an index (ServerlessLLM's layout).

    offset 0        header page: magic, format version, index offset and length, the index's SHA-256
    offset 4096     tensor data, each tensor at an `align`-byte boundary (64 by default: a cache line)
    offset I        index: JSON {name: {dtype, shape, stride, offset, nbytes}} plus the store's meta

A store is published like a template (written under a temporary name, read back and checksummed per
chunk, renamed), so a reader never sees half of one. It knows bytes and dtype names (safetensors'
spelling: F32, F16, BF16, ...), never torch: the torch loader lives in daemon/lora. A reader that
holds only the segment's fd (a LoRA worker in a sandbox that cannot see the pool) parses the store
with `TensorIndex.read(fd, base)`: the header's SHA-256 proves the index whole before it is used.

    tensors = [TensorSource("w", "F32", (2, 3), data=buf), ...]
    write_store(pool, "model.tiny", tensors, meta={"config": {...}})
    with open_store(pool, "model.tiny") as store:
        store.index.tensors["w"].offset, store.fd
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from shmpool.backends import SMALL_PAGE, round_up
from shmpool.errors import PoolError, SegmentCorrupt
from shmpool.pool import Pool, Segment

MAGIC = b"THAWTNS1"
VERSION = 1
HEADER_SIZE = SMALL_PAGE
DEFAULT_ALIGN = 64
_HEADER = struct.Struct("<8sIQQ32s")  # magic, version, index offset, index length, sha256(index)

# Element sizes by safetensors dtype name (the names GGUF and torch loaders translate to and from).
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

Buffer = bytes | bytearray | memoryview


class StoreCorrupt(SegmentCorrupt):
    """A tensor store's header or index does not check out: it is never used."""


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes sit in the segment. Strides are in elements, like torch's."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "stride": list(self.stride),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True)
class TensorSource:
    """One tensor to store. `data` is its bytes in row-major order, or a callable producing them,
    so an importer can dequantize or convert one tensor at a time instead of holding them all."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Buffer | Callable[[], Buffer]

    @property
    def nbytes(self) -> int:
        return _elements(self.shape) * DTYPE_SIZES[self.dtype]

    def load(self) -> memoryview:
        data = self.data() if callable(self.data) else self.data
        view = memoryview(data).cast("B")
        if view.nbytes != self.nbytes:
            raise ValueError(
                f"tensor {self.name!r}: {self.dtype}{list(self.shape)} is {self.nbytes} bytes, "
                f"its data is {view.nbytes}"
            )
        return view


@dataclass
class TensorIndex:
    tensors: dict[str, TensorEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    size: int = 0  # bytes of the whole segment

    def to_json(self) -> bytes:
        doc = {
            "version": VERSION,
            "size": self.size,
            "meta": self.meta,
            "tensors": {name: e.to_json() for name, e in self.tensors.items()},
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> TensorIndex:
        try:
            doc = json.loads(raw)
            if doc.get("version") != VERSION:
                raise StoreCorrupt(f"tensor index version {doc.get('version')} is not {VERSION}")
            tensors = {
                name: TensorEntry(
                    name, e["dtype"], tuple(e["shape"]), tuple(e["stride"]), int(e["offset"]), int(e["nbytes"])
                )
                for name, e in doc["tensors"].items()
            }
            return cls(tensors, dict(doc["meta"]), int(doc["size"]))
        except (ValueError, KeyError, TypeError) as e:
            raise StoreCorrupt(f"tensor index does not parse: {type(e).__name__}: {e}") from e

    @classmethod
    def read(cls, fd: int, base: int = 0) -> TensorIndex:
        """Parse and check the header and index of the store at `base` in `fd` (pread only)."""
        head = os.pread(fd, _HEADER.size, base)
        if len(head) != _HEADER.size:
            raise StoreCorrupt("tensor store is shorter than its header")
        magic, version, offset, length, digest = _HEADER.unpack(head)
        if magic != MAGIC:
            raise StoreCorrupt(f"not a tensor store (magic {magic!r})")
        if version != VERSION:
            raise StoreCorrupt(f"tensor store format {version} is not {VERSION}")
        raw = os.pread(fd, length, base + offset)
        if len(raw) != length or hashlib.sha256(raw).digest() != digest:
            raise StoreCorrupt("tensor store index does not match the SHA-256 in its header")
        index = cls.from_json(raw)
        index.check()
        return index

    def check(self) -> None:
        """Every entry lies inside the data area, within its own bytes, with a known dtype."""
        for e in self.tensors.values():
            if e.dtype not in DTYPE_SIZES:
                raise StoreCorrupt(f"tensor {e.name!r} has unknown dtype {e.dtype!r}")
            if e.offset < HEADER_SIZE or e.offset + e.nbytes > self.size:
                raise StoreCorrupt(f"tensor {e.name!r} lies outside the store (offset {e.offset}, {e.nbytes} bytes)")
            if e.shape and _elements(e.shape) and _extent(e) > e.nbytes:
                raise StoreCorrupt(f"tensor {e.name!r}: shape {list(e.shape)} stride {list(e.stride)} reads past it")

    @property
    def data_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def _elements(shape: Sequence[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _extent(e: TensorEntry) -> int:
    last = sum((dim - 1) * st for dim, st in zip(e.shape, e.stride, strict=True))
    return (last + 1) * DTYPE_SIZES[e.dtype]


def layout(sources: Iterable[TensorSource], align: int = DEFAULT_ALIGN) -> dict[str, TensorEntry]:
    """Offsets for `sources` in order, each aligned; names must be unique."""
    if align <= 0 or align & (align - 1):
        raise ValueError(f"alignment {align} is not a power of two")
    entries: dict[str, TensorEntry] = {}
    pos = HEADER_SIZE
    for src in sources:
        if src.name in entries:
            raise ValueError(f"tensor {src.name!r} appears twice")
        if src.dtype not in DTYPE_SIZES:
            raise ValueError(f"tensor {src.name!r}: unknown dtype {src.dtype!r} (known: {', '.join(DTYPE_SIZES)})")
        if any(d < 0 for d in src.shape):
            raise ValueError(f"tensor {src.name!r}: negative dimension in {list(src.shape)}")
        pos = round_up(pos, align)
        entries[src.name] = TensorEntry(
            src.name, src.dtype, tuple(src.shape), contiguous_strides(src.shape), pos, src.nbytes
        )
        pos += src.nbytes
    return entries


def write_store(
    pool: Pool,
    name: str,
    sources: Sequence[TensorSource],
    meta: dict[str, Any] | None = None,
    align: int = DEFAULT_ALIGN,
    progress: Callable[[int], None] | None = None,
) -> TensorIndex:
    """Write `sources` into a new segment `name` and publish it; `progress(nbytes)` after each tensor.
    On any error (bad data, a full pool) nothing is published and the partial segment is freed."""
    entries = layout(sources, align)
    data_end = max((e.offset + e.nbytes for e in entries.values()), default=HEADER_SIZE)
    index = TensorIndex(entries, dict(meta or {}))
    index_offset = round_up(data_end, SMALL_PAGE)
    # The index's size depends on the segment size it records: fix the size first, then check.
    raw_guess = index.to_json()
    index.size = round_up(index_offset + len(raw_guess) + 64, SMALL_PAGE)
    raw = index.to_json()
    if index_offset + len(raw) > index.size:
        raise PoolError(f"tensor store {name!r}: index grew past its reserved space")  # pragma: no cover
    with pool.create_segment(name, index.size, kind="tensors", huge=True) as writer:
        for src in sources:
            view = src.load()
            writer.write(entries[src.name].offset, view)
            if progress:
                progress(view.nbytes)
        writer.write(index_offset, raw)
        header = _HEADER.pack(MAGIC, VERSION, index_offset, len(raw), hashlib.sha256(raw).digest())
        writer.write(0, header)
        writer.publish(meta={"tensors": len(entries), "data_bytes": index.data_bytes, **(meta or {})})
    return index


class TensorStore:
    """An open store: its segment (fd, base) and parsed index. Map it with `Segment.map`, or pass
    `fd` to another process that maps it itself."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        try:
            self.index = TensorIndex.read(segment.fd, segment.base)
        except BaseException:
            segment.close()
            raise
        if self.index.size != segment.size:
            segment.close()
            raise StoreCorrupt(
                f"tensor store {segment.name!r}: index says {self.index.size} bytes, segment has {segment.size}"
            )

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def fd(self) -> int:
        return self.segment.fd

    @property
    def base(self) -> int:
        return self.segment.base

    def close(self) -> None:
        self.segment.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(pool: Pool, name: str, verify: bool = True) -> TensorStore:
    """Open the published store `name` (per-chunk checksums checked unless `verify=False`)."""
    return TensorStore(pool.open_segment(name, verify=verify))

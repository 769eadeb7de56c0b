"""The manifest: everything a restore needs besides the pages, grouped by resource.

    memory       the VMAs and where their pages lie in the image, the kernel's special
                 mappings, mm fields, auxv, personality          (snapshot/memory.py)
    threads      the main thread's own state and every other thread's (snapshot/threads.py)
    signals      the handlers and what is queued to the process  (snapshot/signals.py)
    files        the files the image maps or keeps open, by identity (snapshot/files.py)
    fds          the fd table: paths to reopen, pipes to make anew (snapshot/files.py)
    credentials  uid, gid, groups, dumpability               (snapshot/credentials.py)
    cold         a compressed template's cold image           (snapshot/compress.py)

Each resource module holds its record with its capture side and its restore side; this module
only groups them and (de)serialises the whole as JSON with a format version. How the manifest
and the pages lie in the pool segment is snapshot/image.py's. A manifest of another version is
refused (templates are captured again, not migrated).
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from native.pager import MAX_COLD_CHUNK
from snapshot.credentials import Credentials
from snapshot.errors import TemplateCorrupt, TemplateTooOld
from snapshot.files import Fds, Files
from snapshot.memory import MemoryMap
from snapshot.signals import Signals
from snapshot.threads import Threads
from snapshot.vocabulary import ColdCodec

VERSION = 3  # 2: grouped by resource; threads, pending signals, pipes. 3: layers, zero pages left out
HEADER_SIZE = 4096  # the image's header page (snapshot/image.py): compressed chunks lie after it


COLD_CHUNK = struct.Struct("<QQII")  # seg_off, comp_off, length, comp_length
COLD_CODECS = tuple(ColdCodec)
PAGE = 4096


@dataclass(frozen=True)
class ColdSection:
    """A compressed template's cold pages (snapshot/compress.py): absent from the page area (holes),
    kept as independently compressed chunks further on in the segment. Each chunk inflates to
    `length` bytes, the pages at `seg_off` in the template's layout; chunks never span two runs."""

    codec: str  # lz4, zstd, deflate or iaa (IAA's raw deflate: the pager inflates it in software)
    level: int
    chunk_size: int
    chunks: tuple[tuple[int, int, int, int], ...]  # (seg_off, comp_off, length, comp_length), sorted
    dictionary: tuple[int, int] = (0, 0)  # zstd dictionary: (offset, length) in the segment
    source: str = ""  # the template it was compressed from
    hot_pages: int = 0
    cold_pages: int = 0
    compressed_bytes: int = 0

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        packed = b"".join(COLD_CHUNK.pack(*c) for c in self.chunks)
        doc["chunks"] = base64.b64encode(packed).decode()
        return doc

    def check(self, image_end: int) -> None:
        """Refuse a chunk table the pager could not follow: chunks out of order, overlapping, not
        whole pages, larger than the pager's bounce buffer, or bytes outside [header, image_end)."""
        if self.codec not in COLD_CODECS:
            raise TemplateCorrupt(f"cold image codec {self.codec!r} is not one of {', '.join(COLD_CODECS)}")
        end = 0
        for seg_off, comp_off, length, comp_length in self.chunks:
            where = f"cold chunk at {seg_off:#x}+{length:#x}"
            if seg_off < end or seg_off % PAGE or not 0 < length <= MAX_COLD_CHUNK or length % PAGE:
                raise TemplateCorrupt(f"{where} overlaps, is out of order or is not whole pages")
            if comp_off < HEADER_SIZE or comp_off + comp_length > image_end:
                raise TemplateCorrupt(f"{where}: its compressed bytes lie outside the cold image")
            end = seg_off + length
        offset, length = self.dictionary
        if length and (offset < HEADER_SIZE or offset + length > image_end):
            raise TemplateCorrupt("the zstd dictionary lies outside the cold image")

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> ColdSection:
        packed = base64.b64decode(d["chunks"])
        if len(packed) % COLD_CHUNK.size:
            raise TemplateCorrupt(f"cold chunk table is {len(packed)} bytes, not a multiple of {COLD_CHUNK.size}")
        chunks = tuple(COLD_CHUNK.iter_unpack(packed))
        return cls(**{**d, "chunks": chunks, "dictionary": tuple(d["dictionary"])})


@dataclass(frozen=True)
class Manifest:
    memory: MemoryMap
    threads: Threads
    signals: Signals
    files: Files
    fds: Fds
    credentials: Credentials
    source_pid: int
    cold: ColdSection | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def comm(self) -> str:
        return self.threads.main.name

    @property
    def data_bytes(self) -> int:
        return self.memory.data_bytes

    # -- serialisation -------------------------------------------------------------------------
    def to_json(self) -> bytes:
        doc = {
            "memory": self.memory.to_doc(),
            "threads": self.threads.to_doc(),
            "signals": self.signals.to_doc(),
            "files": self.files.to_doc(),
            "fds": self.fds.to_doc(),
            "credentials": self.credentials.to_doc(),
            "source_pid": self.source_pid,
            "cold": self.cold.to_doc() if self.cold else None,
            "extra": self.extra,
        }
        return json.dumps({"version": VERSION, "manifest": doc}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            outer = json.loads(raw)
            version = outer.get("version")
            if isinstance(version, int) and 0 < version < VERSION:
                raise TemplateTooOld(f"manifest version {version}: captured by an older thaw: capture it again")
            if version != VERSION:
                raise TemplateCorrupt(f"manifest version {version!r} is not {VERSION}")
            d = outer["manifest"]
            return cls(
                memory=MemoryMap.from_doc(d["memory"]),
                threads=Threads.from_doc(d["threads"]),
                signals=Signals.from_doc(d["signals"]),
                files=Files.from_doc(d["files"]),
                fds=Fds.from_doc(d["fds"]),
                credentials=Credentials.from_doc(d["credentials"]),
                source_pid=int(d["source_pid"]),
                cold=ColdSection.from_doc(d["cold"]) if d.get("cold") else None,
                extra=dict(d.get("extra") or {}),
            )
        except TemplateCorrupt:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise TemplateCorrupt(f"manifest does not parse: {type(e).__name__}: {e}") from e

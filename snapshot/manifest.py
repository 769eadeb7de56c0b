"""The template format: one pool segment holding a header page, the dumped pages, and a manifest.

    offset 0       header: magic, format version, manifest offset and length, its SHA-256
    offset 4096    dumped pages, one run after another at page-aligned offsets
    (compressed)   the cold image: compressed chunks of the cold pages, which are holes above
    offset M       manifest: JSON (everything a restore needs besides the pages)

The pool checksums the whole segment per chunk when it is published and when it is opened; the
header's SHA-256 covers the manifest once more, so a manifest is never trusted before it has been
checked. A reader refuses any other magic or version (templates are rebuilt, not migrated).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from native.pager import MAX_COLD_CHUNK
from snapshot.errors import TemplateCorrupt, TemplateTooOld
from snapshot.threads import ThreadRecord
from snapshot.vocabulary import ColdCodec

MAGIC = b"THAWTPL\0"
VERSION = 2  # 2: threads, pending signals, pipes
HEADER = struct.Struct("<8sIIQQ32s")
HEADER_SIZE = 4096


@dataclass(frozen=True)
class FileIdentity:
    """A file a template maps from its original (text, rodata) or keeps open."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int

    def describe_change(self, st_dev: int, st_ino: int, st_size: int, st_mtime_ns: int) -> str | None:
        if (st_dev, st_ino) != (self.dev, self.ino):
            return f"{self.path} is another file now (device/inode {st_dev}/{st_ino}, captured {self.dev}/{self.ino})"
        if (st_size, st_mtime_ns) != (self.size, self.mtime_ns):
            return f"{self.path} was modified since the capture (size {st_size}, captured {self.size})"
        return None


@dataclass(frozen=True)
class Run:
    """Pages [start, start+length) of a VMA, stored at `offset` in the segment."""

    start: int
    length: int
    offset: int


@dataclass(frozen=True)
class VmaRecord:
    start: int
    end: int
    prot: int
    # "anon": private memory, dumped sparsely (runs); "dump": a private file VMA dumped whole;
    # "file": mapped private from `file` again; "shared": read-only MAP_SHARED of `file`.
    kind: str
    runs: tuple[Run, ...] = ()
    file: int = -1  # index into Manifest.files
    file_offset: int = 0
    stack: bool = False
    name: str = ""  # what /proc/PID/maps called it, for messages

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FdRecord:
    fd: int
    path: str
    flags: int
    pos: int


@dataclass(frozen=True)
class PipeRecord:
    """A pipe the process holds both ends of: made anew (empty) at restore, each end at its fds."""

    read: tuple[tuple[int, int], ...]  # (fd, flags) of every fd of the read end
    write: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Credentials:
    uid: tuple[int, int, int]  # real, effective, saved
    gid: tuple[int, int, int]
    groups: tuple[int, ...]


@dataclass(frozen=True)
class MmFields:
    """What PR_SET_MM_MAP takes (the kernel's struct prctl_mm_map, auxv aside)."""

    start_code: int
    end_code: int
    start_data: int
    end_data: int
    start_brk: int
    brk: int
    start_stack: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int


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
    comm: str
    exe: int  # index into files
    registers: dict[str, int]
    xstate: bytes
    sigactions: dict[int, bytes]  # signal -> the kernel's struct sigaction (32 bytes)
    sigmask: int
    altstack: tuple[int, int, int]  # ss_sp, ss_flags, ss_size
    tid_address: int
    robust_list: tuple[int, int]  # head, length
    rseq: tuple[int, int, int]  # pointer, length, signature (pointer 0: none)
    personality: int
    dumpable: int
    syscall_insn: int  # address of a `syscall` instruction in the restored image
    mm: MmFields
    auxv: bytes
    specials: dict[str, tuple[int, int]]  # [vdso], [vvar], [vvar_vclock] -> (start, end)
    vmas: tuple[VmaRecord, ...]
    files: tuple[FileIdentity, ...]
    fds: tuple[FdRecord, ...]
    credentials: Credentials
    source_pid: int
    data_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    cold: ColdSection | None = None
    threads: tuple[ThreadRecord, ...] = ()  # every thread but the main one
    pipes: tuple[PipeRecord, ...] = ()
    pending: tuple[bytes, ...] = ()  # siginfo of the signals queued to the main thread
    shared_pending: tuple[bytes, ...] = ()  # and to the process

    # -- serialisation -------------------------------------------------------------------------
    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["xstate"] = base64.b64encode(self.xstate).decode()
        doc["auxv"] = base64.b64encode(self.auxv).decode()
        doc["sigactions"] = {str(k): base64.b64encode(v).decode() for k, v in self.sigactions.items()}
        doc["cold"] = self.cold.to_doc() if self.cold else None
        doc["threads"] = [t.to_doc() for t in self.threads]
        doc["pending"] = [base64.b64encode(p).decode() for p in self.pending]
        doc["shared_pending"] = [base64.b64encode(p).decode() for p in self.shared_pending]
        return json.dumps({"version": VERSION, "manifest": doc}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            outer = json.loads(raw)
            _check_version(outer.get("version"), "manifest")
            d = outer["manifest"]
            return cls(
                comm=d["comm"],
                exe=d["exe"],
                registers={k: int(v) for k, v in d["registers"].items()},
                xstate=base64.b64decode(d["xstate"]),
                sigactions={int(k): base64.b64decode(v) for k, v in d["sigactions"].items()},
                sigmask=d["sigmask"],
                altstack=tuple(d["altstack"]),
                tid_address=d["tid_address"],
                robust_list=tuple(d["robust_list"]),
                rseq=tuple(d["rseq"]),
                personality=d["personality"],
                dumpable=d["dumpable"],
                syscall_insn=d["syscall_insn"],
                mm=MmFields(**d["mm"]),
                auxv=base64.b64decode(d["auxv"]),
                specials={k: (v[0], v[1]) for k, v in d["specials"].items()},
                vmas=tuple(VmaRecord(**{**v, "runs": tuple(Run(**r) for r in v["runs"])}) for v in d["vmas"]),
                files=tuple(FileIdentity(**f) for f in d["files"]),
                fds=tuple(FdRecord(**f) for f in d["fds"]),
                credentials=Credentials(
                    uid=tuple(d["credentials"]["uid"]),
                    gid=tuple(d["credentials"]["gid"]),
                    groups=tuple(d["credentials"]["groups"]),
                ),
                source_pid=d["source_pid"],
                data_bytes=d["data_bytes"],
                extra=d.get("extra", {}),
                cold=ColdSection.from_doc(d["cold"]) if d.get("cold") else None,
                threads=tuple(ThreadRecord.from_doc(t) for t in d["threads"]),
                pipes=tuple(PipeRecord(read=_ends(p["read"]), write=_ends(p["write"])) for p in d["pipes"]),
                pending=tuple(base64.b64decode(p) for p in d["pending"]),
                shared_pending=tuple(base64.b64decode(p) for p in d["shared_pending"]),
            )
        except TemplateCorrupt:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise TemplateCorrupt(f"manifest does not parse: {type(e).__name__}: {e}") from e


def pack_header(manifest_offset: int, manifest: bytes) -> bytes:
    raw = HEADER.pack(MAGIC, VERSION, 0, manifest_offset, len(manifest), hashlib.sha256(manifest).digest())
    return raw + bytes(HEADER_SIZE - len(raw))


def unpack_header(raw: bytes, segment_size: int) -> tuple[int, int, bytes]:
    """(manifest offset, length, sha256) from a header page, refusing anything inconsistent."""
    if len(raw) < HEADER.size:
        raise TemplateCorrupt(f"header is {len(raw)} bytes, shorter than {HEADER.size}")
    magic, version, _flags, offset, length, digest = HEADER.unpack(raw[: HEADER.size])
    if magic != MAGIC:
        raise TemplateCorrupt(f"not a thaw template (magic {magic!r})")
    _check_version(version, "template format")
    if offset < HEADER_SIZE or offset + length > segment_size:
        raise TemplateCorrupt(f"manifest at {offset}+{length} lies outside the {segment_size}-byte segment")
    return offset, length, digest


def _ends(raw: list[list[int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(fd), int(flags)) for fd, flags in raw)


def _check_version(version: object, what: str) -> None:
    if isinstance(version, int) and 0 < version < VERSION:
        raise TemplateTooOld(
            f"{what} version {version}: captured by an older thaw (this one reads {VERSION}): capture it again"
        )
    if version != VERSION:
        raise TemplateCorrupt(f"{what} version {version!r}, this thaw reads {VERSION}")


def check_manifest(raw: bytes, digest: bytes) -> Manifest:
    if hashlib.sha256(raw).digest() != digest:
        raise TemplateCorrupt("manifest does not match the SHA-256 in the template header")
    return Manifest.from_json(raw)

"""Memory: the address space of a guest, captured and rebuilt (DESIGN.md, "mm-template in user space").

Capture (`read_memory`, `copy_pages`) decides per VMA what the template holds and where; restore
(`MemoryRestore`) writes the restorer's ops that map it all back. Both sides of the resource:

- anonymous memory is dumped sparsely (pages never touched are not stored), and so are the
  stack's live pages only (below the red zone of its stack pointer nothing lives, however deep
  the stack once went);
- a private file VMA that was written (RELRO, data) is dumped whole: its never-present pages read
  the file, not zeros;
- an untouched private file VMA (text, rodata) is recorded by file identity (snapshot/files.py)
  and mapped from the file again; a read-only shared file VMA is mapped shared again; a writable
  shared one is refused;
- [vdso], [vvar] and [vvar_vclock] are the kernel's: the restorer moves the stub's to the
  template's addresses (glibc caches vdso pointers);
- mm fields (code, data, brk, stack, args, env, auxv, exe) go back in one PR_SET_MM_MAP, and the
  personality (the exec domain: ADDR_NO_RANDOMIZE and friends) with them.

At restore the pages come back as the mode says: cow maps them MAP_PRIVATE from the template
segment, copy reads them into anonymous memory, lazy registers them with userfaultfd for the
pager (through the shared cache segment where the pool has one); a compressed template's cold
pages are always the pager's.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from native import memory as native_memory
from native.constants import (
    PR_SET_MM_MAP,
    UFFDIO_API,
    UFFDIO_REGISTER,
    MapFlag,
    Prctl,
    Prot,
    Syscall,
    UffdFeature,
    UffdRegisterMode,
)
from native.pager import RANGE_COLD, RANGE_PLAIN, PagerRange
from native.restorer import ARG0_SAVED, SAVE, Program
from snapshot import procfs
from snapshot.errors import NotCapturable
from snapshot.inject import RED_ZONE
from snapshot.vocabulary import RestoreMode

PAGE = procfs.PAGE
MERGE_GAP_PAGES = 16  # store small holes between present runs: one mapping instead of two at restore
COPY_CHUNK = 8 << 20
UFFD_API = 0xAA
_PRCTL_MM_MAP = struct.Struct("<11QQII")


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
    file: int = -1  # index into the manifest's files
    file_offset: int = 0
    stack: bool = False
    name: str = ""  # what /proc/PID/maps called it, for messages

    @property
    def size(self) -> int:
        return self.end - self.start


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


@dataclass(frozen=True)
class MemoryMap:
    """The address space as the template holds it."""

    vmas: tuple[VmaRecord, ...]
    specials: dict[str, tuple[int, int]]  # [vdso], [vvar], [vvar_vclock] -> (start, end)
    mm: MmFields
    auxv: bytes
    personality: int
    syscall_insn: int  # address of a `syscall` instruction in the image (the tracer's, the threads')
    data_bytes: int = 0  # the page area's size
    extra: dict[str, Any] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["auxv"] = _b64(self.auxv)
        return doc

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> MemoryMap:
        return cls(
            vmas=tuple(VmaRecord(**{**v, "runs": tuple(Run(**r) for r in v["runs"])}) for v in d["vmas"]),
            specials={k: (int(v[0]), int(v[1])) for k, v in d["specials"].items()},
            mm=MmFields(**d["mm"]),
            auxv=_unb64(d["auxv"]),
            personality=int(d["personality"]),
            syscall_insn=int(d["syscall_insn"]),
            data_bytes=int(d["data_bytes"]),
            extra=dict(d.get("extra", {})),
        )

    def spans(self) -> list[tuple[int, int]]:
        """Every range the restored image occupies, sorted."""
        return sorted([(v.start, v.end) for v in self.vmas] + list(self.specials.values()))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


# -- capture ------------------------------------------------------------------------------------
FileIndex = Callable[[str, str], int]  # (stat path, path as the guest saw it) -> index in the files


def read_memory(pid: int, rsp: int, brk: int, syscall_insn: int, file_index: FileIndex, page_area: int) -> MemoryMap:
    """Plan every VMA of stopped `pid` (dump where in the segment, from `page_area` on, or re-map
    from which file) and read its mm fields. `brk` comes from an injected brk(0): /proc has none."""
    vmas, specials, data_bytes = _plan_vmas(pid, rsp, file_index, page_area)
    return MemoryMap(
        vmas=tuple(vmas),
        specials=specials,
        mm=_mm_fields(pid, brk),
        auxv=Path(f"/proc/{pid}/auxv").read_bytes(),
        personality=int(Path(f"/proc/{pid}/personality").read_text(), 16),
        syscall_insn=syscall_insn,
        data_bytes=data_bytes,
    )


def copy_pages(pid: int, memory: MemoryMap, write: Callable[[int, bytes], None]) -> None:
    """Copy every dumped run of `pid` to its segment offset (process_vm_readv, 8 MiB at a time)."""
    for vma in memory.vmas:
        for run in vma.runs:
            for done in range(0, run.length, COPY_CHUNK):
                length = min(COPY_CHUNK, run.length - done)
                write(run.offset + done, native_memory.read_exact(pid, run.start + done, length))


def _mm_fields(pid: int, brk: int) -> MmFields:
    stat_text = Path(f"/proc/{pid}/stat").read_text()
    fields = stat_text[stat_text.rindex(")") + 2 :].split()

    def at(n: int) -> int:  # proc(5) numbers fields from 1; `fields` starts at field 3
        return int(fields[n - 3])

    return MmFields(
        start_code=at(26),
        end_code=at(27),
        start_data=at(45),
        end_data=at(46),
        start_brk=at(47),
        brk=brk,
        start_stack=at(28),
        arg_start=at(48),
        arg_end=at(49),
        env_start=at(50),
        env_end=at(51),
    )


def _prot(vma: procfs.Vma) -> int:
    return (
        (Prot.READ if vma.readable else 0) | (Prot.WRITE if vma.writable else 0) | (Prot.EXEC if vma.executable else 0)
    )


def _regular_file(pid: int, vma: procfs.Vma) -> bool:
    if not vma.file_backed or not vma.path.startswith("/") or vma.path.endswith(" (deleted)"):
        return False
    return stat.S_ISREG(os.stat(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}").st_mode)


def _merged_runs(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in ranges:
        if merged and start - (merged[-1][0] + merged[-1][1]) <= MERGE_GAP_PAGES * PAGE:
            merged[-1] = (merged[-1][0], start + length - merged[-1][0])
        else:
            merged.append((start, length))
    return merged


def _live_stack(ranges: list[tuple[int, int]], rsp: int) -> list[tuple[int, int]]:
    """The present stack pages from the one holding the red zone up: what lies below is dead (the
    ABI lets nothing live there), however deep the stack once went."""
    floor = (rsp - RED_ZONE) & ~(PAGE - 1)
    live = [(max(start, floor), start + length) for start, length in ranges if start + length > floor]
    return [(start, end - start) for start, end in live]


def _plan_vmas(
    pid: int, rsp: int, file_index: FileIndex, page_area: int
) -> tuple[list[VmaRecord], dict[str, tuple[int, int]], int]:
    """Decide per VMA: dump (where in the segment) or re-map (from which file)."""
    anonymous = procfs.anonymous_bytes(pid)
    vmas: list[VmaRecord] = []
    specials: dict[str, tuple[int, int]] = {}
    offset = page_area

    def file_of(vma: procfs.Vma) -> int:
        return file_index(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}", vma.path)

    for vma in procfs.read_maps(pid):
        if vma.path == "[vsyscall]":
            continue
        if vma.special:
            specials[vma.path] = (vma.start, vma.end)
            continue
        regular = _regular_file(pid, vma)
        common: dict[str, Any] = {"start": vma.start, "end": vma.end, "prot": _prot(vma), "name": vma.path}
        if vma.shared:
            if vma.writable:
                raise NotCapturable(f"pid {pid} has a writable shared mapping {vma.start:#x}-{vma.end:#x} {vma.path}")
            if not regular:
                raise NotCapturable(f"pid {pid} maps {vma.path or 'anonymous memory'} shared: only files can be")
            vmas.append(VmaRecord(**common, kind="shared", file=file_of(vma), file_offset=vma.offset))
            continue
        if regular and anonymous.get(vma.start, 0) == 0:
            vmas.append(VmaRecord(**common, kind="file", file=file_of(vma), file_offset=vma.offset))
            continue
        if regular or vma.file_backed:
            ranges = [(vma.start, vma.size)]  # never-present pages of a file VMA read the file
            kind = "dump"
        else:
            ranges = _merged_runs(procfs.present_ranges(pid, vma.start, vma.end))
            if vma.path == "[stack]":
                ranges = _live_stack(ranges, rsp)
            kind = "anon"
        runs = []
        for start, length in ranges:
            runs.append(Run(start, length, offset))
            offset += length
        vmas.append(VmaRecord(**common, kind=kind, runs=tuple(runs), stack=vma.path == "[stack]"))
    return vmas, specials, offset - page_area


# -- restore ------------------------------------------------------------------------------------
@dataclass
class PageSources:
    """Where a restore's pages come from, in the stub: the restore fds and segment bases."""

    mode: RestoreMode
    segment_fd: int
    segment_base: int
    cache_fd: int  # -1: no cache segment (cow, copy, or a pool without one)
    cache_base: int
    uffd_fd: int  # -1: no pager
    cold: list[tuple[int, int]]  # the cold spans (segment offset, length) of a compressed template

    @property
    def paged(self) -> bool:
        return self.uffd_fd >= 0

    @property
    def via_cache(self) -> bool:
        return self.cache_fd >= 0


class MemoryRestore:
    """Writes the restorer's ops that rebuild the address space, and the pager's ranges."""

    def __init__(self, p: Program, memory: MemoryMap, sources: PageSources, file_fd: Callable[[int], int]) -> None:
        self.p, self.m, self.src, self.file_fd = p, memory, sources, file_fd
        self.ranges: list[PagerRange] = []

    def userfaultfd(self) -> None:
        """The stub makes the userfaultfd the pager serves (at `uffd_fd`), before any VMA."""
        p = self.p
        api = p.put(struct.pack("<QQQ", UFFD_API, UffdFeature.EVENT_FORK | UffdFeature.EVENT_REMAP, 0))
        p.syscall(Syscall.USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK, what="userfaultfd()", flags=SAVE)
        p.syscall(Syscall.IOCTL, 0, UFFDIO_API, api, what="UFFDIO_API", flags=ARG0_SAVED)
        p.syscall(Syscall.DUP3, 0, self.src.uffd_fd, os.O_CLOEXEC, what="moving the userfaultfd", flags=ARG0_SAVED)
        p.syscall(Syscall.CLOSE, 0, what="closing the first userfaultfd", flags=ARG0_SAVED)

    def vmas(self, file_paths: list[str]) -> None:
        for vma in self.m.vmas:
            self._vma(vma, file_paths)

    def _vma(self, v: VmaRecord, file_paths: list[str]) -> None:
        p, src, where = self.p, self.src, f"{v.start:#x}-{v.end:#x} {v.name}".rstrip()
        private_fixed = MapFlag.PRIVATE | MapFlag.FIXED
        anon = private_fixed | MapFlag.ANONYMOUS
        if v.kind in ("file", "shared"):
            flags = (MapFlag.SHARED | MapFlag.FIXED) if v.kind == "shared" else private_fixed
            fd = self.file_fd(v.file)
            p.syscall(
                Syscall.MMAP,
                v.start,
                v.size,
                v.prot,
                flags,
                fd,
                v.file_offset,
                what=f"mmap of {file_paths[v.file]} at {where}",
            )
            return
        lazy = src.mode == RestoreMode.LAZY
        by_copy = v.stack or src.mode == RestoreMode.COPY or (lazy and not src.via_cache)
        covered = sum(r.length for r in v.runs) == v.size
        # a pager without the cache fills cold pages into anonymous memory (cow maps hot ones over it)
        if by_copy or not covered or (src.paged and not src.via_cache):
            prot = v.prot | Prot.WRITE if by_copy else v.prot
            flags = anon | (MapFlag.GROWSDOWN if v.stack else 0)
            p.syscall(Syscall.MMAP, v.start, v.size, prot, flags, -1, 0, what=f"anonymous mmap at {where}")
        for run in v.runs:
            for start, length, offset, cold in self._pieces(run.start, run.length, run.offset, v.stack):
                self._run(v, start, length, offset, cold, by_copy, where)
        if by_copy and not v.prot & Prot.WRITE:
            p.syscall(Syscall.MPROTECT, v.start, v.size, v.prot, what=f"mprotect of {where}")

    def _pieces(self, start: int, length: int, offset: int, stack: bool) -> Iterator[tuple[int, int, int, bool]]:
        """The run cut where its pages turn from hot to cold (compressed) and back."""
        cold_spans = self.src.cold
        if not cold_spans or stack:  # stacks are never compressed
            yield start, length, offset, False
            return
        end = offset + length
        i = max(bisect.bisect_right(cold_spans, (offset, 1 << 63)) - 1, 0)
        at = offset
        for cold_off, cold_len in itertools.islice(cold_spans, i, None):
            lo, hi = max(cold_off, at), min(cold_off + cold_len, end)
            if cold_off >= end:
                break
            if hi <= lo:
                continue
            if lo > at:
                yield start + (at - offset), lo - at, at, False
            yield start + (lo - offset), hi - lo, lo, True
            at = hi
        if at < end:
            yield start + (at - offset), end - at, at, False

    def _run(self, v: VmaRecord, start: int, length: int, offset: int, cold: bool, by_copy: bool, where: str) -> None:
        p, src = self.p, self.src
        if cold or (src.mode == RestoreMode.LAZY and not v.stack):
            self.ranges.append(PagerRange(start, length, offset, RANGE_COLD if cold else RANGE_PLAIN))
            if src.via_cache:
                self._map_private(v, start, length, src.cache_fd, src.cache_base + offset, "the cache segment", where)
            reg = p.put(struct.pack("<QQQQ", start, length, UffdRegisterMode.MISSING, 0))
            p.syscall(Syscall.IOCTL, src.uffd_fd, UFFDIO_REGISTER, reg, what=f"UFFDIO_REGISTER of {where}")
        elif by_copy:
            p.pread(src.segment_fd, start, length, src.segment_base + offset, what=f"reading pages of {where}")
        else:
            self._map_private(
                v, start, length, src.segment_fd, src.segment_base + offset, "the template segment", where
            )

    def _map_private(
        self, v: VmaRecord, start: int, length: int, fd: int, offset: int, source: str, where: str
    ) -> None:
        flags = MapFlag.PRIVATE | MapFlag.FIXED
        self.p.syscall(Syscall.MMAP, start, length, v.prot, flags, fd, offset, what=f"mmap of {source} at {where}")

    def mm(self, exe_fd: int) -> None:
        """PR_SET_MM_MAP (code, data, brk, stack, args, env, auxv, exe) and the personality."""
        p, m = self.p, self.m
        mm = m.mm
        fields = (mm.start_code, mm.end_code, mm.start_data, mm.end_data, mm.start_brk, mm.brk, mm.start_stack)
        fields_args = (mm.arg_start, mm.arg_end, mm.env_start, mm.env_end)
        raw = _PRCTL_MM_MAP.pack(*fields, *fields_args, p.put(m.auxv), len(m.auxv), exe_fd)
        p.syscall(Syscall.PRCTL, Prctl.SET_MM, PR_SET_MM_MAP, p.put(raw), len(raw), 0, what="PR_SET_MM_MAP")
        p.syscall(Syscall.PERSONALITY, m.personality, what="personality")

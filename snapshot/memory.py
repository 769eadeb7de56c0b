"""Memory: the address space of a guest, captured and rebuilt (DESIGN.md, "mm-template in user space").

Capture (`read_memory`, `copy_pages`) decides per VMA what the template holds and where; restore
(`MemoryRestore`) writes the restorer's ops that map it all back. Both sides of the resource:

- anonymous memory is dumped sparsely (pages never touched are not stored), and so are the
  stack's live pages only (below the red zone of its stack pointer nothing lives, however deep
  the stack once went);
- a private file VMA that was written (RELRO, data) is dumped whole: its never-present pages read
  the file, not zeros;
- where each stored page lies is snapshot/pages.py's: a VMA that maps an ancestor's segment (a
  guest thawed from a template, captured as its child) refers to the ancestor's pages it has not
  written, a page equal to one stored before refers to it, an all-zero page is a hole, and a
  *dense* capture keeps each writable anonymous VMA as one run;
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
import dataclasses
import itertools
import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
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
from snapshot.pages import ANCESTOR, ZERO_PAGE, Ancestor, Page, PagePlanner, VmaPages
from snapshot.vocabulary import RestoreMode

PAGE = procfs.PAGE
DENSE_MAX = 256 << 20  # larger VMAs stay sparse: a reservation with a few pages in it
MERGE_GAP_PAGES = 16  # store small holes between present runs: one mapping instead of two at restore
COPY_CHUNK = 8 << 20
UFFD_API = 0xAA
_PRCTL_MM_MAP = struct.Struct("<11QQII")


@dataclass(frozen=True)
class Run:
    """Pages [start, start+length) of a VMA, stored at `offset` in the segment of `layer`: 0 is
    the template's own, k >= 1 the k-th of `MemoryMap.layers` (an ancestor's: snapshot/pages.py)."""

    start: int
    length: int
    offset: int
    layer: int = 0


@dataclass(frozen=True)
class Layer:
    """An ancestor template some pages are in: its name, and the SHA-256 of its manifest
    (snapshot/image.py's header), which names exactly the image this one was captured against."""

    name: str
    image: str


@dataclass(frozen=True)
class VmaRecord:
    start: int
    end: int
    prot: int
    # "anon": private memory, dumped sparsely (runs); "dump": a private file VMA dumped whole;
    # "file": mapped private from `file` again; "shared": read-only MAP_SHARED of `file`.
    kind: str
    # in order, a later run laid over an earlier: a layered VMA's first run is its *base*, the
    # whole VMA from an ancestor's segment, with the pages the guest wrote over it
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
    layers: tuple[Layer, ...] = ()  # the ancestors, parent first (Run.layer 1, 2, ...)
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
            layers=tuple(Layer(**layer) for layer in d["layers"]),
            extra=dict(d.get("extra", {})),
        )

    def own_runs(self, with_stacks: bool = True) -> Iterator[tuple[VmaRecord, Run]]:
        """The runs stored in this template's page area, each offset once (a duplicate's run
        points back at pages another run stored)."""
        end = 0
        for vma in self.vmas:
            for run in vma.runs:
                if run.layer == 0 and run.offset >= end:
                    end = run.offset + run.length
                    if with_stacks or not vma.stack:
                        yield vma, run

    def spans(self) -> list[tuple[int, int]]:
        """Every range the restored image occupies, sorted."""
        return sorted([(v.start, v.end) for v in self.vmas] + list(self.specials.values()))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


# -- capture ------------------------------------------------------------------------------------
FileIndex = Callable[[str, str], int]  # (stat path, path as the guest saw it) -> index in the files


def read_memory(
    pid: int,
    rsp: int,
    brk: int,
    syscall_insn: int,
    file_index: FileIndex,
    page_area: int,
    ancestors: Sequence[Ancestor] = (),
    layers: tuple[Layer, ...] = (),
    dense: bool = False,
) -> MemoryMap:
    """Plan every VMA of stopped `pid` (dump where in the segment, from `page_area` on, refer to
    an ancestor's pages, or re-map from which file) and read its mm fields. `brk` comes from an
    injected brk(0): /proc has none. `ancestors` (with `layers`, their records): the templates
    the guest was thawed from, parent first. `dense`: writable anonymous VMAs as one run each,
    their untouched pages holes of a sparse segment (snapshot/pages.py)."""
    vmas, specials, data_bytes = _plan_vmas(pid, rsp, file_index, page_area, ancestors, dense)
    return MemoryMap(
        vmas=tuple(vmas),
        specials=specials,
        mm=_mm_fields(pid, brk),
        auxv=Path(f"/proc/{pid}/auxv").read_bytes(),
        personality=int(Path(f"/proc/{pid}/personality").read_text(), 16),
        syscall_insn=syscall_insn,
        data_bytes=data_bytes,
        layers=layers,
    )


def copy_pages(
    pid: int, memory: MemoryMap, write: Callable[[int, bytes | memoryview], None], sparse: bool = False
) -> None:
    """Copy every run `pid` stores to its segment offset (process_vm_readv, 8 MiB at a time).
    `sparse`: the segment is a new sparse file, whose holes read zeros: zero pages are not written."""
    for _, run in memory.own_runs():
        for done in range(0, run.length, COPY_CHUNK):
            length = min(COPY_CHUNK, run.length - done)
            data = native_memory.read_exact(pid, run.start + done, length)
            for at, piece in _nonzero_pieces(data) if sparse else [(0, memoryview(data))]:
                write(run.offset + done + at, piece)


def _nonzero_pieces(data: bytes) -> Iterator[tuple[int, memoryview]]:
    """(offset, bytes) of each stretch of pages of `data` that are not all zeros."""
    view = memoryview(data)
    start = None
    for at in range(0, len(data), PAGE):
        zero = view[at : at + PAGE] == ZERO_PAGE
        if zero and start is not None:
            yield start, view[start:at]
            start = None
        elif not zero and start is None:
            start = at
    if start is not None:
        yield start, view[start:]


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
    pid: int, rsp: int, file_index: FileIndex, page_area: int, ancestors: Sequence[Ancestor], dense_pool: bool
) -> tuple[list[VmaRecord], dict[str, tuple[int, int]], int]:
    """Decide per VMA: dump (which pages, and where each lies: snapshot/pages.py) or re-map (from
    which file)."""
    anonymous = procfs.anonymous_bytes(pid)
    planner = PagePlanner(pid, ancestors)
    records: list[VmaRecord] = []
    dumped: list[tuple[int, VmaPages]] = []  # (index in records, its pages)
    specials: dict[str, tuple[int, int]] = {}

    def file_of(vma: procfs.Vma) -> int:
        return file_index(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}", vma.path)

    for vma in procfs.read_maps(pid):
        if vma.path == "[vsyscall]":
            continue
        if vma.special:
            specials[vma.path] = (vma.start, vma.end)
            continue
        common: dict[str, Any] = {"start": vma.start, "end": vma.end, "prot": _prot(vma), "name": vma.path}
        ancestor = _ancestor_of(pid, vma, ancestors) if not vma.shared else None
        regular = ancestor is None and _regular_file(pid, vma)
        if vma.shared:
            if vma.writable:
                raise NotCapturable(f"pid {pid} has a writable shared mapping {vma.start:#x}-{vma.end:#x} {vma.path}")
            if not regular:
                raise NotCapturable(f"pid {pid} maps {vma.path or 'anonymous memory'} shared: only files can be")
            records.append(VmaRecord(**common, kind="shared", file=file_of(vma), file_offset=vma.offset))
            continue
        if regular and anonymous.get(vma.start, 0) == 0:
            records.append(VmaRecord(**common, kind="file", file=file_of(vma), file_offset=vma.offset))
            continue
        stack = vma.path == "[stack]"
        base, dense = None, False
        if ancestor is not None:
            pages, kind = _ancestor_pages(pid, vma, ancestor, planner), "anon"
            base = (ancestor.layer, vma.offset - ancestor.base)
            common["name"] = f"pages of {ancestor.name}"
        elif regular or vma.file_backed:  # never-present pages of a file VMA read the file
            pages, kind = [planner.own(a) for a in range(vma.start, vma.end, PAGE)], "dump"
        else:
            present = procfs.present_ranges(pid, vma.start, vma.end)
            dense = dense_pool and bool(present) and not stack and vma.writable and vma.size <= DENSE_MAX
            if dense:
                pages = _dense_pages(vma, present, planner)
            else:
                ranges = _live_stack(_merged_runs(present), rsp) if stack else _merged_runs(present)
                pages = [planner.own(a) for start, length in ranges for a in range(start, start + length, PAGE)]
            kind = "anon"
        dumped.append((len(records), VmaPages(vma.start, vma.end, stack, pages, base, dense)))
        records.append(VmaRecord(**common, kind=kind, stack=stack))
    planner.decide([pages for _, pages in dumped])
    placed, data_bytes = planner.place([pages for _, pages in dumped], page_area)
    for (index, _), runs in zip(dumped, placed, strict=True):
        records[index] = dataclasses.replace(
            records[index], runs=tuple(Run(r.start, r.length, r.offset, r.layer) for r in runs)
        )
    return records, specials, data_bytes


def _dense_pages(vma: procfs.Vma, present: list[tuple[int, int]], planner: PagePlanner) -> list[Page]:
    touched = {a for start, length in present for a in range(start, start + length, PAGE)}
    return [planner.own(a, untouched=a not in touched) for a in range(vma.start, vma.end, PAGE)]


def _ancestor_of(pid: int, vma: procfs.Vma, ancestors: Sequence[Ancestor]) -> Ancestor | None:
    """The ancestor whose segment `vma` maps (privately: how a cow instance maps its template)."""
    if not ancestors or not vma.file_backed or not vma.path.startswith("/"):
        return None
    try:
        st = os.stat(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}")
    except OSError:
        return None
    return next((a for a in ancestors if a.holds(st.st_dev, st.st_ino, vma.offset, vma.size)), None)


def _ancestor_pages(pid: int, vma: procfs.Vma, ancestor: Ancestor, planner: PagePlanner) -> list[Page]:
    """The pages of a VMA mapping an ancestor's segment: what the guest wrote is its own, the
    rest is still the ancestor's page at its offset."""
    first = vma.offset - ancestor.base
    pages = []
    for i, copied in enumerate(procfs.private_copies(pid, vma.start, vma.end)):
        address = vma.start + i * PAGE
        if copied:
            pages.append(planner.own(address))
        else:
            pages.append(Page(address, ANCESTOR, (ancestor.layer, first + i * PAGE)))
    return pages


def _between(base: Run, later: Sequence[Run]) -> Iterator[tuple[int, int, int]]:
    """(address, length, offset) of the pieces of `base` that no run in `later` covers."""
    at = base.start
    inside = [r for r in later if r.start < base.start + base.length and r.start + r.length > base.start]
    for run in sorted(inside, key=lambda r: r.start):
        if run.start > at:
            yield at, run.start - at, base.offset + at - base.start
        at = max(at, run.start + run.length)
    if at < base.start + base.length:
        yield at, base.start + base.length - at, base.offset + at - base.start


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
    layers: list[tuple[int, int]] = field(default_factory=list)  # (fd, base) of each ancestor's segment

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
        # runs are laid in order, later over earlier: a layered VMA's base run covers it whole
        covered = sum(r.length for r in v.runs) == v.size or any(r.length == v.size for r in v.runs)
        # a pager without the cache fills cold pages into anonymous memory (cow maps hot ones over it)
        if by_copy or not covered or (src.paged and not src.via_cache):
            prot = v.prot | Prot.WRITE if by_copy else v.prot
            flags = anon | (MapFlag.GROWSDOWN if v.stack else 0)
            p.syscall(Syscall.MMAP, v.start, v.size, prot, flags, -1, 0, what=f"anonymous mmap at {where}")
        # Later runs go over a base by mmap; bytes read (copy) or filled by a pager into anonymous
        # memory would be hidden by, or land under, it: there the base is laid only between them.
        overlay = not by_copy and not (src.paged and not src.via_cache)
        for i, run in enumerate(v.runs):
            if run.layer:
                for start, length, offset in (
                    [(run.start, run.length, run.offset)] if overlay else _between(run, v.runs[i + 1 :])
                ):
                    self._ancestor_run(v, Run(start, length, offset, run.layer), by_copy, where)
                continue
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

    def _ancestor_run(self, v: VmaRecord, run: Run, by_copy: bool, where: str) -> None:
        """An ancestor's pages: mapped from its segment (the page cache every instance of every
        template layered on it shares) in every mode but copy, which reads them."""
        fd, base = self.src.layers[run.layer - 1]
        name = self.m.layers[run.layer - 1].name
        if by_copy:
            self.p.pread(fd, run.start, run.length, base + run.offset, what=f"reading pages of {name} at {where}")
        else:
            self._map_private(v, run.start, run.length, fd, base + run.offset, f"the segment of {name}", where)

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

"""Restore: a stopped stub + a template -> a running instance (DESIGN.md, "Restore").

    stub = launch_stub(template.restore_fds("cow"))       # or sandbox.spawn_stub(fds)
    instance = restore(template, stub, "cow")

The stub already holds the fds the restore needs at 1000, 1001, ... (`Template.restore_fds`). The
tracer seizes it, maps a scratch area with one injected mmap, copies in the restorer blob with a
*syscall program* (native/restorer.py), and lets the stub run it: unregister the stub's rseq,
unmap the stub, move [vvar]/[vvar_vclock]/[vdso] to the template's addresses, map every VMA
(MAP_PRIVATE from the template segment for cow, filled by pread for copy, from the cache segment
under userfaultfd for lazy), PR_SET_MM_MAP, sigactions, the alternate stack, path fds, tid
address, robust list, rseq, name, and last the credentials (uid/gid from the template, no
capabilities, no_new_privs). The blob stops with int3; the tracer unmaps the scratch area with a
syscall instruction of the restored image, sets the signal mask, registers and xstate, and
detaches. The number of ptrace round trips does not depend on the number of VMAs.

The per-template part of the program (everything after the stub-specific prologue) is built once
and cached: the scratch area sits at an address chosen from the template's layout, free in every
stub unless the stub happens to use it (then the program is rebuilt for another address).

All calls for one stub must come from one thread (see `Tracer`). A failed restore kills the stub.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from native import memory, pidfd, ptrace
from native.constants import (
    PR_SET_MM_MAP,
    UFFDIO_API,
    UFFDIO_REGISTER,
    MapFlag,
    MremapFlag,
    Prctl,
    Prot,
    Syscall,
    UffdFeature,
    UffdRegisterMode,
)
from native.pager import RANGE_COLD, RANGE_PLAIN, Pager, PagerRange, PagerStats
from native.ptrace import Registers
from native.restorer import (
    ALLOW_ERROR,
    ARG0_SAVED,
    ARGS,
    OP,
    SAVE,
    STORE32,
    STUB_SCRATCH,
    STUB_SCRATCH_SIZE,
    Program,
)
from shmpool import SegmentExists
from shmpool.backends import round_up
from snapshot import procfs
from snapshot.errors import FileChanged, RestoreError
from snapshot.inject import InjectionError, SyscallInjector, restart_fixup, seize_stopped
from snapshot.manifest import Manifest, VmaRecord
from snapshot.template import FIRST_RESTORE_FD, MODES, Template

PAGE = procfs.PAGE
STACK_SIZE = 64 << 10
TASK_TOP = (1 << 47) - PAGE
SCRATCH_HINTS = (STUB_SCRATCH, 0x1000_0000_0000, 0x3000_0000_0000, 0x0800_0000_0000)
UFFD_API = 0xAA
SS_DISABLE = 2
SS_ONSTACK = 1
RSEQ_FLAG_UNREGISTER = 1
CAPABILITY_VERSION_3 = 0x20080522
PROLOGUE_ROOM = 256  # ops: the stub-specific prologue (rseq, unmaps, special mappings) is far shorter
_PRCTL_MM_MAP = struct.Struct("<11QQII")


@dataclass
class Stub:
    """A stopped process, created by someone else, holding the restore fds from `fd_base` on.

    `wait(timeout)` reports the exit code (or -signal) once the process is gone, None while it
    runs; `kill()` ends it. Both come from the creator, who is the only one that can reap it."""

    pid: int
    wait: Callable[[float | None], int | None]
    kill: Callable[[], None]
    fd_base: int = FIRST_RESTORE_FD


@dataclass
class Instance:
    pid: int
    template: Template
    mode: str
    stub: Stub
    pager: Pager | None = None
    timings: dict[str, float] = field(default_factory=dict)
    round_trips: int = 0

    def wait(self, timeout: float | None = None) -> int | None:
        return self.stub.wait(timeout)

    def kill(self) -> None:
        self.stub.kill()

    def pager_stats(self) -> PagerStats | None:
        return self.pager.stats() if self.pager else None

    def close(self) -> None:
        """Kill the instance if it still runs; stop its pager. When the template has no working
        set yet, save the one this instance shows: the pages its pager served, or for a cow
        instance without a pager, the template pages it has mapped (pagemap's present bits)."""
        mapped = self._mapped_pages() if self.pager is None and not self.template.working_set() else []
        if self.stub.wait(0) is None:
            self.stub.kill()
            self.stub.wait(None)
        if mapped:
            with contextlib.suppress(SegmentExists):  # another instance's close saved one first
                self.template.save_working_set(mapped)
        if self.pager is not None:
            self.pager.stop()
            if not self.template.working_set():
                self.template.save_working_set(self.pager.working_set())
            self.pager.close()
            self.pager = None


    def _mapped_pages(self) -> list[int]:
        """Segment page indices of the template pages a running cow instance has mapped (read,
        written, or brought in with a neighbour by fault-around): the pages its work used."""
        if self.mode != "cow" or self.stub.wait(0) is not None:
            return []
        pages: list[int] = []
        try:
            for vma in self.template.manifest.vmas:
                for run in vma.runs if not vma.stack else ():
                    for start, length in procfs.present_ranges(self.pid, run.start, run.start + run.length):
                        first = (run.offset + start - run.start) // PAGE
                        pages.extend(range(first, first + length // PAGE))
        except OSError:  # it exited meanwhile: nothing to learn from it
            return []
        return pages


# -- the per-template program -------------------------------------------------------------------
@dataclass
class _Plan:
    """The scratch area is [program image][stack][park area for moving the special mappings]."""

    scratch: int
    program: Program
    uffd_fd: int  # where the stub holds the userfaultfd (paged restores), else -1
    ranges: list[PagerRange]  # what the pager serves
    via_cache: bool  # the pager fills the shared cache segment
    size: int = 0
    stack_top: int = 0
    park: int = 0


def _intervals(manifest: Manifest) -> list[tuple[int, int]]:
    spans = [(v.start, v.end) for v in manifest.vmas] + list(manifest.specials.values())
    return sorted(spans)


def _free(spans: list[tuple[int, int]], start: int, size: int) -> bool:
    return all(end <= start or begin >= start + size for begin, end in spans)


def _scratch_address(spans: list[tuple[int, int]], size: int, avoid: int = 0) -> int:
    for hint in SCRATCH_HINTS:
        if hint != avoid and _free(spans, hint, size):
            return hint
    for (_, end), (begin, _) in itertools.pairwise(spans):  # any gap
        candidate = round_up(end + (1 << 30), 1 << 21)
        if candidate != avoid and candidate + size <= begin:
            return candidate
    raise RestoreError("no address range is free for the restorer in the template's layout")


class _Builder:
    """Writes the template-specific body of the restore program."""

    def __init__(self, template: Template, mode: str, scratch: int, fd_base: int) -> None:
        self.t, self.m, self.mode = template, template.manifest, mode
        self.p = Program(scratch)
        self.fd_base = fd_base
        self.segment_fd = fd_base
        self.base = template.segment.base
        fds = template.restore_fds(mode)
        self.nfds = len(fds)
        self.paged = template.paged(mode)
        self.via_cache = template.uses_cache(mode)
        self.cache_fd = fd_base + len(fds) - 1 if self.via_cache else -1
        self.cache_base = template.cache().base if self.via_cache else 0
        self.uffd_fd = fd_base + len(fds) if self.paged else -1
        self.cold = template.cold_spans()
        self.ranges: list[PagerRange] = []

    def file_fd(self, index: int) -> int:
        return self.fd_base + 1 + index

    def build(self) -> _Plan:
        if self.paged:
            self.userfaultfd()
        for vma in self.m.vmas:
            self.vma(vma)
        if self.paged:  # from here on the kernel and the blob touch registered pages
            self.p.pause("waiting for the pager")
        self.mm_and_signals()
        self.fds()
        self.thread_state()
        self.credentials()
        return _Plan(self.p.base, self.p, self.uffd_fd, self.ranges, self.via_cache)

    # each step ---------------------------------------------------------------------------------
    def userfaultfd(self) -> None:
        p = self.p
        api = p.put(struct.pack("<QQQ", UFFD_API, UffdFeature.EVENT_FORK | UffdFeature.EVENT_REMAP, 0))
        p.syscall(Syscall.USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK, what="userfaultfd()", flags=SAVE)
        p.syscall(Syscall.IOCTL, 0, UFFDIO_API, api, what="UFFDIO_API", flags=ARG0_SAVED)
        p.syscall(Syscall.DUP3, 0, self.uffd_fd, os.O_CLOEXEC, what="moving the userfaultfd", flags=ARG0_SAVED)
        p.syscall(Syscall.CLOSE, 0, what="closing the first userfaultfd", flags=ARG0_SAVED)

    def vma(self, v: VmaRecord) -> None:
        p, where = self.p, f"{v.start:#x}-{v.end:#x} {v.name}".rstrip()
        private_fixed = MapFlag.PRIVATE | MapFlag.FIXED
        anon = private_fixed | MapFlag.ANONYMOUS
        if v.kind in ("file", "shared"):
            flags = (MapFlag.SHARED | MapFlag.FIXED) if v.kind == "shared" else private_fixed
            p.syscall(
                Syscall.MMAP,
                v.start,
                v.size,
                v.prot,
                flags,
                self.file_fd(v.file),
                v.file_offset,
                what=f"mmap of {self.m.files[v.file].path} at {where}",
            )
            return
        by_copy = v.stack or self.mode == "copy" or (self.mode == "lazy" and not self.via_cache)
        covered = sum(r.length for r in v.runs) == v.size
        # a pager without the cache fills cold pages into anonymous memory (cow maps hot ones over it)
        if by_copy or not covered or (self.paged and not self.via_cache):
            prot = v.prot | Prot.WRITE if by_copy else v.prot
            flags = anon | (MapFlag.GROWSDOWN if v.stack else 0)
            p.syscall(Syscall.MMAP, v.start, v.size, prot, flags, -1, 0, what=f"anonymous mmap at {where}")
        for run in v.runs:
            for start, length, offset, cold in self.pieces(run.start, run.length, run.offset, v.stack):
                self.run(v, start, length, offset, cold, by_copy, where)
        if by_copy and not v.prot & Prot.WRITE:
            p.syscall(Syscall.MPROTECT, v.start, v.size, v.prot, what=f"mprotect of {where}")

    def pieces(self, start: int, length: int, offset: int, stack: bool) -> Iterator[tuple[int, int, int, bool]]:
        """The run cut where its pages turn from hot to cold (compressed) and back."""
        if not self.cold or stack:  # stacks are never compressed
            yield start, length, offset, False
            return
        end = offset + length
        i = max(bisect.bisect_right(self.cold, (offset, 1 << 63)) - 1, 0)
        at = offset
        for cold_off, cold_len in itertools.islice(self.cold, i, None):
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

    def run(self, v: VmaRecord, start: int, length: int, offset: int, cold: bool, by_copy: bool, where: str) -> None:
        p = self.p
        if cold or (self.mode == "lazy" and not v.stack):
            self.ranges.append(PagerRange(start, length, offset, RANGE_COLD if cold else RANGE_PLAIN))
            if self.via_cache:
                self.map_private(v, start, length, self.cache_fd, self.cache_base + offset, "the cache segment", where)
            reg = p.put(struct.pack("<QQQQ", start, length, UffdRegisterMode.MISSING, 0))
            p.syscall(Syscall.IOCTL, self.uffd_fd, UFFDIO_REGISTER, reg, what=f"UFFDIO_REGISTER of {where}")
        elif by_copy:
            p.pread(self.segment_fd, start, length, self.base + offset, what=f"reading pages of {where}")
        else:
            self.map_private(v, start, length, self.segment_fd, self.base + offset, "the template segment", where)

    def map_private(self, v: VmaRecord, start: int, length: int, fd: int, offset: int, source: str, where: str) -> None:
        flags = MapFlag.PRIVATE | MapFlag.FIXED
        self.p.syscall(Syscall.MMAP, start, length, v.prot, flags, fd, offset, what=f"mmap of {source} at {where}")

    def mm_and_signals(self) -> None:
        p, m = self.p, self.m
        auxv = p.put(m.auxv)
        mm = m.mm
        raw = _PRCTL_MM_MAP.pack(
            mm.start_code,
            mm.end_code,
            mm.start_data,
            mm.end_data,
            mm.start_brk,
            mm.brk,
            mm.start_stack,
            mm.arg_start,
            mm.arg_end,
            mm.env_start,
            mm.env_end,
            auxv,
            len(m.auxv),
            self.file_fd(m.exe),
        )
        p.syscall(Syscall.PRCTL, Prctl.SET_MM, PR_SET_MM_MAP, p.put(raw), len(raw), 0, what="PR_SET_MM_MAP")
        p.syscall(Syscall.PERSONALITY, m.personality, what="personality")
        for sig, act in sorted(m.sigactions.items()):
            p.syscall(
                Syscall.RT_SIGACTION,
                sig,
                p.put(act),
                0,
                8,
                what=f"rt_sigaction({signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig})",
            )
        sp, flags, size = m.altstack
        if not flags & SS_DISABLE:
            p.syscall(
                Syscall.SIGALTSTACK,
                p.put(struct.pack("<QiiQ", sp, flags & ~SS_ONSTACK, 0, size)),
                0,
                what="sigaltstack",
            )

    def fds(self) -> None:
        for rec in self.m.fds:
            self.p.open_fd(rec.path, rec.flags, rec.fd, rec.pos, what=f"reopening fd {rec.fd} ({rec.path})")
        self.p.syscall(
            Syscall.CLOSE_RANGE, self.fd_base, self.fd_base + self.nfds - 1, 0, what="closing the restore fds"
        )

    def thread_state(self) -> None:
        p, m = self.p, self.m
        if m.tid_address:  # glibc caches the tid where set_tid_address points: give it the new one
            p.syscall(
                Syscall.SET_TID_ADDRESS, m.tid_address, what="set_tid_address", flags=STORE32, store=m.tid_address
            )
        head, length = m.robust_list
        if head:
            p.syscall(Syscall.SET_ROBUST_LIST, head, length, what="set_robust_list")
        pointer, size, signature = m.rseq
        if pointer:
            p.syscall(Syscall.RSEQ, pointer, size, 0, signature, what="registering rseq")
        p.syscall(Syscall.PRCTL, Prctl.SET_NAME, p.cstr(m.comm[:15]), what="PR_SET_NAME")

    def credentials(self) -> None:
        p, c = self.p, self.m.credentials
        for cap in range(_cap_last_cap() + 1):
            p.syscall(Syscall.PRCTL, Prctl.CAPBSET_DROP, cap, what=f"dropping capability {cap}", flags=ALLOW_ERROR)
        groups = p.put(struct.pack(f"<{len(c.groups)}I", *c.groups)) if c.groups else 0
        p.syscall(Syscall.SETGROUPS, len(c.groups), groups, what="setgroups")
        p.syscall(Syscall.SETRESGID, *c.gid, what=f"setresgid{c.gid}")
        p.syscall(Syscall.SETRESUID, *c.uid, what=f"setresuid{c.uid}")
        header = p.put(struct.pack("<Ii", CAPABILITY_VERSION_3, 0))
        p.syscall(Syscall.CAPSET, header, p.put(bytes(24)), what="clearing capabilities")
        p.syscall(Syscall.PRCTL, Prctl.SET_NO_NEW_PRIVS, 1, 0, 0, 0, what="PR_SET_NO_NEW_PRIVS")
        p.syscall(Syscall.PRCTL, Prctl.SET_DUMPABLE, self.m.dumpable, what="PR_SET_DUMPABLE")


def _cap_last_cap() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


def _plan(template: Template, mode: str, fd_base: int, avoid: int = 0) -> _Plan:
    key = (mode, fd_base)
    plans = template.restore_plans
    plan: _Plan | None = plans.get(key)
    if plan is not None and plan.scratch != avoid:
        return plan
    spans = _intervals(template.manifest)
    specials = sum(end - start for start, end in template.manifest.specials.values())
    estimate = _Builder(template, mode, 0, fd_base).build()  # sizes do not depend on the address
    image, _, _ = estimate.program.finish()
    image_size = round_up(len(image) + PROLOGUE_ROOM * OP.size, PAGE)
    size = image_size + STACK_SIZE + round_up(specials, PAGE)
    scratch = _scratch_address(spans, size, avoid)
    plan = _Builder(template, mode, scratch, fd_base).build()
    plan.size, plan.stack_top, plan.park = size, scratch + image_size + STACK_SIZE, scratch + image_size + STACK_SIZE
    plans[key] = plan
    return plan


# -- the per-stub part --------------------------------------------------------------------------
def _prologue(plan: _Plan, template: Template, stub_maps: list[procfs.Vma], stub_rseq: ptrace.RseqConfig) -> Program:
    """Ops that depend on the stub: unregister its rseq, unmap it, move its special mappings."""
    pro = Program(0)
    if stub_rseq.abi_pointer:
        pro.syscall(
            Syscall.RSEQ,
            stub_rseq.abi_pointer,
            stub_rseq.abi_size,
            RSEQ_FLAG_UNREGISTER,
            stub_rseq.signature,
            what="unregistering the stub's rseq",
        )
    ours = {v.path: (v.start, v.end) for v in stub_maps if v.special and v.path != "[vsyscall]"}
    theirs = template.manifest.specials
    if {k: e - s for k, (s, e) in ours.items()} != {k: e - s for k, (s, e) in theirs.items()}:
        raise RestoreError(
            f"the kernel's special mappings differ from the template's ({sorted(ours)} vs {sorted(theirs)}): "
            "it was captured under another kernel"
        )
    keep = sorted([*ours.values(), (plan.scratch, plan.scratch + plan.size)])
    cursor = 0
    for start, end in keep:
        if start > cursor:
            pro.syscall(Syscall.MUNMAP, cursor, start - cursor, what=f"unmapping the stub at {cursor:#x}")
        cursor = max(cursor, end)
    pro.syscall(Syscall.MUNMAP, cursor, TASK_TOP - cursor, what=f"unmapping the stub at {cursor:#x}")
    _move_specials(pro, ours, theirs, plan.park)
    return pro


def _move_specials(
    pro: Program, ours: dict[str, tuple[int, int]], theirs: dict[str, tuple[int, int]], park: int
) -> None:
    if all(ours[k][0] == theirs[k][0] for k in ours):
        return
    overlap = any(not (oe <= ts or os_ >= te) for os_, oe in ours.values() for ts, te in theirs.values())
    moves = []
    if overlap:  # mremap cannot move onto itself: go through the park area at the scratch's end
        cursor = park
        for name, (start, end) in sorted(ours.items(), key=lambda kv: kv[1]):
            moves.append((name, start, end - start, cursor))
            ours = {**ours, name: (cursor, cursor + end - start)}
            cursor += end - start
    for name, (start, end) in sorted(ours.items(), key=lambda kv: kv[1]):
        moves.append((name, start, end - start, theirs[name][0]))
    for name, start, size, target in moves:
        pro.syscall(
            Syscall.MREMAP,
            start,
            size,
            size,
            MremapFlag.MAYMOVE | MremapFlag.FIXED,
            target,
            what=f"moving {name} to {target:#x}",
        )


# -- restore ------------------------------------------------------------------------------------
def restore(template: Template, stub: Stub, mode: str = "cow") -> Instance:
    """Turn `stub` into an instance of `template`. On any failure the stub is killed and
    RestoreError (or FileChanged) says what failed."""
    if mode not in MODES:
        raise ValueError(f"restore mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "cow" and not template.pool.caps.private_cow:
        _kill(stub)
        raise RestoreError(
            f"the {template.pool.config.backend} backend cannot map pages copy-on-write: restore with copy or lazy"
        )
    t0, trips0 = time.perf_counter(), ptrace.round_trips()
    pagers: list[Pager] = []  # a pager started before a failure must go with the stub
    try:
        template.check_files()
        instance = _restore(template, stub, mode, pagers)
    except BaseException as e:
        _kill(stub)
        for pager in pagers:
            pager.close()
        if isinstance(e, FileChanged | RestoreError):
            raise
        if isinstance(e, OSError | InjectionError):
            raise RestoreError(f"restoring {template.name!r} into pid {stub.pid} failed: {e}") from e
        raise
    instance.timings["restore_ms"] = (time.perf_counter() - t0) * 1e3
    instance.round_trips = ptrace.round_trips() - trips0
    return instance


def _kill(stub: Stub) -> None:
    with contextlib.suppress(OSError):
        stub.kill()
    _reap_traced(stub.pid, 5.0)
    with contextlib.suppress(OSError):
        stub.wait(5.0)


def _reap_traced(pid: int, timeout: float) -> None:
    """Take the exit report of a killed stub we trace but did not create. A traced process's exit
    goes to its tracer first; its parent (a sandbox's agent) hears of it only once the tracer has
    waited, and until then would wait for it forever."""
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return
    if parent == os.getpid():
        return  # our own child: the stub's wait reaps it
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stop = ptrace.wait(pid, nohang=True)
        except ChildProcessError:
            return  # not traced by us (the failure came before the seize)
        if stop is not None and stop.exited:
            return
        time.sleep(0.001)


def _restore(template: Template, stub: Stub, mode: str, pagers: list[Pager]) -> Instance:
    pid = stub.pid
    seize_stopped(pid)
    stub_maps = procfs.read_maps(pid)
    premapped = _premapped_scratch(stub_maps)
    taken = [(v.start, v.end) for v in stub_maps if v.start != premapped]
    plan = _plan(template, mode, stub.fd_base)
    if not _free(taken, plan.scratch, plan.size):
        plan = _plan(template, mode, stub.fd_base, avoid=plan.scratch)
    prologue = _prologue(plan, template, stub_maps, ptrace.get_rseq_configuration(pid))
    image, args_addr, what = plan.program.finish(prologue)
    if len(image) > plan.stack_top - STACK_SIZE - plan.scratch:
        raise RestoreError(f"the restore program ({len(image)} bytes) outgrew its scratch area")
    if plan.scratch == premapped and plan.size <= STUB_SCRATCH_SIZE:
        regs = ptrace.getregs(pid)  # the stub mapped the area: the prologue unmaps what is left over
    else:  # replacing the stub's area where it is in the way (it was too small)
        in_the_way = not _free([(premapped, premapped + STUB_SCRATCH_SIZE)], plan.scratch, plan.size)
        regs = _map_scratch(pid, plan, replace=in_the_way)
    memory.process_vm_writev(pid, plan.scratch, image)
    _start_blob(pid, regs, plan.scratch, plan.stack_top, args_addr)
    if plan.uffd_fd >= 0:
        _wait_blob(pid, args_addr, what, paused=True)
        pagers.append(_start_pager(template, pid, plan))
        ptrace.cont(pid)
    try:
        _wait_blob(pid, args_addr, what, paused=False)
    except RestoreError as e:
        if pagers and (errors := pagers[0].stats().errors):
            raise RestoreError(
                f"the pager could not serve {errors} page(s) of {template.name!r} (a compressed chunk that does "
                f"not decompress?) and killed pid {pid}: {e}"
            ) from e
        raise
    manifest = template.manifest
    with SyscallInjector(pid, insn=manifest.syscall_insn) as inj:
        if plan.uffd_fd >= 0:
            inj.call_ok(Syscall.CLOSE, plan.uffd_fd, what="closing the stub's userfaultfd (the pager holds it)")
        inj.call_ok(Syscall.MUNMAP, plan.scratch, plan.size, what="unmapping the restorer")
    ptrace.setsigmask(pid, manifest.sigmask)
    ptrace.setregs(pid, restart_fixup(Registers(**manifest.registers)))
    ptrace.set_xstate(pid, manifest.xstate)
    ptrace.detach(pid)
    return Instance(pid, template, mode, stub, pagers[0] if pagers else None)


def _premapped_scratch(stub_maps: list[procfs.Vma]) -> int:
    """STUB_SCRATCH if the stub mapped its scratch area there as restorer.h says, else -1."""
    for v in stub_maps:
        if v.start == STUB_SCRATCH and v.size == STUB_SCRATCH_SIZE and v.perms.startswith("rwx") and not v.path:
            return STUB_SCRATCH
    return -1


def _map_scratch(pid: int, plan: _Plan, replace: bool) -> Registers:
    """Map the scratch area by an injected mmap; returns the stub's registers from before."""
    fixed = MapFlag.FIXED if replace else MapFlag.FIXED_NOREPLACE
    with SyscallInjector(pid) as inj:
        inj.call_ok(
            Syscall.MMAP,
            plan.scratch,
            plan.size,
            Prot.READ | Prot.WRITE | Prot.EXEC,
            MapFlag.PRIVATE | MapFlag.ANONYMOUS | fixed,
            -1,
            0,
            what="mapping the restorer's scratch area",
        )
    return inj.saved


def _start_blob(pid: int, regs: Registers, entry: int, stack_top: int, args_addr: int) -> None:
    # rsp as if `entry` had been called (rsp % 16 == 8 at a function's first instruction)
    start = dataclasses.replace(regs, rip=entry, rdi=args_addr, rsp=stack_top - 8, orig_rax=(1 << 64) - 1)
    ptrace.setregs(pid, start)
    ptrace.cont(pid)


def _wait_blob(pid: int, args_addr: int, what: list[str], paused: bool) -> None:
    """Wait for the restorer's int3: its pause (lazy) or its end. One round trip either way."""
    stop = ptrace.wait(pid)
    if stop is None or stop.exited or stop.signal != signal.SIGTRAP:
        rip = ptrace.getregs(pid).rip if stop is not None and not stop.exited else 0
        raise RestoreError(f"the restorer in pid {pid} stopped with {stop} at rip {rip:#x} instead of its int3")
    outcome = Program.outcome(memory.read_exact(pid, args_addr, ARGS.size))
    if not outcome.ok:
        raise RestoreError(f"restore failed in pid {pid} at {Program.describe(outcome, what)}")
    if paused != (outcome.done < len(what)):
        raise RestoreError(f"the restorer in pid {pid} stopped after step {outcome.done} of {len(what)} unexpectedly")


def _start_pager(template: Template, pid: int, plan: _Plan) -> Pager:
    handle = pidfd.pidfd_open(pid)  # the uffd belongs to the stub's mm: pull it out to serve it
    try:
        uffd = pidfd.pidfd_getfd(handle, plan.uffd_fd)
    except BaseException:
        os.close(handle)
        raise
    cache = template.cache_target() if plan.via_cache else None
    cold = template.cold_image() if template.manifest.cold else None
    try:  # the pager keeps the pidfd: it kills the instance when a fault cannot be served
        return Pager(
            uffd,
            handle,
            plan.ranges,
            template.source_address(),
            template.segment.size,
            cache,
            cold,
            prefetch=template.working_set(),
        )
    except BaseException:
        os.close(uffd)
        os.close(handle)
        raise

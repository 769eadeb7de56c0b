"""Restore: a stopped stub + a template -> a running instance (DESIGN.md, "Restore").

    stub = launch_stub(template.restore_fds("cow"))       # or sandbox.spawn_stub(fds)
    instance = restore(template, stub, "cow")

The stub already holds the fds the restore needs at 1000, 1001, ... (`Template.restore_fds`). The
tracer seizes it, copies the restorer blob with a *syscall program* (native/restorer.py) into the
scratch area the stub mapped before it stopped (or maps one with an injected mmap), and lets the
stub run it: unregister the stub's rseq, unmap the stub, move [vvar]/[vvar_vclock]/[vdso] to the
template's addresses (where they are in the stub comes from the report the stub left, else from
its /proc/self/maps), map every VMA (MAP_PRIVATE from the template segment for cow, filled by
pread for copy, from the cache segment under userfaultfd for lazy; a layered template's
ancestors' pages MAP_PRIVATE from their segments, read for copy), PR_SET_MM_MAP, sigactions,
pipes and path fds, the main thread's own state (tid address, robust list, rseq, name, altstack,
queued signals), the other threads (snapshot/threads.py), and last the credentials (uid/gid from
the template, no capabilities, no_new_privs) and the seccomp filter the caller passes
(native.seccomp), on every thread at once. Each resource writes its own ops (memory.py,
signals.py, files.py, threads.py, credentials.py); `_Builder` walks them in the kernel's order.
The blob stops with int3; the tracer unmaps the scratch area with a syscall instruction of the
restored image, sets the signal mask, registers and xstate, and detaches. The files the template
maps are checked (one fstat each of the fds it holds them by) before the instance runs any code of
its own.

The tracer's ptrace work runs in C (native/tracer.py), in three calls with no Python between
requests, on the caller's CPU with the stub pinned to it: in a VM each round trip between two
CPUs wakes a halted vCPU (~50 us here), and on one CPU it is a context switch. The number of
round trips does not depend on the number of VMAs.

The whole program is built once per template and mode and cached: the scratch area sits at an
address chosen from the template's layout, free in every stub unless the stub happens to use it
(then the program is rebuilt for another address); what the tracer learns of the stub (its rseq
registration and special mappings) is written into the image as it is copied in.

The seccomp filter goes in last because the kernel filters injected syscalls too, and the steps
before it need what it denies; installing it needs no_new_privs (set just before) or
CAP_SYS_ADMIN. After it the tracer injects only `close` (the userfaultfd) and `munmap` (the
scratch area), which the filter allows. A lazy restore's userfaultfd is made before it.

All calls for one stub must come from one thread (thawd's ptrace workers,
daemon/ptrace_workers.py). A failed restore kills the stub.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from native import memory, pidfd, ptrace, tracer
from native.constants import MapFlag, Prot, Syscall
from native.pager import Pager, PagerRange, PagerStats
from native.ptrace import Registers
from native.restorer import (
    ARGS,
    FIRST_RESTORE_FD,
    SPECIALS_DIFFER,
    STUB_SCRATCH,
    STUB_SCRATCH_SIZE,
    Outcome,
    Program,
)
from native.seccomp import check_program
from native.tracer import BlobRun, RestoreEnd, TraceError
from shmpool import SegmentExists
from shmpool.backends import round_up
from snapshot import procfs
from snapshot.credentials import Confinement
from snapshot.errors import FileChanged, RestoreError
from snapshot.files import restore_fds
from snapshot.inject import InjectionError, SyscallInjector, restart_fixup, seize_stopped
from snapshot.memory import MemoryRestore, PageSources
from snapshot.signals import queue_shared, restore_signals
from snapshot.template import MODES, Template
from snapshot.threads import ThreadPlan, restore_main
from snapshot.vocabulary import RestoreMode

PAGE = procfs.PAGE
STACK_SIZE = 64 << 10
SCRATCH_HINTS = (STUB_SCRATCH, 0x1000_0000_0000, 0x3000_0000_0000, 0x0800_0000_0000)


@dataclass
class Stub:
    """A stopped process, created by someone else, holding the restore fds from `fd_base` on.

    `wait(timeout)` reports the exit code (or -signal) once the process is gone, None while it
    runs; `kill()` ends it. Both come from the creator, who is the only one that can reap it."""

    pid: int
    wait: Callable[[float | None], int | None]
    kill: Callable[[], None]
    fd_base: int = FIRST_RESTORE_FD
    # A stub that waited (forked before anyone knew its template) holds no restore fds yet: its
    # creator sent them to its socket `handoff` in one SCM_RIGHTS message, and the restore's
    # first step after cleaning the stub takes them (restorer.h, THAW_OP_RECEIVE_FDS). The message
    # starts with fds of the creator's own: received fd i becomes each fd of handoff_places[i];
    # the restore fds follow, placed from fd_base. -1: the stub holds its fds already.
    handoff: int = -1
    handoff_places: tuple[tuple[int, ...], ...] = ()


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
            for _, run in self.template.manifest.memory.own_runs(with_stacks=False):
                for start, length in procfs.present_ranges(self.pid, run.start, run.start + run.length):
                    first = (run.offset + start - run.start) // PAGE
                    pages.extend(range(first, first + length // PAGE))
        except OSError:  # it exited meanwhile: nothing to learn from it
            return []
        return pages


# -- the per-template program -------------------------------------------------------------------
@dataclass
class _Plan:
    """The scratch area is [program image][stack][park area for moving the special mappings]
    [the other threads' stacks]."""

    scratch: int
    size: int
    program: Program
    stub_at: int  # image offset where the tracer writes in what it knows of the stub
    uffd_fd: int  # where the stub holds the userfaultfd (paged restores), else -1
    ranges: list[PagerRange]  # what the pager serves
    via_cache: bool  # the pager fills the shared cache segment
    image: bytes = b""
    args: int = 0  # the argument block's address
    stack_top: int = 0
    end: RestoreEnd | None = None
    threads: ThreadPlan = field(default_factory=lambda: ThreadPlan(()))

    def blob_run(self) -> BlobRun:
        return BlobRun(self.image, self.scratch, self.args, self.stack_top, self.stub_at)


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
    """Writes the template-specific body of the restore program by walking the resources, each
    of which writes its own ops (snapshot/memory.py, signals.py, files.py, threads.py,
    credentials.py). The order is the kernel's: memory first (nothing else has a place to live
    before), the pager started before anything touches registered pages, the threads after the
    ids are dropped (they inherit them) and before the last capabilities are (clone3's set_tid
    needs CAP_CHECKPOINT_RESTORE), the filter last."""

    def __init__(
        self, template: Template, mode: RestoreMode, scratch: int, fd_base: int, bpf: bytes | None, handoff: _Handoff
    ) -> None:
        self.t, self.m, self.mode = template, template.manifest, mode
        self.p = Program(scratch)
        self.fd_base = fd_base
        self.handoff = handoff
        fds = template.restore_fds(mode)
        self.nfds = len(fds)
        paged, via_cache = template.paged(mode), template.uses_cache(mode)
        self.sources = PageSources(
            mode=mode,
            segment_fd=fd_base,
            segment_base=template.segment.base,
            cache_fd=fd_base + len(fds) - 1 if via_cache else -1,
            cache_base=template.cache().base if via_cache else 0,
            uffd_fd=fd_base + len(fds) if paged else -1,
            cold=template.cold_spans(),
            layers=[(fd_base + 1 + i, seg.base) for i, seg in enumerate(template.layers)],
        )
        self.memory = MemoryRestore(self.p, self.m.memory, self.sources, self.file_fd)
        self.threads = ThreadPlan(self.m.threads.others)
        self.confinement = Confinement(self.p, self.m.credentials, bpf)

    def file_fd(self, index: int) -> int:
        return self.fd_base + 1 + len(self.t.layers) + index

    def receive_fds(self) -> None:
        """A stub that waited takes its fds now, from its hand-off socket (Stub.handoff)."""
        sock, places = self.handoff
        if sock < 0:
            return
        moves = [(i, fd) for i, fds in enumerate(places) for fd in fds]
        moves += [(len(places) + i, self.fd_base + i) for i in range(self.nfds)]
        what = f"receiving the restore fds the stub waited for (fd {sock})"
        self.p.receive_fds(sock, len(places) + self.nfds, moves, what=what)

    def build(self, size: int, park: int, thread_stacks: int) -> _Plan:
        p, m = self.p, self.m
        specials = ", ".join(m.memory.specials)
        stub_at = p.clean_stub(
            (p.base, p.base + size),
            park,
            m.memory.specials,
            what=f"unmapping the stub and moving its special mappings ({specials}) to the template's addresses",
        )
        self.receive_fds()
        if self.sources.paged:
            self.memory.userfaultfd()
        self.memory.vmas([f.path for f in m.files.identities])
        if self.sources.paged:  # from here on the kernel and the blob touch registered pages
            p.pause("waiting for the pager")
        self.memory.mm(exe_fd=self.file_fd(m.files.exe))
        restore_signals(p, m.signals)
        restore_fds(p, m.fds, (self.fd_base, self.fd_base + self.nfds - 1))
        restore_main(p, m.threads.main)
        queue_shared(p, m.signals)
        self.confinement.drop_bounding_set(p)  # before the threads: they inherit the empty set
        if self.threads.threads:  # they inherit the ids too: made once all but clone3's capabilities are gone
            self.confinement.for_making_threads(p)
            vmas = [(v.start, v.end) for v in m.memory.vmas]
            scratch = (p.base, p.base + size)
            self.threads.add(p, thread_stacks, m.memory.syscall_insn, scratch, vmas, self.confinement.thread)
            self.confinement.threads_made(p)
        else:
            self.confinement.drop(p)
        # THREADS_GO may read /proc/self/task/*, which a non-dumpable process's new uid may not open
        self.confinement.dumpable(p, 1 if self.threads.threads else None)
        self.confinement.filter(p, every_thread=bool(self.threads.threads))
        if self.threads.threads:  # only now may code of the function's run in another thread
            self.threads.go(p)
            if m.credentials.dumpable != 1:
                self.confinement.dumpable(p)
        plan = _Plan(p.base, size, p, stub_at, self.sources.uffd_fd, self.memory.ranges, self.sources.via_cache)
        plan.threads = self.threads
        return plan


_Handoff = tuple[int, tuple[tuple[int, ...], ...]]  # Stub.handoff, Stub.handoff_places
_NO_HANDOFF: _Handoff = (-1, ())


def _plan(
    template: Template,
    mode: RestoreMode,
    fd_base: int,
    bpf: bytes | None,
    avoid: int = 0,
    handoff: _Handoff = _NO_HANDOFF,
) -> _Plan:
    key = (mode, fd_base, bpf, handoff)  # bytes keep their hash: a lookup hashes the filter once
    plans = template.restore_plans
    plan: _Plan | None = plans.get(key)
    if plan is not None and plan.scratch != avoid:
        return plan
    spans = template.manifest.memory.spans()
    specials = sum(end - start for start, end in template.manifest.memory.specials.values())
    estimate = _Builder(template, mode, 0, fd_base, bpf, handoff).build(0, 0, 0)  # sizes do not depend on addresses
    image_size = round_up(len(estimate.program.finish()[0]), PAGE)
    park_size = round_up(specials, PAGE)
    size = image_size + STACK_SIZE + park_size + estimate.threads.stacks_size
    scratch = _scratch_address(spans, size, avoid)
    stack_top = scratch + image_size + STACK_SIZE
    plan = _Builder(template, mode, scratch, fd_base, bpf, handoff).build(size, stack_top, stack_top + park_size)
    plan.image, plan.args = plan.program.finish()
    plan.stack_top = stack_top
    m = template.manifest
    plan.end = RestoreEnd(
        syscall_insn=m.memory.syscall_insn,
        close_fd=plan.uffd_fd,  # the pager holds its own copy
        scratch=scratch,
        scratch_size=size,
        sigmask=m.threads.main.sigmask,
        registers=tracer.final_registers(restart_fixup(Registers(**m.threads.main.registers))),
        xstate=m.threads.main.xstate,
    )
    plans[key] = plan
    return plan


# -- restore ------------------------------------------------------------------------------------
def restore(
    template: Template, stub: Stub, mode: str = RestoreMode.COW, seccomp_filter: bytes | None = None
) -> Instance:
    """Turn `stub` into an instance of `template`, confined by `seccomp_filter` (a BPF program,
    native.seccomp.program(); None installs none: thawd always passes one). On any failure the
    stub is killed and RestoreError (or FileChanged) says what failed."""
    if mode not in MODES:
        raise ValueError(f"restore mode must be one of {', '.join(MODES)}, not {mode!r}")
    mode = RestoreMode(mode)
    if seccomp_filter is not None:
        check_program(seccomp_filter)
    if mode == "cow" and not template.pool.caps.private_cow:
        _kill(stub)
        raise RestoreError(
            f"the {template.pool.config.backend} backend cannot map pages copy-on-write: restore with copy or lazy"
        )
    t0, trips0 = time.perf_counter(), ptrace.round_trips()
    pagers: list[Pager] = []  # a pager started before a failure must go with the stub
    try:
        instance = _restore(template, stub, mode, seccomp_filter, pagers)
    except BaseException as e:
        _kill(stub)
        for pager in pagers:
            pager.close()
        if isinstance(e, FileChanged | RestoreError):
            raise
        if isinstance(e, OSError | InjectionError | TraceError):
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


def _restore(template: Template, stub: Stub, mode: RestoreMode, bpf: bytes | None, pagers: list[Pager]) -> Instance:
    """Seize the stub, run the restorer in it to its end (pausing once to start a pager for a
    paged restore), finish the thread's state and let it go. The files the template maps are
    checked while the restorer runs, before the instance runs any code of its own."""
    with tracer.same_cpu(stub.pid) as pin:
        return _restore_pinned(template, stub, mode, bpf, pagers, pin)


def _restore_pinned(
    template: Template, stub: Stub, mode: RestoreMode, bpf: bytes | None, pagers: list[Pager], pin: Any
) -> Instance:
    pid = stub.pid
    seize_stopped(pid)
    plan, outcome, changed = _run_restorer(template, mode, stub, bpf)
    if changed >= 0:
        template.check_files()  # raises FileChanged, naming the change
        path = template.manifest.files.identities[changed].path
        raise FileChanged(f"{path} changed while {template.name!r} was restored")
    _check_outcome(pid, template, plan, outcome, paused=plan.uffd_fd >= 0)
    if plan.uffd_fd >= 0:
        with tracer.unpinned(pin):  # the pager's thread must not inherit the pin
            pagers.append(_start_pager(template, pid, plan))
        try:
            outcome = Program.outcome(tracer.resume_blob(pid, plan.args, ARGS.size))
        except TraceError as e:
            if errors := pagers[0].stats().errors:
                raise RestoreError(
                    f"the pager could not serve {errors} page(s) of {template.name!r} (a compressed chunk that does "
                    f"not decompress?) and killed pid {pid}: {e}"
                ) from e
            raise
        _check_outcome(pid, template, plan, outcome, paused=False)
    assert plan.end is not None
    tracer.end_restore(pid, plan.end, pin)
    return Instance(pid, template, mode, stub, pagers[0] if pagers else None)


def _run_restorer(template: Template, mode: RestoreMode, stub: Stub, bpf: bytes | None) -> tuple[_Plan, Outcome, int]:
    """Copy the restorer into the stub's scratch area and run it to its first int3. Stubs map
    the area where restorer.h says before they stop; for a stub that did not, or a plan that
    needs it elsewhere, the stub's maps decide where it goes and an injected mmap makes it."""
    handoff = (stub.handoff, stub.handoff_places)
    plan = _plan(template, mode, stub.fd_base, bpf, handoff=handoff)
    files = template.file_checks()
    if plan.scratch == STUB_SCRATCH and plan.size <= STUB_SCRATCH_SIZE:
        try:
            raw, changed = tracer.run_blob(stub.pid, plan.blob_run(), ARGS.size, files)
            return plan, Program.outcome(raw), changed
        except TraceError as e:
            if e.step != tracer.WRITE:  # only a missing scratch area is worth another try
                raise
    stub_maps = procfs.read_maps(stub.pid)
    premapped = _premapped_scratch(stub_maps)
    taken = [(v.start, v.end) for v in stub_maps if v.start != premapped]
    if not _free(taken, plan.scratch, plan.size):
        plan = _plan(template, mode, stub.fd_base, bpf, avoid=plan.scratch, handoff=handoff)
    if plan.scratch != premapped or plan.size > STUB_SCRATCH_SIZE:
        in_the_way = not _free([(premapped, premapped + STUB_SCRATCH_SIZE)], plan.scratch, plan.size)
        _map_scratch(stub.pid, plan, replace=in_the_way)
    raw, changed = tracer.run_blob(stub.pid, plan.blob_run(), ARGS.size, files)
    return plan, Program.outcome(raw), changed


def _check_outcome(pid: int, template: Template, plan: _Plan, outcome: Outcome, paused: bool) -> None:
    """The restorer stopped at its int3: did every op so far succeed, and is it where it should be?"""
    what = plan.program.what
    if outcome.failed_op == 0 and outcome.result == -SPECIALS_DIFFER:
        specials = ", ".join(template.manifest.memory.specials)
        raise RestoreError(
            f"the kernel's special mappings in pid {pid} differ from the template's ({specials} and their sizes): "
            "it was captured under another kernel"
        )
    if not outcome.ok and outcome.failed_op == plan.threads.op_index:
        step = plan.threads.describe_failure(lambda address, length: memory.read_exact(pid, address, length))
        raise RestoreError(f"restore failed in pid {pid} at {step}: {Program.describe(outcome, what)}")
    if not outcome.ok:
        raise RestoreError(f"restore failed in pid {pid} at {Program.describe(outcome, what)}")
    if paused != (outcome.done < len(what)):
        raise RestoreError(f"the restorer in pid {pid} stopped after step {outcome.done} of {len(what)} unexpectedly")


def _premapped_scratch(stub_maps: list[procfs.Vma]) -> int:
    """STUB_SCRATCH if the stub mapped its scratch area there as restorer.h says, else -1."""
    for v in stub_maps:
        if v.start == STUB_SCRATCH and v.size == STUB_SCRATCH_SIZE and v.perms.startswith("rwx") and not v.path:
            return STUB_SCRATCH
    return -1


def _map_scratch(pid: int, plan: _Plan, replace: bool) -> None:
    """Map the scratch area by an injected mmap (the stub's registers are put back after)."""
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

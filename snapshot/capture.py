"""Capture: a parked guest -> a template in the pool (DESIGN.md, "mm-template in user space").

    template = capture(pid, pool, "hello")

The guest must have stopped itself (SIGSTOP after READY). Every thread is seized, read, and left
stopped exactly as it was (it can still be resumed or killed). This module is the driver; each
resource is read by its own module, which also holds its restore side:

- threads (snapshot/threads.py): every thread's registers, xstate, mask, pending signals,
  alternate stack, tid address, robust list, rseq and name;
- signals (snapshot/signals.py): the handlers and what is queued to the process;
- memory (snapshot/memory.py): the VMAs, dumped sparsely or recorded for re-mapping, mm fields,
  auxv, personality;
- files and fds (snapshot/files.py): the files the image maps, the fd table, pipes;
- credentials (snapshot/credentials.py).

Then snapshot/image.py writes the image: the pages, the manifest, checksummed and published.

Refused, with the cause named (NotCapturable): a process (or a thread of it) that is not stopped,
a thread inside vfork or clone, writable shared mappings, mappings of things that are not regular
files, fds other than stdio, the control socket (fd 3), regular files, directories and pipes
whose both ends it holds. Any other failure on the way (a syscall the capture needs, an injected
one, the pool) is a CaptureError naming what was being done: the guest is left parked, and
nothing half-written stays in the pool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from native import ptrace
from native.constants import Prctl, Syscall
from native.tracer import TraceError
from shmpool import Pool, UnsupportedMapping
from shmpool.errors import PoolError
from snapshot import procfs, threads
from snapshot.credentials import read_credentials
from snapshot.errors import CaptureError, NotCapturable
from snapshot.files import FileTable, read_fds
from snapshot.image import ImageWriter
from snapshot.inject import InjectionError, SyscallInjector, seize_stopped
from snapshot.manifest import HEADER_SIZE, Manifest
from snapshot.memory import Layer, MemoryMap, copy_pages, read_memory
from snapshot.signals import read_signals
from snapshot.template import Template

PAGE = procfs.PAGE


def capture(
    pid: int,
    pool: Pool,
    name: str,
    mounts: Mapping[str, str] | None = None,
    parent: Template | None = None,
    dense: bool = False,
) -> Template:
    """Capture the stopped process `pid` (every thread of it) into template `name` of `pool`.
    `mounts`: where the guest's bind-mounted directories are on this host (see Template.open).
    `parent`: the template `pid` was thawed from (cow): the capture is a *child* of it, which
    stores only the pages the guest wrote or added since (snapshot/pages.py) and needs its
    parent (and the parent's own ancestors) in the pool for as long as it lives. `dense` (on a
    pool with sparse segments): each writable anonymous VMA is one run, its untouched pages holes
    (snapshot/pages.py): for a template others will be layered on. Zero pages are never written
    into a sparse segment."""
    if pool.config.page_size != PAGE:
        raise UnsupportedMapping(
            f"templates need a pool with {PAGE >> 10} KiB pages; the {pool.config.backend} pool has "
            f"{pool.config.page_size >> 10} KiB pages (use a tmpfs, memfd or devdax pool)"
        )
    tids = check_capturable(pid)
    try:
        with _seized(pid, tids):
            manifest = _read_process(pid, tids, parent, dense and pool.caps.sparse)
            _write_image(pid, pool, name, manifest, parent)
        return Template.open(pool, name, verify=False, mounts=mounts)  # publish read it back and checksummed it
    except (NotCapturable, PoolError):
        raise
    except (OSError, InjectionError, TraceError) as e:
        raise CaptureError(f"capturing pid {pid} into {name!r} failed: {e}") from e


def check_capturable(pid: int) -> list[int]:
    """The TIDs of the threads besides the main one, once every thread is seen stopped."""
    try:
        state = procfs.state(pid)
        tids = threads.other_threads(pid)
        if state not in ("T", "t"):
            raise NotCapturable(
                f"pid {pid} is not stopped (state {state}): only a guest parked with SIGSTOP after READY is captured"
            )
        threads.check_threads(pid, tids)
    except FileNotFoundError:
        raise NotCapturable(f"pid {pid} does not exist (or a thread of it exited)") from None
    return tids


@contextmanager
def _seized(pid: int, tids: list[int]) -> Iterator[None]:
    """Every thread seized (the others first: the main thread's seize sends SIGCONT, which a
    seized thread sleeps through), and all parked again afterwards, as we found them."""
    seized = threads.seize_threads(pid, tids)
    try:
        seize_stopped(pid)
    except InjectionError as e:
        os.kill(pid, signal.SIGSTOP)
        threads.release_threads(seized)
        raise NotCapturable(str(e)) from e
    try:
        yield
    finally:
        os.kill(pid, signal.SIGSTOP)  # pending for every thread as each is let go
        threads.release_threads(seized)
        ptrace.detach(pid, signal.SIGSTOP)
        _wait_parked(pid, tids)


def _wait_parked(pid: int, tids: list[int]) -> None:
    """Until every thread is back in the group stop (a let-go thread takes its SIGSTOP when it
    next runs): the caller gets the process as it gave it, whether the capture worked or not."""
    with contextlib.suppress(NotCapturable, FileNotFoundError):
        threads.check_threads(pid, [pid, *tids])


def _read_process(pid: int, tids: list[int], parent: Template | None, dense: bool) -> Manifest:
    """Every resource of the seized process; the main thread's injector serves them all."""
    rsp = ptrace.getregs(pid).rsp
    with SyscallInjector(pid) as inj:
        thread_state = threads.read_threads(pid, tids, inj)  # registers first, before any injection
        brk = inj.call_ok(Syscall.BRK, 0, what="brk(0)")
        dumpable = inj.call_ok(Syscall.PRCTL, Prctl.GET_DUMPABLE, what="PR_GET_DUMPABLE")
        signals = read_signals(pid, inj)
        fds = read_fds(pid, inj)
        syscall_insn = inj.insn
    table = FileTable()
    ancestors = parent.ancestors() if parent else []
    layers = (Layer(parent.name, parent.image), *parent.manifest.memory.layers) if parent else ()
    memory = read_memory(pid, rsp, brk, syscall_insn, table.index, HEADER_SIZE, ancestors, layers, dense)
    if parent is not None:
        memory = _used_layers(memory)
    return Manifest(
        memory=memory,
        threads=thread_state,
        signals=signals,
        files=table.files(pid),
        fds=fds,
        credentials=read_credentials(pid, dumpable),
        source_pid=pid,
    )


def _write_image(pid: int, pool: Pool, name: str, manifest: Manifest, parent: Template | None) -> None:
    with ImageWriter(pool, name, manifest) as image:
        copy_pages(pid, manifest.memory, image.page, sparse=pool.caps.sparse)
        meta: dict[str, object] = {"data_bytes": manifest.data_bytes, "source_pid": pid}
        if parent is not None:
            meta["parent"] = parent.name
        image.publish(meta, needs=[layer.name for layer in manifest.memory.layers])


def _used_layers(memory: MemoryMap) -> MemoryMap:
    """The layers cut to those a run refers to, renumbered: a child needs only the ancestors
    it has pages in (the parent always stays: it names the child's lineage)."""
    used = {run.layer for vma in memory.vmas for run in vma.runs if run.layer} | {1}
    keep = [i for i in range(1, len(memory.layers) + 1) if i in used]
    renumber = {old: new for new, old in enumerate(keep, 1)}
    vmas = tuple(
        dataclasses.replace(vma, runs=tuple(dataclasses.replace(r, layer=renumber.get(r.layer, 0)) for r in vma.runs))
        for vma in memory.vmas
    )
    return dataclasses.replace(memory, vmas=vmas, layers=tuple(memory.layers[i - 1] for i in keep))

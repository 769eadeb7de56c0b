"""The tracer's side of a restore, in C (src/tracer.c): the stretches of ptrace work between the
decisions Python makes, each one call.

    seize_stopped(pid)                       a parked stub, left at its SIGCONT delivery stop
    run_blob(pid, image, ...)                copy the restorer in, run it to its int3, read its
                                             argument block back (and fstat the files the
                                             template maps)
    resume_blob(pid, args)                   on from the restorer's pause to its next int3
    same_cpu(pid)                            tracer and tracee on one CPU meanwhile
    end_restore(pid, RestoreEnd(...))        unmap the restorer by an injected syscall, set the
                                             final mask, registers and xstate, detach

Each ptrace request costs a microsecond or two from C and tens through Python; a restore is
mostly requests. Stops seen count as round trips in `native.ptrace.round_trips()`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from native import ptrace
from native._native import ffi, lib
from native.errors import raise_oserror

_STEPS = {
    int(lib.THAW_TRACE_SEIZE): "seizing it",
    int(lib.THAW_TRACE_NOT_STOPPED): "it is not stopped",
    int(lib.THAW_TRACE_EXITED): "it exited",
    int(lib.THAW_TRACE_REGS): "reading or setting its registers",
    int(lib.THAW_TRACE_WRITE): "writing the restorer into it",
    int(lib.THAW_TRACE_RESUME): "resuming it",
    int(lib.THAW_TRACE_STRAY_STOP): "it stopped somewhere else than expected",
    int(lib.THAW_TRACE_READ): "reading the restorer's outcome",
    int(lib.THAW_TRACE_INJECTED): "an injected syscall failed",
    int(lib.THAW_TRACE_FINAL): "setting its final signal mask, registers or xstate",
    int(lib.THAW_TRACE_DETACH): "detaching",
}
_INJECTED = {3: "closing the stub's userfaultfd (the pager holds it)", 11: "unmapping the restorer"}
NOT_STOPPED = int(lib.THAW_TRACE_NOT_STOPPED)
EXITED = int(lib.THAW_TRACE_EXITED)
WRITE = int(lib.THAW_TRACE_WRITE)


class TraceError(Exception):
    """A stretch of tracer work failed; `step` is a THAW_TRACE_* value, `err` an errno."""

    def __init__(self, pid: int, error: Any) -> None:
        self.pid, self.step, self.err = pid, int(error.step), int(error.err)
        self.status, self.rip = int(error.status), int(error.rip)
        super().__init__(self._describe())

    def _describe(self) -> str:
        what = _STEPS.get(self.step, f"step {self.step}")
        if self.step == lib.THAW_TRACE_INJECTED:
            what = _INJECTED.get(self.status, f"injected syscall {self.status}")
        elif self.step in (NOT_STOPPED, EXITED, lib.THAW_TRACE_STRAY_STOP) and not self.err:
            return f"pid {self.pid}: {what} ({_status(self.status)}{f' at rip {self.rip:#x}' if self.rip else ''})"
        return f"pid {self.pid}: {what}: {os.strerror(self.err)} ({errno.errorcode.get(self.err, self.err)})"


def _status(status: int) -> str:
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    if os.WIFSTOPPED(status):
        return f"stopped by signal {os.WSTOPSIG(status)}, event {status >> 16}"
    return f"wait status {status:#x}"


@contextlib.contextmanager
def same_cpu(pid: int) -> Iterator[Any]:
    """Pin the calling thread and tracee `pid` to one CPU (the caller's, if `pid` may use it)
    while the block runs; both get their own CPUs back after (the tracee at `end_restore`).

    In a VM every round trip between two CPUs wakes a halted vCPU, ~50 us here; on one CPU a
    round trip is a context switch. Yields the pin state `end_restore` takes."""
    pin = ffi.new("struct thaw_pin *")
    if lib.thaw_trace_pin(pid, pin) != 0:
        raise_oserror("sched_getaffinity", f"pid {pid}")
    try:
        yield pin
    finally:
        lib.thaw_trace_unpin_stub(pid, pin)  # a no-op after end_restore did it; gone: ignored
        lib.thaw_trace_unpin_self(pin)


@contextlib.contextmanager
def unpinned(pin: Any) -> Iterator[None]:
    """The calling thread on its own CPUs during the block: threads it starts inherit them."""
    lib.thaw_trace_unpin_self(pin)
    try:
        yield
    finally:
        lib.thaw_trace_repin_self(pin)


def _error() -> Any:
    return ffi.new("struct thaw_trace_error *")


def _check(pid: int, ret: int, error: Any) -> None:
    ptrace.count_round_trips(int(error.trips))
    if ret != 0:
        raise TraceError(pid, error)


def seize_stopped(pid: int) -> None:
    """Seize a process that stopped itself (SIGSTOP), leaving it where a restore can start."""
    error = _error()
    _check(pid, lib.thaw_trace_seize_stopped(pid, error), error)


class FileChecks:
    """The files a template maps, each as (the fd it is held by, device, inode, size, mtime) at
    capture, for the tracer to check with one fstat each: changed in place, or deleted or
    replaced under its name (no links left)."""

    def __init__(self, files: list[tuple[int, int, int, int, int]]) -> None:
        self.array = ffi.new("struct thaw_file_check[]", max(len(files), 1))
        self.count = len(files)
        for entry, (fd, dev, ino, size, mtime_ns) in zip(self.array, files, strict=False):
            entry.fd, entry.dev, entry.ino, entry.size, entry.mtime_ns = fd, dev, ino, size, mtime_ns


@dataclass(frozen=True)
class BlobRun:
    """Where the restorer goes and runs in the stub."""

    image: bytes
    scratch: int
    args: int
    stack_top: int
    stub_at: int  # image offset where the stub's facts (thaw_stub_facts) are written in, -1 if nowhere


def run_blob(pid: int, run: BlobRun, outcome_size: int, files: FileChecks | None) -> tuple[bytes, int]:
    """Copy the restorer in, run it to its int3 and return its argument block, and the index of
    the first of `files` that is not as captured (-1: all are)."""
    spec = ffi.new("struct thaw_blob_run *")
    image = ffi.from_buffer(run.image)
    spec.image, spec.len = image, len(run.image)
    spec.scratch, spec.args, spec.stack_top, spec.stub_at = run.scratch, run.args, run.stack_top, run.stub_at
    if files is not None:
        spec.files, spec.nfiles = files.array, files.count
    out = ffi.new("char[]", outcome_size)
    error = _error()
    _check(pid, lib.thaw_trace_run_blob(pid, spec, out, outcome_size, error), error)
    return bytes(ffi.buffer(out, outcome_size)), int(spec.changed_file)


def resume_blob(pid: int, args: int, outcome_size: int) -> bytes:
    """Resume the restorer from its pause and wait for its next int3."""
    out = ffi.new("char[]", outcome_size)
    error = _error()
    _check(pid, lib.thaw_trace_resume_blob(pid, args, out, outcome_size, error), error)
    return bytes(ffi.buffer(out, outcome_size))


def final_registers(regs: ptrace.Registers) -> Any:
    """`regs` as the C struct `end_restore` sets (build it once per template)."""
    raw = ffi.new("struct user_regs_struct *")
    for name, value in vars(regs).items():
        setattr(raw, name, value & 0xFFFF_FFFF_FFFF_FFFF)
    return raw


@dataclass(frozen=True)
class RestoreEnd:
    syscall_insn: int  # a `syscall` instruction of the restored image
    close_fd: int  # closed in the tracee first (-1: none)
    scratch: int
    scratch_size: int
    sigmask: int
    registers: Any  # from final_registers()
    xstate: bytes


def end_restore(pid: int, end: RestoreEnd, pin: Any = None) -> None:
    """Unmap the restorer with an injected syscall, set the thread's final state, give the stub
    its own CPUs back (`pin` from `same_cpu`), detach."""
    spec = ffi.new("struct thaw_restore_end *")
    xstate = ffi.from_buffer(end.xstate)
    spec.syscall_insn, spec.close_fd = end.syscall_insn, end.close_fd
    spec.unmap_start, spec.unmap_len, spec.sigmask = end.scratch, end.scratch_size, end.sigmask
    spec.regs, spec.xstate, spec.xstate_len = end.registers, xstate, len(end.xstate)
    spec.pin = pin if pin is not None else ffi.NULL
    error = _error()
    _check(pid, lib.thaw_trace_end_restore(pid, spec, error), error)

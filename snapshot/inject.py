"""Running syscalls inside a stopped tracee, without writing any code into it.

Some facts about x86-64 that make this work:

- `syscall` is two bytes, `0f 05`. A tracee that stopped itself (kill/raise SIGSTOP) sits right
  after one, so pointing rip two bytes back and single-stepping executes exactly one syscall of
  our choosing with the registers we set: rax = number, rdi, rsi, rdx, r10, r8, r9 = arguments,
  result in rax (-errno on failure).
- `orig_rax = -1` before the step keeps the kernel from treating the stop as an interrupted
  syscall to restart.
- Buffers for syscalls that take pointers go below the tracee's stack pointer, past the 128-byte
  red zone the ABI lets leaf functions use, and are read back with process_vm_readv.
- A tracee stopped *inside* a syscall shows rax = -ERESTART*: a resumed copy of it must re-run
  that syscall (rip -= 2, rax = orig_rax) — `restart_fixup` does that for a captured state.

All calls must come from the thread that seized the tracee.
"""

from __future__ import annotations

import dataclasses
import signal

from native import memory, ptrace, tracer
from native.ptrace import Registers
from snapshot import procfs

SYSCALL_INSN = b"\x0f\x05"
RED_ZONE = 128
SCRATCH_SIZE = 4096
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
# -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK
_RESTART = {-512, -513, -514, -516}
_ERESTART_RESTARTBLOCK = -516
_NR_RESTART_SYSCALL = 219


class InjectionError(Exception):
    """A syscall could not be run inside the tracee."""


def seize_stopped(pid: int) -> None:
    """Seize a process that stopped itself (SIGSTOP) and leave it where injection can start.

    A seized tracee in group-stop re-enters group-stop whenever it is resumed, so single-steps
    from there never run. SIGCONT ends the group-stop; resumed, the tracee dequeues it and, being
    traced, reports a signal-delivery-stop for SIGCONT before running any of its own code. From
    that stop we inject, and the SIGCONT is never delivered (its job-control effect is done).
    The sequence runs in C (native/tracer.py): it is on every restore's path.
    """
    try:
        tracer.seize_stopped(pid)
    except tracer.TraceError as e:
        if e.step == tracer.NOT_STOPPED:
            raise InjectionError(f"{e}: only a parked process is captured or restored") from e
        raise InjectionError(str(e)) from e


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def restart_fixup(regs: Registers) -> Registers:
    """The registers a copy of this tracee should resume with, if it was stopped in a syscall."""
    rax = _signed(regs.rax)
    if rax not in _RESTART:
        return regs
    nr = _NR_RESTART_SYSCALL if rax == _ERESTART_RESTARTBLOCK else regs.orig_rax
    return dataclasses.replace(regs, rip=regs.rip - 2, rax=nr)


class SyscallInjector:
    """Runs syscalls in a seized, stopped tracee; `close()` puts its registers back."""

    def __init__(self, pid: int, insn: int | None = None) -> None:
        """`insn`: the address of a `syscall` instruction to use (default: at rip-2, else the vdso's)."""
        self.pid = pid
        self.saved = ptrace.getregs(pid)
        self.insn = self._find_syscall_insn() if insn is None else insn
        self.scratch = (self.saved.rsp - RED_ZONE - SCRATCH_SIZE) & ~0xF
        self.calls = 0

    def _find_syscall_insn(self) -> int:
        here = self.saved.rip - 2
        if memory.read_exact(self.pid, here, 2) == SYSCALL_INSN:
            return here
        for vma in procfs.read_maps(self.pid):  # stopped outside a syscall: borrow the vdso's
            if vma.path == "[vdso]":
                offset = memory.read_exact(self.pid, vma.start, vma.size).find(SYSCALL_INSN)
                if offset >= 0:
                    return vma.start + offset
        raise InjectionError(f"pid {self.pid}: no syscall instruction at rip-2 nor in its vdso")

    def call(self, nr: int, *args: int) -> int:
        """Run syscall `nr` in the tracee; returns rax as a signed value (-errno on failure)."""
        if len(args) > len(_ARG_REGS):
            raise ValueError(f"a syscall takes at most 6 arguments, not {len(args)}")
        regs = dataclasses.replace(self.saved, rax=nr, orig_rax=(1 << 64) - 1, rip=self.insn)
        for name, value in zip(_ARG_REGS, args, strict=False):
            setattr(regs, name, value & 0xFFFF_FFFF_FFFF_FFFF)
        ptrace.setregs(self.pid, regs)
        ptrace.singlestep(self.pid)
        stop = ptrace.wait(self.pid)
        if stop is None or stop.exited or stop.signal != signal.SIGTRAP:
            raise InjectionError(f"pid {self.pid}: syscall {nr} ended in {stop} instead of a single-step trap")
        self.calls += 1
        return _signed(ptrace.getregs(self.pid).rax)

    def call_ok(self, nr: int, *args: int, what: str = "") -> int:
        """`call`, raising OSError (named after `what`) when the tracee's syscall failed."""
        ret = self.call(nr, *args)
        if -4096 < ret < 0:
            raise OSError(-ret, f"{what or f'syscall {nr}'} in pid {self.pid} failed (originated from injection)")
        return ret

    def write_scratch(self, data: bytes, offset: int = 0) -> int:
        """Put `data` in the tracee's scratch area; returns its address there."""
        if offset + len(data) > SCRATCH_SIZE:
            raise ValueError(f"{len(data)} bytes at {offset} do not fit the {SCRATCH_SIZE}-byte scratch area")
        memory.process_vm_writev(self.pid, self.scratch + offset, data)
        return self.scratch + offset

    def read_scratch(self, length: int, offset: int = 0) -> bytes:
        return memory.read_exact(self.pid, self.scratch + offset, length)

    def close(self) -> None:
        """Put the tracee's registers back as they were before the first injected call."""
        ptrace.setregs(self.pid, self.saved)

    def __enter__(self) -> SyscallInjector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""ptrace, the way thaw uses it.

Some facts about ptrace that shape this module:

- Every request for a tracee must come from the thread that attached it. Callers keep all ptrace
  work on one tracer thread; nothing here is thread-safe on purpose.
- `PTRACE_SEIZE` attaches without stopping. A tracee already in group-stop reports
  `PTRACE_EVENT_STOP` (status >> 16) to the next `waitpid`; a running one must be stopped with
  `PTRACE_INTERRUPT` first.
- `PTRACE_PEEKDATA` returns the word itself, so -1 is a valid result: the C shim clears errno
  before the call and we look at errno, not the value.
- A *round trip* is one resume of the tracee followed by the `waitpid` that sees it stop again
  (~18-20 us here). `round_trips()` counts them, so tests can check that work moved into the
  tracee (the restorer blob) instead of growing with the number of VMAs.
- Registers are the kernel's `struct user_regs_struct`; `fs_base` is in it, so TLS survives a
  GETREGS/SETREGS round trip. FPU/SSE/AVX state lives in the `NT_X86_XSTATE` regset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from native._native import ffi, lib
from native.constants import PTRACE_EVENT_STOP, WALL, PtraceRequest, RegSet
from native.errors import raise_oserror

# Large enough for every XSAVE layout the kernel reports (AVX-512 + AMX tile data is ~11 KiB).
XSTATE_MAX = 16384
WORD = 8
_round_trips = 0


def round_trips() -> int:
    """Stops seen by `wait()` in this process so far (each one a tracee round trip), and those
    native/tracer.py's C calls saw."""
    return _round_trips


def count_round_trips(n: int) -> None:
    """Add the stops a C tracer call saw to `round_trips()`."""
    global _round_trips
    _round_trips += n


@dataclass
class Registers:
    """x86-64 `struct user_regs_struct`, field for field."""

    r15: int = 0
    r14: int = 0
    r13: int = 0
    r12: int = 0
    rbp: int = 0
    rbx: int = 0
    r11: int = 0
    r10: int = 0
    r9: int = 0
    r8: int = 0
    rax: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    orig_rax: int = 0
    rip: int = 0
    cs: int = 0
    eflags: int = 0
    rsp: int = 0
    ss: int = 0
    fs_base: int = 0
    gs_base: int = 0
    ds: int = 0
    es: int = 0
    fs: int = 0
    gs: int = 0


_REG_NAMES = [f.name for f in fields(Registers)]


@dataclass(frozen=True)
class RseqConfig:
    """What `PTRACE_GET_RSEQ_CONFIGURATION` reports: the tracee's registered rseq area."""

    abi_pointer: int
    abi_size: int
    signature: int
    flags: int


@dataclass(frozen=True)
class Stop:
    """One `waitpid` result for a tracee, decoded."""

    status: int
    exited: bool
    exit_code: int | None
    signal: int | None  # stop signal (stopped) or terminating signal (killed)
    event: int  # PTRACE_EVENT_* in status >> 16, 0 for none

    @property
    def is_group_stop(self) -> bool:
        return self.event == PTRACE_EVENT_STOP


def _request(req: PtraceRequest, pid: int, addr: int = 0, data: int = 0) -> int:
    ret = int(lib.thaw_ptrace(req, pid, addr, data))
    if ret == -1 and ffi.errno != 0:
        raise_oserror("ptrace", f"PTRACE_{req.name} pid {pid}")
    return ret


def seize(pid: int, options: int = 0) -> None:
    _request(PtraceRequest.SEIZE, pid, 0, options)


def interrupt(pid: int) -> None:
    _request(PtraceRequest.INTERRUPT, pid)


def setoptions(pid: int, options: int) -> None:
    _request(PtraceRequest.SETOPTIONS, pid, 0, options)


def cont(pid: int, sig: int = 0) -> None:
    _request(PtraceRequest.CONT, pid, 0, sig)


def listen(pid: int) -> None:
    _request(PtraceRequest.LISTEN, pid)


def singlestep(pid: int, sig: int = 0) -> None:
    _request(PtraceRequest.SINGLESTEP, pid, 0, sig)


def syscall(pid: int, sig: int = 0) -> None:
    """Resume until the next syscall entry or exit (`PTRACE_SYSCALL`)."""
    _request(PtraceRequest.SYSCALL, pid, 0, sig)


def detach(pid: int, sig: int = 0) -> None:
    _request(PtraceRequest.DETACH, pid, 0, sig)


def geteventmsg(pid: int) -> int:
    out = ffi.new("unsigned long *")
    _request(PtraceRequest.GETEVENTMSG, pid, 0, int(ffi.cast("uintptr_t", out)))
    return int(out[0])


def peekdata(pid: int, addr: int) -> int:
    """Read one 8-byte word of the tracee (unsigned)."""
    return _request(PtraceRequest.PEEKDATA, pid, addr) & 0xFFFF_FFFF_FFFF_FFFF


def pokedata(pid: int, addr: int, word: int) -> None:
    _request(PtraceRequest.POKEDATA, pid, addr, word & 0xFFFF_FFFF_FFFF_FFFF)


def getregs(pid: int) -> Registers:
    regs = ffi.new("struct user_regs_struct *")
    # Safety: `regs` is owned by this frame and outlives the call.
    _request(PtraceRequest.GETREGS, pid, 0, int(ffi.cast("uintptr_t", regs)))
    return Registers(**{name: int(getattr(regs, name)) for name in _REG_NAMES})


def setregs(pid: int, regs: Registers) -> None:
    raw = ffi.new("struct user_regs_struct *")
    for name in _REG_NAMES:
        setattr(raw, name, getattr(regs, name) & 0xFFFF_FFFF_FFFF_FFFF)
    _request(PtraceRequest.SETREGS, pid, 0, int(ffi.cast("uintptr_t", raw)))


def get_xstate(pid: int) -> bytes:
    """The tracee's XSAVE area (`PTRACE_GETREGSET NT_X86_XSTATE`), as long as the kernel says."""
    buf = ffi.new("char[]", XSTATE_MAX)
    length = ffi.new("size_t *", XSTATE_MAX)
    if lib.thaw_ptrace_getregset(pid, RegSet.X86_XSTATE, buf, length) == -1:
        raise_oserror("ptrace", f"PTRACE_GETREGSET NT_X86_XSTATE pid {pid}")
    return bytes(ffi.buffer(buf, length[0]))


def set_xstate(pid: int, xstate: bytes) -> None:
    buf = ffi.from_buffer(xstate)
    if lib.thaw_ptrace_setregset(pid, RegSet.X86_XSTATE, buf, len(xstate)) == -1:
        raise_oserror("ptrace", f"PTRACE_SETREGSET NT_X86_XSTATE pid {pid}")


def getsigmask(pid: int) -> int:
    """The tracee's blocked-signal mask (bit n-1 = signal n)."""
    mask = ffi.new("uint64_t *")
    _request(PtraceRequest.GETSIGMASK, pid, 8, int(ffi.cast("uintptr_t", mask)))
    return int(mask[0])


def setsigmask(pid: int, mask: int) -> None:
    """Set the blocked mask from outside: it takes effect when the tracee resumes, so no signal
    can be delivered in between (as it could after an injected rt_sigprocmask)."""
    raw = ffi.new("uint64_t *", mask & 0xFFFF_FFFF_FFFF_FFFF)
    _request(PtraceRequest.SETSIGMASK, pid, 8, int(ffi.cast("uintptr_t", raw)))


def get_rseq_configuration(pid: int) -> RseqConfig:
    conf = ffi.new("struct thaw_rseq_config *")
    # For this request addr carries the buffer size and data the buffer.
    ret = int(
        lib.thaw_ptrace(
            PtraceRequest.GET_RSEQ_CONFIGURATION, pid, ffi.sizeof(conf[0]), int(ffi.cast("uintptr_t", conf))
        )
    )
    if ret == -1:
        raise_oserror("ptrace", f"PTRACE_GET_RSEQ_CONFIGURATION pid {pid}")
    return RseqConfig(
        abi_pointer=int(conf.rseq_abi_pointer),
        abi_size=int(conf.rseq_abi_size),
        signature=int(conf.signature),
        flags=int(conf.flags),
    )


def decode_status(status: int) -> Stop:
    if os.WIFEXITED(status):
        return Stop(status, True, os.WEXITSTATUS(status), None, 0)
    if os.WIFSIGNALED(status):
        return Stop(status, True, None, os.WTERMSIG(status), 0)
    return Stop(status, False, None, os.WSTOPSIG(status), (status >> 16) & 0xFF)


def wait(pid: int, nohang: bool = False) -> Stop | None:
    """`waitpid(pid, __WALL)`, decoded; None when `nohang` and nothing changed."""
    global _round_trips
    flags = WALL | (os.WNOHANG if nohang else 0)
    got, status = os.waitpid(pid, flags)
    if got == 0:
        return None
    _round_trips += 1
    return decode_status(status)


# PTRACE_PEEKSIGINFO: not in every libc's headers, stable in the kernel's uapi.
PTRACE_PEEKSIGINFO = 0x4209
PEEKSIGINFO_SHARED = 1
SIGINFO_SIZE = 128
_PEEK_BATCH = 32


def peek_siginfo(pid: int, shared: bool = False) -> list[bytes]:
    """The siginfo of every signal pending for thread `pid` (its own queue), or with `shared` for
    its whole process, oldest first; nothing is dequeued."""
    args = ffi.new("uint64_t[2]")  # struct ptrace_peeksiginfo_args { u64 off; u32 flags; s32 nr; }
    buf = ffi.new("char[]", SIGINFO_SIZE * _PEEK_BATCH)
    found: list[bytes] = []
    while True:
        args[0] = len(found)
        args[1] = (PEEKSIGINFO_SHARED if shared else 0) | (_PEEK_BATCH << 32)
        # Safety: `args` and `buf` are owned by this frame and outlive the call.
        got = int(
            lib.thaw_ptrace(PTRACE_PEEKSIGINFO, pid, int(ffi.cast("uintptr_t", args)), int(ffi.cast("uintptr_t", buf)))
        )
        if got == -1:
            raise_oserror("ptrace", f"PTRACE_PEEKSIGINFO pid {pid}")
        if got == 0:
            return found
        found += [bytes(ffi.buffer(buf + i * SIGINFO_SIZE, SIGINFO_SIZE)) for i in range(got)]

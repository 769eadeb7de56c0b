"""Threads: every thread of a guest but the main one, captured and recreated (DESIGN.md, "Threads").

Both sides of the resource live here: `read_threads` reads every thread of a seized guest,
`restore_main` writes the ops by which the main thread (the stub, which keeps its own TID) sets
its own state, and `ThreadPlan` the restorer's part that recreates the others
(native/src/restorer.h, THAW_OP_THREADS). The main thread's registers, xstate and signal mask are
set by the tracer as it lets the instance go (native/tracer.py, end_restore).

Some facts about Linux threads this rests on:

- Much of a thread's state is its own, not the process's: registers and xstate (fs_base, the
  TLS pointer, among the registers), the signal mask, signals queued to the thread itself, the
  alternate signal stack, the tid address (CLONE_CHILD_CLEARTID), the robust futex list, the rseq
  registration, the name (comm), the CPU affinity, and the credentials (uid/gid, capabilities,
  no_new_privs) and seccomp filter. The credentials a new thread starts with are its maker's
  (snapshot/credentials.py drops the main thread's before it makes the others); the rest is read
  here and set again by the thread itself (the affinity by the main thread, once it is out).
- glibc caches each thread's TID in its `struct pthread` (pthread_kill, mutex owners, robust
  futexes use it): a thread must come back with its TID. clone3's `set_tid` gives it that TID in
  the instance's pid namespace (CAP_CHECKPOINT_RESTORE, which the stub has until the restore drops
  it), and fails with EEXIST when the TID is taken: the restore then names the thread.
- A thread parked inside a syscall shows rax = -ERESTART*: it re-runs the syscall after the thaw
  (rip -= 2, rax = orig_rax), as a signal would have had it do. A futex wait, read, poll or select
  resumes; an absolute-deadline sleep (Python's time.sleep is clock_nanosleep TIMER_ABSTIME on the
  monotonic clock, the same clock in every instance of this machine) ends no later than it would
  have; a relative one (-ERESTART_RESTARTBLOCK) returns EINTR, which Python retries (PEP 475)
  with the time left.
- A new thread returns to its captured state through rt_sigreturn: one syscall sets every
  register (but fs_base: clone3 sets it), the xstate (XRSTOR from the frame's fpstate: the XSAVE
  image ptrace gave, whose software-reserved bytes hold XCR0 there and struct _fpx_sw_bytes with
  FP_XSTATE_MAGIC1 in a frame, with FP_XSTATE_MAGIC2 after it), the signal mask and the
  alternate stack.
  The frame goes below the thread's captured stack pointer, past the 128-byte red zone: memory
  the thread does not use.
- A thread inside vfork (its parent side) or clone cannot be captured: re-running that syscall
  would start a second child. The capture refuses it, naming the thread.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from native import ptrace
from native.constants import Prctl, Syscall
from native.ptrace import Registers
from native.restorer import (
    ARG0_SAVED,
    ARG1_SAVED,
    SAVE,
    STORE32,
    THREAD_FAILED_OP,
    THREADS_FAILED,
    WRITE_ARG0,
    Program,
    ThreadStart,
)
from snapshot import procfs
from snapshot.errors import NotCapturable, RestoreError
from snapshot.inject import RED_ZONE, SyscallInjector, restart_fixup

PAGE = procfs.PAGE
STOP_TIMEOUT = 2.0
STOP_POLL = 0.0005
THREAD_STACK = 16 << 10  # each thread's stack in the scratch area while it sets itself up
SS_DISABLE = 2
SS_ONSTACK = 1
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
UC_FP_XSTATE, UC_SIGCONTEXT_SS, UC_STRICT_RESTORE_SS = 1, 2, 4
SIGINFO_SIZE = 128
_SW_BYTES = struct.Struct("<IIQI")  # struct _fpx_sw_bytes, at offset 464 of the XSAVE image
_SW_BYTES_AT = 464
_XSAVE_MIN = 576  # the legacy area and the XSAVE header
# struct rt_sigframe (x86-64): pretcode, struct ucontext {flags, link, stack_t, sigcontext, sigmask},
# struct siginfo. The sigcontext: r8-r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip, eflags,
# cs, gs, fs, ss, err, trapno, oldmask, cr2, fpstate, reserved[8].
_SIGCONTEXT = struct.Struct("<18Q4H5Q8Q")
_UCONTEXT_HEAD = struct.Struct("<QQQiiQ")
_SIGCONTEXT_REGS: tuple[str, ...] = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SIGCONTEXT_REGS += ("rdi", "rsi", "rbp", "rbx", "rdx", "rax", "rcx", "rsp", "rip", "eflags")
RT_SIGFRAME_SIZE = 8 + _UCONTEXT_HEAD.size + _SIGCONTEXT.size + 8 + SIGINFO_SIZE
# Syscalls that create a process or thread: re-running one after a thaw would create another.
_FORKING = {Syscall.CLONE, Syscall.CLONE3, Syscall.FORK, Syscall.VFORK}


@dataclass(frozen=True)
class ThreadRecord:
    """One thread's own state, as captured."""

    tid: int
    name: str
    registers: dict[str, int]
    xstate: bytes
    sigmask: int
    pending: tuple[bytes, ...]  # siginfo of the signals queued to this thread, oldest first
    altstack: tuple[int, int, int]  # ss_sp, ss_flags, ss_size
    tid_address: int
    robust_list: tuple[int, int]  # head, length
    rseq: tuple[int, int, int]  # pointer, length, signature (pointer 0: none)

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["xstate"] = base64.b64encode(self.xstate).decode()
        doc["pending"] = [base64.b64encode(p).decode() for p in self.pending]
        return doc

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> ThreadRecord:
        return cls(
            tid=int(d["tid"]),
            name=str(d["name"]),
            registers={k: int(v) for k, v in d["registers"].items()},
            xstate=base64.b64decode(d["xstate"]),
            sigmask=int(d["sigmask"]),
            pending=tuple(base64.b64decode(p) for p in d["pending"]),
            altstack=(int(d["altstack"][0]), int(d["altstack"][1]), int(d["altstack"][2])),
            tid_address=int(d["tid_address"]),
            robust_list=(int(d["robust_list"][0]), int(d["robust_list"][1])),
            rseq=(int(d["rseq"][0]), int(d["rseq"][1]), int(d["rseq"][2])),
        )


@dataclass(frozen=True)
class Threads:
    main: ThreadRecord  # its tid is the guest's pid; its name the process's comm
    others: tuple[ThreadRecord, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return {"main": self.main.to_doc(), "others": [t.to_doc() for t in self.others]}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Threads:
        return cls(main=ThreadRecord.from_doc(d["main"]), others=tuple(ThreadRecord.from_doc(t) for t in d["others"]))


# -- capture ------------------------------------------------------------------------------------
def other_threads(pid: int) -> list[int]:
    return [tid for tid, _ in procfs.threads(pid) if tid != pid]


def check_threads(pid: int, tids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    """Every thread stopped. A group stop reaches each thread as it next passes through the
    kernel's signal handling, so a thread may still be on its way when the main one stopped."""
    deadline = time.monotonic() + timeout
    for tid in tids:
        while (state := procfs.state(tid)) not in ("T", "t"):
            if time.monotonic() > deadline:
                raise NotCapturable(f"thread {tid} of pid {pid} is not stopped (state {state})")
            time.sleep(STOP_POLL)


def seize_threads(pid: int, tids: list[int]) -> list[int]:
    """Seize every thread but the main one while the process is group-stopped, so none runs
    when the main thread's seize sends SIGCONT (a traced thread in its stop stays there)."""
    seized = []
    try:
        for tid in tids:
            ptrace.seize(tid)
            seized.append(tid)
            ptrace.interrupt(tid)
            stop = ptrace.wait(tid)
            if stop is None or stop.exited:
                raise NotCapturable(f"thread {tid} of pid {pid} exited while it was seized")
    except BaseException:
        release_threads(seized)
        raise
    return seized


def release_threads(tids: list[int]) -> None:
    """Detach the threads (the caller stops the process first, so they stay parked)."""
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            ptrace.detach(tid)


def read_threads(pid: int, tids: list[int], main: SyscallInjector) -> Threads:
    """Every seized thread's own state. `main` injects into the main thread (which also reads
    each other thread's robust list: get_robust_list takes a TID)."""
    regs = ptrace.getregs(pid)
    main_thread = _read_thread(pid, pid, regs, main, main)
    others = []
    for tid in tids:
        with SyscallInjector(tid) as own:
            others.append(_read_thread(pid, tid, ptrace.getregs(tid), own, main))
    return Threads(main=main_thread, others=tuple(others))


def _read_thread(pid: int, tid: int, regs: Registers, own: SyscallInjector, main: SyscallInjector) -> ThreadRecord:
    """Registers are read before any injection (`own` puts them back as they were)."""
    refuse_forking(pid, tid, regs)
    rseq = ptrace.get_rseq_configuration(tid)
    own.call_ok(Syscall.SIGALTSTACK, 0, own.scratch, what=f"sigaltstack of thread {tid}")
    sp, flags, _pad, size = struct.unpack("<QiiQ", own.read_scratch(24))
    own.call_ok(Syscall.PRCTL, Prctl.GET_TID_ADDRESS, own.scratch, what=f"PR_GET_TID_ADDRESS of thread {tid}")
    (tid_address,) = struct.unpack("<Q", own.read_scratch(8))
    inner = namespace_tid(pid, tid)
    target = 0 if tid == pid else inner  # get_robust_list reads a TID in the guest's pid namespace
    main.call_ok(Syscall.GET_ROBUST_LIST, target, main.scratch, main.scratch + 8, what=f"get_robust_list of {inner}")
    head, length = struct.unpack("<QQ", main.read_scratch(16))
    return ThreadRecord(
        tid=inner,
        name=Path(f"/proc/{pid}/task/{tid}/comm").read_text().rstrip("\n"),
        registers=vars(regs).copy(),
        xstate=ptrace.get_xstate(tid),
        sigmask=ptrace.getsigmask(tid),
        pending=tuple(ptrace.peek_siginfo(tid)),
        altstack=(sp, flags, size),
        tid_address=tid_address,
        robust_list=(head, length),
        rseq=(rseq.abi_pointer, rseq.abi_size, rseq.signature),
    )


def namespace_tid(pid: int, tid: int) -> int:
    """Thread `tid`'s TID in the guest's own pid namespace (the last of NSpid): what glibc cached,
    and what the restore gives the thread back in the instance's namespace."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return tid


def refuse_forking(pid: int, tid: int, regs: Registers) -> None:
    rax = regs.rax - (1 << 64) if regs.rax >= 1 << 63 else regs.rax
    if -516 <= rax <= -512 and regs.orig_rax in _FORKING:
        call = Syscall(regs.orig_rax).name.lower()
        raise NotCapturable(
            f"thread {tid} of pid {pid} is inside {call} (waiting for a child it started): "
            "a thaw would start that child again; capture once it has returned"
        )


# -- restore ------------------------------------------------------------------------------------
@dataclass
class ThreadPlan:
    """The restorer's part for the other threads: where their program stacks go in the scratch
    area, and the block THAW_OP_THREADS and THAW_OP_THREADS_GO take."""

    threads: tuple[ThreadRecord, ...]
    op_index: int = -1  # THAW_OP_THREADS's index in the main program
    block: int = 0  # address of struct thaw_threads
    entries: tuple[int, ...] = ()  # address of each struct thaw_thread
    whats: tuple[list[str], ...] = ()  # each thread's op descriptions

    @property
    def stacks_size(self) -> int:
        return len(self.threads) * THREAD_STACK

    def add(
        self,
        p: Program,
        stacks_at: int,
        syscall_insn: int,
        scratch: tuple[int, int],
        vmas: list[tuple[int, int]],
        own_state: Callable[[Program], None],
    ) -> None:
        """Add THAW_OP_THREADS to `p`. `own_state(sub)` writes what every thread sets the same way
        as the main one (what is left of its credential drop) into the thread's program `sub`."""
        starts, whats = [], []
        for i, t in enumerate(self.threads):
            sub = p.subprogram()
            _thread_program(sub, t)
            own_state(sub)
            frame_at, frame, sigreturn_sp = _frame(t, vmas)
            regs = Registers(**t.registers)
            stack = stacks_at + i * THREAD_STACK
            starts.append(
                ThreadStart(t.tid, regs.fs_base, t.tid_address, stack, THREAD_STACK, sub, frame, frame_at, sigreturn_sp)
            )
            whats.append(sub.what)
        names = ", ".join(f"{t.tid} ({t.name})" for t in self.threads)
        self.op_index = len(p.ops)
        self.block, entries = p.threads(starts, syscall_insn, scratch, what=f"recreating threads {names}")
        self.entries, self.whats = tuple(entries), tuple(whats)

    def go(self, p: Program) -> None:
        p.threads_go(self.block, what="letting the threads run")

    def describe_failure(self, read: Any) -> str:
        """Which thread failed and at which step; `read(address, length)` reads the stub."""
        failed = struct.unpack("<q", read(self.block + THREADS_FAILED, 8))[0]
        if not 0 <= failed < len(self.threads):
            return "recreating the threads"
        t = self.threads[failed]
        failed_op, result = struct.unpack("<qq", read(self.entries[failed] + THREAD_FAILED_OP, 16))
        if failed_op < 0:
            taken = " (its TID is taken in this pid namespace)" if result == -17 else ""
            return f"creating thread {t.tid} ({t.name}) with its TID{taken}"
        whats = self.whats[failed]
        step = whats[failed_op] if failed_op < len(whats) else "?"
        return f"thread {t.tid} ({t.name}): {step}"


def _own_state(p: Program, t: ThreadRecord) -> None:
    """Robust list, rseq and name: what every thread registers for itself."""
    head, length = t.robust_list
    if head:
        p.syscall(Syscall.SET_ROBUST_LIST, head, length, what="set_robust_list")
    pointer, size, signature = t.rseq
    if pointer:
        p.syscall(Syscall.RSEQ, pointer, size, 0, signature, what="registering rseq", flags=WRITE_ARG0)
    p.syscall(Syscall.PRCTL, Prctl.SET_NAME, p.cstr(t.name[:15]), what="PR_SET_NAME")


def _queue_own_pending(p: Program, t: ThreadRecord, main: bool) -> None:
    """The signals that were queued to thread `t`, queued again by the thread itself (a thread
    may queue a siginfo of any si_code only to itself: rt_tgsigqueueinfo refuses others). The
    main thread's TID is its pid; another keeps its captured TID."""
    if not t.pending:
        return
    p.syscall(Syscall.GETPID, what="getpid", flags=SAVE)
    tid, flags = (0, ARG0_SAVED | ARG1_SAVED) if main else (t.tid, ARG0_SAVED)
    for info in t.pending:
        signo = struct.unpack_from("<i", info)[0]
        what = f"queueing {'the main thread' if main else 'its'} pending {_signal_name(signo)}"
        p.syscall(Syscall.RT_TGSIGQUEUEINFO, 0, tid, signo, p.put(info), what=what, flags=flags)


def _thread_program(p: Program, t: ThreadRecord) -> None:
    """What a new thread sets of its own before the credentials."""
    _own_state(p, t)
    _queue_own_pending(p, t, main=False)


def restore_main(p: Program, t: ThreadRecord) -> None:
    """What the main thread (the stub, with a TID of its own) sets of its own state in the
    restorer: tid address (and glibc's cached TID, the new one), robust list, rseq, name, the
    alternate stack, and the signals that were queued to it (queued while every signal is still
    blocked: the tracer sets the captured mask last)."""
    if t.tid_address:  # glibc caches the tid where set_tid_address points: give it the new one
        p.syscall(Syscall.SET_TID_ADDRESS, t.tid_address, what="set_tid_address", flags=STORE32, store=t.tid_address)
    _own_state(p, t)
    sp, flags, stack_size = t.altstack
    if not flags & SS_DISABLE:
        stack = p.put(struct.pack("<QiiQ", sp, flags & ~SS_ONSTACK, 0, stack_size))
        p.syscall(Syscall.SIGALTSTACK, stack, 0, what="sigaltstack")
    _queue_own_pending(p, t, main=True)


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


def _frame(t: ThreadRecord, vmas: list[tuple[int, int]]) -> tuple[int, bytes, int]:
    """(where the frame goes, the frame, the stack pointer rt_sigreturn wants) for thread `t`:
    its fpstate (64-byte aligned, FP_XSTATE_MAGIC2 after it) then struct rt_sigframe, below its
    captured stack pointer and red zone."""
    regs = restart_fixup(Registers(**t.registers))
    if len(t.xstate) < _XSAVE_MIN:
        raise RestoreError(f"thread {t.tid}'s xstate is {len(t.xstate)} bytes: not an XSAVE image")
    # ptrace leaves XCR0 in the software-reserved bytes; a signal frame has struct _fpx_sw_bytes there
    (xcr0,) = struct.unpack_from("<Q", t.xstate, _SW_BYTES_AT)
    size = len(t.xstate)
    sw_bytes = _SW_BYTES.pack(FP_XSTATE_MAGIC1, size + 4, xcr0, size)
    fpstate = t.xstate[:_SW_BYTES_AT] + sw_bytes + t.xstate[_SW_BYTES_AT + len(sw_bytes) :]
    fpstate += struct.pack("<I", FP_XSTATE_MAGIC2)
    sigframe_at = _round_up(len(fpstate), 16)
    size = sigframe_at + RT_SIGFRAME_SIZE
    below = (regs.rsp - RED_ZONE - size) & ~63
    # A frame across two pages costs two copy-on-write faults as the thread writes it: one page
    # lower, it fits in one (the lower of the two; below the stack pointer, nothing is in use).
    one_page = below & ~(PAGE - 1) if size <= PAGE and below // PAGE != (below + size - 1) // PAGE else below
    for frame_at in (one_page, below):
        if any(start <= frame_at and regs.rsp <= end for start, end in vmas):
            break
    else:
        raise RestoreError(f"thread {t.tid}'s stack has no room below its stack pointer {regs.rsp:#x} for its frame")
    sp, flags, stack_size = t.altstack
    uc_stack = (sp, SS_DISABLE, 0) if flags & SS_DISABLE else (sp, flags & ~SS_ONSTACK, stack_size)
    sigcontext = _SIGCONTEXT.pack(
        *(getattr(regs, name) for name in _SIGCONTEXT_REGS),
        regs.cs,
        regs.gs,
        regs.fs,
        regs.ss,
        0,  # err
        0,  # trapno
        0,  # oldmask
        0,  # cr2
        frame_at,  # fpstate: the XSAVE image at the frame's start
        *([0] * 8),
    )
    uc_flags = UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
    ucontext = _UCONTEXT_HEAD.pack(uc_flags, 0, uc_stack[0], uc_stack[1], 0, uc_stack[2]) + sigcontext
    sigframe = struct.pack("<Q", 0) + ucontext + struct.pack("<Q", t.sigmask) + bytes(SIGINFO_SIZE)
    frame = fpstate.ljust(sigframe_at, b"\0") + sigframe
    return frame_at, frame, frame_at + sigframe_at + 8


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to

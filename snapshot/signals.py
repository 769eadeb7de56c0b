"""Signals of the process: its handlers and what is queued to the process as a whole, captured and
set again. What is each thread's own (its mask, its queue, its alternate stack) is in
snapshot/threads.py.

Handlers are read by injected rt_sigaction calls (the kernel's struct sigaction, 32 bytes on
x86-64: handler, flags, restorer, mask) and set by the restorer the same way; SIGKILL and SIGSTOP
have none. Signals queued to the process (not to one thread) are read with PTRACE_PEEKSIGINFO's
shared queue and queued again with rt_sigqueueinfo, which lets a process queue to itself any
siginfo (si_code included) it held.
"""

from __future__ import annotations

import base64
import signal
import struct
from dataclasses import dataclass
from typing import Any

from native import ptrace
from native.constants import Syscall
from native.restorer import ARG0_SAVED, SAVE, Program
from snapshot.inject import SyscallInjector

NSIG = 64
SIGACTION_SIZE = 32


@dataclass(frozen=True)
class Signals:
    actions: dict[int, bytes]  # signal -> the kernel's struct sigaction
    shared_pending: tuple[bytes, ...] = ()  # siginfo queued to the process, oldest first

    def to_doc(self) -> dict[str, Any]:
        return {
            "actions": {str(k): base64.b64encode(v).decode() for k, v in self.actions.items()},
            "shared_pending": [base64.b64encode(p).decode() for p in self.shared_pending],
        }

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Signals:
        return cls(
            actions={int(k): base64.b64decode(v) for k, v in d["actions"].items()},
            shared_pending=tuple(base64.b64decode(p) for p in d["shared_pending"]),
        )


def name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


def read_signals(pid: int, inj: SyscallInjector) -> Signals:
    actions = {}
    for sig in range(1, NSIG + 1):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue  # fixed by the kernel
        inj.call_ok(Syscall.RT_SIGACTION, sig, 0, inj.scratch, 8, what=f"rt_sigaction({sig})")
        actions[sig] = inj.read_scratch(SIGACTION_SIZE)
    return Signals(actions=actions, shared_pending=tuple(ptrace.peek_siginfo(pid, shared=True)))


def restore_signals(p: Program, signals: Signals) -> None:
    for sig, act in sorted(signals.actions.items()):
        p.syscall(Syscall.RT_SIGACTION, sig, p.put(act), 0, 8, what=f"rt_sigaction({name(sig)})")


def queue_shared(p: Program, signals: Signals) -> None:
    """The process's pending signals, queued again (while every signal is still blocked)."""
    if not signals.shared_pending:
        return
    p.syscall(Syscall.GETPID, what="getpid", flags=SAVE)
    for info in signals.shared_pending:
        signo = struct.unpack_from("<i", info)[0]
        what = f"queueing the process's pending {name(signo)}"
        p.syscall(Syscall.RT_SIGQUEUEINFO, 0, signo, p.put(info), what=what, flags=ARG0_SAVED)

"""Credentials and confinement: who the instance runs as, captured and dropped to.

A stub starts privileged (its restore needs CAP_SYS_RESOURCE for PR_SET_MM_MAP, CAP_SYS_ADMIN or
CAP_CHECKPOINT_RESTORE for clone3's set_tid); every thread of the instance ends with the
template's uid and gid (as the host sees them), no capabilities, an empty bounding set and
no_new_privs. Credentials are per thread in the kernel, and a thread made by clone starts with
its maker's: so the main thread drops its ids, groups and bounding set and sets no_new_privs
before it makes the other threads, keeping only the capabilities that making them takes
(PR_SET_KEEPCAPS carries them across setresuid), and each new thread, sharing those credentials,
has only those capabilities left to drop, one capset instead of five syscalls (a setresuid to
another uid commits new credentials, with their accounting, each time). The seccomp filter the
caller passes (native.seccomp) is per thread too; the main thread installs it with
SECCOMP_FILTER_FLAG_TSYNC, which puts it on every thread at once while the others still wait in
the restorer. The filter goes last: the kernel filters every later syscall, injected ones
included, and installing it needs no_new_privs first. Dumpability (who may ptrace the process,
whether /proc shows its files to its own uid) is the process's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from native import seccomp
from native.constants import Prctl, Syscall
from native.restorer import Program

CAPABILITY_VERSION_3 = 0x20080522
SECCOMP_FILTER_FLAG_TSYNC = 1


class Capability(IntEnum):  # linux/capability.h
    SYS_ADMIN = 21
    CHECKPOINT_RESTORE = 40


@dataclass(frozen=True)
class Credentials:
    uid: tuple[int, int, int]  # real, effective, saved
    gid: tuple[int, int, int]
    groups: tuple[int, ...]
    dumpable: int = 1

    def to_doc(self) -> dict[str, Any]:
        return {"uid": list(self.uid), "gid": list(self.gid), "groups": list(self.groups), "dumpable": self.dumpable}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Credentials:
        uid, gid = [int(x) for x in d["uid"]], [int(x) for x in d["gid"]]
        return cls(
            uid=(uid[0], uid[1], uid[2]),
            gid=(gid[0], gid[1], gid[2]),
            groups=tuple(int(g) for g in d["groups"]),
            dumpable=int(d["dumpable"]),
        )


def read_credentials(pid: int, dumpable: int) -> Credentials:
    """From /proc/PID/status; `dumpable` from an injected PR_GET_DUMPABLE (/proc has none)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    uid = [int(x) for x in status["Uid"].split()]
    gid = [int(x) for x in status["Gid"].split()]
    groups = tuple(int(g) for g in status["Groups"].split())
    return Credentials(uid=(uid[0], uid[1], uid[2]), gid=(gid[0], gid[1], gid[2]), groups=groups, dumpable=dumpable)


class Confinement:
    """Writes the ops that drop a thread's privileges and install the filter. One copy of the
    filter in the restorer's image serves every thread."""

    def __init__(self, p: Program, credentials: Credentials, bpf: bytes | None) -> None:
        self.p, self.c, self.bpf = p, credentials, bpf
        self._fprog = 0

    def drop_bounding_set(self, p: Program) -> None:
        """Empty the capability bounding set. Threads made after it inherit the empty set: the
        main thread does it before it makes them (its capabilities stay until `drop`)."""
        p.drop_bounding_set(_cap_last_cap(), what="dropping the capability bounding set")

    def drop(self, p: Program, keep: tuple[Capability, ...] = ()) -> None:
        """The calling thread's credentials: the template's ids, no capabilities but `keep`,
        no_new_privs (its bounding set is empty already: `drop_bounding_set`)."""
        c = self.c
        groups = p.put(struct.pack(f"<{len(c.groups)}I", *c.groups)) if c.groups else 0
        p.syscall(Syscall.SETGROUPS, len(c.groups), groups, what="setgroups")
        p.syscall(Syscall.SETRESGID, *c.gid, what=f"setresgid{c.gid}")
        if keep:  # else leaving uid 0 empties the permitted set
            p.syscall(Syscall.PRCTL, Prctl.SET_KEEPCAPS, 1, 0, 0, 0, what="PR_SET_KEEPCAPS")
        p.syscall(Syscall.SETRESUID, *c.uid, what=f"setresuid{c.uid}")
        if keep:  # securebits are inherited: the threads must not start with it set
            p.syscall(Syscall.PRCTL, Prctl.SET_KEEPCAPS, 0, 0, 0, 0, what="clearing PR_SET_KEEPCAPS")
        self.capabilities(p, keep)
        p.syscall(Syscall.PRCTL, Prctl.SET_NO_NEW_PRIVS, 1, 0, 0, 0, what="PR_SET_NO_NEW_PRIVS")

    def capabilities(self, p: Program, keep: tuple[Capability, ...] = ()) -> None:
        """Effective and permitted sets = `keep`, inheritable empty."""
        mask = sum(1 << cap for cap in set(keep))
        data = struct.pack("<6I", mask & 0xFFFF_FFFF, mask & 0xFFFF_FFFF, 0, mask >> 32, mask >> 32, 0)
        header = p.put(struct.pack("<Ii", CAPABILITY_VERSION_3, 0))
        what = "keeping only " + ", ".join(f"CAP_{cap.name}" for cap in keep) if keep else "clearing capabilities"
        p.syscall(Syscall.CAPSET, header, p.put(data), what=what)

    def for_making_threads(self, p: Program) -> None:
        """The main thread's drop before it makes the other threads: all but the capability
        clone3's set_tid takes, which `thread` and `threads_made` drop. Made under the template's
        uid, the threads count against its RLIMIT_NPROC, as those the function starts itself do."""
        last = _cap_last_cap()  # a kernel older than 5.9 knows no CAP_CHECKPOINT_RESTORE
        set_tid = Capability.CHECKPOINT_RESTORE if last >= Capability.CHECKPOINT_RESTORE else Capability.SYS_ADMIN
        self.drop(p, keep=(set_tid,))

    def threads_made(self, p: Program) -> None:
        self.capabilities(p)

    def dumpable(self, p: Program, value: int | None = None) -> None:
        value = self.c.dumpable if value is None else value
        p.syscall(Syscall.PRCTL, Prctl.SET_DUMPABLE, value, what="PR_SET_DUMPABLE")

    def filter(self, p: Program, every_thread: bool = False) -> None:
        """The seccomp filter, last: it judges every later syscall, injected ones too. With
        `every_thread`, SECCOMP_FILTER_FLAG_TSYNC puts the one filter on every thread of the
        process at once (and no_new_privs with it): attaching a filter costs ~80 us, once instead
        of once per thread. The other threads are waiting in the restorer, unfiltered until then."""
        if self.bpf is None:
            return
        if not self._fprog:
            self._fprog = self.p.put(seccomp.sock_fprog(self.p.put(self.bpf), self.bpf))
        flags = SECCOMP_FILTER_FLAG_TSYNC if every_thread else 0
        what = "installing the seccomp filter" + (" on every thread" if every_thread else "")
        p.syscall(Syscall.SECCOMP, seccomp.SET_MODE_FILTER, flags, self._fprog, what=what)

    def thread(self, p: Program) -> None:
        """What a thread other than the main one drops for itself: the capabilities it was made
        with (its ids, groups, bounding set and no_new_privs are the main thread's already; the
        main thread's filter reaches it by TSYNC)."""
        self.capabilities(p)


def _cap_last_cap() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())

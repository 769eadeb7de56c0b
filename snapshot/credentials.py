"""Credentials and confinement: who the instance runs as, captured and dropped to.

A stub starts privileged (its restore needs CAP_SYS_RESOURCE for PR_SET_MM_MAP, CAP_SYS_ADMIN or
CAP_CHECKPOINT_RESTORE for clone3's set_tid); every thread of the instance then drops, itself,
to the template's uid and gid (as the host sees them) with no capabilities, an empty bounding set
and no_new_privs: credentials are per thread in the kernel. The seccomp filter the caller passes
(native.seccomp) is per thread too; the main thread installs it with SECCOMP_FILTER_FLAG_TSYNC,
which puts it on every thread at once while the others still wait in the restorer. The filter
goes last: the kernel filters every later syscall, injected ones included, and installing it
needs no_new_privs first. Dumpability (who may ptrace the process, whether /proc shows its files
to its own uid) is the process's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from native import seccomp
from native.constants import Prctl, Syscall
from native.restorer import Program

CAPABILITY_VERSION_3 = 0x20080522
SECCOMP_FILTER_FLAG_TSYNC = 1


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

    def drop(self, p: Program) -> None:
        """The calling thread's credentials: no capabilities, the template's ids, no_new_privs
        (its bounding set is empty already: `drop_bounding_set`)."""
        c = self.c
        groups = p.put(struct.pack(f"<{len(c.groups)}I", *c.groups)) if c.groups else 0
        p.syscall(Syscall.SETGROUPS, len(c.groups), groups, what="setgroups")
        p.syscall(Syscall.SETRESGID, *c.gid, what=f"setresgid{c.gid}")
        p.syscall(Syscall.SETRESUID, *c.uid, what=f"setresuid{c.uid}")
        header = p.put(struct.pack("<Ii", CAPABILITY_VERSION_3, 0))
        p.syscall(Syscall.CAPSET, header, p.put(bytes(24)), what="clearing capabilities")
        p.syscall(Syscall.PRCTL, Prctl.SET_NO_NEW_PRIVS, 1, 0, 0, 0, what="PR_SET_NO_NEW_PRIVS")

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
        """What a thread other than the main one drops for itself (the main thread's filter
        reaches it by TSYNC)."""
        self.drop(p)


def _cap_last_cap() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())

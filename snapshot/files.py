"""Files and fds: the files a template maps or keeps open, and the fd table, captured and rebuilt.

Files (`Files`): every file the restored image maps from the original (text, rodata, read-only
shared mappings) and the executable, recorded by identity (device, inode, size, mtime as the
host sees them). A restore holds each open at a restore fd and refuses to run the instance if one
changed (snapshot/template.py checks them, by fstat, while the restorer runs). This works because
sandboxes show host files at the same paths through bind mounts: same device and inode.

Fds (`Fds`): the fd table but stdio and the control socket (fd 3), which come from the stub:
regular files and directories are opened again at their path with their flags and position;
pipes whose both ends the process holds are made anew (empty: a pipe with unread bytes is
refused, as is one whose other end is elsewhere); anything else (sockets, eventfds, epoll,
devices) is refused with the fds named.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from native.constants import Syscall
from native.restorer import Program
from snapshot.errors import NotCapturable
from snapshot.inject import SyscallInjector

CONTROL_FD = 3
FIONREAD = 0x541B
# Flags that only matter when a file is first opened; reopening with them would change the file.
_OPEN_ONLY_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY


@dataclass(frozen=True)
class FileIdentity:
    """A file a template maps from its original (text, rodata) or keeps open."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int

    def describe_change(self, st_dev: int, st_ino: int, st_size: int, st_mtime_ns: int) -> str | None:
        if (st_dev, st_ino) != (self.dev, self.ino):
            return f"{self.path} is another file now (device/inode {st_dev}/{st_ino}, captured {self.dev}/{self.ino})"
        if (st_size, st_mtime_ns) != (self.size, self.mtime_ns):
            return f"{self.path} was modified since the capture (size {st_size}, captured {self.size})"
        return None


@dataclass(frozen=True)
class Files:
    identities: tuple[FileIdentity, ...]
    exe: int  # index of the executable in `identities`

    def to_doc(self) -> dict[str, Any]:
        return {"identities": [vars(f) for f in self.identities], "exe": self.exe}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Files:
        return cls(identities=tuple(FileIdentity(**f) for f in d["identities"]), exe=int(d["exe"]))


@dataclass(frozen=True)
class FdRecord:
    fd: int
    path: str
    flags: int
    pos: int


@dataclass(frozen=True)
class PipeRecord:
    """A pipe the process holds both ends of: made anew (empty) at restore, each end at its fds."""

    read: tuple[tuple[int, int], ...]  # (fd, flags) of every fd of the read end
    write: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Fds:
    paths: tuple[FdRecord, ...] = ()
    pipes: tuple[PipeRecord, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        pipes = [{"read": list(p.read), "write": list(p.write)} for p in self.pipes]
        return {"paths": [vars(r) for r in self.paths], "pipes": pipes}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Fds:
        return cls(
            paths=tuple(FdRecord(**r) for r in d["paths"]),
            pipes=tuple(PipeRecord(read=_ends(p["read"]), write=_ends(p["write"])) for p in d["pipes"]),
        )

    def numbers(self) -> list[int]:
        return [r.fd for r in self.paths] + [fd for pipe in self.pipes for fd, _ in pipe.read + pipe.write]


def _ends(raw: list[list[int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(fd), int(flags)) for fd, flags in raw)


# -- capture ------------------------------------------------------------------------------------
class FileTable:
    """Identities of the files a capture meets, each once (by device and inode)."""

    def __init__(self) -> None:
        self.identities: list[FileIdentity] = []
        self._index: dict[tuple[int, int], int] = {}

    def index(self, stat_path: str, path: str) -> int:
        """The index of the file at `stat_path` (a /proc path to it), recorded under `path`."""
        st = os.stat(stat_path)
        key = (st.st_dev, st.st_ino)
        if key not in self._index:
            self._index[key] = len(self.identities)
            self.identities.append(FileIdentity(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return self._index[key]

    def files(self, pid: int) -> Files:
        """The table with the executable of `pid` last."""
        exe = self.index(f"/proc/{pid}/exe", os.readlink(f"/proc/{pid}/exe"))
        return Files(identities=tuple(self.identities), exe=exe)


def _fdinfo(pid: int, fd: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def read_fds(pid: int, inj: SyscallInjector) -> Fds:
    """Path fds to reopen at restore, and pipes the process holds both ends of (made anew);
    stdio and the control socket come from the stub."""
    records, unknown = [], []
    pipes: dict[str, list[tuple[int, int]]] = {}
    for entry in sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda p: int(p.name)):
        fd = int(entry.name)
        target = os.readlink(entry)
        if fd <= CONTROL_FD:
            continue
        try:
            mode = os.stat(entry).st_mode
        except OSError:
            mode = 0
        if target.startswith("/") and not target.endswith(" (deleted)") and (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            info = _fdinfo(pid, fd)
            flags = int(info["flags"], 8) & ~_OPEN_ONLY_FLAGS
            records.append(FdRecord(fd=fd, path=target, flags=flags, pos=int(info["pos"])))
        elif target.startswith("pipe:[") and stat.S_ISFIFO(mode):
            pipes.setdefault(target, []).append((fd, int(_fdinfo(pid, fd)["flags"], 8)))
        else:
            unknown.append(f"fd {fd} -> {target}")
    if unknown:
        raise NotCapturable(
            f"pid {pid} has fds a restore cannot recreate: {', '.join(unknown)} (only stdio, the control "
            "socket on fd 3, regular files, directories and pipes whose both ends it holds are kept)"
        )
    return Fds(paths=tuple(records), pipes=tuple(_pipe(pid, name, ends, inj) for name, ends in pipes.items()))


def _pipe(pid: int, name: str, ends: list[tuple[int, int]], inj: SyscallInjector) -> PipeRecord:
    """A pipe both of whose ends the process holds, and that holds no unread bytes (a new pipe is
    made at restore: what the old one buffered is not carried over)."""
    read = tuple((fd, flags) for fd, flags in ends if flags & os.O_ACCMODE == os.O_RDONLY)
    write = tuple((fd, flags) for fd, flags in ends if flags & os.O_ACCMODE == os.O_WRONLY)
    fds = ", ".join(str(fd) for fd, _ in ends)
    if not read or not write:
        raise NotCapturable(
            f"pid {pid} holds only one end of {name} (fd {fds}): a restore makes only pipes whose both ends "
            "it holds (the other end is closed, or in another process)"
        )
    inj.call_ok(Syscall.IOCTL, read[0][0], FIONREAD, inj.scratch, what=f"FIONREAD of fd {read[0][0]}")
    (unread,) = struct.unpack("<i", inj.read_scratch(4))
    if unread:
        raise NotCapturable(f"pid {pid}'s {name} (fd {fds}) holds {unread} unread bytes: capture it once they are read")
    return PipeRecord(read=read, write=write)


# -- restore ------------------------------------------------------------------------------------
def restore_fds(p: Program, fds: Fds, restore_fds: tuple[int, int]) -> None:
    """Pipes made anew, paths opened again, each at its fd; then the restore fds
    [first, last] closed: nothing of the restore stays open in the instance."""
    spare = max(fds.numbers(), default=CONTROL_FD) + 1  # above every fd the instance will hold: free for moves
    for pipe in fds.pipes:
        numbers = ", ".join(str(fd) for fd, _ in pipe.read + pipe.write)
        p.pipe(pipe.read[0], pipe.write[0], spare, what=f"making a pipe anew as fds {numbers}")
        for (first, _), others in ((pipe.read[0], pipe.read[1:]), (pipe.write[0], pipe.write[1:])):
            for fd, flags in others:
                p.syscall(Syscall.DUP3, first, fd, flags & os.O_CLOEXEC, what=f"duplicating fd {first} as {fd}")
    for rec in fds.paths:
        p.open_fd(rec.path, rec.flags, rec.fd, rec.pos, what=f"reopening fd {rec.fd} ({rec.path})")
    first, last = restore_fds
    p.syscall(Syscall.CLOSE_RANGE, first, last, 0, what="closing the restore fds")

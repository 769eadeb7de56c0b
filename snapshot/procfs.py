"""What /proc tells about a process that capture needs: its mappings, which of their pages
exist, its threads and its run state.

Some facts about /proc that shape this module:

- `maps` lists every VMA; a private file VMA that was written (RELRO, .data) stays "file-backed"
  there, and only smaps' `Anonymous:` shows how much of it is now private copies.
- `pagemap` has one 64-bit entry per virtual page: bit 63 present, bit 62 swapped. A page that is
  neither was never touched: an anonymous VMA reads zeros there, so capture can skip it; a
  private file VMA reads the file there, so such VMAs are dumped whole. Bit 61 says a present
  page is the file's (page cache) rather than a private copy: in an instance that maps its
  template's segment privately, the pages it has not written are still the template's.
- Special VMAs ([vdso], [vvar], [vvar_vclock], [vsyscall]) belong to the kernel and are never dumped.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import NamedTuple

PAGE = 4096
SPECIAL = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"})
_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62
_PM_FILE = 1 << 61


class Vma(NamedTuple):
    """One line of /proc/PID/maps (a NamedTuple: restores parse the stub's maps on their critical path)."""

    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    dev: str  # "major:minor" as maps prints it (hex)
    inode: int
    path: str  # "" for anonymous memory; "[heap]", "[stack]", a file path, ...

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def special(self) -> bool:
        return self.path in SPECIAL

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and not self.special


def parse_maps_line(line: str) -> Vma:
    fields = line.split(maxsplit=5)
    start, _, end = fields[0].partition("-")
    path = fields[5].strip() if len(fields) > 5 else ""
    return Vma(int(start, 16), int(end, 16), fields[1], int(fields[2], 16), fields[3], int(fields[4]), path)


def read_maps(pid: int) -> list[Vma]:
    fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return [parse_maps_line(line) for line in b"".join(chunks).decode().splitlines()]


def anonymous_bytes(pid: int) -> dict[int, int]:
    """VMA start -> bytes of private (anonymous) pages in it, from smaps."""
    result: dict[int, int] = {}
    current = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            current = int(head.split("-")[0], 16)
        elif head == "Anonymous:":
            result[current] = int(line.split()[1]) * 1024
    return result


def present_ranges(pid: int, start: int, end: int) -> list[tuple[int, int]]:
    """(address, length) runs of pages in [start, end) that are present or swapped out."""
    first, count = start // PAGE, (end - start) // PAGE
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(first * 8)
        raw = f.read(count * 8)
    runs: list[tuple[int, int]] = []
    run_start: int | None = None
    for i, (entry,) in enumerate(struct.iter_unpack("<Q", raw)):
        present = bool(entry & (_PM_PRESENT | _PM_SWAPPED))
        if present and run_start is None:
            run_start = i
        elif not present and run_start is not None:
            runs.append((start + run_start * PAGE, (i - run_start) * PAGE))
            run_start = None
    if run_start is not None:
        runs.append((start + run_start * PAGE, (count - run_start) * PAGE))
    return runs


def private_copies(pid: int, start: int, end: int) -> list[bool]:
    """Per page of [start, end) of a private file mapping: is it a private copy (written since it
    was mapped, or swapped out) rather than the file's page or not yet touched?"""
    entries = _pagemap(pid, start, end)
    return [bool(entry & _PM_SWAPPED) or entry & (_PM_PRESENT | _PM_FILE) == _PM_PRESENT for entry in entries]


def _pagemap(pid: int, start: int, end: int) -> list[int]:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        raw = f.read((end - start) // PAGE * 8)
    return [entry for (entry,) in struct.iter_unpack("<Q", raw)]


def threads(pid: int) -> list[tuple[int, str]]:
    """(tid, comm) of every thread of `pid`."""
    base = Path(f"/proc/{pid}/task")
    return sorted((int(t.name), (t / "comm").read_text().strip()) for t in base.iterdir())


def state(pid: int) -> str:
    """The one-letter run state of /proc/PID/stat ("R", "S", "T" stopped, "t" traced, ...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]

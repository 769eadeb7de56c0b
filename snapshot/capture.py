"""Capture: a parked guest -> a template in the pool (DESIGN.md, "mm-template in user space").

    template = capture(pid, pool, "hello")

The guest must have stopped itself (SIGSTOP after READY). Every thread is seized, read, and
left stopped exactly as it was (it can still be resumed or killed). What is read:

- registers, xstate and rseq through ptrace; brk, every sigaction, the signal mask, the
  alternate stack, the tid address, the robust list and dumpability through injected syscalls;
- mm fields (/proc/PID/stat), auxv, comm, exe, credentials, personality and the fd table;
- every other thread's own state (snapshot/threads.py), and the signals pending for the main
  thread and for the process;
- the VMAs: anonymous memory dumped sparsely (pages never touched are not stored, nor the stack's
  pages below the red zone: dead, though present), private file VMAs that were written dumped
  whole, untouched file VMAs recorded by file identity and mapped from the file again at restore.

Refused, with the cause named: a process (or a thread of it) that is not stopped, a thread inside
vfork or clone, writable shared mappings, mappings of things that are not regular files, fds other
than stdio, the control socket (fd 3) and regular files or directories.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from native import memory, ptrace
from native.constants import Prctl, Prot, Syscall
from shmpool import Pool, UnsupportedMapping
from shmpool.backends import round_up
from snapshot import procfs, threads
from snapshot.errors import NotCapturable
from snapshot.inject import RED_ZONE, InjectionError, SyscallInjector, seize_stopped
from snapshot.manifest import (
    HEADER_SIZE,
    Credentials,
    FdRecord,
    FileIdentity,
    Manifest,
    MmFields,
    PipeRecord,
    Run,
    VmaRecord,
    pack_header,
)
from snapshot.template import Template

PAGE = procfs.PAGE
NSIG = 64
SIGACTION_SIZE = 32  # the kernel's struct sigaction on x86-64: handler, flags, restorer, mask
MERGE_GAP_PAGES = 16  # store small holes between present runs: one mapping instead of two at restore
COPY_CHUNK = 8 << 20
CONTROL_FD = 3
FIONREAD = 0x541B
# Flags that only matter when a file is first opened; reopening with them would change the file.
_OPEN_ONLY_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY


def capture(pid: int, pool: Pool, name: str, mounts: Mapping[str, str] | None = None) -> Template:
    """Capture the stopped, single-threaded process `pid` into template `name` of `pool`.
    `mounts`: where the guest's bind-mounted directories are on this host (see Template.open)."""
    if pool.config.page_size != PAGE:
        raise UnsupportedMapping(
            f"templates need a pool with {PAGE >> 10} KiB pages; the {pool.config.backend} pool has "
            f"{pool.config.page_size >> 10} KiB pages (use a tmpfs, memfd or devdax pool)"
        )
    tids = check_capturable(pid)
    with _seized(pid, tids):
        manifest = _read_process(pid, tids)
        _write_template(pid, pool, name, manifest)
    return Template.open(pool, name, verify=False, mounts=mounts)  # publish read it back and checksummed it


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


# -- reading the process ------------------------------------------------------------------------
def _read_process(pid: int, tids: list[int]) -> Manifest:
    regs = ptrace.getregs(pid)
    threads.refuse_forking(pid, pid, regs)
    xstate = ptrace.get_xstate(pid)
    rseq = ptrace.get_rseq_configuration(pid)
    pending, shared = ptrace.peek_siginfo(pid), ptrace.peek_siginfo(pid, shared=True)
    with SyscallInjector(pid) as inj:
        others = threads.capture_threads(pid, tids, inj)
        brk = inj.call_ok(Syscall.BRK, 0, what="brk(0)")
        sigactions = _sigactions(inj)
        sigmask = _read_u64(inj, Syscall.RT_SIGPROCMASK, 0, 0, inj.scratch, 8, what="rt_sigprocmask")
        altstack = struct.unpack("<QiiQ", _read_out(inj, 24, Syscall.SIGALTSTACK, 0, inj.scratch))
        tid_address = _read_u64(inj, Syscall.PRCTL, Prctl.GET_TID_ADDRESS, inj.scratch, what="PR_GET_TID_ADDRESS")
        head = _read_out(inj, 16, Syscall.GET_ROBUST_LIST, 0, inj.scratch, inj.scratch + 8)
        dumpable = inj.call_ok(Syscall.PRCTL, Prctl.GET_DUMPABLE, what="PR_GET_DUMPABLE")
        syscall_insn = inj.insn
        fds, pipes = _read_fds(pid, inj)
    vmas, files, specials, data_bytes = _plan_vmas(pid, regs.rsp)
    exe = _identity(f"/proc/{pid}/exe", os.readlink(f"/proc/{pid}/exe"))
    files.append(exe)
    return Manifest(
        comm=Path(f"/proc/{pid}/comm").read_text().rstrip("\n"),
        exe=len(files) - 1,
        registers=vars(regs).copy(),
        xstate=xstate,
        sigactions=sigactions,
        sigmask=sigmask,
        altstack=(altstack[0], altstack[1], altstack[3]),
        tid_address=tid_address,
        robust_list=struct.unpack("<QQ", head),
        rseq=(rseq.abi_pointer, rseq.abi_size, rseq.signature),
        personality=int(Path(f"/proc/{pid}/personality").read_text(), 16),
        dumpable=dumpable,
        syscall_insn=syscall_insn,
        mm=_mm_fields(pid, brk),
        auxv=Path(f"/proc/{pid}/auxv").read_bytes(),
        specials=specials,
        vmas=tuple(vmas),
        files=tuple(files),
        fds=tuple(fds),
        pipes=tuple(pipes),
        credentials=_credentials(pid),
        source_pid=pid,
        data_bytes=data_bytes,
        threads=others,
        pending=tuple(pending),
        shared_pending=tuple(shared),
    )


def _read_out(inj: SyscallInjector, length: int, nr: int, *args: int) -> bytes:
    inj.call_ok(nr, *args, what=f"syscall {Syscall(nr).name.lower()}")
    return inj.read_scratch(length)


def _read_u64(inj: SyscallInjector, nr: int, *args: int, what: str) -> int:
    inj.call_ok(nr, *args, what=what)
    value: int = struct.unpack("<Q", inj.read_scratch(8))[0]
    return value


def _sigactions(inj: SyscallInjector) -> dict[int, bytes]:
    result = {}
    for sig in range(1, NSIG + 1):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue  # fixed by the kernel
        inj.call_ok(Syscall.RT_SIGACTION, sig, 0, inj.scratch, 8, what=f"rt_sigaction({sig})")
        result[sig] = inj.read_scratch(SIGACTION_SIZE)
    return result


def _mm_fields(pid: int, brk: int) -> MmFields:
    stat_text = Path(f"/proc/{pid}/stat").read_text()
    fields = stat_text[stat_text.rindex(")") + 2 :].split()

    def field(n: int) -> int:  # proc(5) numbers fields from 1; `fields` starts at field 3
        return int(fields[n - 3])

    return MmFields(
        start_code=field(26),
        end_code=field(27),
        start_data=field(45),
        end_data=field(46),
        start_brk=field(47),
        brk=brk,
        start_stack=field(28),
        arg_start=field(48),
        arg_end=field(49),
        env_start=field(50),
        env_end=field(51),
    )


def _credentials(pid: int) -> Credentials:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    uid = [int(x) for x in status["Uid"].split()]
    gid = [int(x) for x in status["Gid"].split()]
    return Credentials(
        uid=(uid[0], uid[1], uid[2]),
        gid=(gid[0], gid[1], gid[2]),
        groups=tuple(int(g) for g in status["Groups"].split()),
    )


def _identity(stat_path: str, path: str) -> FileIdentity:
    st = os.stat(stat_path)
    return FileIdentity(path=path, dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)


# -- VMAs ---------------------------------------------------------------------------------------
def _prot(vma: procfs.Vma) -> int:
    return (
        (Prot.READ if vma.readable else 0) | (Prot.WRITE if vma.writable else 0) | (Prot.EXEC if vma.executable else 0)
    )


def _regular_file(pid: int, vma: procfs.Vma) -> bool:
    if not vma.file_backed or not vma.path.startswith("/") or vma.path.endswith(" (deleted)"):
        return False
    return stat.S_ISREG(os.stat(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}").st_mode)


def _merged_runs(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in ranges:
        if merged and start - (merged[-1][0] + merged[-1][1]) <= MERGE_GAP_PAGES * PAGE:
            merged[-1] = (merged[-1][0], start + length - merged[-1][0])
        else:
            merged.append((start, length))
    return merged


def _live_stack(ranges: list[tuple[int, int]], rsp: int) -> list[tuple[int, int]]:
    """The present stack pages from the one holding the red zone up: what lies below is dead (the
    ABI lets nothing live there), however deep the stack once went."""
    floor = (rsp - RED_ZONE) & ~(PAGE - 1)
    live = [(max(start, floor), start + length) for start, length in ranges if start + length > floor]
    return [(start, end - start) for start, end in live]


def _plan_vmas(
    pid: int,
    rsp: int,
) -> tuple[list[VmaRecord], list[FileIdentity], dict[str, tuple[int, int]], int]:
    """Decide per VMA: dump (where in the segment) or re-map (from which file)."""
    anonymous = procfs.anonymous_bytes(pid)
    vmas: list[VmaRecord] = []
    files: list[FileIdentity] = []
    file_index: dict[tuple[int, int], int] = {}
    specials: dict[str, tuple[int, int]] = {}
    offset = HEADER_SIZE

    def file_of(vma: procfs.Vma) -> int:
        ident = _identity(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}", vma.path)
        key = (ident.dev, ident.ino)
        if key not in file_index:
            file_index[key] = len(files)
            files.append(ident)
        return file_index[key]

    for vma in procfs.read_maps(pid):
        if vma.path == "[vsyscall]":
            continue
        if vma.special:
            specials[vma.path] = (vma.start, vma.end)
            continue
        regular = _regular_file(pid, vma)
        common: dict[str, Any] = {"start": vma.start, "end": vma.end, "prot": _prot(vma), "name": vma.path}
        if vma.shared:
            if vma.writable:
                raise NotCapturable(f"pid {pid} has a writable shared mapping {vma.start:#x}-{vma.end:#x} {vma.path}")
            if not regular:
                raise NotCapturable(f"pid {pid} maps {vma.path or 'anonymous memory'} shared: only files can be")
            vmas.append(VmaRecord(**common, kind="shared", file=file_of(vma), file_offset=vma.offset))
            continue
        if regular and anonymous.get(vma.start, 0) == 0:
            vmas.append(VmaRecord(**common, kind="file", file=file_of(vma), file_offset=vma.offset))
            continue
        if regular or vma.file_backed:
            ranges = [(vma.start, vma.size)]  # never-present pages of a file VMA read the file
            kind = "dump"
        else:
            ranges = _merged_runs(procfs.present_ranges(pid, vma.start, vma.end))
            if vma.path == "[stack]":
                ranges = _live_stack(ranges, rsp)
            kind = "anon"
        runs = []
        for start, length in ranges:
            runs.append(Run(start, length, offset))
            offset += length
        vmas.append(VmaRecord(**common, kind=kind, runs=tuple(runs), stack=vma.path == "[stack]"))
    return vmas, files, specials, offset - HEADER_SIZE


# -- fds ----------------------------------------------------------------------------------------
def _fdinfo(pid: int, fd: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _read_fds(pid: int, inj: SyscallInjector) -> tuple[list[FdRecord], list[PipeRecord]]:
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
    return records, [_pipe(pid, name, ends, inj) for name, ends in pipes.items()]


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


# -- writing ------------------------------------------------------------------------------------
def _write_template(pid: int, pool: Pool, name: str, manifest: Manifest) -> None:
    raw = manifest.to_json()
    manifest_offset = HEADER_SIZE + manifest.data_bytes
    size = round_up(manifest_offset + len(raw), PAGE)
    with pool.create_segment(name, size, kind="template") as writer:
        writer.write(0, pack_header(manifest_offset, raw))
        for vma in manifest.vmas:
            for run in vma.runs:
                for done in range(0, run.length, COPY_CHUNK):
                    length = min(COPY_CHUNK, run.length - done)
                    writer.write(run.offset + done, memory.read_exact(pid, run.start + done, length))
        writer.write(manifest_offset, raw)
        writer.publish(meta={"comm": manifest.comm, "data_bytes": manifest.data_bytes, "source_pid": pid})

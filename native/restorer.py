"""The restorer blob and the syscall program it runs inside a stub (see src/restorer.h).

`Program` lays out, at a base address chosen in the stub, the blob's code, the data the program
points to (paths, structs), the argument block and the op array:

    base: [blob code][data ...][struct thaw_restorer_args][struct thaw_restorer_op x n]

Every op carries a description, so a failure inside the stub is reported as "mmap of
/usr/lib/x86_64-linux-gnu/libc.so.6 at 0x7f...: Permission denied", not as op 37.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from native._native import ffi, lib

OP = struct.Struct("<IIQ6QQ")
ARGS = struct.Struct("<QQQqqQ")
assert OP.size == ffi.sizeof("struct thaw_restorer_op")
assert ARGS.size == ffi.sizeof("struct thaw_restorer_args")

ALLOW_ERROR = int(lib.THAW_OPF_ALLOW_ERROR)
SAVE = int(lib.THAW_OPF_SAVE)
ARG0_SAVED = int(lib.THAW_OPF_ARG0_SAVED)
STORE32 = int(lib.THAW_OPF_STORE32)
ARG1_SAVED = int(lib.THAW_OPF_ARG1_SAVED)
WRITE_ARG0 = int(lib.THAW_OPF_WRITE_ARG0)
FIRST_RESTORE_FD = int(lib.THAW_FIRST_RESTORE_FD)  # where a stub holds the restore fds
STUB_SCRATCH = int(lib.THAW_STUB_SCRATCH)  # where stubs pre-map the restorer's scratch area
STUB_SCRATCH_SIZE = int(lib.THAW_STUB_SCRATCH_SIZE)
SPECIALS_MAX = int(lib.THAW_SPECIALS_MAX)
SPECIALS_DIFFER = int(lib.THAW_SPECIALS_DIFFER)
_CLEAN = struct.Struct("<QQQQ")
_SPECIAL = struct.Struct("<16sQQ")
_STUB_FACTS = ffi.sizeof("struct thaw_stub_facts")
assert _CLEAN.size + SPECIALS_MAX * _SPECIAL.size + _STUB_FACTS == ffi.sizeof("struct thaw_stub_clean")
STUB_IN_CLEAN = int(ffi.offsetof("struct thaw_stub_clean", "stub"))
# struct thaw_thread: tid, tls, clear_tid, stack, stack_size, nops, ops, frame, frame_size,
# frame_at, sigreturn_sp, failed_op, result, state, pad; struct thaw_threads: nthreads, threads,
# syscall_insn, scratch, scratch_end, failed_thread, go, ready, affinity.
THREAD = struct.Struct("<11QqqII")
THREADS = struct.Struct(f"<5QqII{int(lib.THAW_AFFINITY_BYTES)}s")
assert THREAD.size == ffi.sizeof("struct thaw_thread")
assert THREADS.size == ffi.sizeof("struct thaw_threads")
THREAD_FAILED_OP = int(ffi.offsetof("struct thaw_thread", "failed_op"))
THREADS_FAILED = int(ffi.offsetof("struct thaw_threads", "failed_thread"))
AFFINITY_BYTES = int(lib.THAW_AFFINITY_BYTES)
_RECEIVE = struct.Struct("<5Q")  # struct thaw_receive_fds
_MOVE = struct.Struct("<ii")  # struct thaw_fd_move
_CMSG_HEADER = 16  # struct cmsghdr on x86-64: the fds follow it
assert _RECEIVE.size == ffi.sizeof("struct thaw_receive_fds") and _MOVE.size == ffi.sizeof("struct thaw_fd_move")


@dataclass(frozen=True)
class ThreadStart:
    """What the blob needs to recreate one thread (struct thaw_thread, restorer.h)."""

    tid: int
    tls: int
    clear_tid: int
    stack: int
    stack_size: int
    program: Program
    frame: bytes
    frame_at: int
    sigreturn_sp: int


def blob() -> bytes:
    length = ffi.new("size_t *")
    return bytes(ffi.buffer(lib.thaw_restorer_blob(length), length[0]))


@dataclass(frozen=True)
class Outcome:
    failed_op: int  # -1 when every op ran
    result: int  # the failed op's -errno
    done: int

    @property
    def ok(self) -> bool:
        return self.failed_op < 0


class Program:
    """A restore, as a list of syscalls the blob runs in order inside the stub."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.image = bytearray(blob())
        self.ops: list[bytes] = []
        self.what: list[str] = []

    def _align(self, n: int) -> None:
        self.image += bytes(-len(self.image) % n)

    def put(self, raw: bytes, align: int = 8) -> int:
        """Place `raw` in the data area; returns its address in the stub."""
        self._align(align)
        addr = self.base + len(self.image)
        self.image += raw
        return addr

    def cstr(self, text: str) -> int:
        return self.put(os.fsencode(text) + b"\0", 1)

    def _op(self, kind: int, nr: int, args: tuple[int, ...], flags: int, store: int, what: str) -> None:
        words = [a & 0xFFFF_FFFF_FFFF_FFFF for a in args] + [0] * (6 - len(args))
        self.ops.append(OP.pack(kind, flags, nr, *words, store))
        self.what.append(what)

    def syscall(self, nr: int, *args: int, what: str, flags: int = 0, store: int = 0) -> None:
        self._op(int(lib.THAW_OP_SYSCALL), nr, args, flags, store, what)

    def pread(self, fd: int, addr: int, length: int, offset: int, what: str) -> None:
        self._op(int(lib.THAW_OP_PREAD), 0, (fd, addr, length, offset), 0, 0, what)

    def open_fd(self, path: str, flags: int, fd: int, pos: int, what: str) -> None:
        self._op(int(lib.THAW_OP_OPEN_FD), 0, (self.cstr(path), flags, fd, pos), 0, 0, what)

    def clean_stub(self, keep: tuple[int, int], park: int, specials: dict[str, tuple[int, int]], what: str) -> int:
        """Unmap the stub but for `keep` (the scratch area) and its special mappings, and move
        those to where `specials` says (see restorer.h). Returns the image offset where the
        tracer writes in what it knows of the stub (struct thaw_stub_facts)."""
        if len(specials) > SPECIALS_MAX:
            raise ValueError(f"at most {SPECIALS_MAX} special mappings, not {sorted(specials)}")
        entries = b"".join(_SPECIAL.pack(os.fsencode(name), start, end) for name, (start, end) in specials.items())
        raw = _CLEAN.pack(*keep, park, len(specials)) + entries.ljust(SPECIALS_MAX * _SPECIAL.size, b"\0")
        addr = self.put(raw + bytes(_STUB_FACTS))
        self._op(int(lib.THAW_OP_CLEAN_STUB), 0, (addr,), 0, 0, what)
        return addr - self.base + STUB_IN_CLEAN

    def drop_bounding_set(self, last_cap: int, what: str) -> None:
        """Drop capabilities 0..last_cap still in the bounding set (failures are not fatal)."""
        self._op(int(lib.THAW_OP_DROP_BOUNDING), 0, (last_cap,), ALLOW_ERROR, 0, what)

    def subprogram(self) -> Program:
        """A program for another thread: its data goes into this program's image, its ops too
        when `threads` places it."""
        sub = Program.__new__(Program)
        sub.base, sub.image, sub.ops, sub.what = self.base, self.image, [], []
        return sub

    def threads(
        self, starts: list[ThreadStart], syscall_insn: int, scratch: tuple[int, int], what: str
    ) -> tuple[int, list[int]]:
        """Recreate the other threads (THAW_OP_THREADS). Returns the address of the threads block
        (which `threads_go` takes) and of each struct thaw_thread, for reading failures back."""
        entries = []
        for t in starts:
            ops = self.put(b"".join(t.program.ops))
            frame = self.put(t.frame, 64)
            entries.append(
                (
                    t.tid,
                    t.tls,
                    t.clear_tid,
                    t.stack,
                    t.stack_size,
                    len(t.program.ops),
                    ops,
                    frame,
                    len(t.frame),
                    t.frame_at,
                    t.sigreturn_sp,
                    -1,
                    0,
                    0,
                    0,
                )
            )
        table = self.put(b"".join(THREAD.pack(*e) for e in entries), 64)
        block = self.put(
            THREADS.pack(len(starts), table, syscall_insn, *scratch, -1, 0, 0, b"\xff" * AFFINITY_BYTES), 64
        )
        self._op(int(lib.THAW_OP_THREADS), 0, (block,), 0, 0, what)
        return block, [table + i * THREAD.size for i in range(len(starts))]

    def threads_go(self, block: int, what: str) -> None:
        """Let the threads `threads` made run, once no thread can use the main one's privileges."""
        self._op(int(lib.THAW_OP_THREADS_GO), 0, (block,), 0, 0, what)

    def pipe(self, read: tuple[int, int], write: tuple[int, int], spare: int, what: str) -> None:
        """A new pipe whose ends are (fd, flags) `read` and `write`; fds from `spare` up are free."""
        self._op(int(lib.THAW_OP_PIPE), 0, (read[0], write[0], read[1], write[1], spare), 0, 0, what)

    def receive_fds(self, sock: int, nfds: int, moves: list[tuple[int, int]], what: str) -> None:
        """Take `nfds` fds sent to `sock` in one SCM_RIGHTS message and dup3 each (index among
        them, fd it becomes) of `moves`; then close them and the socket (a waiting stub's
        hand-off, restorer.h)."""
        control_size = _CMSG_HEADER + -(-4 * nfds // 8) * 8
        table = self.put(b"".join(_MOVE.pack(index, to) for index, to in moves))
        raw = _RECEIVE.pack(nfds, len(moves), table, self.put(bytes(control_size)), control_size)
        self._op(int(lib.THAW_OP_RECEIVE_FDS), 0, (sock, self.put(raw)), 0, 0, what)

    def pause(self, what: str) -> None:
        """Stop with int3 here; the program goes on when the tracer resumes the stub."""
        self._op(int(lib.THAW_OP_PAUSE), 0, (), 0, 0, what)

    def finish(self) -> tuple[bytes, int]:
        """The bytes to copy to `base` and the address of the argument block (the blob's rdi)."""
        self._align(16)
        args_addr = self.base + len(self.image)
        header = ARGS.pack(int(lib.THAW_RESTORER_MAGIC), len(self.ops), args_addr + ARGS.size, -1, 0, 0)
        return bytes(self.image) + header + b"".join(self.ops), args_addr

    @staticmethod
    def outcome(raw_args: bytes) -> Outcome:
        _magic, _n, _ops, failed, result, done = ARGS.unpack(raw_args[: ARGS.size])
        return Outcome(failed, result, done)

    @staticmethod
    def describe(outcome: Outcome, what: list[str]) -> str:
        step = what[outcome.failed_op] if 0 <= outcome.failed_op < len(what) else "?"
        code = -outcome.result
        name = errno.errorcode.get(code, str(code))
        return f"{step}: {os.strerror(code)} ({name}; step {outcome.failed_op + 1} of {len(what)})"

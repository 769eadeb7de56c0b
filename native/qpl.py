"""Intel QPL (Query Processing Library) bound in cffi ABI mode: raw deflate on Intel IAA, or on the CPU.

QPL is in neither Debian nor PyPI, and it is optional: thaw runs without it. So it is not part of
`native/build.py` (API mode, compiled at install) but declared here and `dlopen`ed at run time,
which means the C compiler never checks these declarations against QPL's headers. What that
puts on us, and how it is held:

- The `qpl_job` layout is pinned by hand. `QPL_JOB_OFFSETS` are the byte offsets, on x86-64 with
  the SysV ABI (enums are 4 bytes), of the fields this binding touches, read from
  `include/qpl/c_api/job.h` of intel/qpl (1.6). The cffi struct is generated from that dict with
  explicit padding, and `Qpl.load` refuses to run if cffi lays it out any other way.
- The application allocates the job: `qpl_get_job_size(path)` bytes (the public struct, 240 bytes
  in 1.6, followed by the library's private buffers), then `qpl_init_job` once, `qpl_fini_job` at
  the end. Jobs are pooled per path here: init sets up per-job state worth reusing.
- `qpl_execute_job` runs one job to completion; `qpl_submit_job` + `qpl_wait_job` let several
  jobs be in flight on the accelerator at once (on the software path submit simply runs the job).
  The input and output buffers must stay alive and unmoved until the wait returns.
- IAA's deflate keeps a 4 KiB history window, so its output is the same stream shape as zlib's raw
  deflate with `wbits=-12`: zlib inflates it, and IAA inflates what zlib deflates with a 4 KiB
  window (not what it deflates with its default 32 KiB window: distances past 4 KiB).
- Every QPL call returns a `qpl_status`; errors here carry its number and its name from
  `include/qpl/c_api/status.h`.

Real IAA hardware is untested here: this machine has no IAA (and no QPL). The binding is tested
against a stand-in library (`tests/qpl_standin.c`: the same entry points over zlib, reading and
writing the job at the same offsets), built with offsets written independently from the header.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from functools import partial
from typing import Any, Literal

from cffi import FFI

# ---------------------------------------------------------------------------------------------
# The C API of QPL 1.6 (include/qpl/c_api/{defs,status,job}.h)

# Byte offsets in `qpl_job`: intel/qpl include/qpl/c_api/job.h, QPL 1.6 (the struct's field list
# is the same in the two versions of job.h read: commit 06c1d514 and an older one), x86-64 SysV
# ABI. Only the fields raw deflate needs; the rest (crc, huffman_table, dictionary, indexing,
# analytics, the internal `data_ptr`) keep what qpl_init_job put there.
QPL_JOB_OFFSETS = {
    "next_in_ptr": 0,  # uint8_t *
    "available_in": 8,  # uint32_t
    "total_in": 12,  # uint32_t
    "next_out_ptr": 16,  # uint8_t *
    "available_out": 24,  # uint32_t
    "total_out": 28,  # uint32_t
    "op": 32,  # qpl_operation (enum)
    "flags": 36,  # uint32_t, QPL_FLAG_*
    "level": 52,  # qpl_compression_levels (enum)
}
QPL_JOB_SIZE = 240  # sizeof(qpl_job) in 1.6; qpl_get_job_size() must report at least this
_POINTERS = {"next_in_ptr", "next_out_ptr"}  # uint8_t *; every other field above is 32-bit

# QPL takes at most 2^32 - 35 input bytes per job (its documented limit: 32-bit sizes plus headers).
MAX_INPUT = (1 << 32) - 35
DEFAULT_DEPTH = 16  # jobs in flight per batch (a guess: untested on IAA)
LIBRARY_NAMES = ("libqpl.so.1", "libqpl.so")
ENV_LIBRARY = "THAW_QPL_LIBRARY"


class QplPath(IntEnum):
    """qpl_path_t (defs.h)."""

    AUTO = 0  # hardware if an IAA work queue is usable, else software
    HARDWARE = 1
    SOFTWARE = 2


class QplOp(IntEnum):
    """qpl_operation (defs.h): only the deflate pair."""

    DECOMPRESS = 0x00
    COMPRESS = 0x01


class QplFlag(IntFlag):
    """QPL_FLAG_* (defs.h) that raw deflate uses."""

    FIRST = 0x0001  # the job starts a stream
    LAST = 0x0002  # the job ends it (FIRST|LAST: one job, one whole stream)
    DYNAMIC_HUFFMAN = 0x2000  # one dynamic block (two passes); without it and a table: fixed Huffman
    OMIT_VERIFY = 0x4000  # skip the hardware path's decompress-to-verify of its own output


class QplLevel(IntEnum):
    """qpl_compression_levels (defs.h). IAA itself only has the default level."""

    DEFAULT = 1  # qpl_default_level = qpl_level_1
    HIGH = 3  # qpl_high_level = qpl_level_3 (software path)


class QplStatus(IntEnum):
    """qpl_status (status.h)."""

    QPL_STS_OK = 0
    QPL_STS_BEING_PROCESSED = 1
    QPL_STS_MORE_OUTPUT_NEEDED = 2
    QPL_STS_MORE_INPUT_NEEDED = 3
    QPL_STS_JOB_NOT_CONTINUABLE_ERR = 4
    QPL_STS_QUEUES_ARE_BUSY_ERR = 5
    QPL_STS_LIBRARY_INTERNAL_ERR = 6
    QPL_STS_NULL_PTR_ERR = 50
    QPL_STS_OPERATION_ERR = 51
    QPL_STS_NOT_SUPPORTED_MODE_ERR = 52
    QPL_STS_BAD_JOB_STRUCT_ERR = 53
    QPL_STS_PATH_ERR = 54
    QPL_STS_INVALID_PARAM_ERR = 55
    QPL_STS_FLAG_CONFLICT_ERR = 56
    QPL_STS_SIZE_ERR = 57
    QPL_STS_BUFFER_TOO_LARGE_ERR = 58
    QPL_STS_BUFFER_OVERLAP_ERR = 59
    QPL_STS_CRC64_BAD_POLYNOM = 60
    QPL_STS_SET_TOO_LARGE_ERR = 70
    QPL_STS_PARSER_ERR = 71
    QPL_STS_OUT_FORMAT_ERR = 72
    QPL_STS_DROP_BITS_OVERFLOW_ERR = 73
    QPL_STS_BIT_WIDTH_OUT_EXTENDED_ERR = 74
    QPL_STS_DROP_BYTES_ERR = 75
    QPL_STS_MISSING_HUFFMAN_TABLE_ERR = 80
    QPL_STS_INVALID_HUFFMAN_TABLE_ERR = 81
    QPL_STS_MISSING_INDEX_TABLE_ERR = 82
    QPL_STS_INVALID_COMPRESS_STYLE_ERR = 83
    QPL_STS_INFLATE_NEED_DICT_ERR = 84
    QPL_STS_INVALID_DECOMP_END_PROC_ERR = 85
    QPL_STS_INVALID_BLOCK_SIZE_ERR = 86
    QPL_STD_UNSUPPORTED_COMPRESSION_LEVEL = 87  # sic: STD, as the header spells it
    QPL_STS_HUFFMAN_TABLE_TYPE_ERROR = 88
    QPL_STS_SERIALIZATION_FORMAT_ERROR = 90
    QPL_STS_SERIALIZATION_CORRUPTED_DUMP = 91
    QPL_STS_INVALID_DEFLATE_DATA_ERR = 100
    QPL_STS_NO_MEM_ERR = 101
    QPL_STS_INDEX_ARRAY_TOO_SMALL = 102
    QPL_STS_INDEX_GENERATION_ERR = 103
    QPL_STS_ARCHIVE_HEADER_ERR = 104
    QPL_STS_ARCHIVE_UNSUP_METHOD_ERR = 105
    QPL_STS_OBJECT_ALLOCATION_ERR = 106
    QPL_STS_BIG_HEADER_ERR = 201
    QPL_STS_UNDEF_CL_CODE_ERR = 202
    QPL_STS_FIRST_LL_CODE_16_ERR = 203
    QPL_STS_FIRST_D_CODE_16_ERR = 204
    QPL_STS_NO_LL_CODE_ERR = 205
    QPL_STS_WRONG_NUM_LL_CODES_ERR = 206
    QPL_STS_WRONG_NUM_DIST_CODES_ERR = 207
    QPL_STS_BAD_CL_CODE_LEN_ERR = 208
    QPL_STS_BAD_LL_CODE_LEN_ERR = 209
    QPL_STS_BAD_DIST_CODE_LEN_ERR = 210
    QPL_STS_BAD_LL_CODE_ERR = 211
    QPL_STS_BAD_D_CODE_ERR = 212
    QPL_STS_INVALID_BLOCK_TYPE = 213
    QPL_STS_INVALID_STORED_LEN_ERR = 214
    QPL_STS_BAD_EOF_ERR = 215
    QPL_STS_BAD_LEN_ERR = 216
    QPL_STS_BAD_DIST_ERR = 217
    QPL_STS_REF_BEFORE_START_ERR = 218
    QPL_STS_TIMEOUT_ERR = 219
    QPL_STS_PRLE_FORMAT_ERR = 220
    QPL_STS_OUTPUT_OVERFLOW_ERR = 221
    QPL_STS_INTL_AECS_ERR = 222
    QPL_STS_SRC1_TOO_SMALL_ERR = 223
    QPL_STS_SRC2_IS_SHORT_ERR = 224
    QPL_STS_DST_IS_SHORT_ERR = 225
    QPL_STS_INTL_DIST_SPANS_MINI_BLOCKS = 226
    QPL_STS_INTL_LEN_SPANS_MINI_BLOCKS = 227
    QPL_STS_INTL_VERIF_INVALID_BLOCK_SIZE = 228
    QPL_STS_INTL_VERIFY_ERR = 229
    QPL_STS_INVALID_HUFFCODE_ERR = 230
    QPL_STS_BIT_WIDTH_ERR = 231
    QPL_STS_SRC_IS_SHORT_ERR = 232
    QPL_STS_INVALID_RLE_COUNT = 233
    QPL_STS_TOO_MANY_LL_CODES_ERR = 235
    QPL_STS_TOO_MANY_D_CODES_ERR = 236
    QPL_STS_INTL_INPROG = 300
    QPL_STS_INTL_SUCCESS = 301
    QPL_STS_INTL_ANALYTIC_ERROR = 310
    QPL_STS_INTL_OUTPUT_OVERFLOW = 311
    QPL_STS_INTL_UNSUPPORTED_OPCODE = 316
    QPL_STS_INTL_INVALID_OP_FLAG = 317
    QPL_STS_INTL_NONZERO_RESERVED_FIELD = 318
    QPL_STS_TRANFER_SIZE_INVALID = 319  # sic
    QPL_STS_INTL_OVERLAPPING_BUFFERS = 322
    QPL_STS_INTL_COMPL_RECORD_UNALIGN = 327
    QPL_STS_INTL_MISALIGNED_ADDRESS = 328
    QPL_STS_INTL_INVALID_DECOMP_FLAG = 348
    QPL_STS_INTL_INVALID_FILTER_FLAG = 349
    QPL_STS_INTL_INVALID_INPUT_SIZE = 350
    QPL_STS_INVALID_NUM_ELEM = 351
    QPL_STS_INVALID_SRC1_WIDTH = 352
    QPL_STS_INV_OUTPUT = 353
    QPL_INIT_HW_NOT_SUPPORTED = 500
    QPL_STS_INIT_LIBACCEL_NOT_FOUND = 501
    QPL_STS_INIT_LIBACCEL_ERROR = 502
    QPL_STS_INIT_WORK_QUEUES_NOT_AVAILABLE = 503


# The statuses that mean "no usable IAA here", not "bad data": they get a hint in the message.
_DEVICE_ABSENT = {
    QplStatus.QPL_INIT_HW_NOT_SUPPORTED,
    QplStatus.QPL_STS_INIT_LIBACCEL_NOT_FOUND,
    QplStatus.QPL_STS_INIT_LIBACCEL_ERROR,
    QplStatus.QPL_STS_INIT_WORK_QUEUES_NOT_AVAILABLE,
}


def status_name(status: int) -> str:
    try:
        return QplStatus(status).name
    except ValueError:
        return f"unknown qpl_status {status}"


class QplUnavailable(Exception):
    """No Intel QPL shared library could be loaded."""


class QplError(Exception):
    """A QPL call returned a status other than QPL_STS_OK; `status` is its number."""

    def __init__(self, call: str, status: int, context: str = "", problem: str = "") -> None:
        self.call, self.status, self.status_name = call, status, status_name(status)
        what = f"{context}: " if context else ""
        if problem:  # the call succeeded but its result is wrong
            super().__init__(f"{what}{problem} ({call} returned {self.status_name})")
            return
        hint = ""
        if status in _DEVICE_ABSENT:
            hint = " (no usable Intel IAA: no iax device with an enabled work queue, or no libaccel-config)"
        super().__init__(f"{what}{self.status_name} ({status}) from {call}{hint}")


def _job_cdef(offsets: dict[str, int]) -> str:
    """`thaw_qpl_job`: the fields of `offsets` at those offsets, explicit padding in between."""
    lines, at = [], 0
    for name, offset in sorted(offsets.items(), key=lambda item: item[1]):
        if offset < at:
            raise ValueError(f"qpl_job field {name} at {offset} overlaps the field before it (ends at {at})")
        if offset > at:
            lines.append(f"uint8_t _pad{at}[{offset - at}];")
        pointer = name in _POINTERS
        lines.append(f"uint8_t *{name};" if pointer else f"uint32_t {name};")
        at = offset + (8 if pointer else 4)
    return "typedef struct {\n    " + "\n    ".join(lines) + "\n} thaw_qpl_job;"


# qpl_status and the enum parameters are C enums: int-sized in the x86-64 SysV ABI.
_FUNCTIONS = """
int qpl_get_job_size(int qpl_path, uint32_t *job_size_ptr);
int qpl_init_job(int qpl_path, thaw_qpl_job *qpl_job_ptr);
int qpl_execute_job(thaw_qpl_job *qpl_job_ptr);
int qpl_submit_job(thaw_qpl_job *qpl_job_ptr);
int qpl_wait_job(thaw_qpl_job *qpl_job_ptr);
int qpl_fini_job(thaw_qpl_job *qpl_job_ptr);
const char *qpl_get_library_version(void);
"""
_REQUIRED = ("qpl_get_job_size", "qpl_init_job", "qpl_execute_job", "qpl_submit_job", "qpl_wait_job", "qpl_fini_job")


def _make_ffi(offsets: dict[str, int]) -> Any:
    ffi = FFI()
    ffi.cdef(_job_cdef(offsets) + _FUNCTIONS)
    laid_out = {name: ffi.offsetof("thaw_qpl_job", name) for name in offsets}
    if laid_out != offsets:  # cffi added alignment padding we did not ask for: an offset is misaligned
        raise ValueError(f"qpl_job offsets {offsets} lay out as {laid_out} in cffi")
    return ffi


# ---------------------------------------------------------------------------------------------
# Loading


def _candidates(path: str | None) -> list[str]:
    """An explicit path or $THAW_QPL_LIBRARY is the only candidate (no silent fallback elsewhere)."""
    explicit = path or os.environ.get(ENV_LIBRARY)
    return [explicit] if explicit else list(LIBRARY_NAMES)


def _dlopen(ffi: Any, path: str | None) -> tuple[Any, str]:
    reasons = []
    for name in _candidates(path):
        try:
            lib = ffi.dlopen(name)
        except OSError as e:
            reasons.append(f"{name}: {e}")
            continue
        missing = [fn for fn in _REQUIRED if not hasattr(lib, fn)]  # cffi resolves symbols lazily
        if missing:
            raise QplUnavailable(f"{name} is not Intel QPL: it does not export {', '.join(missing)}")
        return lib, name
    raise QplUnavailable(
        "Intel QPL (libqpl) is not installed: "
        + "; ".join(reasons)
        + f". Build QPL with -DQPL_LIBRARY_TYPE=SHARED (or install libqpl1) and set {ENV_LIBRARY} to its path."
    )


# ---------------------------------------------------------------------------------------------
# Jobs

Buffer = bytes | bytearray | memoryview
PathName = Literal["auto", "hardware", "software"]


@dataclass
class _Job:
    """One initialized qpl_job. `raw` owns the memory; `head` is its public part, typed."""

    path: QplPath
    raw: Any
    head: Any


@dataclass
class _Task:
    """A job set up for one buffer, with everything the C side points into kept alive."""

    job: _Job
    out: bytearray
    size_in: int = 0
    keep: list[Any] = field(default_factory=list)
    expect: int | None = None  # decompress: the exact output size


_Results = list[bytes | BaseException]  # by item index: its output, or the error to raise
_Pending = deque[tuple[int, _Task]]  # (item index, task) in flight, oldest first


def _fini_all(lib: Any, pools: dict[QplPath, list[_Job]]) -> None:
    """Finalizer: may run at interpreter exit, so it must not need the Qpl object."""
    for jobs in pools.values():
        while jobs:
            lib.qpl_fini_job(jobs.pop().head)


def _compress_bound(size: int) -> int:
    # Stored-block fallback costs 5 bytes per 64 KiB block; a dynamic header is under 300 bytes.
    return size + (size >> 3) + 1024


def as_path(path: PathName | QplPath) -> QplPath:
    if isinstance(path, QplPath):
        return path
    try:
        return QplPath[path.upper()]
    except KeyError:
        raise ValueError(f"QPL path must be auto, hardware or software, not {path!r}") from None


class Qpl:
    """A loaded libqpl. Thread-safe: each call takes its own jobs from a per-path pool."""

    def __init__(self, ffi: Any, lib: Any, library: str) -> None:
        self._ffi, self._lib, self.library = ffi, lib, library
        self._pools: dict[QplPath, list[_Job]] = {p: [] for p in QplPath}
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _fini_all, lib, self._pools)

    @classmethod
    def load(cls, path: str | None = None) -> Qpl:
        """Load `path`, else $THAW_QPL_LIBRARY, else libqpl.so.1 / libqpl.so from the linker's path."""
        ffi = _make_ffi(QPL_JOB_OFFSETS)
        lib, name = _dlopen(ffi, path)
        return cls(ffi, lib, name)

    @property
    def version(self) -> str:
        try:
            return str(self._ffi.string(self._lib.qpl_get_library_version()).decode())
        except AttributeError:  # not exported by this build
            return "unknown"

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Qpl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- job pool ------------------------------------------------------------------------------

    def _check(self, call: str, status: int, context: str = "") -> None:
        if status != QplStatus.QPL_STS_OK:
            raise QplError(call, status, context)

    def _new_job(self, path: QplPath) -> _Job:
        size = self._ffi.new("uint32_t *")
        self._check("qpl_get_job_size", self._lib.qpl_get_job_size(path, size), f"{path.name.lower()} path")
        if size[0] < QPL_JOB_SIZE:
            raise QplUnavailable(
                f"{self.library} reports a {size[0]}-byte qpl_job, smaller than QPL 1.6's {QPL_JOB_SIZE}: "
                "not an ABI this binding knows"
            )
        # uint64_t[] rather than char[]: the job holds pointers, so it must be 8-byte aligned.
        raw = self._ffi.new("uint64_t[]", (size[0] + 7) // 8)
        head = self._ffi.cast("thaw_qpl_job *", raw)
        self._check("qpl_init_job", self._lib.qpl_init_job(path, head), f"{path.name.lower()} path")
        return _Job(path, raw, head)

    def _acquire(self, path: QplPath) -> _Job:
        with self._lock:
            if self._pools[path]:
                return self._pools[path].pop()
        return self._new_job(path)

    def _release(self, job: _Job, ok: bool) -> None:
        if ok:
            with self._lock:
                self._pools[job.path].append(job)
        else:  # a job that failed is not documented as reusable: finish it, make a fresh one next time
            self._lib.qpl_fini_job(job.head)

    # -- setting up and finishing one job ------------------------------------------------------

    def _point(self, task: _Task, data: Buffer, capacity: int) -> None:
        """Point the job at `data` and a fresh `capacity`-byte output; keep both alive in `task`."""
        src = self._ffi.from_buffer(data)
        dst = self._ffi.from_buffer(task.out, require_writable=True)
        task.keep += [src, dst]
        task.size_in = len(src)
        head = task.job.head
        head.next_in_ptr = self._ffi.cast("uint8_t *", src)
        head.available_in = len(src)
        head.total_in = 0
        head.next_out_ptr = self._ffi.cast("uint8_t *", dst)
        head.available_out = capacity
        head.total_out = 0

    def _task(self, path: QplPath, out: bytearray, data: Buffer, expect: int | None = None) -> _Task:
        """A pooled job of `path` pointed at `data` and `out` (given back to the pool if that fails)."""
        task = _Task(self._acquire(path), out, expect=expect)
        try:
            self._point(task, data, len(out))
        except BaseException:
            self._release(task.job, True)
            raise
        return task

    def _compress_task(self, path: QplPath, data: Buffer, level: QplLevel, dynamic: bool) -> _Task:
        size = memoryview(data).nbytes
        if size > MAX_INPUT:
            raise ValueError(f"QPL compresses at most {MAX_INPUT} bytes per job, not {size}")
        task = self._task(path, bytearray(_compress_bound(size)), data)
        task.job.head.op = QplOp.COMPRESS
        task.job.head.level = level
        flags = QplFlag.FIRST | QplFlag.LAST | QplFlag.OMIT_VERIFY
        task.job.head.flags = (flags | QplFlag.DYNAMIC_HUFFMAN) if dynamic else flags
        return task

    def _decompress_task(self, path: QplPath, data: Buffer, size: int) -> _Task:
        if not 0 <= size <= 0xFFFF_FFFF:
            raise ValueError(f"QPL decompresses to 0..4 GiB, not {size} bytes")
        task = self._task(path, bytearray(size), data, expect=size)
        task.job.head.op = QplOp.DECOMPRESS
        task.job.head.flags = QplFlag.FIRST | QplFlag.LAST
        return task

    def _result(self, task: _Task, call: str, status: int) -> bytes:
        """The job's output; raises (after releasing the job either way) unless it succeeded."""
        total = int(task.job.head.total_out)
        self._release(task.job, status == QplStatus.QPL_STS_OK)
        kind = "decompress" if task.expect is not None else "compress"
        self._check(call, status, f"{kind} {task.size_in} bytes")
        if task.expect is not None and total != task.expect:
            raise QplError(call, status, f"{kind} {task.size_in} bytes", f"{total} bytes out, expected {task.expect}")
        return bytes(memoryview(task.out)[:total])

    # -- public API ----------------------------------------------------------------------------

    def compress(
        self, data: Buffer, path: PathName | QplPath = "auto", level: QplLevel = QplLevel.DEFAULT, dynamic: bool = True
    ) -> bytes:
        """One raw deflate stream (4 KiB window) of `data`, dynamic Huffman unless `dynamic=False`."""
        task = self._compress_task(as_path(path), data, level, dynamic)
        return self._result(task, "qpl_execute_job", self._lib.qpl_execute_job(task.job.head))

    def decompress(self, data: Buffer, size: int, path: PathName | QplPath = "auto") -> bytes:
        """Inflate one raw deflate stream that must come to exactly `size` bytes."""
        task = self._decompress_task(as_path(path), data, size)
        return self._result(task, "qpl_execute_job", self._lib.qpl_execute_job(task.job.head))

    def compress_many(
        self,
        items: Sequence[Buffer],
        path: PathName | QplPath = "auto",
        level: QplLevel = QplLevel.DEFAULT,
        dynamic: bool = True,
        depth: int = DEFAULT_DEPTH,
    ) -> list[bytes]:
        """`compress` of each item, up to `depth` jobs in flight (submitted in order, waited in order)."""
        p = as_path(path)
        return self._batch([partial(self._compress_task, p, d, level, dynamic) for d in items], depth)

    def decompress_many(
        self, items: Sequence[tuple[Buffer, int]], path: PathName | QplPath = "auto", depth: int = DEFAULT_DEPTH
    ) -> list[bytes]:
        """`decompress` of each (data, size), up to `depth` jobs in flight."""
        p = as_path(path)
        return self._batch([partial(self._decompress_task, p, d, n) for d, n in items], depth)

    # -- batches -------------------------------------------------------------------------------

    def _batch(self, makers: Sequence[Callable[[], _Task]], depth: int) -> list[bytes]:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        results: _Results = [b""] * len(makers)
        pending: _Pending = deque()
        try:
            for i, make in enumerate(makers):
                task = make()
                done = self._submit(task, pending, results)
                if done is not None:
                    results[i] = done
                else:
                    pending.append((i, task))
                while len(pending) >= depth:
                    self._wait_oldest(pending, results)
        finally:
            # Whatever went wrong, jobs in flight point into our buffers: wait for every one.
            while pending:
                self._wait_oldest(pending, results)
        return [_unwrap(r) for r in results]

    def _submit(self, task: _Task, pending: _Pending, results: _Results) -> bytes | None:
        """Submit `task`; None once it is in flight, else its (synchronous) result."""
        while True:
            status = self._lib.qpl_submit_job(task.job.head)
            if status != QplStatus.QPL_STS_QUEUES_ARE_BUSY_ERR:
                break
            if not pending:  # the queues are full of other processes' work: let QPL wait for room
                return self._result(task, "qpl_execute_job", self._lib.qpl_execute_job(task.job.head))
            self._wait_oldest(pending, results)  # our own oldest job frees a slot
        if status != QplStatus.QPL_STS_OK:
            return self._result(task, "qpl_submit_job", status)
        return None

    def _wait_oldest(self, pending: _Pending, results: _Results) -> None:
        i, task = pending.popleft()
        try:
            results[i] = self._result(task, "qpl_wait_job", self._lib.qpl_wait_job(task.job.head))
        except QplError as e:  # raised once all are waited for, so no buffer is freed under a job
            results[i] = e


def _unwrap(result: bytes | BaseException) -> bytes:
    if isinstance(result, BaseException):
        raise result
    return result

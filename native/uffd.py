"""userfaultfd: page faults of registered ranges delivered to a file descriptor.

Some facts about userfaultfd that shape this module:

- There are two doors: the `userfaultfd(2)` syscall (root, or vm.unprivileged_userfaultfd=1,
  or UFFD_USER_MODE_ONLY) and `/dev/userfaultfd` (whoever may open the node; ioctl
  USERFAULTFD_IOC_NEW). We try the device first, then the syscall.
- `UFFDIO_API` must be the first ioctl and may be done only once per fd; it both negotiates the
  requested features and reports which the kernel has.
- The context belongs to the mm that created it. A uffd created *inside* another process (by an
  injected syscall) and pulled out with `pidfd_getfd` registers ranges of that process.
- `UFFDIO_COPY` installs a private anonymous page. For MAP_PRIVATE file/shmem mappings a pager
  that wants the page cache shared instead fills the file and answers with `UFFDIO_WAKE`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from native._native import ffi, lib
from native.constants import UffdEvent, UffdFaultFlag
from native.errors import check

MSG_SIZE = 32
_MSG = struct.Struct("<BBHIQQI4x")  # struct uffd_msg, pagefault arm of the union


@dataclass(frozen=True)
class UffdMsg:
    event: int
    flags: int  # UffdFaultFlag for page faults
    address: int
    ptid: int

    @property
    def is_write(self) -> bool:
        return self.event == UffdEvent.PAGEFAULT and bool(self.flags & UffdFaultFlag.WRITE)


def open_userfaultfd(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> tuple[int, str]:
    """A new userfaultfd and the door it came through: "/dev/userfaultfd", else "syscall"."""
    fd = int(lib.thaw_userfaultfd_dev(flags))
    if fd >= 0:
        return fd, "/dev/userfaultfd"
    return check(int(lib.thaw_userfaultfd_syscall(flags)), "userfaultfd"), "syscall"


def userfaultfd(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """A new userfaultfd, through /dev/userfaultfd when it can be opened, else the syscall."""
    return open_userfaultfd(flags)[0]


def api(fd: int, features: int = 0) -> tuple[int, int]:
    """UFFDIO_API: enable `features`; returns (features the kernel supports, ioctls mask)."""
    out_features = ffi.new("uint64_t *")
    out_ioctls = ffi.new("uint64_t *")
    check(lib.thaw_uffdio_api(fd, features, out_features, out_ioctls), "ioctl", "UFFDIO_API")
    return int(out_features[0]), int(out_ioctls[0])


def register(fd: int, start: int, length: int, mode: int) -> int:
    """UFFDIO_REGISTER a range; returns the ioctls allowed on it."""
    out = ffi.new("uint64_t *")
    check(
        lib.thaw_uffdio_register(fd, start, length, mode, out),
        "ioctl",
        f"UFFDIO_REGISTER {start:#x}+{length}",
    )
    return int(out[0])


def unregister(fd: int, start: int, length: int) -> None:
    check(lib.thaw_uffdio_unregister(fd, start, length), "ioctl", f"UFFDIO_UNREGISTER {start:#x}+{length}")


def copy(fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
    """UFFDIO_COPY `length` bytes from our `src` to the faulting range at `dst`; bytes copied.

    Fewer than `length` means the kernel stopped early (EAGAIN: the mm changed under us); resume
    from there. An error is raised only when nothing was copied.
    """
    return int(check(int(lib.thaw_uffdio_copy(fd, dst, src, length, mode)), "ioctl", f"UFFDIO_COPY {dst:#x}"))


def zeropage(fd: int, start: int, length: int, mode: int = 0) -> int:
    return int(check(int(lib.thaw_uffdio_zeropage(fd, start, length, mode)), "ioctl", f"UFFDIO_ZEROPAGE {start:#x}"))


def wake(fd: int, start: int, length: int) -> None:
    check(lib.thaw_uffdio_wake(fd, start, length), "ioctl", f"UFFDIO_WAKE {start:#x}+{length}")


def read_messages(fd: int, max_messages: int = 64) -> list[UffdMsg]:
    """Read pending messages (the fd is usually non-blocking: [] when none are queued)."""
    try:
        raw = os.read(fd, MSG_SIZE * max_messages)
    except BlockingIOError:
        return []
    return [UffdMsg(*_fields(raw[i : i + MSG_SIZE])) for i in range(0, len(raw), MSG_SIZE)]


def _fields(chunk: bytes) -> tuple[int, int, int, int]:
    event, _r1, _r2, _r3, flags, address, ptid = _MSG.unpack(chunk)
    return event, flags, address, ptid

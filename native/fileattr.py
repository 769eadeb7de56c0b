"""Inode flags (`chattr`): the immutable flag that keeps published pool segments unchanged.

Some facts about the flag this module relies on:

- `FS_IMMUTABLE_FL`, set with the `FS_IOC_SETFLAGS` ioctl, refuses every write to the inode
  whoever asks, root included: `open(O_WRONLY|O_RDWR)`, `truncate`, `fallocate`, a shared
  writable mapping, `rename` onto it and `unlink` all fail with EPERM. Only a holder of
  CAP_LINUX_IMMUTABLE can clear it again. A *private* mapping still works (its writes go to
  anonymous copies), which is all a restore needs.
- tmpfs has the flag since Linux 6.0; hugetlbfs has no inode flags at all (ENOTTY or
  EOPNOTSUPP): there `set_immutable` answers False and the caller relies on file modes.
- The ioctl's argument is declared `long` but the kernel reads and writes an `int`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
_UNSUPPORTED = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL)


def _flags(fd: int) -> int:
    try:
        raw = fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4)
    except OSError as e:
        raise OSError(
            e.errno, f"reading inode flags: {os.strerror(e.errno or 0)} (originated from FS_IOC_GETFLAGS)"
        ) from e
    return int(struct.unpack("i", raw)[0])


def _set_flags(fd: int, flags: int) -> None:
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
    except OSError as e:
        raise OSError(
            e.errno, f"setting inode flags: {os.strerror(e.errno or 0)} (originated from FS_IOC_SETFLAGS)"
        ) from e


def _open(path: str | os.PathLike[str]) -> int:
    # O_RDONLY works on an immutable file; O_NOFOLLOW: never change the flags of a link's target.
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _flags_of(fd: int) -> int | None:
    """The inode flags, or None where the filesystem has none."""
    try:
        return _flags(fd)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return None
        raise


def is_immutable(path: str | os.PathLike[str]) -> bool:
    fd = _open(path)
    try:
        flags = _flags_of(fd)
        return flags is not None and bool(flags & FS_IMMUTABLE_FL)
    finally:
        os.close(fd)


def set_immutable(path: str | os.PathLike[str], on: bool) -> bool:
    """Set or clear the immutable flag of `path`; False where the filesystem has no inode flags."""
    fd = _open(path)
    try:
        flags = _flags_of(fd)
        if flags is None:
            return False
        wanted = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        if wanted != flags:
            _set_flags(fd, wanted)
        return True
    finally:
        os.close(fd)

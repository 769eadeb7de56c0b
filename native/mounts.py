"""mount(2), umount2(2), pivot_root(2), detached bind mounts (open_tree) and a path's filesystem type."""

from __future__ import annotations

from enum import IntEnum

from native._native import ffi, lib
from native.errors import check


class FsMagic(IntEnum):
    """statfs f_type values thaw branches on (linux/magic.h)."""

    TMPFS = 0x01021994
    HUGETLBFS = 0x958458F6
    CGROUP = 0x27E0EB
    CGROUP2 = 0x63677270
    PROC = 0x9FA0
    SYSFS = 0x62656572


def _opt(value: str | None) -> object:
    return ffi.NULL if value is None else value.encode()


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    check(
        lib.mount(_opt(source), target.encode(), _opt(fstype), flags, _opt(data)),
        "mount",
        f"{fstype or 'bind/propagation'} {source} on {target}",
    )


def umount2(target: str, flags: int = 0) -> None:
    check(lib.umount2(target.encode(), flags), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    check(lib.thaw_pivot_root(new_root.encode(), put_old.encode()), "pivot_root", f"{new_root} ({put_old})")


def detached_bind(path: str, readonly: bool = True) -> int:
    """A detached bind mount of `path` (open_tree OPEN_TREE_CLONE; read-only, nosuid, nodev by
    default), as an fd that a process in another mount namespace attaches with move_mount."""
    return check(lib.thaw_detached_bind(path.encode(), int(readonly)), "open_tree", path)


def statfs_type(path: str) -> int:
    """The filesystem magic of `path` (compare with FsMagic)."""
    return check(int(lib.thaw_statfs_type(path.encode())), "statfs", path)

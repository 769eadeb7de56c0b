"""unshare(2) and setns(2), which Python 3.11's `os` lacks.

The kernel refuses `setns(CLONE_NEWNS)` and `unshare(CLONE_NEWNS | CLONE_FS)` in a multi-threaded
process (EINVAL), and a new pid namespace applies only to children made afterwards. The daemon
therefore never calls these on itself: sandbox agents and short-lived helper processes do.
"""

from __future__ import annotations

from native._native import lib
from native.constants import CloneFlag
from native.errors import check


def unshare(flags: int) -> None:
    check(lib.unshare(flags), "unshare", repr(CloneFlag(flags)))


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace behind `fd` (a /proc/PID/ns/* file or a pidfd); nstype 0 = any kind."""
    check(lib.setns(fd, nstype), "setns", f"fd {fd}")

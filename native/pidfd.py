"""pidfds: stable handles to processes (no pid reuse races) and fd theft with `pidfd_getfd`."""

from __future__ import annotations

from native._native import lib
from native.errors import check


def pidfd_open(pid: int, flags: int = 0) -> int:
    return check(lib.thaw_pidfd_open(pid, flags), "pidfd_open", f"pid {pid}")


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Duplicate fd `targetfd` of the process behind `pidfd` into this process (needs ptrace rights).

    The new fd is close-on-exec, as the kernel always makes it.
    """
    return check(lib.thaw_pidfd_getfd(pidfd, targetfd, 0), "pidfd_getfd", f"fd {targetfd}")


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    check(lib.thaw_pidfd_send_signal(pidfd, sig, 0), "pidfd_send_signal", f"signal {sig}")

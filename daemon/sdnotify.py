"""The systemd notify protocol, without libsystemd.

thawd runs as a `Type=notify` service (systemd/thawd.service). With `Type=simple` systemd would
call thawd started the moment it forks, before it has opened its pool, recovered its functions
and bound its API socket, so `systemctl start thawd && thaw ...` would race the daemon. With
`Type=notify` systemd waits until thawd says it is ready, and `systemctl status` shows what it
last said it was doing.

The protocol is one AF_UNIX datagram per message to the socket named by `$NOTIFY_SOCKET`: lines
of `NAME=value` assignments joined by newlines. The address is a filesystem path, or, when it
starts with "@", a name in the abstract namespace (the "@" stands for a leading NUL byte). A
datagram arrives whole or not at all, so a message is never seen half-written. Under
`NotifyAccess=main` systemd reads only datagrams from the main PID, which it identifies by the
sender's credentials: the sandboxes' processes inherit the variable but cannot speak for thawd.

What thawd sends:
- `STATUS=...` lines while it starts (opening the pool, recovering functions) and, once up, a
  one-line summary;
- `READY=1` once the API socket listens, and only then;
- `STOPPING=1` when SIGTERM arrives and it starts draining in-flight invocations.

`watchdog_interval()` is for a unit that sets `WatchdogSec=` (thawd.service does not): the daemon
would then send `WATCHDOG=1` every half interval.

Outside systemd (`$NOTIFY_SOCKET` unset) every call is a no-op that returns False.
"""

from __future__ import annotations

import errno
import os
import socket

__all__ = ["notify", "watchdog_interval"]


def _address(name: str) -> bytes:
    """The sockaddr_un path for `$NOTIFY_SOCKET`'s value `name`."""
    if name.startswith("@"):
        # Abstract namespace: the kernel keys the name on every byte after the NUL, with no terminator.
        return b"\0" + os.fsencode(name[1:])
    if name.startswith("/"):
        return os.fsencode(name)
    # systemd 254+ also accepts "vsock:CID:PORT" (a manager outside the VM); not supported here.
    raise OSError(
        errno.EAFNOSUPPORT, f"NOTIFY_SOCKET {name!r} is neither an absolute path nor an abstract name ('@...')"
    )


def notify(*states: str) -> bool:
    """Send `states` (e.g. "READY=1", "STATUS=serving") to systemd as one datagram, one per line.

    Returns False, sending nothing, when `$NOTIFY_SOCKET` is unset or empty (not run by systemd,
    or by a unit that is not `Type=notify`), True once the datagram is sent. Raises OSError naming
    the socket when it cannot be sent.
    """
    if not states:
        raise ValueError("notify() needs at least one state, e.g. 'READY=1'")
    name = os.environ.get("NOTIFY_SOCKET", "")
    if not name:
        return False
    message = "\n".join(states).encode()
    address = _address(name)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as e:
        raise OSError(
            e.errno, f"notify systemd at NOTIFY_SOCKET {name!r}: {e.strerror} (originated from sendto)"
        ) from e
    return True


def watchdog_interval() -> float | None:
    """The watchdog timeout systemd expects this process to honour, in seconds, or None.

    None when the unit sets no `WatchdogSec=` (`$WATCHDOG_USEC` unset, empty, not a positive
    integer) or when `$WATCHDOG_PID` is set but names another process: the variables were then
    meant for a parent and leaked into this one's environment. Ping with `notify("WATCHDOG=1")`
    at half this interval, as sd_watchdog_enabled(3) advises.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    try:
        interval = int(usec)
    except ValueError:
        return None
    if interval <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return interval / 1_000_000

"""What goes wrong with sandboxes, each naming the cause."""

from __future__ import annotations


class SandboxError(Exception):
    """A sandbox could not be built, repurposed, released or destroyed."""


class InvalidLimits(SandboxError, ValueError):
    """A cpu, memory, pids or cpuset limit that no cgroup would accept."""


class InvalidSpec(SandboxError, ValueError):
    """A function spec that cannot be mounted: a missing function directory, a bad hostname."""


class InvalidHostPorts(SandboxError, ValueError):
    """A host port allow-list entry that is not tcp:PORT, udp:PORT or a range of them."""


class SubnetExhausted(SandboxError):
    """Every address of the sandbox subnet is in use."""


class PoolExhausted(SandboxError):
    """The sandbox pool is at its maximum and every sandbox is in use."""


class UnsupportedRestore(SandboxError):
    """A restore the kernel would refuse to a stub in this sandbox (one with a pager, in a user namespace)."""


class AgentError(SandboxError):
    """The sandbox agent refused or failed a request; `errno` is its errno (0 if it died)."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno

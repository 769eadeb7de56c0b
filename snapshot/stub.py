"""thaw's own stub launcher, for restores without a sandbox (tests, benchmarks, tools).

    stub = launch_stub(template.restore_fds("cow"))
    instance = restore(template, stub, "cow")
    stub.control.sendall(...)              # the daemon's end of the instance's fd 3

The stub is native/thaw-stub, exec'd fresh (never a fork of this possibly multi-threaded
process): it moves the restore fds to 1000, 1001, ..., keeps 0-2 and the control socket on 3,
closes everything else and stops itself. With `namespaces` (CLONE_NEW* flags) it first unshares
them; with CLONE_NEWPID a reaper becomes pid 1 of the new namespace and the stub is its child,
so the instance is not pid 1 (pid 1 ignores its own SIGSTOP and dies with every process in it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import native
from native.constants import CloneFlag
from native.restorer import FIRST_RESTORE_FD
from snapshot import procfs
from snapshot.errors import RestoreError
from snapshot.restore import Stub

STUB_PROGRAM = Path(native.__file__).parent / "thaw-stub"
STOP_TIMEOUT = 10.0


@dataclass
class LaunchedStub(Stub):
    popen: Any = None
    control: socket.socket | None = None  # our end of the stub's fd 3


def launch_stub(
    fds: list[int],
    *,
    namespaces: int = 0,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    bare: bool = False,
) -> LaunchedStub:
    """Start a stopped stub holding `fds` from fd 1000 and one end of a new socketpair on fd 3.
    A `bare` stub skips the preparations that save a restore work (native/src/stub_prepare.h):
    it is like any other process that stops itself, for testing restores into those."""
    ours, theirs = socket.socketpair()
    moves = [f"{fd}:{FIRST_RESTORE_FD + i}" for i, fd in enumerate(fds)] + [f"{theirs.fileno()}:3"]
    argv = [str(STUB_PROGRAM), *(["--bare"] if bare else []), "--unshare", str(int(namespaces)), *moves]
    in_pid_namespace = bool(namespaces & CloneFlag.NEWPID)
    try:
        popen = subprocess.Popen(
            argv, pass_fds=[*fds, theirs.fileno()], stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
    finally:
        theirs.close()
    try:
        pid = _stopped_stub(popen, in_pid_namespace)
    except BaseException:
        popen.kill()
        popen.wait()
        ours.close()
        raise
    return LaunchedStub(
        pid=pid, wait=_waiter(popen, in_pid_namespace), kill=_killer(popen, pid), popen=popen, control=ours
    )


def _waiter(popen: subprocess.Popen[bytes], in_pid_namespace: bool) -> Any:
    def wait(timeout: float | None) -> int | None:
        try:
            code = popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if in_pid_namespace and code > 128:
            return -(code - 128)  # the reaper reports a signalled stub as 128 + signal
        return int(code)

    return wait


def _killer(popen: subprocess.Popen[bytes], pid: int) -> Any:
    def kill() -> None:
        for target in {pid, popen.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)

    return kill


def _stopped_stub(popen: subprocess.Popen[bytes], in_pid_namespace: bool) -> int:
    """The stub's pid once it has stopped itself."""
    if not in_pid_namespace:
        _, status = os.waitpid(popen.pid, os.WUNTRACED)  # consume the stop report: ptrace's comes next
        if not os.WIFSTOPPED(status):
            raise RestoreError(f"the stub exited ({status:#x}) instead of stopping: see its stderr")
        return popen.pid
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        stub = _grandchild(popen.pid)
        if stub is not None and procfs.state(stub) == "T":
            return stub
        if popen.poll() is not None:
            raise RestoreError(f"the stub launcher exited with {popen.returncode} before its stub stopped")
        time.sleep(0.0005)
    raise RestoreError(f"the stub under pid {popen.pid} did not stop within {STOP_TIMEOUT} s")


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _grandchild(pid: int) -> int | None:
    for reaper in _children(pid):
        for stub in _children(reaper):
            return stub
    return None

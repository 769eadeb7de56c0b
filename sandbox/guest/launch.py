"""Starting a guest on this host, outside any sandbox (tests, benchmarks, the demo), and talking
to it on its control socket. Sandboxes start guests their own way; the protocol is the same.

    guest = start_parked(function_dir)            # returns once it said READY and stopped itself
    capture(guest.pid, pool, "f")                 # or os.kill(guest.pid, SIGCONT): a cold start
    reply = invoke(guest.control, "/", b"")
"""

from __future__ import annotations

import math
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.guest import protocol

STOP_POLL = 0.0002


@dataclass
class ParkedGuest:
    popen: subprocess.Popen[bytes]
    control: socket.socket  # our end of the guest's fd 3

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()
        self.control.close()


def recv(sock: socket.socket, timeout: float = 60) -> protocol.Message | None:
    """The next frame from `sock` within `timeout` (the protocol reads a blocking fd)."""
    poller = select.poll()  # not select: a process holding many templates has fds past 1023
    poller.register(sock, select.POLLIN)
    if not poller.poll(max(0, math.ceil(timeout * 1000))):
        raise TimeoutError(f"the guest sent nothing within {timeout} s")
    return protocol.recv(sock.fileno())


def invoke(sock: socket.socket, path: str = "/", body: bytes = b"", timeout: float = 60) -> protocol.Message:
    """One request; returns the guest's response or error message."""
    protocol.send(
        sock.fileno(), {"type": "request", "id": 1, "path": path, "method": "POST", "body": protocol.b64(body)}
    )
    reply = recv(sock, timeout)
    if reply is None:
        raise ConnectionError("the guest closed its control socket")
    return reply


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def start_parked(
    function_dir: Path | None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
    preload: list[str] | None = None,
) -> ParkedGuest:
    """Start `python -m sandbox.guest function_dir` with fd 3 on a socketpair; return once it has
    said READY and stopped itself. With no `function_dir`, a runtime guest (`--runtime`) that
    imports `preload` and waits, once thawed, for `become` to say what it is."""
    ours, theirs = socket.socketpair()
    what = [str(function_dir)] if function_dir else ["--runtime", "--preload", ",".join(preload or [])]
    popen = subprocess.Popen(
        ["sh", "-c", 'exec "$@" 3<&0 </dev/null', "sh", sys.executable, "-m", "sandbox.guest", *what],
        stdin=theirs.fileno(),  # the shell moves it to fd 3
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    theirs.close()
    guest = ParkedGuest(popen, ours)
    try:
        first = recv(ours, timeout)
        if first != {"type": "ready"}:
            raise RuntimeError(f"the guest said {first} instead of READY (see its stderr)")
        wait_stopped(popen.pid, timeout)
    except BaseException:
        guest.kill()
        raise
    return guest


def become(sock: socket.socket, message: protocol.Message, timeout: float = 120) -> None:
    """Tell a thawed runtime guest (which said RESTORED) to `load` a function or `preload` more;
    return once it has said READY again (it stops itself right after: wait for that before a
    capture)."""
    protocol.send(sock.fileno(), message)
    reply = recv(sock, timeout)
    if reply != {"type": "ready"}:
        raise RuntimeError(f"the guest said {reply} instead of READY (see its stderr)")


def wait_stopped(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _state(pid) != "T":
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} did not stop within {timeout} s")
        time.sleep(STOP_POLL)


def decode_body(reply: protocol.Message) -> Any:
    """The body of a response, as bytes; raises with the guest's error for an error message."""
    if reply.get("type") == "error":
        error = reply["error"]
        raise RuntimeError(f"the guest failed: {error['type']}: {error['message']}\n{error.get('traceback', '')}")
    return protocol.unb64(reply["body"])

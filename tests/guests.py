"""Helpers for tests that run real guests: start one, wait until it parked, talk to it on fd 3."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.guest import protocol
from shmpool import Pool
from snapshot import procfs
from snapshot.capture import capture
from snapshot.restore import Instance, restore
from snapshot.stub import LaunchedStub, launch_stub
from snapshot.template import Template

REPO = Path(__file__).resolve().parents[1]


def recv(sock: socket.socket, timeout: float = 60) -> Any:
    """The next frame from `sock` (blocking fd: the protocol reads with os.read), within `timeout`."""
    if not select.select([sock], [], [], timeout)[0]:
        raise AssertionError(f"no message within {timeout} s")
    return protocol.recv(sock.fileno())


@dataclass
class Guest:
    popen: subprocess.Popen[bytes]
    control: socket.socket

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()
        self.control.close()


def start_guest(function_dir: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Guest:
    """Start `python -m sandbox.guest` with fd 3 on a socketpair; return once it has stopped itself."""
    ours, theirs = socket.socketpair()
    popen = subprocess.Popen(
        ["sh", "-c", 'exec "$@" 3<&0 </dev/null', "sh", sys.executable, "-m", "sandbox.guest", str(function_dir)],
        stdin=theirs.fileno(),
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    theirs.close()
    first = recv(ours, timeout)
    if first != {"type": "ready"}:
        popen.kill()
        raise AssertionError(f"guest said {first} instead of READY")
    deadline = time.monotonic() + timeout
    while procfs.state(popen.pid) != "T":
        if time.monotonic() > deadline:
            raise AssertionError("guest did not stop after READY")
        time.sleep(0.002)
    return Guest(popen, ours)


def request(sock: socket.socket, path: str = "/", body: Any = None) -> Any:
    """One invocation; returns the decoded JSON body (or raises with the guest's error)."""
    raw = json.dumps(body).encode() if body is not None else b""
    protocol.send(
        sock.fileno(), {"type": "request", "id": 1, "path": path, "method": "POST", "body": protocol.b64(raw)}
    )
    reply = recv(sock)
    assert reply is not None, "the instance closed its control socket"
    if reply["type"] == "error":
        raise AssertionError(f"guest error: {reply['error']['message']}\n{reply['error']['traceback']}")
    return json.loads(protocol.unb64(reply["body"]))


def captured(pool: Pool, function_dir: Path, name: str, env: dict[str, str] | None = None) -> Template:
    guest = start_guest(function_dir, env)
    try:
        return capture(guest.pid, pool, name)
    finally:
        guest.kill()


@contextmanager
def thawed(template: Template, mode: str, namespaces: int = 0) -> Iterator[tuple[Instance, LaunchedStub]]:
    """A restored instance that has said RESTORED; killed and reaped afterwards."""
    stub = launch_stub(template.restore_fds(mode), namespaces=namespaces)
    assert stub.control is not None
    instance = restore(template, stub, mode)
    try:
        hello = recv(stub.control)
        assert hello is not None and hello["type"] == "restored", hello
        yield instance, stub
    finally:
        instance.close()
        stub.control.close()

"""Helpers for tests that run real guests: start one, wait until it parked, talk to it on fd 3."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sandbox.guest.launch import ParkedGuest, decode_body, invoke, recv, start_parked
from shmpool import Pool
from snapshot.capture import capture
from snapshot.restore import Instance, restore
from snapshot.stub import LaunchedStub, launch_stub
from snapshot.template import Template

REPO = Path(__file__).resolve().parents[1]
__all__ = ["captured", "recv", "request", "start_guest", "thawed"]


def start_guest(function_dir: Path, env: dict[str, str] | None = None) -> ParkedGuest:
    return start_parked(function_dir, env, cwd=REPO)


def request(sock: Any, path: str = "/", body: Any = None) -> Any:
    """One invocation; returns the decoded JSON body (or raises with the guest's error)."""
    raw = json.dumps(body).encode() if body is not None else b""
    return json.loads(decode_body(invoke(sock, path, raw)))


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

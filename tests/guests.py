"""Helpers for tests that run real guests: start one, wait until it parked, talk to it on fd 3."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from native._native import lib

from sandbox.guest.launch import ParkedGuest, decode_body, invoke, recv, start_parked
from shmpool import Pool
from snapshot import procfs
from snapshot.capture import capture
from snapshot.restore import Instance, restore
from snapshot.stub import LaunchedStub, launch_stub
from snapshot.template import Template

REPO = Path(__file__).resolve().parents[1]
__all__ = ["captured", "prepared_stub_facts", "recv", "request", "rss_pss", "start_guest", "thawed"]
_REPORT = struct.Struct("<QQ")
_SPECIAL = struct.Struct("<16sQQ")


def prepared_stub_facts(pid: int) -> tuple[dict[str, tuple[int, int]] | None, dict[str, tuple[int, int]], str]:
    """What a stopped stub left for the restore (native/src/stub_prepare.h): the special mappings
    its report names (None without a report), the ones its maps show, its CapBnd."""
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(int(lib.THAW_STUB_REPORT))
        raw = mem.read(_REPORT.size + 4 * _SPECIAL.size)
    magic, count = _REPORT.unpack_from(raw)
    reported = None
    if magic == int(lib.THAW_STUB_REPORT_MAGIC):
        entries = [_SPECIAL.unpack_from(raw, _REPORT.size + i * _SPECIAL.size) for i in range(count)]
        reported = {name.rstrip(b"\0").decode(): (start, end) for name, start, end in entries}
    mapped = {v.path: (v.start, v.end) for v in procfs.read_maps(pid) if v.special and v.path != "[vsyscall]"}
    status = Path(f"/proc/{pid}/status").read_text()
    return reported, mapped, status.split("CapBnd:")[1].split()[0]


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


def rss_pss(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of `pid` in bytes, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields["Rss"], fields["Pss"]

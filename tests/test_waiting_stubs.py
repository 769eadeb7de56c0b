"""Idle sandboxes that hold a stub waiting for its restore, and repurposes that keep what a
function left: on the real kernel, restored in every mode, threads included."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from native.kerndat import kerndat
from sandbox.guest.launch import recv
from sandbox.network import NetworkConfig
from sandbox.pool import PoolSettings, SandboxPool
from sandbox.sandbox import HANDOFF_FD, HANDOFF_PLACES, Sandbox, SandboxConfig, SandboxSpec
from shmpool import Pool
from snapshot import procfs
from snapshot.capture import capture
from snapshot.restore import Stub, restore
from snapshot.template import Template
from tests.guests import request

pytestmark = pytest.mark.privileged
STUB_PIDS_FROM = 16384  # native/src/agent.c: a stub's pid never takes a TID a template's thread needs
THREADED = """
import os, threading
ready = threading.Event()
tids = []
def park():
    tids.append(threading.get_native_id())
    ready.set()
    threading.Event().wait()
worker = threading.Thread(target=park, daemon=True)
worker.start()
ready.wait()
def handle(event, context):
    return {"pid": os.getpid(), "worker_alive": worker.is_alive(), "worker_tid": tids[0],
            "threads": sorted(int(t) for t in os.listdir("/proc/self/task"))}
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxPool]:
    runtime = tmp_path_factory.mktemp("waiting")
    pool = SandboxPool(
        PoolSettings(prewarm=1, max_size=4, cgroup_tree="thaw-test-waiting", waiting_stubs=True),
        SandboxConfig(runtime_dir=runtime),
        NetworkConfig(bridge="thawt9", subnet="10.251.0.0/24"),
    )
    yield pool
    pool.destroy()


@pytest.fixture
def templates(tmp_path: Path) -> Iterator[Pool]:
    pool = Pool.create(tmp_path / "pool", backend="tmpfs", node=0, size=256 << 20)
    yield pool
    pool.destroy()


def _function(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True)
    directory.chmod(0o755)
    (directory / "handler.py").write_text(body)
    (directory / "handler.py").chmod(0o644)
    return directory


def _capture(pool: SandboxPool, fn: Path, templates: Pool) -> Template:
    box = pool.acquire(SandboxSpec(fn, hostname="deploy"))
    ours, theirs = socket.socketpair()
    try:
        with ours:
            guest = box.spawn([sys.executable, "-m", "sandbox.guest", "/function"], control_fd=theirs.fileno())
            theirs.close()
            assert (recv(ours) or {}).get("type") == "ready"
            while procfs.state(guest.pid) != "T":
                time.sleep(0.001)
            return capture(guest.pid, templates, "waited")
    finally:
        pool.release(box)  # given back with a stub waiting in it


def _function_mount_id(box: Sandbox) -> int:
    """The mount id of /function in the sandbox's mount namespace (seen through its agent)."""
    for line in Path(f"/proc/{box.agent.pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/function":
            return int(fields[0])
    raise AssertionError("no /function mount in the sandbox")


@pytest.mark.parametrize("mode", ["cow", "copy", "lazy"])
def test_a_waiting_stub_becomes_an_instance(pool: SandboxPool, templates: Pool, tmp_path: Path, mode: str) -> None:
    if mode == "lazy" and not kerndat().uffd:
        pytest.skip("no userfaultfd on this kernel")
    fn = _function(tmp_path / "fn", THREADED)
    with _capture(pool, fn, templates) as template:
        box = pool.acquire(SandboxSpec(fn, hostname="serve"))
        try:
            waiting = box.waiting
            assert waiting is not None, "the sandbox the function used came back with a stub waiting in it"
            assert waiting.process.inner_pid >= STUB_PIDS_FROM
            ours, theirs = socket.socketpair()
            with ours:
                stub, handoff = box.take_stub(template.restore_fds(mode), theirs.fileno(), theirs.fileno(), False)
                theirs.close()
                assert (stub, handoff) == (waiting.process, HANDOFF_FD)  # no fork: the waiting one
                target = Stub(stub.pid, stub.wait, stub.kill, handoff=handoff, handoff_places=HANDOFF_PLACES)
                instance = restore(template, target, mode)
                assert (recv(ours) or {}).get("type") == "restored"
                reply = request(ours, "/")
                fds = [int(fd) for fd in os.listdir(f"/proc/{instance.pid}/fd")]
                instance.close()
        finally:
            pool.release(box)
    assert reply["pid"] == waiting.process.inner_pid  # the stub's pid inside: the instance's own
    assert reply["worker_alive"] and reply["worker_tid"] in reply["threads"]  # recreated with its TID
    assert all(fd < HANDOFF_FD for fd in fds)  # neither the hand-off socket nor received fds stay


def test_a_stub_that_died_waiting_is_replaced_by_a_fork(pool: SandboxPool, templates: Pool, tmp_path: Path) -> None:
    fn = _function(tmp_path / "fn", "def handle(event, context):\n    return {'ok': True}\n")
    with _capture(pool, fn, templates) as template:
        box = pool.acquire(SandboxSpec(fn))
        try:
            assert box.waiting is not None
            box.waiting.process.kill()
            assert box.waiting.process.wait_exit(5) is not None
            ours, theirs = socket.socketpair()
            with ours:
                stub, handoff = box.take_stub(template.restore_fds("cow"), theirs.fileno(), theirs.fileno(), False)
                theirs.close()
                assert handoff == -1  # forked now, holding its fds
                instance = restore(template, Stub(stub.pid, stub.wait, stub.kill), "cow")
                assert (recv(ours) or {}).get("type") == "restored"
                assert request(ours, "/") == {"ok": True}
                instance.close()
        finally:
            pool.release(box)


def test_a_function_comes_back_to_its_sandbox_and_keeps_its_mount(pool: SandboxPool, tmp_path: Path) -> None:
    fn_a = _function(tmp_path / "a", "def handle(event, context):\n    return 'a'\n")
    fn_b = _function(tmp_path / "b", "def handle(event, context):\n    return 'b'\n")
    first = pool.acquire(SandboxSpec(fn_a, hostname="a"))
    other = pool.acquire(SandboxSpec(fn_b, hostname="b"))
    mount_a = _function_mount_id(first)
    pool.release(other)  # released last: the most recently used, which a plain pick would take
    pool.release(first)
    again = pool.acquire(SandboxSpec(fn_a, hostname="a"))
    try:
        assert again is first  # steered back to the sandbox that holds the function already
        assert _function_mount_id(again) == mount_a  # no mount swapped in for the same function
    finally:
        pool.release(again)
    swapped = pool.acquire(SandboxSpec(fn_b, hostname="b"))
    try:
        assert swapped is other
        first_elsewhere = pool.acquire(SandboxSpec(fn_b, hostname="b2"))
        try:
            assert first_elsewhere is first and _function_mount_id(first) != mount_a  # another function: swapped
        finally:
            pool.release(first_elsewhere)
    finally:
        pool.release(swapped)


def test_a_ready_sandbox_is_taken_without_its_agent(pool: SandboxPool, tmp_path: Path) -> None:
    """What thawd's thaws try first, on its event loop: a sandbox that holds the function already
    (mount, limits, hostname) with a stub waiting in it, or none (then the usual acquire)."""
    fn = _function(tmp_path / "ready", "def handle(event, context):\n    return 'ready'\n")
    spec = SandboxSpec(fn, hostname="ready")
    assert pool.acquire_ready(spec) is None  # no sandbox holds it yet
    box = pool.acquire(spec)
    pool.release(box)  # back with its mount kept and a stub waiting
    ready = pool.acquire_ready(spec)
    try:
        assert ready is box and ready.waiting is not None
        assert pool.acquire_ready(spec) is None  # the one that held it is busy now
        assert pool.acquire_ready(SandboxSpec(fn, hostname="renamed")) is None  # a hostname to change
    finally:
        pool.release(ready or box)

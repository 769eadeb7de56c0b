"""thawd and its sandboxes, end to end: none held by an invocation that gave up, idle ones given
back, a SIGTERM stop within the drain timeout with many of them, the host closed to instances."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.test_daemon import ECHO, _leftovers
from tests.thawd import Thawd, free_port, write_function

pytestmark = pytest.mark.privileged
NAME, SUBNET, GATEWAY = "thawp0", "10.250.0.0/24", "10.250.0.1"
PATIENCE = 30.0  # seconds a test waits for something that takes well under one here

PROBE = """
import errno, socket
def handle(event, context):
    host, port = event.body.decode().split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=20):
            return {"reached": "ok"}
    except socket.timeout:
        return {"reached": "timed out"}
    except OSError as e:
        return {"reached": errno.errorcode.get(e.errno or 0, str(e))}
"""


@pytest.fixture(scope="module")
def thawd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thawd]:
    base = tmp_path_factory.mktemp("thawd")
    daemon = Thawd(
        base,
        NAME,
        SUBNET,
        sandboxes_prewarm=1,
        sandboxes_idle_timeout=1,
        gateway_listen=f"0.0.0.0:{free_port()}",  # on every address of the host, the bridge's too
    )
    with daemon.serving():
        yield daemon
    assert _leftovers(NAME) == {"bridge": [], "cgroups": []}


def _sandboxes(thawd: Thawd) -> list[dict[str, Any]]:
    status, reply = thawd.api("GET", "/sandboxes")
    assert status == 200, reply
    return list(reply["sandboxes"])


def _burst(thawd: Thawd, name: str, n: int, body: Any) -> list[int]:
    async def calls() -> list[tuple[int, dict[str, str], bytes]]:
        data = json.dumps(body).encode()
        return await asyncio.gather(*(thawd.request("POST", f"/functions/{name}/invoke", data=data) for _ in range(n)))

    return [status for status, _, _ in asyncio.run(calls())]


def _eventually(check: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_invocations_that_time_out_during_their_thaw_hold_no_sandbox(thawd: Thawd, tmp_path: Path) -> None:
    """A 3 ms timeout expires while the sandbox and stub are still being made on a worker thread:
    the sandbox that thread acquired goes back (it used to stay busy for good, with a stub in it)."""
    thawd.deploy("hasty", write_function(tmp_path / "hasty", ECHO), timeout=0.003)
    try:
        statuses = [thawd.invoke("hasty", {"n": n})[0] for n in range(12)]
        assert set(statuses) <= {200, 504} and 504 in statuses, statuses

        def nothing_held() -> bool:
            return not [s for s in _sandboxes(thawd) if s["state"] == "busy" and s["instance"] is None]

        _eventually(nothing_held, f"busy sandboxes that no instance holds: {_sandboxes(thawd)}")
    finally:
        thawd.remove("hasty")


def test_idle_sandboxes_are_given_back_after_the_idle_timeout(thawd: Thawd, tmp_path: Path) -> None:
    thawd.deploy("bursty", write_function(tmp_path / "bursty", ECHO), idle_timeout=0)  # instances go at once
    try:
        assert _burst(thawd, "bursty", 8, {"sleep": 0.5}) == [200] * 8
        grown = _sandboxes(thawd)
        assert len(grown) > 2
        agents = [s["agent_pid"] for s in grown]
        _eventually(lambda: len(_sandboxes(thawd)) == 1, f"idle sandboxes stayed: {_sandboxes(thawd)}")
        _eventually(lambda: sum(psutil.pid_exists(pid) for pid in agents) <= 1, "their agents stayed")
        assert thawd.invoke("bursty", {"after": "shrink"})[0] == 200  # and the pool grows again on demand
    finally:
        thawd.remove("bursty")


def test_an_instance_cannot_reach_the_gateway_on_the_hosts_wildcard_address(thawd: Thawd, tmp_path: Path) -> None:
    """thawd's own OpenFaaS gateway on 0.0.0.0 answers the host, not instances: through the bridge
    address it would let any function invoke others without credentials."""
    thawd.deploy("probe", write_function(tmp_path / "probe", PROBE), timeout=60)
    try:
        host, _, port = str(thawd.flags["gateway-listen"]).rpartition(":")
        assert host == "0.0.0.0"
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass  # the host itself reaches it
        status, reply = thawd.api("POST", "/functions/probe/invoke", data=f"{GATEWAY}:{port}".encode())
        assert status == 200, reply
        assert reply["reached"] == "ECONNREFUSED"  # refused at once, not hanging
    finally:
        thawd.remove("probe")


def test_sigterm_stops_within_the_drain_timeout_with_many_sandboxes(tmp_path: Path) -> None:
    """Two dozen sandboxes, an invocation that outlasts the drain and a deploy whose init never
    ends in time: SIGTERM ends thawd within drain_timeout and a margin (it took 64 s and more)."""
    drain = 3.0
    daemon = Thawd(tmp_path, "thawp1", "10.249.0.0/24", drain_timeout=drain, sandboxes_prewarm=1)
    daemon.start()
    try:
        daemon.deploy("echo", write_function(tmp_path / "echo", ECHO), timeout=300)
        assert _burst(daemon, "echo", 24, {"sleep": 0.5}) == [200] * 24
        assert len(_sandboxes(daemon)) >= 12
        slow_init = write_function(tmp_path / "slow", "import time\ntime.sleep(300)\n" + ECHO)
        answers: list[object] = []

        def call(method: str, path: str, body: Any = None, data: bytes | None = None) -> None:
            try:
                answers.append(daemon.api(method, path, body, data))
            except (OSError, aiohttp.ClientError) as e:  # cut off: what a client of a stopping thawd sees
                answers.append(e)

        in_flight = [
            threading.Thread(target=call, args=("POST", "/functions/echo/invoke", None, b'{"sleep": 300}')),
            threading.Thread(target=call, args=("POST", "/functions", {"name": "slow", "source": str(slow_init)})),
        ]
        for thread in in_flight:
            thread.start()
        _eventually(lambda: len([s for s in _sandboxes(daemon) if s["state"] == "busy"]) >= 2, "both in flight")
        try:
            assert daemon.stop(signal.SIGTERM, timeout=drain + 20) == 0, daemon.log()
        except subprocess.TimeoutExpired:
            pytest.fail(f"thawd did not stop within {drain} s of drain and 20 s more:\n{daemon.log()}")
        for thread in in_flight:
            thread.join()
        assert len(answers) == 2
    finally:
        if daemon.process and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        daemon.destroy_pool()
    assert _leftovers("thawp1") == {"bridge": [], "cgroups": []}

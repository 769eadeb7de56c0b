"""thawd's provider API driven the way the OpenFaaS gateway (scale from zero on) and faas-cli drive
faasd: scale from zero under a burst, an update that keeps the function available, names with
their namespace, the health check, and what a restart keeps."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sandbox.cgroups import CgroupTree
from tests.test_gateway import Gateway
from tests.thawd import Thawd, write_function

pytestmark = pytest.mark.privileged
NAME = "thawf0"
BURST = 32
VERSIONED = """
import os
def handle(event, context):
    return {"version": VERSION, "pid": os.getpid()}
"""


def versioned(directory: Path, version: int) -> Path:
    return write_function(directory, f"VERSION = {version}\n" + VERSIONED)


def deployment(name: str, source: Path) -> dict[str, Any]:
    return {"service": name, "image": str(source), "namespace": "openfaas-fn", "envProcess": "handler:handle"}


@pytest.fixture(scope="module")
def thawd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thawd]:
    daemon = Thawd(tmp_path_factory.mktemp("provider"), NAME, "10.233.0.0/24")
    try:
        with daemon.serving():
            yield daemon
    finally:
        CgroupTree(NAME).remove()


@pytest.fixture(scope="module")
def gateway(thawd: Thawd) -> Gateway:
    return Gateway(thawd.gateway_port, "admin", thawd.password)


def status_of(gateway: Gateway, name: str) -> dict[str, Any]:
    status, _, body = gateway.call("GET", f"/system/function/{name}")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def scale_from_zero(gateway: Gateway, name: str) -> None:
    """What the gateway's function scaler does for a request to a function with no replica: read
    the replicas, ask for one, poll availableReplicas until it is there."""
    status = status_of(gateway, name)
    if status.get("availableReplicas", 0) > 0:
        return
    if status.get("replicas", 0) == 0:
        scale = {"serviceName": name, "namespace": "openfaas-fn", "replicas": 1}
        assert gateway.call("POST", f"/system/scale-function/{name}", scale)[0] == 200
    for _ in range(1000):  # the gateway polls a bounded number of times
        if status_of(gateway, name).get("availableReplicas", 0) > 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} never became available: {status_of(gateway, name)}")


def test_a_burst_after_scale_from_zero_is_served_without_a_5xx(gateway: Gateway, tmp_path: Path) -> None:
    source = versioned(tmp_path / "burst", 1)
    assert gateway.call("POST", "/system/functions", deployment("burst", source))[0] == 200
    scale = {"serviceName": "burst", "replicas": 0}
    assert gateway.call("POST", "/system/scale-function/burst", scale)[0] == 200
    assert status_of(gateway, "burst").get("availableReplicas", 0) == 0

    scale_from_zero(gateway, "burst")
    start = threading.Barrier(BURST)

    def forward(_: int) -> int:
        start.wait()  # released at the same instant, as the gateway forwards the queued requests
        return gateway.call("POST", "/function/burst", auth=None, raw=b"{}")[0]

    with ThreadPoolExecutor(BURST) as callers:
        statuses = list(callers.map(forward, range(BURST)))
    assert statuses == [200] * BURST
    status = status_of(gateway, "burst")
    assert 1 <= status["availableReplicas"] <= BURST
    assert status["invocationCount"] == BURST


def test_an_update_keeps_the_function_available(gateway: Gateway, tmp_path: Path) -> None:
    assert gateway.call("POST", "/system/functions", deployment("rolling", versioned(tmp_path / "v1", 1)))[0] == 200
    scale_from_zero(gateway, "rolling")
    status, _, body = gateway.call("GET", "/function/rolling", auth=None)
    assert status == 200 and json.loads(body)["version"] == 1

    update = deployment("rolling", versioned(tmp_path / "v2", 2))
    assert gateway.call("PUT", "/system/functions", update)[0] == 200
    after = status_of(gateway, "rolling")  # no scale-from-zero here: replicas says 1 already
    assert after["replicas"] == 1 and after["availableReplicas"] >= 1
    status, _, body = gateway.call("GET", "/function/rolling", auth=None)
    assert status == 200 and json.loads(body)["version"] == 2
    assert status_of(gateway, "rolling")["availableReplicas"] == 1  # the old revision's instance went


def test_names_may_carry_the_namespace(gateway: Gateway, tmp_path: Path) -> None:
    assert gateway.call("POST", "/system/functions", deployment("named", versioned(tmp_path / "n", 1)))[0] == 200
    assert status_of(gateway, "named.openfaas-fn")["name"] == "named"
    status, _, body = gateway.call("POST", "/function/named.openfaas-fn/x", auth=None, raw=b"")
    assert status == 200 and json.loads(body)["version"] == 1
    scale = {"serviceName": "named.openfaas-fn", "replicas": 1}
    assert gateway.call("POST", "/system/scale-function/named.openfaas-fn", scale)[0] == 200
    assert status_of(gateway, "named")["availableReplicas"] == 1
    assert gateway.call("GET", "/system/function/named.elsewhere")[0] == 404
    status, _, body = gateway.call("GET", "/function/named.elsewhere", auth=None)
    assert status == 404 and b"Cannot find service: named.elsewhere" in body
    assert gateway.call("DELETE", "/system/functions", {"functionName": "named.openfaas-fn"})[0] == 200
    assert gateway.call("GET", "/system/function/named")[0] == 404


def test_healthz_answers_without_credentials(gateway: Gateway) -> None:
    status, _, body = gateway.call("GET", "/healthz", auth=None)
    assert status == 200 and body == b"OK"


def test_a_restart_keeps_the_scale_target_and_the_invocation_count(
    thawd: Thawd, gateway: Gateway, tmp_path: Path
) -> None:
    assert gateway.call("POST", "/system/functions", deployment("kept", versioned(tmp_path / "k", 1)))[0] == 200
    assert gateway.call("POST", "/system/scale-function/kept", {"serviceName": "kept", "replicas": 2})[0] == 200
    for _ in range(3):
        assert gateway.call("GET", "/function/kept", auth=None)[0] == 200
    assert thawd.stop() == 0, thawd.log()
    thawd.start()
    status = status_of(gateway, "kept")
    assert status["replicas"] == 2 and status["invocationCount"] == 3
    for _ in range(1000):  # the restarted thawd thaws up to the stored target on its own
        if status_of(gateway, "kept").get("availableReplicas", 0) == 2:
            break
        time.sleep(0.02)
    assert status_of(gateway, "kept")["availableReplicas"] == 2

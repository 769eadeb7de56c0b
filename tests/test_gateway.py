"""Contract tests of the FaaS gateway: the requests the OpenFaaS gateway and faas-cli send to a
provider, and the replies checked field by field against faas-provider's Go types
(types.FunctionDeployment, types.FunctionStatus, types.ScaleServiceRequest,
types.DeleteFunctionRequest, types.ProviderInfo, logs.Message) and faasd's status codes."""

from __future__ import annotations

import base64
import datetime
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.cgroups import CgroupTree
from tests.thawd import Thawd, write_function

pytestmark = pytest.mark.privileged
NAME = "thawg0"
ECHO = """
def handle(event, context):
    print("gateway call", event.path, flush=True)
    return {"statusCode": 201, "headers": {"X-Echo": "yes"},
            "body": {"method": event.method, "path": event.path, "query": event.query,
                     "header": event.headers.get("X-Custom"), "body": event.body.decode()}}
"""
# What faas-cli sends for `faas-cli deploy` (types.FunctionDeployment, json tags as in faas-provider).
DEPLOYMENT = {
    "service": "gw-echo",
    "image": "",  # filled in with the function's directory
    "namespace": "openfaas-fn",
    "envProcess": "handler:handle",
    "envVars": {"GREETING": "hi"},
    "constraints": [],
    "secrets": [],
    "labels": {"com.openfaas.scale.min": "1"},
    "annotations": {"topic": "demo"},
    "limits": {"memory": "128Mi", "cpu": "500m"},
    "requests": {"memory": "64Mi"},
    "readOnlyRootFilesystem": True,
}


class Gateway:
    def __init__(self, port: int, user: str, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        auth: str | None = "",
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        if auth is not None:
            request.add_header("Authorization", auth or self.auth)
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def thawd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thawd]:
    daemon = Thawd(tmp_path_factory.mktemp("gateway"), NAME, "10.236.0.0/24")
    try:
        with daemon.serving():
            yield daemon
    finally:
        CgroupTree(NAME).remove()


@pytest.fixture(scope="module")
def gateway(thawd: Thawd) -> Gateway:
    return Gateway(thawd.gateway_port, "admin", thawd.password)


@pytest.fixture(scope="module")
def deployed(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    source = write_function(tmp_path_factory.mktemp("gw-echo"), ECHO)
    deployment = {**DEPLOYMENT, "image": str(source)}
    status, _, _ = gateway.call("PUT", "/system/functions", deployment)
    assert status == 404  # faas-cli: update first, create on 404
    status, _, body = gateway.call("POST", "/system/functions", deployment)
    assert status == 200, body
    return deployment


def test_system_routes_want_basic_auth(gateway: Gateway) -> None:
    status, headers, _ = gateway.call("GET", "/system/functions", auth=None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    wrong = "Basic " + base64.b64encode(b"admin:nope").decode()
    assert gateway.call("GET", "/system/info", auth=wrong)[0] == 401
    assert gateway.call("GET", "/system/info", auth="Bearer x")[0] == 401


def test_info_and_namespaces(gateway: Gateway) -> None:
    status, headers, body = gateway.call("GET", "/system/info")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    info = json.loads(body)
    assert set(info) == {"provider", "orchestration", "version"}
    assert info["provider"] == "thaw" and set(info["version"]) >= {"sha", "release"}
    status, _, body = gateway.call("GET", "/system/namespaces")
    assert status == 200 and json.loads(body) == ["openfaas-fn"]


def test_deployed_function_reads_back_as_a_function_status(gateway: Gateway, deployed: dict[str, Any]) -> None:
    status, _, body = gateway.call("GET", "/system/functions")
    assert status == 200
    listed = {f["name"]: f for f in json.loads(body)}
    status, _, body = gateway.call("GET", "/system/function/gw-echo?namespace=openfaas-fn")
    assert status == 200
    one = json.loads(body)
    for f in (listed["gw-echo"], one):
        assert f["name"] == "gw-echo" and f["image"] == deployed["image"] and f["namespace"] == "openfaas-fn"
        assert f["envProcess"] == "handler:handle" and f["envVars"] == {"GREETING": "hi"}
        assert f["labels"] == deployed["labels"] and f["annotations"] == deployed["annotations"]
        assert f["limits"] == {"memory": "128Mi", "cpu": "500m"}
        datetime.datetime.fromisoformat(f["createdAt"].replace("Z", "+00:00"))  # RFC 3339
        allowed = {"name", "image", "namespace", "envProcess", "envVars", "constraints", "secrets", "labels"}
        allowed |= {"annotations", "limits", "requests", "readOnlyRootFilesystem", "invocationCount", "replicas"}
        allowed |= {"availableReplicas", "createdAt", "usage"}
        assert set(f) <= allowed, set(f) - allowed  # FunctionStatus's json names only
    assert gateway.call("GET", "/system/function/nosuch")[0] == 404


def test_invocation_carries_the_whole_http_request(gateway: Gateway, deployed: dict[str, Any]) -> None:
    status, headers, body = gateway.call(
        "PUT", "/function/gw-echo/items/7?color=red", auth=None, headers={"X-Custom": "abc"}, raw=b"payload"
    )
    assert status == 201 and headers["X-Echo"] == "yes"
    assert json.loads(body) == {
        "method": "PUT",
        "path": "/items/7",
        "query": {"color": "red"},
        "header": "abc",
        "body": "payload",
    }
    status, _, body = gateway.call("GET", "/function/gw-echo", auth=None)
    assert status == 201 and json.loads(body)["path"] == "/"
    status, _, body = gateway.call("GET", "/function/nosuch", auth=None)
    assert status == 404 and b"Cannot find service: nosuch." in body
    assert gateway.call("OPTIONS", "/function/gw-echo", auth=None)[0] == 405


def test_scale_from_zero_through_available_replicas(gateway: Gateway, deployed: dict[str, Any]) -> None:
    status, _, _ = gateway.call("POST", "/system/scale-function/gw-echo", {"serviceName": "gw-echo", "replicas": 0})
    assert status == 200
    status = json.loads(gateway.call("GET", "/system/function/gw-echo")[2])
    assert status.get("availableReplicas", 0) == 0 and status.get("replicas", 0) == 0  # omitempty: absent
    scale = {"serviceName": "gw-echo", "replicas": 1}
    assert gateway.call("POST", "/system/scale-function/gw-echo?namespace=openfaas-fn", scale)[0] == 200
    deadline = time.monotonic() + 30  # the gateway polls availableReplicas
    while time.monotonic() < deadline:
        status = json.loads(gateway.call("GET", "/system/function/gw-echo")[2])
        if status.get("availableReplicas", 0) > 0:
            break
        time.sleep(0.05)
    assert status["availableReplicas"] == 1 and status["replicas"] == 1
    missing = {"serviceName": "nosuch", "replicas": 1}
    assert gateway.call("POST", "/system/scale-function/nosuch", missing)[0] == 404
    assert gateway.call("POST", "/system/scale-function/gw-echo", raw=b"{bad")[0] == 400


def test_logs_are_ndjson_log_messages(gateway: Gateway, deployed: dict[str, Any]) -> None:
    gateway.call("POST", "/function/gw-echo/logged", auth=None, raw=b"")
    time.sleep(0.2)
    status, headers, body = gateway.call("GET", "/system/logs?name=gw-echo&namespace=openfaas-fn&tail=5")
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson")
    messages = [json.loads(line) for line in body.decode().splitlines()]
    assert messages and all(set(m) == {"name", "namespace", "instance", "timestamp", "text"} for m in messages)
    assert any(m["text"] == "gateway call /logged" for m in messages)
    assert all(m["name"] == "gw-echo" and m["namespace"] == "openfaas-fn" for m in messages)
    assert gateway.call("GET", "/system/logs?name=gw-echo&tail=x")[0] == 422
    assert gateway.call("GET", "/system/logs?name=gw-echo&since=yesterday")[0] == 422


def test_bad_deployments_are_refused(gateway: Gateway, deployed: dict[str, Any], tmp_path: Path) -> None:
    assert gateway.call("POST", "/system/functions", raw=b"{bad json")[0] == 400
    relative = {**DEPLOYMENT, "service": "gw-relative", "image": "ghcr.io/openfaas/figlet:latest"}
    status, _, body = gateway.call("POST", "/system/functions", relative)
    assert status == 400 and b"absolute path" in body
    elsewhere = {**DEPLOYMENT, "service": "gw-ns", "image": deployed["image"], "namespace": "other"}
    assert gateway.call("POST", "/system/functions", elsewhere)[0] == 400
    assert gateway.call("GET", "/system/functions?namespace=other")[0] == 400
    assert gateway.call("POST", "/system/functions", deployed)[0] == 400  # exists: faasd says 400


def test_update_then_delete(gateway: Gateway, deployed: dict[str, Any], tmp_path: Path) -> None:
    source = write_function(tmp_path / "v2", "def handle(event, context):\n    return {'version': 2}\n")
    update = {**deployed, "image": f"file://{source}"}
    assert gateway.call("PUT", "/system/functions", update)[0] == 200
    status, _, body = gateway.call("GET", "/function/gw-echo", auth=None)
    assert status == 200 and json.loads(body) == {"version": 2}
    assert json.loads(gateway.call("GET", "/system/function/gw-echo")[2])["image"] == f"file://{source}"
    assert gateway.call("DELETE", "/system/functions", {"functionName": "gw-echo"})[0] == 200
    assert gateway.call("DELETE", "/system/functions", {"functionName": "gw-echo"})[0] == 404
    assert gateway.call("GET", "/system/function/gw-echo")[0] == 404


BAD_DEPLOYMENTS: list[tuple[dict[str, Any], bytes]] = [
    ({"labels": "notadict"}, b"labels must be an object of strings, not 'notadict'"),
    ({"annotations": 5}, b"annotations must be an object of strings, not 5"),
    ({"annotations": {"com.thaw.timeout": "inf"}}, b"timeout must be a number greater than 0 and at most 604800 s"),
    ({"image": 7}, b"image (the function's directory on thawd's host) is required"),
    ({"envVars": [["A", "b"]]}, b"envVars must be an object of strings"),
    ({"envVars": {"A": 1}}, b"envVars must be an object of strings"),
    ({"envProcess": 5}, b"envProcess must be a string, module:callable, not 5"),
    ({"namespace": ["x"]}, b"namespace not valid: ['x']"),
    ({"limits": "1G"}, b"limits must be an object {memory, cpu}, not '1G'"),
    ({"limits": {"memory": 128}}, b"limits.memory 128 is not a quantity"),
    ({"limits": {"cpu": "2000"}}, b"limits.cpu must be a number from 0.01 to 1024 cores, not 2000.0"),
    ({"limits": {"memory": "2000Ti"}}, b"limits.memory must be a number of bytes from 4194304 (4 MiB) to"),
    ({"limits": {"memory": "9" * 400}}, b"is out of any range"),
    ({"requests": {"cpu": "lots"}}, b"requests.cpu 'lots' is not a quantity"),
    ({"service": "gw-bad\n"}, b"function name 'gw-bad\\n' must be"),
]


@pytest.mark.parametrize(("field", "message"), BAD_DEPLOYMENTS)
def test_a_bad_deployment_field_is_a_400_naming_it(
    gateway: Gateway, tmp_path: Path, field: dict[str, Any], message: bytes
) -> None:
    source = write_function(tmp_path / "fine", "def handle(event, context):\n    return 1\n")
    deployment = {**DEPLOYMENT, "service": "gw-bad", "image": str(source), **field}
    status, _, body = gateway.call("POST", "/system/functions", deployment)
    assert status == 400 and message in body, body
    status, _, body = gateway.call("GET", "/system/functions")
    assert status == 200 and all(f["name"] != "gw-bad" for f in json.loads(body))


def test_an_invalid_reply_is_a_502_on_the_gateway_too(gateway: Gateway, tmp_path: Path) -> None:
    handler = "import json\ndef handle(event, context):\n    return json.loads(event.body)\n"
    source = write_function(tmp_path / "gw-replies", handler)
    status, _, body = gateway.call("POST", "/system/functions", {"service": "gw-replies", "image": str(source)})
    assert status == 200, body
    try:
        for reply, reason in [
            ({"statusCode": 1000}, b"gw-replies answered with status code 1000"),
            ({"statusCode": -1}, b"gw-replies answered with status code -1"),
            ({"statusCode": 200, "headers": {"X-A": "a\r\nb"}}, b"invalid value of header X-A"),
            ({"statusCode": 200, "headers": {"X A": "b"}}, b"invalid header name 'X A'"),
        ]:
            status, _, body = gateway.call("POST", "/function/gw-replies", auth=None, raw=json.dumps(reply).encode())
            assert status == 502 and reason in body, body
        status, _, body = gateway.call("POST", "/function/gw-replies", auth=None, raw=b'{"statusCode": 202}')
        assert status == 202
    finally:
        gateway.call("DELETE", "/system/functions", {"functionName": "gw-replies"})

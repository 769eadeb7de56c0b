"""thawd end to end: a real daemon process, driven through its Unix socket and the `thaw` CLI."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pyroute2 import IPRoute

from sandbox.cgroups import CgroupTree
from tests.thawd import Thawd, write_function

pytestmark = pytest.mark.privileged
NAME = "thawe0"

ECHO = """
import json, os, socket, time
def handle(event, context):
    data = json.loads(event.body or b"null")
    print("echo", event.method, event.path, flush=True)
    if isinstance(data, dict) and data.get("sleep"):
        time.sleep(data["sleep"])
    if isinstance(data, dict) and data.get("raise"):
        raise ValueError("asked to fail: " + data["raise"])
    if isinstance(data, dict) and data.get("exit"):
        os._exit(data["exit"])
    return {"data": data, "method": event.method, "path": event.path, "query": event.query,
            "uid": os.getuid(), "host": socket.gethostname(), "headers": event.headers}
"""


def _leftovers(name: str) -> dict[str, Any]:
    with IPRoute() as ipr:
        bridge = ipr.link_lookup(ifname=name)
    tree = CgroupTree(name)
    left = {"bridge": bridge, "cgroups": tree.children()}
    tree.remove()  # the probe made thaw's (empty) directories again
    return left


@pytest.fixture(scope="module")
def thawd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thawd]:
    daemon = Thawd(tmp_path_factory.mktemp("thawd"), NAME, "10.235.0.0/24", max_frame="1M")
    daemon.start()
    agents: list[int] = []
    try:
        yield daemon
    finally:
        if daemon.process and daemon.process.poll() is None:
            agents = [s["agent_pid"] for s in daemon.api("GET", "/sandboxes")[1]["sandboxes"]]
            assert daemon.stop() == 0, daemon.log()
        daemon.destroy_pool()
    assert _leftovers(NAME) == {"bridge": [], "cgroups": []}
    assert agents and not any(psutil.pid_exists(pid) for pid in agents)


@pytest.fixture(scope="module")
def echo(thawd: Thawd, tmp_path_factory: pytest.TempPathFactory) -> str:
    source = write_function(tmp_path_factory.mktemp("echo"), ECHO)
    result = thawd.cli("deploy", str(source), "--name", "echo", "--timeout", "2", "--json")
    assert result.returncode == 0, result.stderr + thawd.log()
    assert json.loads(result.stdout)["status"] == "ready"
    return "echo"


def _metric(thawd: Thawd, line_start: str) -> float:
    _, text = thawd.api("GET", "/metrics")
    for line in text.decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- deploy and invoke ---------------------------------------------------------------------------------
def test_invoke_restores_from_the_template_then_stays_warm(thawd: Thawd, echo: str) -> None:
    restored = '{function="echo",kind="restored"}'
    before = _metric(thawd, "thaw_starts_total" + restored)
    status, first = thawd.invoke(echo, {"n": 1}, path="/a/b?x=1")
    assert status == 200, first
    assert first["data"] == {"n": 1} and first["path"] == "/a/b" and first["query"] == {"x": "1"}
    assert first["uid"] == 65534 and first["host"] == "echo"
    instances = thawd.api("GET", "/instances?function=echo")[1]["instances"]
    status, second = thawd.invoke(echo, {"n": 2})
    assert status == 200 and second["data"] == {"n": 2}
    assert _metric(thawd, "thaw_starts_total" + restored) >= before + (1 if len(instances) == 1 else 0)
    assert _metric(thawd, 'thaw_starts_total{function="echo",kind="warm"}') >= 1
    after = thawd.api("GET", "/instances?function=echo")[1]["instances"]
    assert {i["id"] for i in after} == {i["id"] for i in instances}  # the second call reused the instance


def test_cli_lists_invokes_and_shows_logs(thawd: Thawd, echo: str) -> None:
    listed = json.loads(thawd.cli("ls", "--json").stdout)["functions"]
    assert [f["name"] for f in listed] == ["echo"]
    result = thawd.cli("invoke", echo, "--data", '{"via": "cli"}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"] == {"via": "cli"}
    piped = thawd.cli("invoke", echo, "--data", "-", stdin=b'{"via": "stdin"}')
    assert json.loads(piped.stdout)["data"] == {"via": "stdin"}
    logs = thawd.cli("logs", echo, "--tail", "50")
    assert "echo POST /" in logs.stdout
    table = thawd.cli("instances")
    assert "echo-" in table.stdout and "cow" in table.stdout
    assert "tmpfs on node 0" in thawd.cli("pool").stdout


def test_32_concurrent_invocations_scale_out(thawd: Thawd, echo: str) -> None:
    async def burst() -> list[tuple[int, dict[str, str], bytes]]:
        body = json.dumps({"sleep": 0.5}).encode()
        return await asyncio.gather(*(thawd.request("POST", f"/functions/{echo}/invoke", data=body) for _ in range(32)))

    replies = asyncio.run(burst())
    assert [r[0] for r in replies] == [200] * 32, [r[2][:200] for r in replies if r[0] != 200]
    instances = thawd.api("GET", "/instances?function=echo")[1]["instances"]
    assert 1 < len(instances) <= 32
    assert len({i["sandbox"] for i in instances}) == len(instances)  # one instance per sandbox


def test_handler_exception_is_a_500_with_its_message(thawd: Thawd, echo: str) -> None:
    status, reply = thawd.invoke(echo, {"raise": "boom"})
    assert status == 500
    assert reply["error"]["code"] == "handler_error"
    assert reply["error"]["message"] == "ValueError: asked to fail: boom"
    assert "Traceback" in reply["error"]["traceback"]
    result = thawd.cli("invoke", echo, "--data", '{"raise": "again"}')
    assert result.returncode == 1 and "asked to fail: again" in result.stderr
    assert thawd.invoke(echo, {"after": "error"})[0] == 200  # the instance lives on


def test_failed_invocations_are_logged_with_their_request_id(thawd: Thawd, echo: str) -> None:
    """Handler errors, timeouts and crashes reach thawd's log and `thaw logs`, each with the
    function and a request id (the caller's X-Call-Id when it sends one, as the gateway does)."""
    body = json.dumps({"raise": "logged"}).encode()
    status, _ = thawd.api("POST", f"/functions/{echo}/invoke", data=body, headers={"X-Call-Id": "call-7f3a"})
    assert status == 500
    assert thawd.invoke(echo, {"sleep": 3})[0] == 504  # its timeout is 2 s
    assert thawd.invoke(echo, {"exit": 4})[0] == 502
    logs = thawd.cli("logs", echo, "--tail", "200").stdout
    assert "request call-7f3a failed (handler_error): ValueError: asked to fail: logged" in logs
    assert re.search(r"request thaw-\d+ failed \(timeout\): echo did not answer within its 2 s timeout", logs), logs
    assert re.search(r"request thaw-\d+ failed \(instance_crashed\): .*exited with 4", logs), logs
    assert "echo: request call-7f3a failed (handler_error)" in thawd.log()


def test_timeout_is_a_504_and_the_instance_is_killed(thawd: Thawd, echo: str) -> None:
    before = {i["pid"] for i in thawd.api("GET", "/instances?function=echo")[1]["instances"]}
    status, reply = thawd.invoke(echo, {"sleep": 5})
    assert status == 504 and reply["error"]["code"] == "timeout"
    assert "2 s timeout" in reply["error"]["message"]
    deadline = time.monotonic() + 5
    killed: set[int] = set()
    while time.monotonic() < deadline:
        now = {i["pid"] for i in thawd.api("GET", "/instances?function=echo")[1]["instances"]}
        killed = {pid for pid in before if pid not in now and not psutil.pid_exists(pid)}
        if killed:
            break
        time.sleep(0.05)
    assert len(killed) >= 1 or not before
    assert thawd.invoke(echo, {"after": "timeout"})[0] == 200


def test_a_crashing_instance_is_reported_and_the_daemon_goes_on(thawd: Thawd, echo: str) -> None:
    status, reply = thawd.invoke(echo, {"exit": 3})
    assert status == 502 and reply["error"]["code"] == "instance_crashed"
    assert "exited with 3" in reply["error"]["message"]
    assert thawd.invoke(echo, {"after": "crash"})[0] == 200


def test_bad_requests_are_refused_clearly(thawd: Thawd, echo: str) -> None:
    status, reply = thawd.api("POST", "/functions", data=b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = thawd.api("POST", "/functions", {"name": "Bad_Name", "source": "/tmp"})
    assert status == 400 and "function name" in reply["error"]["message"]
    status, reply = thawd.api("POST", "/functions", {"name": "nodir", "source": "/no/such/dir"})
    assert status == 400 and "/no/such/dir" in reply["error"]["message"]
    status, reply = thawd.invoke("nosuch")
    assert status == 404 and reply["error"]["code"] == "not_found"
    assert thawd.cli("invoke", "nosuch").returncode == 3
    status, reply = thawd.api("POST", f"/functions/{echo}/invoke", data=b"x" * (2 << 20))
    assert status == 413 and reply["error"]["code"] == "too_large"
    status, reply = thawd.api("POST", f"/functions/{echo}/invoke", data=b"x" * 900_000)  # base64 grows it
    assert status == 413 and "exceeds" in reply["error"]["message"]
    status, reply = thawd.api("GET", "/no/such/route")
    assert status == 404 and reply["error"]["code"] == "not_found"


def test_failed_init_is_reported_with_the_guest_traceback_and_nothing_stays(thawd: Thawd, tmp_path: Path) -> None:
    source = write_function(tmp_path / "broken", "raise RuntimeError('init cannot start')\n")
    status, reply = thawd.api("POST", "/functions", {"name": "broken", "source": str(source)})
    assert status == 422 and reply["error"]["code"] == "deploy_failed"
    assert "init cannot start" in reply["error"]["message"]
    assert thawd.api("GET", "/functions/broken")[0] == 404
    assert not (Path(str(thawd.flags["state-dir"])) / "functions" / "broken").exists()


def test_requirements_txt_is_installed_at_deploy(thawd: Thawd, tmp_path: Path) -> None:
    wheel = tmp_path / "thawtestdep-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("thawtestdep/__init__.py", "ANSWER = 42\n")
        z.writestr("thawtestdep-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: thawtestdep\nVersion: 1.0\n")
        z.writestr("thawtestdep-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("thawtestdep-1.0.dist-info/RECORD", "")
    body = "import thawtestdep\ndef handle(event, context):\n    return {'answer': thawtestdep.ANSWER}\n"
    source = write_function(tmp_path / "withdeps", body, requirements=f"{wheel}\n")
    thawd.deploy("withdeps", source)
    try:
        assert thawd.invoke("withdeps") == (200, {"answer": 42})
    finally:
        thawd.remove("withdeps")
    bad = write_function(tmp_path / "baddeps", body, requirements="/no/such/package.whl\n")
    status, reply = thawd.api("POST", "/functions", {"name": "baddeps", "source": str(bad)})
    assert status == 422 and "requirements.txt" in reply["error"]["message"]


MAPS_A_TABLE = (
    "import mmap, os\n"
    "with open(os.path.join(os.path.dirname(__file__), 'table.bin'), 'rb') as f:\n"
    "    TABLE = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)\n"
    "def handle(event, context):\n"
    "    return TABLE[:5].decode()\n"
)


def _table_function(directory: Path) -> Path:
    source = write_function(directory, MAPS_A_TABLE)
    (source / "table.bin").write_bytes(b"thaws" * 2000)
    return source


def test_a_file_the_function_maps_from_its_own_directory_is_remapped_at_restore(thawd: Thawd, tmp_path: Path) -> None:
    """The guest sees its code at /function; the daemon finds the mapped file where that is on the host
    (as it must for C extensions installed from requirements.txt)."""
    thawd.deploy("mapped", _table_function(tmp_path / "mapped"))
    try:
        assert thawd.invoke("mapped") == (200, "thaws")
    finally:
        thawd.remove("mapped")


def test_a_failed_restore_is_a_503_and_gives_its_sandbox_back(thawd: Thawd, tmp_path: Path) -> None:
    """A file the template maps changes under it: the restore is refused with the cause, the
    instance's sandbox goes back to the pool, and the daemon goes on."""
    thawd.deploy("changing", _table_function(tmp_path / "changing"))
    try:
        (mapped,) = [p for p in thawd.base.rglob("table.bin") if "changing" in str(p)]
        with open(mapped, "ab") as f:
            f.write(b"!")  # the revision's copy, the one the template maps
        status, reply = thawd.invoke("changing")
        assert status == 503 and reply["error"]["code"] == "unavailable", reply
        assert "table.bin was modified since the capture" in reply["error"]["message"]
        sandboxes = thawd.api("GET", "/sandboxes")[1]["sandboxes"]
        assert not [s for s in sandboxes if s["function"] == "changing" and s["state"] == "busy"], sandboxes
        assert thawd.api("GET", "/functions/changing")[0] == 200
    finally:
        thawd.remove("changing")


def test_update_recaptures_and_delete_removes_the_template(thawd: Thawd, tmp_path: Path) -> None:
    source = write_function(tmp_path / "v", "def handle(event, context):\n    return 'one'\n")
    first = thawd.deploy("versions", source)
    assert thawd.invoke("versions") == (200, "one")
    write_function(source, "def handle(event, context):\n    return 'two'\n")
    result = thawd.cli("deploy", str(source), "--name", "versions", "--json")
    assert result.returncode == 0, result.stderr
    second = json.loads(result.stdout)
    assert second["revision"] == first["revision"] + 1
    assert thawd.invoke("versions") == (200, "two")
    templates = {t["name"] for t in thawd.api("GET", "/pool")[1]["templates"]}
    assert second["template"] in templates and first["template"] not in templates
    assert thawd.cli("rm", "versions").returncode == 0
    segments = thawd.api("GET", "/pool")[1]["templates"]
    assert all(t["function"] != "versions" for t in segments)
    assert thawd.invoke("versions")[0] == 404


def test_a_full_pool_says_so(thawd: Thawd, tmp_path: Path) -> None:
    body = "import os\nSTATE = os.urandom(600 << 20)\ndef handle(event, context):\n    return len(STATE)\n"
    source = write_function(tmp_path / "huge", body)
    status, reply = thawd.api("POST", "/functions", {"name": "huge", "source": str(source)})
    assert status == 507 and reply["error"]["code"] == "pool_full", reply
    assert "full" in reply["error"]["message"]
    assert thawd.api("GET", "/functions/huge")[0] == 404


def test_metrics_and_openapi_are_served(thawd: Thawd, echo: str) -> None:
    status, text = thawd.api("GET", "/metrics")
    assert status == 200
    for name in ("thaw_invocations_total", "thaw_starts_total", "thaw_restore_seconds_bucket", "thaw_pool_bytes"):
        assert name in text.decode()
    status, doc = thawd.api("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")


# -- restart and shutdown ------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_invocations_and_a_restart_keeps_functions(thawd: Thawd, echo: str) -> None:
    assert thawd.process is not None
    result: dict[str, Any] = {}

    def slow_call() -> None:
        result["reply"] = thawd.invoke(echo, {"sleep": 1.0})

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.4)  # the invocation is in flight
    assert thawd.stop(signal.SIGTERM) == 0, thawd.log()
    caller.join()
    assert result["reply"][0] == 200 and result["reply"][1]["data"] == {"sleep": 1.0}
    assert not thawd.socket.exists()
    thawd.start()
    names = [f["name"] for f in thawd.api("GET", "/functions")[1]["functions"]]
    assert "echo" in names
    assert thawd.invoke(echo, {"after": "restart"})[1]["data"] == {"after": "restart"}


def test_a_killed_daemon_leaves_nothing_a_restart_does_not_clean(thawd: Thawd, echo: str) -> None:
    assert thawd.invoke(echo, {"before": "kill"})[0] == 200
    agents = [s["agent_pid"] for s in thawd.api("GET", "/sandboxes")[1]["sandboxes"]]
    assert agents
    assert thawd.stop(signal.SIGKILL) == -signal.SIGKILL
    thawd.start()
    assert not any(psutil.pid_exists(pid) for pid in agents)
    assert "killed and removed" in thawd.log()
    assert thawd.invoke(echo, {"after": "kill"})[0] == 200


# -- bad input, answered cleanly -----------------------------------------------------------------------
REPLIES = """
import json
def handle(event, context):
    return json.loads(event.body)  # the reply the caller asks for, whatever it is
"""


@pytest.fixture(scope="module")
def replies(thawd: Thawd, tmp_path_factory: pytest.TempPathFactory) -> str:
    thawd.deploy("replies", write_function(tmp_path_factory.mktemp("replies"), REPLIES))
    return "replies"


@pytest.mark.parametrize("status", [99, 1000, -1, 0, 101, "200", True, 200.0])
def test_an_invalid_status_code_is_a_502_naming_it(thawd: Thawd, replies: str, status: Any) -> None:
    code, reply = thawd.invoke(replies, {"statusCode": status, "body": "x"})
    assert code == 502, reply
    assert reply["error"]["code"] == "bad_reply"
    assert reply["error"]["message"] == (
        f"replies answered with status code {status!r}: a status code is an integer from 200 to 599"
    )


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"X-Split": "a\r\nSet-Cookie: b=c"}, "invalid value of header X-Split"),
        ({"X-Split": "a\nb"}, "invalid value of header X-Split"),
        ({"X-Nul": "a\x00b"}, "invalid value of header X-Nul"),
        ({"X-Split\r\nSet-Cookie": "b"}, "invalid header name 'X-Split\\r\\nSet-Cookie'"),
        ({"Two Words": "b"}, "invalid header name 'Two Words'"),
        ({"": "b"}, "invalid header name ''"),
    ],
)
def test_an_invalid_header_is_a_502_naming_it(thawd: Thawd, replies: str, headers: dict[str, str], reason: str) -> None:
    code, reply = thawd.invoke(replies, {"statusCode": 200, "headers": headers, "body": "x"})
    assert code == 502, reply
    assert reply["error"]["code"] == "bad_reply" and reason in reply["error"]["message"], reply
    status, _, body = asyncio.run(
        thawd.request(
            "POST", f"/functions/{replies}/invoke", data=json.dumps({"statusCode": 299, "body": "ok"}).encode()
        )
    )
    assert (status, body) == (299, b"ok")  # the same instance answers on


def _strict_json(data: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(data, parse_constant=refuse)


def test_deeply_nested_json_is_a_400(thawd: Thawd, echo: str) -> None:
    for route in ("/functions", f"/functions/{echo}", f"/functions/{echo}/scale", f"/functions/{echo}/template"):
        method = "PUT" if route == f"/functions/{echo}" else "POST"
        status, reply = thawd.api(method, route, data=b"[" * 100_000)
        assert status == 400, (route, reply)
        assert reply["error"]["message"] == "the request body nests arrays or objects more than 32 levels deep"
    nested: Any = {"replicas": 1}
    for _ in range(40):  # parses, but no body of the API is like it
        nested = {"replicas": nested}
    status, reply = thawd.api("POST", f"/functions/{echo}/scale", nested)
    assert status == 400 and "32 levels" in reply["error"]["message"]


BAD_FIELDS: list[tuple[dict[str, Any] | bytes, str]] = [
    ({"labels": "notadict"}, "labels must be an object of strings, not 'notadict'"),
    ({"labels": {"a": 1}}, "labels must be an object of strings"),
    ({"annotations": 5}, "annotations must be an object of strings, not 5"),
    ({"image": 7}, "image must be a string, not 7"),
    (b'"timeout": Infinity', "not valid JSON: Infinity is not a JSON value"),
    (b'"timeout": NaN', "not valid JSON: NaN is not a JSON value"),
    (b'"timeout": 1e400', "timeout must be a number greater than 0 and at most 604800 s, not inf"),
    ({"idle_timeout": -0.5}, "idle_timeout must be a number from 0 to 604800 s, not -0.5"),
    ({"cpu": 1e300}, "cpu must be a number from 0.01 to 1024 cores, not 1e+300"),
    ({"memory": 2**70}, "memory must be a number of bytes from 4194304 (4 MiB) to 1125899906842624 (1 PiB)"),
    ({"memory": True}, "memory must be a number of bytes"),
    ({"max_instances": 1.5}, "max_instances must be an integer >= 1, not 1.5"),
    ({"env": {"A\nB": "x"}}, "env must map variable names"),
    ({"handler": "handler:handle\n"}, "handler 'handler:handle\\n' must be module:callable"),
    ({"mode": ["cow"]}, "restore mode must be one of cow, copy, lazy, not ['cow']"),
]


@pytest.mark.parametrize(("field", "message"), BAD_FIELDS)
def test_a_bad_deploy_field_is_a_400_naming_it(
    thawd: Thawd, echo: str, tmp_path: Path, field: dict[str, Any] | bytes, message: str
) -> None:
    source = write_function(tmp_path / "fine", "def handle(event, context):\n    return 1\n")
    body = {"name": "badfield", "source": str(source)}
    if isinstance(field, bytes):  # what json.dumps would not write
        data = json.dumps(body).encode()[:-1] + b", " + field + b"}"
    else:
        data = json.dumps({**body, **field}).encode()
    try:
        status, reply = thawd.api("POST", "/functions", data=data)
        assert status == 400 and message in reply["error"]["message"], reply
        status, reply = thawd.api("PUT", f"/functions/{echo}", data=data.replace(b"badfield", echo.encode()))
        assert status == 400 and message in reply["error"]["message"], reply
    finally:
        thawd.remove("badfield")
    status, _, listing = asyncio.run(thawd.request("GET", "/functions"))
    assert status == 200
    assert [f["name"] for f in _strict_json(listing)["functions"] if f["name"] == "badfield"] == []


def test_a_name_with_a_trailing_newline_is_refused_before_any_init(thawd: Thawd, tmp_path: Path) -> None:
    source = write_function(tmp_path / "trailing", "def handle(event, context):\n    return 1\n")
    status, reply = thawd.api("POST", "/functions", {"name": "trailing\n", "source": str(source)})
    assert status == 400, reply
    assert reply["error"]["message"].startswith("function name 'trailing\\n' must be 1-63 lowercase letters")
    assert not (Path(str(thawd.flags["state-dir"])) / "functions" / "trailing\n").exists()
    status, reply = thawd.api("PUT", "/functions/trailing%0A", {"source": str(source)})
    assert status == 400 and "function name 'trailing\\n'" in reply["error"]["message"], reply

"""containerd-shim-thaw-v2 with the real containerd (Debian's), a private one started here.

A function image is written as an OCI archive (tests/oci_image.py), imported with `ctr image
import` and run with `ctr run --runtime io.containerd.thaw.v2`, each container in a network
namespace made as CRI makes a pod's. What a user relies on: HTTP on :8080 in that namespace
answers (the watchdog convention), the second container of an image is thawed from the first's
template (thawd and the shim say so), kill/delete/rm leave nothing behind, and failures reach
containerd's client as clear errors while containerd keeps serving.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.cgroups import CgroupTree
from tests.oci_image import SHIM_DIR, Containerd, containerd, http_in, netns, remove_netns, wait_http, write_image
from tests.thawd import Thawd

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (containerd, namespaces, cgroups)"),
    pytest.mark.skipif(
        shutil.which("containerd") is None, reason="Debian's containerd is not installed (scripts/setup)"
    ),
]
RUNTIME = "io.containerd.thaw.v2"
SHIM = SHIM_DIR / "containerd-shim-thaw-v2"
IMAGE = "docker.io/thaw-test/hello:1"
CRASHY = "docker.io/thaw-test/crashy:1"
BROKEN = "docker.io/thaw-test/nofunction:1"
HELLO = """
import json, os
STATE = bytes(range(256)) * 4096  # built once, at the cold start; every thawed instance has it
def handle(event, context):
    if event.path == "/crash":
        os._exit(7)
    return {"statusCode": 200, "body": json.dumps({"pid": os.getpid(), "state": len(STATE),
            "path": event.path, "echo": event.body.decode()})}
"""
THAW_FAILS = """
import os
def handle(event, context):
    return "never"
def after_thaw():
    raise RuntimeError("this function cannot be thawed")
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Thawd, Containerd]]:
    base = tmp_path_factory.mktemp("shim")
    thawd = Thawd(base, "thawshim0", "10.238.0.0/24")
    with thawd.serving(), containerd(thawd.socket) as ctd:
        for name, files in (
            (IMAGE, {"function/handler.py": HELLO}),
            (CRASHY, {"function/handler.py": THAW_FAILS}),
            (BROKEN, {"app/main.py": "print('not a thaw function')\n"}),
        ):
            archive = base / (name.rsplit("/", 1)[1].replace(":", "-") + ".tar")
            write_image(archive, name, files)
            ctd.ctr("image", "import", str(archive))
        yield thawd, ctd
    CgroupTree("thawshim0").remove()


@pytest.fixture
def pod() -> Iterator[str]:
    """A pod's network namespace, as CRI makes it."""
    name = f"thawpod{os.getpid() % 10000}{time.monotonic_ns() % 100000}"
    netns(name)
    try:
        yield name
    finally:
        remove_netns(name)


def run(
    ctd: Containerd, image: str, container_id: str, ns: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return ctd.ctr(
        "run", "-d", "--runtime", RUNTIME, "--with-ns", f"network:/run/netns/{ns}", image, container_id, check=check
    )


def remove(ctd: Containerd, container_id: str) -> None:
    ctd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=False)
    deadline = time.monotonic() + 10
    while "RUNNING" in ctd.ctr("task", "ls").stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    ctd.ctr("task", "delete", container_id, check=False)
    ctd.ctr("container", "rm", container_id, check=False)


def mounts_under(path: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(str(path))]


def cgroup_dirs(relative: str) -> list[Path]:
    """The OCI spec's cgroup in every hierarchy (ctr's default cgroupsPath is /<namespace>/<id>)."""
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/{relative}") if p.exists()]


def test_first_container_cold_second_thawed_and_http_answers(node: tuple[Thawd, Containerd], pod: str) -> None:
    thawd, ctd = node
    first = run(ctd, IMAGE, "hello1", pod)
    assert "cold start" in first.stdout  # the shim says so on the container's stdout
    status, body = wait_http(pod, "/_/health")
    assert (status, body) == (200, b"OK")
    status, body = http_in(pod, "/greet", data=b"hi")
    reply = json.loads(body)
    assert status == 200 and reply["state"] == 256 * 4096 and reply["path"] == "/greet" and reply["echo"] == "hi"
    _, info = thawd.api("GET", "/containers/default/hello1")
    assert info["start"] == "cold" and info["state"] == "running" and info["init_ms"] > 0
    remove(ctd, "hello1")

    second = run(ctd, IMAGE, "hello2", pod)
    assert "thawed from template" in second.stdout and "no cold start" in second.stdout
    _, info2 = thawd.api("GET", "/containers/default/hello2")
    assert info2["start"] == "thawed" and info2["template"] == info["template"] and info2["init_ms"] is None
    assert wait_http(pod, "/")[0] == 200
    # The instance serves from the pod's network namespace: the one the OCI spec named.
    assert _same_netns(info2["pid"], pod)
    remove(ctd, "hello2")


def _same_netns(pid: int, ns: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino


def test_kill_delete_rm_leave_nothing_behind(node: tuple[Thawd, Containerd], pod: str) -> None:
    thawd, ctd = node
    mounts_before = len(Path("/proc/self/mountinfo").read_text().splitlines())
    parents_before = cgroup_dirs("default")
    run(ctd, IMAGE, "gone1", pod)
    _, info = thawd.api("GET", "/containers/default/gone1")
    pid = info["pid"]
    assert _same_netns(pid, pod)
    cgroups = cgroup_dirs("default/gone1")
    assert cgroups, "the instance's cgroup is the OCI spec's cgroupsPath"
    assert all(str(pid) in (c / "cgroup.procs").read_text().split() for c in cgroups if (c / "cgroup.procs").exists())
    assert mounts_under(ctd.base / "state"), "the rootfs is mounted in the bundle while the container lives"

    ctd.ctr("task", "kill", "gone1")  # SIGTERM
    deadline = time.monotonic() + 10
    while "STOPPED" not in ctd.ctr("task", "ls").stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "STOPPED" in ctd.ctr("task", "ls").stdout
    ctd.ctr("task", "delete", "gone1")
    ctd.ctr("container", "rm", "gone1")

    assert not Path(f"/proc/{pid}").exists()
    assert not cgroup_dirs("default/gone1") and cgroup_dirs("default") == parents_before  # parents made go too
    assert not mounts_under(ctd.base / "state")
    assert len(Path("/proc/self/mountinfo").read_text().splitlines()) <= mounts_before
    assert thawd.api("GET", "/containers")[1] == []
    assert ctd.ctr("task", "ls", "-q").stdout.strip() == ""
    # The namespace's resident shim server stays for the next container, holding nothing of this one.
    assert ctd.shim_pids() and not any(_children(pid) for pid in ctd.shim_pids())


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _shim_pid(ctd: Containerd, container_id: str) -> int:
    """The shim pid containerd was given for a container (`start` writes it in the bundle)."""
    return int(
        (ctd.base / "state" / "io.containerd.runtime.v2.task" / "default" / container_id / "shim.pid").read_text()
    )


def test_one_resident_shim_serves_the_namespace(node: tuple[Thawd, Containerd], pod: str) -> None:
    thawd, ctd = node
    run(ctd, IMAGE, "pair1", pod)
    second_pod = f"{pod}b"
    netns(second_pod)
    try:
        run(ctd, IMAGE, "pair2", second_pod)  # both at once: one server, two tasks
        assert _shim_pid(ctd, "pair1") == _shim_pid(ctd, "pair2") and ctd.shim_pids() == [_shim_pid(ctd, "pair1")]
        assert wait_http(pod)[0] == 200 and wait_http(second_pod)[0] == 200
        remove(ctd, "pair1")
        assert wait_http(second_pod)[0] == 200  # the other container is untouched
        remove(ctd, "pair2")
    finally:
        remove_netns(second_pod)
    # A server that died (its socket left behind) is replaced by the next start.
    (server,) = ctd.shim_pids()
    os.kill(server, signal.SIGKILL)
    while _alive(server):
        time.sleep(0.05)
    run(ctd, IMAGE, "pair3", pod)
    assert _shim_pid(ctd, "pair3") != server and wait_http(pod)[0] == 200
    remove(ctd, "pair3")
    assert thawd.api("GET", "/containers")[1] == []


def test_a_shim_that_dies_holding_a_container_leaves_nothing_behind(node: tuple[Thawd, Containerd], pod: str) -> None:
    """containerd runs the binary's `delete` for each task of a shim whose connection closed: the
    rootfs still mounted takes the full path (unmount), thawd drops the instance."""
    thawd, ctd = node
    run(ctd, IMAGE, "orphan2", pod)
    pid = thawd.api("GET", "/containers/default/orphan2")[1]["pid"]
    os.kill(_shim_pid(ctd, "orphan2"), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (thawd.api("GET", "/containers")[1] or mounts_under(ctd.base / "state")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert thawd.api("GET", "/containers")[1] == [] and not mounts_under(ctd.base / "state")
    assert not _alive(pid)
    ctd.ctr("task", "delete", "orphan2", check=False)
    ctd.ctr("container", "rm", "orphan2")
    assert run(ctd, IMAGE, "orphan3", pod).returncode == 0  # a new server; containerd keeps serving
    assert wait_http(pod)[0] == 200
    remove(ctd, "orphan3")


def test_an_idle_server_leaves_and_the_next_start_brings_one(tmp_path: Path) -> None:
    """The binary's `start` leaves a server on the namespace's socket; with no task and no
    connection for THAW_SHIM_IDLE_TIMEOUT seconds it removes its socket and pid file and exits."""
    env = {**os.environ, "THAW_SHIM_SOCKET_DIR": str(tmp_path / "s"), "THAW_SHIM_IDLE_TIMEOUT": "0.5"}
    flags = ["-namespace", "idle", "-id", "c1", "-address", str(tmp_path / "no-containerd.sock")]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    pids = []
    for _ in range(2):
        out = subprocess.run(
            [str(SHIM), *flags, "-publish-binary", "/bin/false", "start"],
            cwd=bundle, env=env, capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        socket_path = Path(out.stdout.removeprefix("unix://"))
        assert (bundle / "address").read_text() == out.stdout and socket_path.is_socket()
        pid = int((bundle / "shim.pid").read_text())
        pids.append(pid)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid) and not socket_path.exists() and not Path(f"{socket_path}.pid").exists()
    assert pids[0] != pids[1]


def test_delete_response_is_protobufs() -> None:
    """`delete` writes its DeleteResponse by hand (daemon/shim/start.py): protobuf reads it back."""
    from daemon.shim.proto.containerd.runtime.task.v2 import shim_pb2
    from daemon.shim.start import delete_response

    for at in (1_700_000_000_123_456_789, 1_700_000_000_000_000_000, 0):
        response = shim_pb2.DeleteResponse.FromString(delete_response(137, at))
        assert (response.pid, response.exit_status, response.exited_at.ToNanoseconds()) == (0, 137, at)


def test_crash_after_start_is_a_task_exit(node: tuple[Thawd, Containerd], pod: str) -> None:
    thawd, ctd = node
    events = subprocess.Popen(
        ["ctr", "--address", str(ctd.address), "events"], stdout=subprocess.PIPE, text=True, env=ctd.env
    )
    try:
        run(ctd, IMAGE, "crash1", pod)
        wait_http(pod)
        with pytest.raises(ConnectionError):
            http_in(pod, "/crash", timeout=3.0)
        deadline = time.monotonic() + 10
        while thawd.api("GET", "/containers/default/crash1")[1]["state"] != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        _, info = thawd.api("GET", "/containers/default/crash1")
        assert info["exit_status"] == 7
        while "STOPPED" not in ctd.ctr("task", "ls").stdout and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "STOPPED" in ctd.ctr("task", "ls").stdout
        time.sleep(0.5)  # the publish binary's run
    finally:
        events.terminate()
        out, _ = events.communicate(timeout=10)
        remove(ctd, "crash1")
    exits = [line for line in out.splitlines() if "/tasks/exit" in line and "crash1" in line]
    assert exits and '"exit_status":7' in exits[0].replace(" ", "")


def test_failures_are_clear_errors_and_containerd_keeps_serving(node: tuple[Thawd, Containerd], pod: str) -> None:
    thawd, ctd = node
    broken = run(ctd, BROKEN, "broken1", pod, check=False)
    assert broken.returncode != 0 and "has no function" in broken.stderr and "/function" in broken.stderr
    ctd.ctr("container", "rm", "broken1", check=False)

    crashy = run(ctd, CRASHY, "crashy1", pod, check=False)
    assert crashy.returncode != 0
    assert "crashed during its thaw" in crashy.stderr and "this function cannot be thawed" in crashy.stderr
    ctd.ctr("container", "rm", "crashy1", check=False)
    assert thawd.api("GET", "/containers")[1] == []

    assert run(ctd, IMAGE, "after1", pod).returncode == 0  # containerd and thawd still serve
    assert wait_http(pod)[0] == 200
    remove(ctd, "after1")


def test_thawd_not_running_is_a_clear_error(tmp_path: Path, pod: str) -> None:
    missing = tmp_path / "no-thawd.sock"
    with containerd(missing) as lonely:
        archive = tmp_path / "img.tar"
        write_image(archive, IMAGE, {"function/handler.py": HELLO})
        lonely.ctr("image", "import", str(archive))
        result = run(lonely, IMAGE, "orphan1", pod, check=False)
        assert result.returncode != 0
        assert "thawd is not running" in result.stderr and str(missing) in result.stderr
        assert lonely.ctr("version").returncode == 0
        lonely.ctr("container", "rm", "orphan1", check=False)
        assert lonely.ctr("task", "ls", "-q").stdout.strip() == ""

"""Sandboxes on the real kernel: isolation, limits, repurposing, release, leaks and bad input."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pyroute2 import IPRoute

from daemon.config import DaemonConfig
from daemon.main import build_sandboxes
from native.kerndat import kerndat
from sandbox import rootfs
from sandbox.cgroups import CgroupTree, Limits, detect
from sandbox.egress import HostPort, thaw_tables
from sandbox.errors import InvalidLimits, InvalidSpec, SandboxError, SubnetExhausted, UnsupportedRestore
from sandbox.guest.launch import recv
from sandbox.network import NetworkConfig
from sandbox.pool import PoolSettings, SandboxPool
from sandbox.sandbox import UNPRIVILEGED_USERFAULTFD, ProcessExit, Sandbox, SandboxConfig, SandboxSpec
from shmpool import Pool
from snapshot import procfs
from snapshot.capture import capture
from snapshot.errors import RestoreError
from snapshot.restore import Stub, restore
from snapshot.template import Template
from tests.guests import REPO, prepared_stub_facts, request

pytestmark = pytest.mark.privileged
BRIDGE = "thawt0"
SUBNET = "10.231.0.0/24"
TREE = "thaw-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


OPEN_PORT = _free_port()  # the one host port the module's pool opens to its sandboxes


def _function(directory: Path, body: str = "def handle(event, context):\n    return {'ok': True}\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    (directory / "handler.py").write_text(body)
    (directory / "handler.py").chmod(0o644)
    return directory


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sandboxes")


@pytest.fixture(scope="module")
def pool(runtime: Path) -> Iterator[SandboxPool]:
    pool = SandboxPool(
        PoolSettings(prewarm=1, max_size=6, cgroup_tree=TREE),
        SandboxConfig(runtime_dir=runtime),
        NetworkConfig(bridge=BRIDGE, subnet=SUBNET, host_ports=(HostPort("tcp", OPEN_PORT, OPEN_PORT),)),
    )
    yield pool
    pool.destroy()


@pytest.fixture
def fn_a(tmp_path: Path) -> Path:
    return _function(tmp_path / "fn-a")


def run(sandbox: Sandbox, code: str, timeout: float = 30) -> tuple[ProcessExit, str]:
    """Run Python `code` inside; returns how it ended and what it printed."""
    read, write = os.pipe()
    try:
        process = sandbox.spawn([sys.executable, "-c", textwrap.dedent(code)], log_fd=write)
    finally:
        os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    ended = process.wait_exit(timeout)
    assert ended is not None, "the process did not end"
    return ended, b"".join(chunks).decode()


def run_json(sandbox: Sandbox, code: str) -> dict[str, object]:
    ended, out = run(sandbox, "import json\n" + textwrap.dedent(code))
    assert ended.code == 0, out
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


# -- isolation -----------------------------------------------------------------------------------------
def test_inside_is_isolated(pool: SandboxPool, fn_a: Path, tmp_path: Path) -> None:
    listener = socket.create_server(("10.231.0.1", OPEN_PORT))  # the host is closed but for open ports
    port = listener.getsockname()[1]
    accepted: list[str] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[1][0]), daemon=True).start()
    hidden = [
        str(tmp_path),
        str(REPO / "native"),
        str(REPO / "README.md"),
        "/root/.bashrc",
        "/run/thaw",
        "/sys",
        str(pool.config.runtime_dir),
    ]
    hidden.append("/etc/shadow")
    sandbox = pool.acquire(SandboxSpec(fn_a, hostname="fn-a"))
    try:
        seen = run_json(
            sandbox,
            f"""
            import os, socket
            def writable(path):
                try:
                    open(path, "w").close()
                    return True
                except OSError:
                    return False
            with socket.create_connection(("10.231.0.1", {port}), timeout=5):
                pass
            status = dict(line.split(":", 1) for line in open("/proc/self/status"))
            print(json.dumps({{
                "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                "me": os.getpid(),
                "hostname": socket.gethostname(),
                "links": sorted(name for _, name in socket.if_nameindex()),
                "visible": [p for p in {hidden!r} if os.path.exists(p)],
                "function": sorted(os.listdir("/function")),
                "root_writable": writable("/x"),
                "tmp_writable": writable("/tmp/x"),
                "uid": [os.getuid(), os.getgid()],
                "cap_eff": status["CapEff"].strip(),
                "no_new_privs": status["NoNewPrivs"].strip(),
            }}))
            """,
        )
    finally:
        pool.release(sandbox)
        listener.close()
    assert seen["pids"] == [1, seen["me"]]  # the agent and us, nothing of the host
    assert seen["hostname"] == "fn-a"
    assert seen["links"] == ["eth0", "lo"]
    assert seen["visible"] == []
    assert seen["function"] == ["handler.py"]
    assert seen["root_writable"] is False and seen["tmp_writable"] is True
    assert seen["uid"] == [65534, 65534]
    assert seen["cap_eff"] == "0000000000000000" and seen["no_new_privs"] == "1"
    assert sandbox.lease is not None and accepted == [str(sandbox.lease.address)]


def test_eth0_has_the_assigned_address(pool: SandboxPool, fn_a: Path) -> None:
    sandbox = pool.acquire(SandboxSpec(fn_a))
    try:
        inside = IPRoute(fileno=sandbox.agent.netlink())
        try:
            addresses = {(a.get_attr("IFA_LABEL"), a.get_attr("IFA_ADDRESS")) for a in inside.get_addr(family=2)}
        finally:
            inside.close()
    finally:
        pool.release(sandbox)
    assert sandbox.lease is not None
    assert addresses == {("lo", "127.0.0.1"), ("eth0", str(sandbox.lease.address))}


# -- limits --------------------------------------------------------------------------------------------
def test_memory_hog_is_oom_killed_and_reported(pool: SandboxPool, fn_a: Path) -> None:
    sandbox = pool.acquire(SandboxSpec(fn_a, Limits(memory=48 << 20)))
    try:
        ended, _ = run(sandbox, "blocks = [bytearray(1 << 20) for _ in range(400)]\nprint('survived')")
    finally:
        pool.release(sandbox)
    assert ended.oom_killed, ended
    assert "OOM" in ended.describe()


def test_fork_bomb_stops_at_pids_max(pool: SandboxPool, fn_a: Path) -> None:
    sandbox = pool.acquire(SandboxSpec(fn_a, Limits(pids=12)))
    try:
        ended, out = run(
            sandbox,
            """
            import os, time
            children, refused = [], 0
            for _ in range(60):
                try:
                    pid = os.fork()
                except BlockingIOError:
                    refused += 1
                    continue
                if pid == 0:
                    os.closerange(0, 3)  # let the test read our parent's output to its end
                    time.sleep(30)
                    os._exit(0)
                children.append(pid)
            print(len(children), refused, flush=True)
            """,
        )
        in_cgroup = len(sandbox.instance_cgroup.pids())
    finally:
        pool.release(sandbox)
    made, refused = map(int, out.split())
    assert ended.code == 0
    assert made == 11 and refused == 49  # 12 = the python that forks + 11 children
    assert in_cgroup == 11  # the parent has exited; its children remain until release


def _pids_and_memory(sandbox: Sandbox) -> tuple[float, float]:
    """The instance cgroup's pids and memory limits as the kernel has them (inf: none)."""
    dirs = sandbox.instance_cgroup.directories()
    files = [d / name for d in dirs for name in ("pids.max", "memory.max", "memory.limit_in_bytes")]
    values = {f.name: f.read_text().strip() for f in files if f.exists()}
    memory = values.get("memory.max", values.get("memory.limit_in_bytes", "max"))

    def number(value: str) -> float:
        return float("inf") if value == "max" or int(value) >= 1 << 60 else float(value)

    return number(values["pids.max"]), number(memory)


def test_limits_follow_each_function_through_one_sandbox(pool: SandboxPool, fn_a: Path, tmp_path: Path) -> None:
    """Repurpose writes only the limits that differ from what the cgroup holds: each function
    still gets its own."""
    fn_b = _function(tmp_path / "fn-b")
    steps = [
        (fn_a, Limits(memory=48 << 20, pids=12), (12, 48 << 20)),
        (fn_a, Limits(memory=48 << 20, pids=12), (12, 48 << 20)),
        (fn_b, Limits(), (float("inf"), float("inf"))),
        (fn_a, Limits(pids=12), (12, float("inf"))),
    ]
    used = set()
    for fn, limits, expected in steps:
        sandbox = pool.acquire(SandboxSpec(fn, limits))
        try:
            used.add(sandbox.id)
            assert _pids_and_memory(sandbox) == expected
        finally:
            pool.release(sandbox)
    assert len(used) == 1  # one sandbox served them all, released in between


def test_invalid_limits_are_refused_before_anything_changes(pool: SandboxPool, fn_a: Path) -> None:
    idle = len(pool.idle)
    for limits, words in [
        (Limits(memory=1000), "memory limit"),
        (Limits(cpu=0), "cpu limit"),
        (Limits(pids=0), "pids limit"),
        (Limits(cpuset_mems="zero"), "cpuset_mems"),
    ]:
        with pytest.raises(InvalidLimits, match=words):
            pool.acquire(SandboxSpec(fn_a, limits))
    with pytest.raises(InvalidSpec, match="does not exist"):
        pool.acquire(SandboxSpec(fn_a / "missing"))
    with pytest.raises(InvalidSpec, match="hostname"):
        pool.acquire(SandboxSpec(fn_a, hostname="not a name"))
    assert len(pool.idle) == idle and not pool.busy


# -- repurposing and release ---------------------------------------------------------------------------
def test_repurpose_leaves_nothing_of_the_previous_function(pool: SandboxPool, tmp_path: Path) -> None:
    fn_b = _function(tmp_path / "fn-b")
    (fn_b / "b-only.txt").write_text("b")
    fn_a = _function(tmp_path / "fn-a")
    a = pool.acquire(SandboxSpec(fn_a, hostname="fn-a", env={"A_SECRET": "1"}))
    sleeper = a.spawn(["/bin/sh", "-c", "echo a > /tmp/a-file; exec sleep 60"])
    first = a.id
    pool.release(a)
    b = pool.acquire(SandboxSpec(fn_b, hostname="fn-b", env={"B_SETTING": "2"}))
    try:
        assert b.id == first  # the same sandbox, repurposed
        seen = run_json(
            b,
            """
            import os, socket
            print(json.dumps({
                "tmp": os.listdir("/tmp"), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                "me": os.getpid(), "env": sorted(k for k in os.environ if k.endswith(("_SECRET", "_SETTING"))),
                "hostname": socket.gethostname(), "function": sorted(os.listdir("/function")),
            }))
            """,
        )
    finally:
        pool.release(b)
    assert sleeper.wait_exit(0) is not None
    assert seen == {
        "tmp": _tmp_leaf_tops(),
        "pids": [1, seen["me"]],
        "me": seen["me"],
        "env": ["B_SETTING"],
        "hostname": "fn-b",
        "function": ["b-only.txt", "handler.py"],
    }


def _tmp_leaf_tops() -> list[str]:
    """What a fresh /tmp holds: the tops of read-only leaves that live under /tmp on the host
    (a checkout of thaw in /tmp brings its venv and guest package there)."""
    return sorted({leaf.split("/")[2] for leaf in rootfs.default_leaves() if leaf.startswith("/tmp/")})


def test_release_kills_instances_and_the_agent_survives(pool: SandboxPool, fn_a: Path) -> None:
    sandbox = pool.acquire(SandboxSpec(fn_a))
    sleepers = [sandbox.spawn(["/bin/sleep", "60"]) for _ in range(3)]
    stub = sandbox.spawn_stub([])
    host_pids = [p.pid for p in [*sleepers, stub]]
    assert all(psutil.pid_exists(pid) for pid in host_pids)
    assert psutil.Process(stub.pid).status() == psutil.STATUS_STOPPED
    pool.release(sandbox)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in host_pids)
    assert all(p.wait_exit(0) is not None for p in sleepers)
    assert sandbox.alive() and psutil.pid_exists(sandbox.agent.pid)
    sandbox.agent.ping()
    assert sandbox.instance_cgroup.pids() == set()


def test_stubs_share_the_agents_report_and_empty_bounding_set(pool: SandboxPool, fn_a: Path) -> None:
    """The agent reads its special mappings and empties its bounding set once; its stubs, forks of
    it, start with both (what saves a restore into them the work)."""
    sandbox = pool.acquire(SandboxSpec(fn_a))
    try:
        for _ in range(2):
            stub = sandbox.spawn_stub([])
            reported, mapped, bounding = prepared_stub_facts(stub.pid)
            assert reported == mapped and {"[vdso]", "[vvar]"} <= set(mapped)
            assert bounding == "0000000000000000"
    finally:
        pool.release(sandbox)


def test_spawn_of_a_missing_program_says_so(pool: SandboxPool, fn_a: Path) -> None:
    sandbox = pool.acquire(SandboxSpec(fn_a))
    try:
        with pytest.raises(SandboxError, match=r"execve of /no/such/program failed: No such file"):
            sandbox.spawn(["/no/such/program"])
        sandbox.agent.ping()
    finally:
        pool.release(sandbox)


def test_guest_and_restored_stub_run_as_the_sandbox_uid(pool: SandboxPool, tmp_path: Path) -> None:
    """Deploy and invoke as the daemon wires them: a guest captured in one sandbox, an instance
    restored from its template into a stub of another."""
    body = "import os\ndef handle(event, context):\n    return {'uid': os.getuid(), 'host': context.hostname}\n"
    fn = _function(tmp_path / "fn-s", body)
    templates = Pool.create(tmp_path / "pool", backend="tmpfs", node=0, size=256 << 20)
    try:
        guest_box = pool.acquire(SandboxSpec(fn, hostname="deploy"))
        ours, theirs = socket.socketpair()
        with ours:
            guest = guest_box.spawn([sys.executable, "-m", "sandbox.guest", "/function"], control_fd=theirs.fileno())
            theirs.close()
            assert (recv(ours) or {}).get("type") == "ready"
            while procfs.state(guest.pid) != "T":
                time.sleep(0.001)
            guest_uid = Path(f"/proc/{guest.pid}/status").read_text().split("Uid:")[1].split()[0]
            template = capture(guest.pid, templates, "in-sandbox")
            pool.release(guest_box)
        instance_box = pool.acquire(SandboxSpec(fn, hostname="serve"))
        ours, theirs = socket.socketpair()
        with ours, template:
            stub = instance_box.spawn_stub(template.restore_fds("cow"), control_fd=theirs.fileno())
            theirs.close()
            instance = restore(template, Stub(stub.pid, stub.wait, stub.kill), "cow")
            try:
                assert (recv(ours) or {}).get("type") == "restored"
                reply = request(ours, "/")
                status = Path(f"/proc/{instance.pid}/status").read_text()
                assert instance.pid in instance_box.instance_cgroup.pids()
            finally:
                pool.release(instance_box)
        assert stub.wait_exit(5) is not None
    finally:
        templates.destroy()
    assert guest_uid == "65534"
    assert reply == {"uid": 65534, "host": "serve"}
    assert "Uid:\t65534" in status and "CapEff:\t0000000000000000" in status


def test_a_failed_restore_in_a_sandbox_leaves_no_stub_and_the_sandbox_releases(
    pool: SandboxPool, tmp_path: Path
) -> None:
    """The stub's parent is the agent, its tracer the restoring thread: the restore that fails must
    take the stub's exit report as tracer, or the agent would wait for the stub for ever."""
    fn = _function(tmp_path / "fn-f")
    templates = Pool.create(tmp_path / "pool", backend="tmpfs", node=0, size=256 << 20)
    try:
        template = _capture_in(pool, fn, templates, "fails")
        box = pool.acquire(SandboxSpec(fn, hostname="serve"))
        with template:
            stub = box.spawn_stub(template.restore_fds("cow")[:1])  # the segment only: no library can be mapped
            with pytest.raises(RestoreError, match="Bad file descriptor"):
                restore(template, Stub(stub.pid, stub.wait, stub.kill), "cow")
            assert stub.wait_exit(5) is not None
            assert box.instance_cgroup.pids() == set()
            pool.release(box)  # returns: the agent is not stuck waiting for the stub
    finally:
        templates.destroy()


# -- leaks and exhaustion ------------------------------------------------------------------------------
def _counts() -> dict[str, int]:
    """What a sandbox creates on the host (processes: not kernel threads, which come and go)."""
    netns = set()
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            netns.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
    with IPRoute() as ipr:
        links = len(ipr.get_links())
    tree = CgroupTree(TREE)
    return {
        "mounts": len(Path("/proc/self/mountinfo").read_text().splitlines()),
        "netns": len(netns),
        "links": links,
        "cgroups": len(tree.children()),
        "nft_tables": len(thaw_tables()),
        "processes": sum(1 for p in psutil.process_iter(["ppid"]) if p.pid != 2 and p.info["ppid"] != 2),
    }


@pytest.mark.parametrize("userns", [False, True], ids=["", "userns"])
def test_fifty_sandboxes_leave_nothing_behind(runtime: Path, userns: bool) -> None:
    before = _counts()
    pool = SandboxPool(
        PoolSettings(prewarm=0, max_size=50, cgroup_tree=TREE),
        SandboxConfig(runtime_dir=runtime, userns=userns),
        NetworkConfig(bridge="thawt1", subnet="10.232.0.0/24"),
    )
    try:
        sandboxes = [Sandbox.create(pool.config, pool.tree, pool.network) for _ in range(50)]
        during = _counts()
        for sandbox in sandboxes:
            sandbox.destroy()
    finally:
        pool.destroy()
    assert during["netns"] >= before["netns"] + 50 and during["links"] >= before["links"] + 51
    assert _counts() == before
    assert list(runtime.iterdir()) == []


def test_exhausted_subnet_is_a_clear_error_and_nothing_is_left(runtime: Path) -> None:
    before = _counts()
    pool = SandboxPool(
        PoolSettings(prewarm=1, max_size=3, cgroup_tree=TREE),
        SandboxConfig(runtime_dir=runtime),
        NetworkConfig(bridge="thawt2", subnet="10.233.0.0/30"),  # the gateway and one sandbox
    )
    try:
        with pytest.raises(SubnetExhausted, match=r"10\.233\.0\.0/30"):
            Sandbox.create(pool.config, pool.tree, pool.network)
        assert len(pool.tree.children()) == before["cgroups"] + 2  # the first sandbox's two cgroups
    finally:
        pool.destroy()
    assert _counts() == before


def test_cgroup_mode_is_detected() -> None:
    h = detect()
    assert h.mode in ("v1", "v2", "hybrid")
    if h.mode != "v2":
        assert set(h.v1) >= {"memory", "pids"}


# -- the optional user namespace -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def userns_pool(runtime: Path) -> Iterator[SandboxPool]:
    if not Path("/proc/self/ns/user").exists() or int(Path("/proc/sys/user/max_user_namespaces").read_text()) < 2:
        pytest.skip("needs user namespaces (CONFIG_USER_NS, user.max_user_namespaces)")
    pool = SandboxPool(
        PoolSettings(prewarm=1, max_size=3, cgroup_tree=TREE),
        SandboxConfig(runtime_dir=runtime, userns=True, userns_root=USERNS_ROOT),
        NetworkConfig(bridge="thawt3", subnet="10.234.0.0/24"),
    )
    yield pool
    pool.destroy()


USERNS_ROOT = 100_000


def _ids(pid: int) -> tuple[str, str]:
    status = Path(f"/proc/{pid}/status").read_text()
    return status.split("Uid:")[1].split()[0], status.split("Gid:")[1].split()[0]


def test_user_namespace_maps_root_to_an_unprivileged_uid(userns_pool: SandboxPool, fn_a: Path) -> None:
    sandbox = userns_pool.acquire(SandboxSpec(fn_a, hostname="fn-u"))
    try:
        agent_ids = _ids(sandbox.agent.pid)
        read, write = os.pipe()
        try:
            guest = sandbox.spawn(["/bin/sleep", "60"], log_fd=write)
        finally:
            os.close(write)
        os.close(read)
        guest_ids = _ids(guest.pid)
        seen = run_json(
            sandbox,
            """
            import os, socket
            print(json.dumps({
                "uid_map": open("/proc/self/uid_map").read().split(),
                "gid_map": open("/proc/self/gid_map").read().split(),
                "ids": [os.getuid(), os.getgid(), os.getgroups()],
                "cap_eff": dict(l.split(":", 1) for l in open("/proc/self/status"))["CapEff"].strip(),
                "hostname": socket.gethostname(), "function": os.listdir("/function"),
                "tmp_writable": os.access("/tmp", os.W_OK),
            }))
            """,
        )
    finally:
        userns_pool.release(sandbox)
    root = str(USERNS_ROOT)
    assert seen["uid_map"] == ["0", root, "1", "65534", "65534", "1"]
    assert seen["gid_map"] == ["0", root, "1", "65534", "65534", "1"]
    assert seen["ids"] == [65534, 65534, []] and seen["cap_eff"] == "0000000000000000"
    assert seen["hostname"] == "fn-u" and seen["function"] == ["handler.py"] and seen["tmp_writable"]
    assert agent_ids == (root, root)  # root inside is nobody in particular outside
    assert guest_ids == ("65534", "65534")  # as seen from the host: the mapped unprivileged uid


def test_user_namespace_root_must_differ_from_the_guests_ids(runtime: Path) -> None:
    with pytest.raises(SandboxError, match="userns_root 65534 must be an unprivileged host id other than"):
        SandboxPool(
            PoolSettings(prewarm=0, cgroup_tree=TREE, network=False),
            SandboxConfig(runtime_dir=runtime, userns=True, userns_root=65534),
        )


def test_user_namespace_sandbox_is_repurposed_clean(userns_pool: SandboxPool, tmp_path: Path) -> None:
    fn_a, fn_b = _function(tmp_path / "fn-a"), _function(tmp_path / "fn-b")
    (fn_b / "b-only.txt").write_text("b")
    a = userns_pool.acquire(SandboxSpec(fn_a, hostname="fn-a"))
    a.spawn(["/bin/sh", "-c", "echo a > /tmp/a-file; exec sleep 60"])
    userns_pool.release(a)
    b = userns_pool.acquire(SandboxSpec(fn_b, hostname="fn-b"))
    try:
        seen = run_json(b, "import os\nprint(json.dumps({'tmp': os.listdir('/tmp'), 'fn': os.listdir('/function')}))")
    finally:
        userns_pool.release(b)
    assert b.id == a.id
    assert sorted(seen["tmp"]) == _tmp_leaf_tops()  # type: ignore[call-overload]
    assert sorted(seen["fn"]) == ["b-only.txt", "handler.py"]  # type: ignore[call-overload]


def _capture_in(sandboxes: SandboxPool, fn: Path, templates: Pool, name: str = "in-userns") -> Template:
    """Deploy as the daemon does: the guest parks in a sandbox, is captured, the sandbox released."""
    box = sandboxes.acquire(SandboxSpec(fn, hostname="deploy"))
    ours, theirs = socket.socketpair()
    try:
        with ours:
            guest = box.spawn([sys.executable, "-m", "sandbox.guest", "/function"], control_fd=theirs.fileno())
            theirs.close()
            assert (recv(ours) or {}).get("type") == "ready"
            while procfs.state(guest.pid) != "T":
                time.sleep(0.001)
            return capture(guest.pid, templates, name)
    finally:
        sandboxes.release(box)


@pytest.mark.parametrize("mode", ["cow", "copy"])
def test_restore_into_a_user_namespace_sandbox(userns_pool: SandboxPool, tmp_path: Path, mode: str) -> None:
    """A template captured in a user namespace sandbox restores into another: the guest's uid maps
    to itself, so the uid the template recorded (as the host sees it) is the uid inside too."""
    fn = _function(tmp_path / "fn-s", "import os\ndef handle(event, context):\n    return {'uid': os.getuid()}\n")
    templates = Pool.create(tmp_path / "pool", backend="tmpfs", node=0, size=256 << 20)
    try:
        template = _capture_in(userns_pool, fn, templates)
        box = userns_pool.acquire(SandboxSpec(fn, hostname="serve"))
        ours, theirs = socket.socketpair()
        with ours, template:
            try:
                stub = box.spawn_stub(
                    template.restore_fds(mode), control_fd=theirs.fileno(), paged=template.paged(mode)
                )
                theirs.close()
                instance = restore(template, Stub(stub.pid, stub.wait, stub.kill), mode)
                assert (recv(ours) or {}).get("type") == "restored"
                reply = request(ours, "/")
                ids = _ids(instance.pid)
            finally:
                userns_pool.release(box)
    finally:
        templates.destroy()
    assert reply == {"uid": 65534} and ids == ("65534", "65534")


def test_lazy_restore_into_a_user_namespace_is_refused(userns_pool: SandboxPool, tmp_path: Path) -> None:
    if UNPRIVILEGED_USERFAULTFD.read_text().strip() == "1":
        pytest.skip("vm.unprivileged_userfaultfd is 1: the kernel lets a stub in a user namespace page lazily")
    fn = _function(tmp_path / "fn-l")
    templates = Pool.create(tmp_path / "pool", backend="tmpfs", node=0, size=256 << 20)
    try:
        template = _capture_in(userns_pool, fn, templates)
        box = userns_pool.acquire(SandboxSpec(fn))
        try:
            with template, pytest.raises(UnsupportedRestore, match="needs a userfaultfd for kernel faults"):
                box.spawn_stub(template.restore_fds("lazy"), paged=template.paged("lazy"))
            assert box.instance_cgroup.pids() == set()  # refused before a stub existed
        finally:
            userns_pool.release(box)
    finally:
        templates.destroy()


# -- egress: tests/test_network.py ------------------------------------------------------------------


# -- NUMA ----------------------------------------------------------------------------------------------
def test_instances_allocate_from_the_memory_pools_node(runtime: Path, fn_a: Path) -> None:
    """thawd hands the pool's node to the sandbox pool; every instance cgroup's cpuset.mems shows it."""
    node = kerndat().node_ids[-1]  # with several nodes, not all of what a new cgroup inherits
    config = DaemonConfig(sandboxes_prewarm=0, sandboxes_network=False, sandboxes_cgroup=TREE)
    config.sandboxes_runtime_dir = str(runtime)
    pool = build_sandboxes(config, pool_node=node)
    try:
        sandbox = pool.acquire(SandboxSpec(fn_a))
        try:
            files = [d / "cpuset.mems" for d in sandbox.instance_cgroup.directories() if (d / "cpuset.mems").exists()]
            mems = [f.read_text().strip() for f in files]
        finally:
            pool.release(sandbox)
    finally:
        pool.destroy()
    assert mems == [str(node)]


def test_a_node_outside_thaws_cpuset_is_refused(runtime: Path) -> None:
    with pytest.raises(SandboxError, match=r"NUMA nodes 4095 are not all in .*cpuset"):
        SandboxPool(
            PoolSettings(prewarm=0, cgroup_tree=TREE, network=False, cpuset_mems="4095"),
            SandboxConfig(runtime_dir=runtime),
        )

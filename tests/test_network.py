"""Sandbox networking on the real kernel: what a sandbox reaches of the host and beyond, through
thaw's nftables table, with egress off and on, and the host-port allow-list."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from daemon.config import ConfigError, load
from sandbox.egress import HostPort, parse_host_ports, thaw_tables
from sandbox.errors import InvalidHostPorts
from sandbox.network import IP_FORWARD, NetworkConfig
from sandbox.pool import PoolSettings, SandboxPool
from sandbox.sandbox import Sandbox, SandboxConfig, SandboxSpec
from tests.test_sandbox import TREE, _function, run_json

OUTSIDE = "10.235.0.2"  # in a network namespace this test makes: never a real host
HOST_SIDE = "10.235.0.1"  # the host's end of the veth to it: an address of the host beyond the bridge
REFUSED = {"ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "EACCES", "EPERM"}  # at once: not "timed out"
OUTSIDE_PROGRAM = """
import socket, sys
from native.constants import CloneFlag
from native.namespaces import unshare
from pyroute2 import IPRoute
unshare(CloneFlag.NEWNET)
print("unshared", flush=True)
sys.stdin.readline()  # the test has moved our end of the veth in
with IPRoute() as ip:
    ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
    end = ip.link_lookup(ifname="thwo1")[0]
    ip.addr("add", index=end, address=sys.argv[1], prefixlen=24)
    ip.link("set", index=end, state="up")
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
while True:  # no route back to any sandbox subnet: only a masqueraded connection is answered
    conn, peer = server.accept()
    print(peer[0], flush=True)
    conn.close()
"""
pytestmark = pytest.mark.privileged


@dataclass
class Outside:
    process: subprocess.Popen[str]
    port: int

    def next_peer(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()


@pytest.fixture
def outside() -> Iterator[Outside]:
    """A host out there: a process in a network namespace of its own, behind a veth of the host's."""
    process = subprocess.Popen(
        [sys.executable, "-c", OUTSIDE_PROGRAM, OUTSIDE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        assert process.stdout.readline().strip() == "unshared"
        with IPRoute() as ipr:
            ipr.link("add", ifname="thwo0", kind="veth", peer={"ifname": "thwo1", "net_ns_pid": process.pid})
            host_end = ipr.link_lookup(ifname="thwo0")[0]
            ipr.addr("add", index=host_end, address=HOST_SIDE, prefixlen=24)
            ipr.link("set", index=host_end, state="up")
        process.stdin.write("go\n")
        process.stdin.flush()
        yield Outside(process, int(process.stdout.readline()))
    finally:
        process.kill()  # its namespace goes with it, and the veth pair with the namespace
        process.wait()
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname="thwo0"):
                ipr.link("del", index=index)


@pytest.fixture(params=["0", "1"], ids=["host-not-routing", "host-routing"])
def ip_forward(request: pytest.FixtureRequest) -> Iterator[str]:
    """IPv4 forwarding as the host has it: off (the kernel then drops packets for beyond silently)
    or on (a router, or a host running containers); egress off must hold either way."""
    before = IP_FORWARD.read_text()
    IP_FORWARD.write_text(request.param)
    yield str(request.param)
    IP_FORWARD.write_text(before)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sandboxes")


@pytest.fixture
def fn_a(tmp_path: Path) -> Path:
    return _function(tmp_path / "fn-a")


@pytest.fixture
def listeners() -> Iterator[dict[str, int]]:
    """Host services on the wildcard address, like thawd's gateway on 0.0.0.0:8080: one whose port
    the test opens to sandboxes, one it does not."""
    with socket.create_server(("0.0.0.0", 0)) as opened, socket.create_server(("0.0.0.0", 0)) as closed:
        yield {"open": opened.getsockname()[1], "closed": closed.getsockname()[1]}


def _pool(runtime: Path, bridge: str, subnet: str, egress: bool, host_ports: str = "") -> SandboxPool:
    return SandboxPool(
        PoolSettings(prewarm=0, max_size=1, cgroup_tree=TREE),
        SandboxConfig(runtime_dir=runtime),
        NetworkConfig(bridge=bridge, subnet=subnet, egress=egress, host_ports=parse_host_ports(host_ports)),
    )


def _reach(sandbox: Sandbox, targets: dict[str, tuple[str, int]], tries: int = 1) -> dict[str, str]:
    """From inside: "ok" for each target a TCP connection reaches, else the errno's name ("timed
    out" if nothing answered within a generous 20 s). With `tries`, connects that many times and
    reports every outcome seen, so a refusal that slows down after a burst shows."""
    seen = run_json(
        sandbox,
        f"""
        import errno, socket
        def reach(host, port):
            try:
                with socket.create_connection((host, port), timeout=20):
                    return "ok"
            except socket.timeout:
                return "timed out"
            except OSError as e:
                return errno.errorcode.get(e.errno or 0, str(e))
        print(json.dumps({{
            name: "|".join(sorted({{reach(*target) for _ in range({tries})}}))
            for name, target in {targets!r}.items()
        }}))
        """,
    )
    return {k: str(v) for k, v in seen.items()}


def _udp_echo(sandbox: Sandbox, gateway: str, port: int) -> str:
    """From inside: the answer to one datagram sent to the host, or the error that came instead."""
    code = f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.connect(({gateway!r}, {port}))
        s.send(b"ping")
        try:
            print(json.dumps({{"answer": s.recv(16).decode()}}))
        except OSError as e:
            print(json.dumps({{"answer": type(e).__name__}}))
        """
    return str(run_json(sandbox, code)["answer"])


# -- the allow-list setting ------------------------------------------------------------------------
def test_host_ports_are_parsed() -> None:
    assert parse_host_ports("") == ()
    assert parse_host_ports(" tcp:53, udp:53 ,tcp:8000-8099") == (
        HostPort("tcp", 53, 53),
        HostPort("udp", 53, 53),
        HostPort("tcp", 8000, 8099),
    )
    assert [str(p) for p in parse_host_ports("tcp:53,udp:8000-8099")] == ["tcp:53", "udp:8000-8099"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("53", r"'53' is not PROTOCOL:PORT"),
        ("tcp:53,", r"'' is not PROTOCOL:PORT"),
        ("icmp:1", r"protocol must be tcp or udp, not 'icmp'"),
        ("tcp:0", r"ports must be 1 to 65535"),
        ("udp:70000", r"ports must be 1 to 65535"),
        ("tcp:90-80", r"the first not above the last"),
    ],
)
def test_bad_host_ports_are_refused_by_name(text: str, says: str) -> None:
    with pytest.raises(InvalidHostPorts, match=says):
        parse_host_ports(text)
    with pytest.raises(ConfigError, match=r"^sandboxes\.host_ports: host port .*" + says):
        load(None, {"sandboxes_host_ports": text})


# -- what a sandbox reaches ------------------------------------------------------------------------
def test_without_egress_nothing_of_the_host_or_beyond_answers_but_the_open_ports(
    runtime: Path, fn_a: Path, outside: Outside, ip_forward: str, listeners: dict[str, int]
) -> None:
    gateway = "10.236.0.1"
    pool = _pool(runtime, "thawt4", "10.236.0.0/24", egress=False, host_ports=f"tcp:{listeners['open']}")
    try:
        assert "thaw-thawt4" in thaw_tables()
        sandbox = pool.acquire(SandboxSpec(fn_a))
        try:
            seen = _reach(
                sandbox,
                {
                    "gateway, closed port": (gateway, listeners["closed"]),
                    "gateway, open port": (gateway, listeners["open"]),
                    "host's other address, open port": (HOST_SIDE, listeners["open"]),
                    "outside": (OUTSIDE, outside.port),
                    "nowhere": ("198.51.100.7", 80),  # TEST-NET-2: no route beyond this host either
                },
            )
            # More than the burst of ICMP errors the kernel sends a peer before it rate-limits them.
            again = _reach(sandbox, {"outside": (OUTSIDE, outside.port), "host": (gateway, listeners["closed"])}, 10)
        finally:
            pool.release(sandbox)
    finally:
        pool.destroy()
    assert seen["gateway, open port"] == "ok"
    for target in ("gateway, closed port", "host's other address, open port", "outside", "nowhere"):
        assert seen[target] in REFUSED, (target, seen)
    # TCP is refused with a reset, which no rate limit holds back: every connect fails at once.
    assert again == {"outside": "ECONNREFUSED", "host": "ECONNREFUSED"}
    assert "thaw-thawt4" not in thaw_tables()


def test_with_egress_the_subnet_goes_out_masqueraded_and_the_host_stays_closed(
    runtime: Path, fn_a: Path, outside: Outside, listeners: dict[str, int]
) -> None:
    forwarding_before = IP_FORWARD.read_text()
    gateway = "10.237.0.1"
    pool = _pool(runtime, "thawt5", "10.237.0.0/24", egress=True, host_ports=f"tcp:{listeners['open']}")
    try:
        assert IP_FORWARD.read_text().strip() == "1"
        sandbox = pool.acquire(SandboxSpec(fn_a))
        try:
            seen = _reach(
                sandbox,
                {
                    "gateway, closed port": (gateway, listeners["closed"]),
                    "gateway, open port": (gateway, listeners["open"]),
                    "host's other address, closed port": (HOST_SIDE, listeners["closed"]),
                    "outside": (OUTSIDE, outside.port),
                },
            )
        finally:
            pool.release(sandbox)
        peer = outside.next_peer()
    finally:
        pool.destroy()
    assert seen == {
        "gateway, closed port": "ECONNREFUSED",
        "gateway, open port": "ok",
        "host's other address, closed port": "ECONNREFUSED",
        "outside": "ok",
    }
    assert peer == HOST_SIDE  # the sandbox's address was masqueraded as the host's
    assert "thaw-thawt5" not in thaw_tables()
    assert IP_FORWARD.read_text() == forwarding_before


@pytest.mark.parametrize("egress", [False, True], ids=["egress-off", "egress-on"])
def test_udp_reaches_the_host_only_on_an_open_port(runtime: Path, fn_a: Path, egress: bool) -> None:
    gateway = "10.246.0.1"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as opened,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed,
    ):
        opened.bind(("0.0.0.0", 0))
        closed.bind(("0.0.0.0", 0))
        pool = _pool(runtime, "thawt6", "10.246.0.0/24", egress=egress, host_ports=f"udp:{opened.getsockname()[1]}")
        try:
            sandbox = pool.acquire(SandboxSpec(fn_a))
            try:
                echo = _echo_once(opened)
                answer_open = _udp_echo(sandbox, gateway, opened.getsockname()[1])
                echo.join()
                answer_closed = _udp_echo(sandbox, gateway, closed.getsockname()[1])
            finally:
                pool.release(sandbox)
        finally:
            pool.destroy()
        closed.setblocking(False)
        with pytest.raises(BlockingIOError):
            closed.recv(16)  # the refused datagram never reached the host's socket
    assert answer_open == "ping"
    assert answer_closed != "ping"


def _echo_once(sock: socket.socket) -> threading.Thread:
    def echo() -> None:
        sock.settimeout(20)
        data, peer = sock.recvfrom(16)
        sock.sendto(data, peer)

    thread = threading.Thread(target=echo)
    thread.start()
    return thread


def test_sandboxes_do_not_reach_each_other(runtime: Path, fn_a: Path) -> None:
    """Two sandboxes on one bridge, egress on: one listens on every address, the other cannot
    connect (their bridge ports are isolated), while the listener answers itself."""
    pool = SandboxPool(
        PoolSettings(prewarm=0, max_size=2, cgroup_tree=TREE),
        SandboxConfig(runtime_dir=runtime),
        NetworkConfig(bridge="thawt9", subnet="10.245.0.0/24", egress=True),
    )
    try:
        listening, other = pool.acquire(SandboxSpec(fn_a)), pool.acquire(SandboxSpec(fn_a))
        try:
            assert listening.lease is not None
            address = str(listening.lease.address)
            read, write = os.pipe()
            server = listening.spawn(
                [
                    sys.executable,
                    "-c",
                    "import socket, time\ns = socket.create_server(('0.0.0.0', 9000))\n"
                    "print('up', flush=True)\ntime.sleep(60)",
                ],
                log_fd=write,
            )
            os.close(write)
            assert os.read(read, 16).startswith(b"up")
            os.close(read)
            assert _reach(listening, {"itself": (address, 9000)}) == {"itself": "ok"}
            seen = _reach(other, {"the other sandbox": (address, 9000)})
            assert seen["the other sandbox"] != "ok", seen
            server.kill()
        finally:
            pool.release(listening)
            pool.release(other)
    finally:
        pool.destroy()

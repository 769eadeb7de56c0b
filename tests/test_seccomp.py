"""The seccomp filter (native/seccomp.py): in every thawed instance, in every restore mode and of a
compressed template, and in every guest from the start of its init; what functions rely on still
works; opt-outs are per function and by name only.

The probe function asks the kernel itself, through ctypes as any function may: /proc/self/status,
unshare(CLONE_NEWUSER), clone with namespace flags, clone3, and a tmpfs mount as root of its own
user and mount namespaces (which only the filter stops once unshare is allowed). Probes that could
succeed run in a forked child, so whatever namespace they enter dies with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from native import seccomp
from shmpool import Pool
from shmpool.codecs import get_codec
from snapshot.compress import compress
from snapshot.restore import restore
from snapshot.stub import launch_stub
from snapshot.template import MODES, Template
from tests.guests import captured, recv, request
from tests.thawd import Thawd, write_function

pytestmark = pytest.mark.privileged
NAME = "thawsec0"

PROBE = r"""
import ctypes, errno, os, subprocess, threading

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
CLONE_NEWNS, CLONE_NEWUSER, SIGCHLD = 0x20000, 0x10000000, 17
SYS_CLONE, SYS_PERSONALITY, SYS_MOUNT, SYS_UNSHARE, SYS_CLONE3 = 56, 135, 165, 272, 435


def seccomp_mode():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("Seccomp:")).split()[1])


def syscall(nr, *args):
    ret = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    return "ok" if ret >= 0 else errno.errorcode[ctypes.get_errno()]


def in_child(probe):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, probe().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        said = answer.read()
    os.waitpid(pid, 0)
    return said


def unshare_user():
    return syscall(SYS_UNSHARE, CLONE_NEWUSER)


def clone_namespaces():
    flags, zero = ctypes.c_long(CLONE_NEWUSER | CLONE_NEWNS | SIGCHLD), ctypes.c_long(0)
    ret = libc.syscall(ctypes.c_long(SYS_CLONE), flags, zero, zero, zero, zero)
    if ret == 0:
        os._exit(0)  # the clone's child, in its new namespaces
    if ret < 0:
        return errno.errorcode[ctypes.get_errno()]
    os.waitpid(ret, 0)
    return "ok"


def mount_tmpfs():
    unshared = syscall(SYS_UNSHARE, CLONE_NEWUSER | CLONE_NEWNS)
    if unshared != "ok":
        return "unshare " + unshared
    return syscall(SYS_MOUNT, b"none", b"/tmp", b"tmpfs", 0, None)


def ptrace_me():
    return syscall(101, 0, 0, 0, 0)  # PTRACE_TRACEME


INIT = {"seccomp": seccomp_mode(), "unshare": in_child(unshare_user)}


def handle(event, context):
    ran = []
    thread = threading.Thread(target=ran.append, args=("thread",))
    thread.start()
    thread.join()
    return {
        "init": INIT,
        "seccomp": seccomp_mode(),
        "unshare": in_child(unshare_user),
        "clone": in_child(clone_namespaces),
        "clone3": syscall(SYS_CLONE3, None, 0),
        "mount": in_child(mount_tmpfs),
        "ptrace": in_child(ptrace_me),
        "no_aslr": in_child(lambda: syscall(SYS_PERSONALITY, 0x0040000)),  # ADDR_NO_RANDOMIZE
        "persona": syscall(SYS_PERSONALITY, 0xFFFFFFFF),  # the query stays allowed
        "thread": ran,
        "subprocess": subprocess.run(["true"]).returncode,
    }
"""

CONFINED = {
    "seccomp": 2,
    "unshare": "EPERM",
    "clone": "EPERM",
    "clone3": "ENOSYS",  # so glibc falls back to clone, whose flags the filter can read
    "mount": "unshare EPERM",
    "ptrace": "EPERM",
    "no_aslr": "EPERM",
    "persona": "ok",
    "thread": ["thread"],
    "subprocess": 0,
}


def _confined(reply: dict[str, Any]) -> dict[str, Any]:
    return {key: reply[key] for key in CONFINED}


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_function(tmp_path_factory.mktemp("probe"), PROBE)


# -- restore, without a daemon ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    pool = Pool.create(tmp_path_factory.mktemp("seccomp-pool") / "pool", backend="tmpfs", node=0, size=256 << 20)
    yield pool
    pool.destroy()


@pytest.fixture(scope="module")
def template(pool: Pool, probe_dir: Path) -> Iterator[Template]:
    made = captured(pool, probe_dir, "probe")
    yield made
    made.close()


@pytest.fixture(scope="module")
def compressed(pool: Pool, template: Template) -> Iterator[Template]:
    made = compress(pool, template.name, get_codec("lz4"), "probe.z", hot=[])
    yield made
    made.close()


@contextmanager
def _instance(template: Template, mode: str, bpf: bytes | None) -> Iterator[dict[str, Any]]:
    """One instance restored with filter `bpf`, and its reply to one invocation."""
    stub = launch_stub(template.restore_fds(mode))
    assert stub.control is not None
    instance = restore(template, stub, mode, bpf)
    try:
        hello = recv(stub.control)
        assert hello is not None and hello["type"] == "restored", hello
        yield request(stub.control)
    finally:
        instance.close()
        stub.control.close()


@pytest.mark.parametrize("mode", MODES)
def test_an_instance_is_confined_in_every_mode(template: Template, mode: str) -> None:
    with _instance(template, mode, seccomp.program()) as reply:
        assert _confined(reply) == CONFINED
        # captured unconfined (a guest started by hand, as root): nothing but the restore set it
        assert reply["init"] == {"seccomp": 0, "unshare": "ok"}


@pytest.mark.parametrize("mode", ["cow", "lazy"])
def test_an_instance_of_a_compressed_template_is_confined(compressed: Template, mode: str) -> None:
    with _instance(compressed, mode, seccomp.program()) as reply:
        assert _confined(reply) == CONFINED


def test_an_opt_out_lifts_only_what_it_names(template: Template) -> None:
    with _instance(template, "cow", seccomp.program(frozenset({"unshare"}))) as reply:
        assert reply["seccomp"] == 2
        assert reply["unshare"] == "ok"
        # root of its own user and mount namespaces now, the filter still refuses the mount
        assert reply["mount"] == "EPERM"
        assert reply["clone"] == "EPERM" and reply["ptrace"] == "EPERM"


def test_restore_refuses_a_program_that_is_not_bpf(template: Template) -> None:
    stub = launch_stub(template.restore_fds("cow"))
    try:
        with pytest.raises(ValueError, match="a seccomp program is 1 to 4096 instructions of 8 bytes, not 5 bytes"):
            restore(template, stub, "cow", b"\0" * 5)
    finally:
        stub.kill()
        stub.wait(5.0)
        if stub.control is not None:
            stub.control.close()


def test_the_personality_rules_allow_exactly_dockers_values() -> None:
    """The construction checked on every value of a 12-bit analogue, and on the 32-bit rules
    around the values personality allows."""
    free = 0b1000_0000_1000
    rules = seccomp.only_bits(free, width=12)
    allowed = {x for x in range(1 << 12) if not x & ~free} | {(1 << 12) - 1}
    assert [x for x in range(1 << 12) if any(x & m == v for m, v in rules) == (x in allowed)] == []
    rules = seccomp.only_bits(0x20008)
    values = [0, 8, 0x20000, 0x20008, 0xFFFF_FFFF, 9, 0x40000, 0x80040000, 0xFFFF_FFFE, 0x7FFF_FFFF]
    denied = [x for x in values if any(x & m == v for m, v in rules)]
    assert denied == [9, 0x40000, 0x80040000, 0xFFFF_FFFE, 0x7FFF_FFFF] and len(rules) == 32


def test_opt_outs_are_checked_by_name() -> None:
    with pytest.raises(seccomp.BadOptOut) as caught:
        seccomp.check_opt_outs(["ptrace", "no_such_call", "read"])
    assert caught.value.names == ["no_such_call", "read"]
    message = str(caught.value)
    assert "no such syscall on x86-64: no_such_call" in message
    assert "not denied by thaw's seccomp filter (allowed already): read" in message
    assert seccomp.check_opt_outs(["ptrace"]) == frozenset({"ptrace"})


# -- thawd: guests and instances ------------------------------------------------------------------
@pytest.fixture(scope="module")
def thawd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thawd]:
    with Thawd(tmp_path_factory.mktemp("thawd"), NAME, "10.243.0.0/24", sandboxes_prewarm=1).serving() as daemon:
        yield daemon


@pytest.mark.parametrize("mode", MODES)
def test_thawd_confines_the_guest_from_its_init_and_every_instance(thawd: Thawd, probe_dir: Path, mode: str) -> None:
    thawd.deploy(f"probe-{mode}", probe_dir, mode=mode)
    status, reply = thawd.invoke(f"probe-{mode}")
    assert status == 200, reply
    assert reply["init"] == {"seccomp": 2, "unshare": "EPERM"}  # the guest's init ran under the filter
    assert _confined(reply) == CONFINED
    (instance,) = thawd.api("GET", f"/instances?function=probe-{mode}")[1]["instances"]
    status_file = Path(f"/proc/{instance['pid']}/status").read_text()  # as the host sees the instance
    assert "\nSeccomp:\t2\n" in status_file and "\nNoNewPrivs:\t1\n" in status_file


def test_thawd_gives_a_function_the_syscalls_it_opts_out_of(thawd: Thawd, probe_dir: Path) -> None:
    thawd.deploy("probe-unshare", probe_dir, syscalls=["unshare", "ptrace"])
    status, reply = thawd.invoke("probe-unshare")
    assert status == 200, reply
    assert reply["init"] == {"seccomp": 2, "unshare": "ok"}
    assert reply["unshare"] == "ok" and reply["ptrace"] == "ok" and reply["mount"] == "EPERM"
    assert reply["clone"] == "EPERM" and reply["seccomp"] == 2
    status, described = thawd.api("GET", "/functions/probe-unshare")
    assert status == 200 and described["syscalls"] == ["unshare", "ptrace"], described


def test_thawd_refuses_an_opt_out_not_on_the_deny_list_naming_it(thawd: Thawd, probe_dir: Path) -> None:
    body = {"name": "probe-bad", "source": str(probe_dir), "syscalls": ["ptrace", "getpid", "frobnicate"]}
    status, reply = thawd.api("POST", "/functions", body)
    assert status == 400, reply
    message = reply["error"]["message"]
    assert "no such syscall on x86-64: frobnicate" in message, message
    assert "allowed already): getpid" in message, message
    status, reply = thawd.api("POST", "/functions", {**body, "syscalls": "ptrace"})
    assert status == 400 and "syscalls must be a list of syscall names" in reply["error"]["message"], reply
    assert thawd.api("GET", "/functions/probe-bad")[0] == 404

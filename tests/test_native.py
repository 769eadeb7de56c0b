"""Every native wrapper exercised for real: a ptraced child, a uffd round trip, cross-process reads,
NUMA syscalls on real pages, namespaces and mounts in throw-away processes."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from native import bench, memory, mounts, namespaces, pidfd, process, ptrace, uffd
from native.constants import (
    PTRACE_EVENT_STOP,
    UFFDIO_COPY_MODE_DONTWAKE,
    CloneFlag,
    Mempolicy,
    MfdFlag,
    MountFlag,
    Persona,
    PtraceOption,
    UffdEvent,
    UffdIoctl,
    UffdRegisterMode,
    UmountFlag,
)
from tests.conftest import run_python, spawn_python

pytestmark = pytest.mark.privileged
PAGE = mmap.PAGESIZE
SECRET = b"thaw-secret-data"

# A child that publishes the address of known bytes, then keeps making syscalls in a loop (so
# single-steps and syscall stops have somewhere to go).
CHILD = """
    import os, sys
    from native.memory import address_of
    buf = bytearray(b"thaw-secret-data" * 256)
    print(address_of(buf), flush=True)
    while True:
        os.getppid()
"""


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = spawn_python(CHILD)
    assert proc.stdout is not None
    addr = int(proc.stdout.readline())
    yield proc, addr
    proc.kill()
    proc.wait()


def _seize_stopped(pid: int, options: int = 0) -> None:
    ptrace.seize(pid, options)
    ptrace.interrupt(pid)
    stop = ptrace.wait(pid)
    assert stop is not None and stop.event == PTRACE_EVENT_STOP


# ---------------------------------------------------------------------------------------------
# ptrace


def test_ptrace_registers_memory_and_resume(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = child
    _seize_stopped(proc.pid, PtraceOption.TRACESYSGOOD)

    regs = ptrace.getregs(proc.pid)
    assert regs.rip != 0 and regs.rsp != 0 and regs.fs_base != 0
    ptrace.setregs(proc.pid, regs)
    assert ptrace.getregs(proc.pid) == regs

    xstate = ptrace.get_xstate(proc.pid)
    assert len(xstate) >= 576  # legacy FXSAVE area + XSAVE header at least
    ptrace.set_xstate(proc.pid, xstate)
    assert ptrace.get_xstate(proc.pid) == xstate

    assert ptrace.peekdata(proc.pid, addr) == int.from_bytes(SECRET[:8], "little")
    ptrace.pokedata(proc.pid, addr, int.from_bytes(b"POKED!!!", "little"))
    assert memory.read_exact(proc.pid, addr, 16) == b"POKED!!!" + SECRET[8:]

    rseq = ptrace.get_rseq_configuration(proc.pid)
    assert rseq.abi_pointer != 0 and rseq.abi_size >= 32  # glibc registers rseq in every thread

    ptrace.singlestep(proc.pid)
    stop = ptrace.wait(proc.pid)
    assert stop is not None and stop.signal == signal.SIGTRAP

    ptrace.syscall(proc.pid)
    stop = ptrace.wait(proc.pid)
    assert stop is not None and stop.signal == signal.SIGTRAP | 0x80  # a syscall stop (TRACESYSGOOD)
    assert ptrace.getregs(proc.pid).orig_rax >= 0

    ptrace.cont(proc.pid)
    ptrace.interrupt(proc.pid)
    stop = ptrace.wait(proc.pid)
    assert stop is not None and stop.event == PTRACE_EVENT_STOP
    ptrace.setoptions(proc.pid, PtraceOption.TRACESYSGOOD | PtraceOption.EXITKILL)

    # A real group stop (SIGSTOP) of a seized tracee: LISTEN keeps it stopped but lets it be woken.
    ptrace.cont(proc.pid)
    os.kill(proc.pid, signal.SIGSTOP)
    stop = ptrace.wait(proc.pid)
    assert stop is not None and stop.signal == signal.SIGSTOP and stop.event == 0  # signal-delivery stop
    ptrace.cont(proc.pid, signal.SIGSTOP)  # deliver it: the tracee enters group stop
    stop = ptrace.wait(proc.pid)
    assert stop is not None and stop.is_group_stop and stop.signal == signal.SIGSTOP
    assert ptrace.geteventmsg(proc.pid) == 0
    ptrace.listen(proc.pid)
    assert ptrace.wait(proc.pid, nohang=True) is None  # still stopped, nothing new to report
    os.kill(proc.pid, signal.SIGCONT)
    ptrace.interrupt(proc.pid)
    ptrace.wait(proc.pid)
    ptrace.detach(proc.pid)
    assert proc.poll() is None  # alive and untraced


def test_ptrace_error_names_the_request() -> None:
    with pytest.raises(ProcessLookupError, match=r"PTRACE_GETREGS pid .*\(originated from ptrace\)"):
        ptrace.getregs(os.getpid())  # not our tracee: ESRCH


# ---------------------------------------------------------------------------------------------
# cross-process memory and pidfds


def test_process_vm_readv_writev(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = child
    assert memory.read_exact(proc.pid, addr, 32) == SECRET * 2
    out = bytearray(8)
    assert memory.process_vm_readv(proc.pid, [(addr, 4), (addr + 16, 4)], out) == 8
    assert bytes(out) == b"thawthaw"
    assert memory.process_vm_writev(proc.pid, addr, b"WRITTEN!") == 8
    assert memory.read_exact(proc.pid, addr, 8) == b"WRITTEN!"
    with pytest.raises(OSError, match=r"originated from process_vm_readv"):
        memory.read_exact(proc.pid, 0x10, 8)


def test_pidfd_getfd_and_signal(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, _ = child
    pfd = pidfd.pidfd_open(proc.pid)
    try:
        theirs = pidfd.pidfd_getfd(pfd, 1)  # the child's stdout: our pipe's write end
        assert proc.stdout is not None
        assert os.fstat(theirs).st_ino == os.fstat(proc.stdout.fileno()).st_ino
        os.close(theirs)
        pidfd.pidfd_send_signal(pfd, signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        os.close(pfd)


# ---------------------------------------------------------------------------------------------
# userfaultfd


def _fault_in_thread(addr: int) -> tuple[threading.Thread, dict[str, int]]:
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(value=memory.touch(addr, 1, 1, write=False)))
    thread.start()
    return thread, result


def test_uffd_round_trip_on_anonymous_memory() -> None:
    fd = uffd.userfaultfd(os.O_CLOEXEC)  # blocking reads
    region = mmap.mmap(-1, 4 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = memory.address_of(region)
    try:
        _features, ioctls = uffd.api(fd, 0)
        assert ioctls & UffdIoctl.REGISTER
        allowed = uffd.register(fd, addr, 4 * PAGE, UffdRegisterMode.MISSING)
        assert allowed & UffdIoctl.COPY and allowed & UffdIoctl.ZEROPAGE and allowed & UffdIoctl.WAKE

        # COPY resolves a fault with our bytes.
        thread, result = _fault_in_thread(addr + PAGE)
        (msg,) = uffd.read_messages(fd, 1)
        assert msg.event == UffdEvent.PAGEFAULT and msg.address == addr + PAGE and not msg.is_write
        page = bytearray(b"\x07" * PAGE)
        assert uffd.copy(fd, addr + PAGE, memory.address_of(page), PAGE) == PAGE
        thread.join(10)
        assert result == {"value": 7}

        # ZEROPAGE resolves with zeros.
        thread, result = _fault_in_thread(addr + 2 * PAGE)
        (msg,) = uffd.read_messages(fd, 1)
        assert uffd.zeropage(fd, msg.address, PAGE) == PAGE
        thread.join(10)
        assert result == {"value": 0}

        # COPY without waking leaves the faulting thread asleep until WAKE.
        thread, result = _fault_in_thread(addr + 3 * PAGE)
        (msg,) = uffd.read_messages(fd, 1)
        uffd.copy(fd, msg.address, memory.address_of(page), PAGE, mode=UFFDIO_COPY_MODE_DONTWAKE)
        thread.join(0.2)
        assert thread.is_alive()
        uffd.wake(fd, msg.address, PAGE)
        thread.join(10)
        assert result == {"value": 7}

        uffd.unregister(fd, addr, 4 * PAGE)
        assert memory.touch(addr, 1, 1, write=False) == 0  # plain anonymous memory again
    finally:
        os.close(fd)
        region.close()


# ---------------------------------------------------------------------------------------------
# memfd, mmap, NUMA policy


def test_memfd_create_and_raw_mmap() -> None:
    fd = memory.memfd_create("thaw-test", MfdFlag.CLOEXEC)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:thaw-test")
        os.write(fd, b"x" * PAGE)
        addr = memory.mmap(0, PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
        assert memory.touch(addr, PAGE, PAGE, write=False) == ord("x")
        memory.munmap(addr, PAGE)
    finally:
        os.close(fd)


def test_mempolicy_and_move_pages() -> None:
    region = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = memory.address_of(region)
    try:
        memory.mbind(addr, 2 * PAGE, Mempolicy.BIND, [0])
        assert memory.get_mempolicy(addr) == (Mempolicy.BIND, [0])
        memory.touch(addr, PAGE, PAGE, write=True)
        assert memory.node_of_address(addr) == 0
        assert memory.move_pages(0, [addr, addr + PAGE]) == [0, -errno.ENOENT]  # second page never touched
        assert memory.move_pages(0, [addr], [0]) == [0]  # "move" to where it is
    finally:
        region.close()

    seen: dict[str, object] = {}

    def in_thread() -> None:  # the policy is per thread: leave the test's own thread alone
        memory.set_mempolicy(Mempolicy.BIND, [0])
        seen["bound"] = memory.get_mempolicy()
        memory.set_mempolicy(Mempolicy.DEFAULT)
        seen["default"] = memory.get_mempolicy()[0]

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen == {"bound": (Mempolicy.BIND, [0]), "default": Mempolicy.DEFAULT}
    with pytest.raises(ValueError, match="outside"):
        memory.mbind(0, PAGE, Mempolicy.BIND, [5000])


# ---------------------------------------------------------------------------------------------
# namespaces, mounts, process knobs (in throw-away processes where they would change the test's)


def test_unshare_uts_leaves_the_host_alone() -> None:
    out = run_python("""
        import socket
        from native import namespaces
        from native.constants import CloneFlag
        namespaces.unshare(CloneFlag.NEWUTS)
        socket.sethostname("thaw-unshared")
        print(socket.gethostname())
    """)
    assert out.stdout.strip() == "thaw-unshared"
    assert socket.gethostname() != "thaw-unshared"


def test_setns_joins_another_process_namespace() -> None:
    holder = spawn_python("""
        import socket, sys, time
        from native import namespaces
        from native.constants import CloneFlag
        namespaces.unshare(CloneFlag.NEWUTS)
        socket.sethostname("thaw-joined")
        print("ready", flush=True)
        time.sleep(60)
    """)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        out = run_python(
            """
            import os, socket, sys
            from native import namespaces
            from native.constants import CloneFlag
            fd = os.open(f"/proc/{sys.argv[1]}/ns/uts", os.O_RDONLY)
            namespaces.setns(fd, CloneFlag.NEWUTS)
            print(socket.gethostname())
            """,
            str(holder.pid),
        )
        assert out.stdout.strip() == "thaw-joined"
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(OSError, match=r"originated from setns"):
        namespaces.setns(0, CloneFlag.NEWUTS)  # stdin is no namespace


def test_mount_umount_and_statfs(tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    mounts.mount("thaw-test", str(target), "tmpfs", MountFlag.NOSUID, "size=1M")
    try:
        assert mounts.statfs_type(str(target)) == mounts.FsMagic.TMPFS
        (target / "f").write_bytes(b"hello")
    finally:
        mounts.umount2(str(target), UmountFlag.NOFOLLOW)
    assert not os.path.ismount(target) and not (target / "f").exists()
    with pytest.raises(FileNotFoundError, match=r"originated from mount"):
        mounts.mount("x", str(tmp_path / "missing"), "tmpfs")


def test_pivot_root_in_a_private_mount_namespace(tmp_path: Path) -> None:
    out = run_python(
        """
        import os, sys
        from native import mounts, namespaces
        from native.constants import CloneFlag, MountFlag, UmountFlag
        new = sys.argv[1]
        namespaces.unshare(CloneFlag.NEWNS)
        mounts.mount(None, "/", None, MountFlag.REC | MountFlag.PRIVATE)
        mounts.mount("thaw-root", new, "tmpfs", 0, "size=1M")
        os.mkdir(new + "/old")
        mounts.pivot_root(new, new + "/old")
        os.chdir("/")
        mounts.umount2("/old", UmountFlag.DETACH)
        print(sorted(os.listdir("/")))
        """,
        str(tmp_path),
    )
    assert out.stdout.strip() == "['old']"


def test_prctl_name_in_a_thread() -> None:
    seen: dict[str, str] = {}

    def rename() -> None:
        process.set_name("thaw-renamed")
        seen["prctl"] = process.get_name()
        seen["proc"] = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    t = threading.Thread(target=rename)
    t.start()
    t.join()
    assert seen == {"prctl": "thaw-renamed", "proc": "thaw-renamed"}


def test_close_range() -> None:
    fds = [os.dup2(os.open("/dev/null", os.O_RDONLY), 900 + i) for i in range(3)]
    process.close_range(900, 902)
    for fd in fds:
        with pytest.raises(OSError) as e:
            os.fstat(fd)
        assert e.value.errno == errno.EBADF


def test_personality() -> None:
    out = run_python("""
        import subprocess
        from native import process
        from native.constants import Persona
        process.personality(process.personality() | Persona.ADDR_NO_RANDOMIZE)
        print(subprocess.run(["cat", "/proc/self/personality"], capture_output=True, text=True).stdout)
    """)
    assert int(out.stdout, 16) & Persona.ADDR_NO_RANDOMIZE
    assert not process.personality() & Persona.ADDR_NO_RANDOMIZE


def test_bench_loops_compute_over_real_memory() -> None:
    buf = mmap.mmap(-1, 64 * PAGE)
    try:
        buf[:] = bytes(range(256)) * (64 * PAGE // 256)
        addr = memory.address_of(buf)
        words = [int.from_bytes(bytes(buf[i : i + 8]), "little") for i in range(0, 64, 8)]
        assert bench.read_sum(addr, 64) == sum(words) % 2**64  # the C sum wraps at 64 bits
        bench.chase_init(addr, 64 * PAGE // 64, 64, seed=1)
        # One cycle through every slot: after exactly `slots` steps the chase is back at the start.
        assert bench.chase(addr, 64 * PAGE // 64) == 0
        assert bench.chase(addr, 1) != 0
    finally:
        buf.close()

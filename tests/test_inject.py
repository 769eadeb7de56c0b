"""Syscall injection and /proc reading against a real stopped Python process (the capture's
building blocks): the tracee runs our syscalls and afterwards carries on as if nothing happened."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
from collections.abc import Iterator

import pytest

from native import ptrace
from native.ptrace import Registers
from snapshot import procfs
from snapshot.inject import InjectionError, SyscallInjector, restart_fixup, seize_stopped
from tests.conftest import spawn_python

pytestmark = pytest.mark.privileged

SYS_getpid, SYS_brk, SYS_rt_sigaction, SYS_prctl = 39, 12, 13, 157
PR_GET_TID_ADDRESS = 40

PARKED = """
    import mmap, os, signal, sys, threading
    from native.memory import address_of
    signal.signal(signal.SIGUSR1, lambda *_: None)
    big = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    big[0:1] = b"x"
    big[10 * 4096 : 10 * 4096 + 1] = b"y"
    print(address_of(big), flush=True)
    if len(sys.argv) > 1:
        from native.process import set_name
        named = threading.Event()
        def worker():
            set_name("extra-worker")  # Python 3.11 does not name OS threads itself
            named.set()
            threading.Event().wait()
        threading.Thread(target=worker, daemon=True).start()
        named.wait()
    os.kill(os.getpid(), signal.SIGSTOP)
    print("resumed", os.getpid(), flush=True)
"""


@pytest.fixture
def parked() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = spawn_python(PARKED)
    assert proc.stdout is not None
    addr = int(proc.stdout.readline())
    yield proc, addr
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _seize_group_stopped(pid: int) -> None:
    while procfs.state(pid) != "T":
        pass
    seize_stopped(pid)


def test_injected_syscalls_run_in_the_tracee_and_leave_it_intact(parked: tuple[subprocess.Popen[str], int]) -> None:
    proc, _ = parked
    _seize_group_stopped(proc.pid)
    before = ptrace.getregs(proc.pid)
    with SyscallInjector(proc.pid) as inj:
        assert inj.call(SYS_getpid) == proc.pid
        assert inj.call(SYS_brk, 0) > 0  # brk is in no /proc file: this is how capture learns it
        # rt_sigaction(SIGUSR1, NULL, &old, 8): the handler Python installed is there.
        old = inj.write_scratch(bytes(32))
        assert inj.call(SYS_rt_sigaction, signal.SIGUSR1, 0, old, 8) == 0
        handler = struct.unpack("<Q", inj.read_scratch(8))[0]
        assert handler not in (0, 1)  # neither SIG_DFL nor SIG_IGN
        assert inj.call_ok(SYS_prctl, PR_GET_TID_ADDRESS, old, what="prctl(PR_GET_TID_ADDRESS)") == 0
        assert struct.unpack("<Q", inj.read_scratch(8))[0] != 0  # glibc's clear-tid address
        with pytest.raises(OSError, match=r"rt_sigaction\(9999\) in pid \d+ failed"):
            inj.call_ok(SYS_rt_sigaction, 9999, 0, 0, 8, what="rt_sigaction(9999)")
        assert inj.calls == 5
    assert ptrace.getregs(proc.pid) == before
    ptrace.detach(proc.pid)
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.stdout is not None and proc.stdout.readline().split() == ["resumed", str(proc.pid)]
    assert proc.wait(timeout=10) == 0


def test_procfs_sees_mappings_present_pages_threads_and_state(parked: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = parked
    while procfs.state(proc.pid) != "T":
        pass
    vmas = procfs.read_maps(proc.pid)
    big = next(v for v in vmas if v.start <= addr < v.end)  # the kernel may merge it with a neighbour
    assert big.perms == "rw-p" and not big.file_backed and big.path == ""
    end = addr + 64 * 4096
    assert procfs.present_ranges(proc.pid, addr, end) == [(addr, 4096), (addr + 10 * 4096, 4096)]
    assert procfs.anonymous_bytes(proc.pid)[big.start] >= 2 * 4096
    assert any(v.path == "[vdso]" and v.special for v in vmas)
    assert any(v.file_backed and v.executable for v in vmas)  # the interpreter's text
    assert [tid for tid, _ in procfs.threads(proc.pid)] == [proc.pid]


def test_threads_are_named() -> None:
    proc = spawn_python(PARKED, "with-thread")
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        while procfs.state(proc.pid) != "T":
            pass
        names = [name for _, name in procfs.threads(proc.pid)]
        assert len(names) == 2 and "extra-worker" in names
    finally:
        proc.kill()
        proc.wait()


def test_restart_fixup_rewinds_an_interrupted_syscall() -> None:
    regs = Registers(rip=0x1002, rax=(1 << 64) - 514, orig_rax=7)  # -ERESTARTNOHAND in poll()
    fixed = restart_fixup(regs)
    assert (fixed.rip, fixed.rax) == (0x1000, 7)
    block = restart_fixup(Registers(rip=0x1002, rax=(1 << 64) - 516, orig_rax=35))
    assert (block.rip, block.rax) == (0x1000, 219)  # restart_syscall
    done = Registers(rip=0x1002, rax=0, orig_rax=62)
    assert restart_fixup(done) is done


def test_a_running_process_is_refused(parked: tuple[subprocess.Popen[str], int]) -> None:
    proc, _ = parked
    while procfs.state(proc.pid) != "T":
        pass
    os.kill(proc.pid, signal.SIGCONT)  # it runs on and exits: not parked any more
    proc.wait(timeout=10)
    with pytest.raises((InjectionError, ProcessLookupError)):
        seize_stopped(proc.pid)

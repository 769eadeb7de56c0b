"""Microbenchmarks of the operations a restore and a deploy are made of (pytest-benchmark).

`scripts/bench_micro` runs them with benchmarking on and writes their figures; the normal test run
runs each once with benchmarking off (`--benchmark-disable` in pyproject.toml's addopts), so each
is also a test: it asserts the operation did what it should. Figures only come from bench_micro.

- ptrace round trip      interrupt a running tracee, wait for its stop, continue it
- injected syscall       getpid run inside a stopped tracee by single-stepping its syscall insn
- restorer run           the restorer blob copied into a stopped stub and run to its int3, with a
                         program of getpid calls and nothing of a guest (a new stub every round)
- pager fault service    every page of a template's image read through userfaultfd and the C
                         pager, per codec ("none": uncompressed), per page (extra_info operations)
- sandbox repurpose      an idle sandbox switched between two functions
- publish a segment      create, write 1 MiB and publish a pool segment, then delete it
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from native import ptrace, tracer
from native.restorer import ARGS, STUB_SCRATCH, STUB_SCRATCH_SIZE, Program
from native.tracer import BlobRun
from sandbox.cgroups import Limits
from sandbox.guest.launch import start_parked
from sandbox.network import NetworkConfig
from sandbox.pool import PoolSettings, SandboxPool
from sandbox.sandbox import Sandbox, SandboxConfig, SandboxSpec
from scripts import bench_codecs
from shmpool.codecs import available_codecs, get_codec
from shmpool.pool import Pool
from snapshot import procfs
from snapshot.capture import capture
from snapshot.compress import compress
from snapshot.inject import SyscallInjector, seize_stopped
from snapshot.stub import LaunchedStub, launch_stub
from snapshot.template import Template
from tests.conftest import ROOT_MISSING, spawn_python

# In the suite each is a privileged test, leak-checked like any other. Under scripts/bench_micro
# (THAW_BENCH_MICRO=1) the leak check is left out: it compares the machine's mount count, which any
# concurrent work changes, and a timing run has nothing to say about leaks.
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_MISSING)]
if not os.environ.get("THAW_BENCH_MICRO"):
    pytestmark.append(pytest.mark.privileged)
SYS_getpid = 39
SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(3600)\n"
PARKED = "import os, signal\nprint('up', flush=True)\nos.kill(os.getpid(), signal.SIGSTOP)\n"


@pytest.fixture
def sleeper() -> Iterator[int]:
    proc = spawn_python(SLEEPER)
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    yield proc.pid
    proc.kill()
    proc.wait()


def test_ptrace_round_trip(benchmark: BenchmarkFixture, sleeper: int) -> None:
    ptrace.seize(sleeper)
    before = ptrace.round_trips()

    def round_trip() -> None:
        ptrace.interrupt(sleeper)
        stop = ptrace.wait(sleeper)
        assert stop is not None and not stop.exited
        ptrace.cont(sleeper)

    benchmark.group = "ptrace"
    benchmark(round_trip)
    assert ptrace.round_trips() > before
    assert procfs.state(sleeper) in ("S", "R")  # running on: nanosleep restarted after each stop
    ptrace.interrupt(sleeper)  # a tracee is detached from a stop
    ptrace.wait(sleeper)
    ptrace.detach(sleeper)


@pytest.fixture
def parked() -> Iterator[int]:
    proc = spawn_python(PARKED)
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    while procfs.state(proc.pid) != "T":
        pass
    yield proc.pid
    proc.kill()
    proc.wait()


def test_injected_syscall(benchmark: BenchmarkFixture, parked: int) -> None:
    seize_stopped(parked)
    before = ptrace.getregs(parked)
    with SyscallInjector(parked) as inj:
        benchmark.group = "ptrace"
        pid = benchmark(inj.call, SYS_getpid)
    assert pid == parked
    assert ptrace.getregs(parked) == before


def test_restorer_run_without_a_guest(benchmark: BenchmarkFixture) -> None:
    stubs: list[LaunchedStub] = []
    calls = 16

    def seized_stub() -> tuple[tuple[int], dict[str, Any]]:
        stubs.append(launch_stub([]))
        tracer.seize_stopped(stubs[-1].pid)
        return (stubs[-1].pid,), {}

    program = Program(STUB_SCRATCH)
    for i in range(calls):
        program.syscall(SYS_getpid, what=f"getpid {i}")
    image, args = program.finish()
    # The stack grows down from the scratch area's end, clear of the program at its start.
    run = BlobRun(image, STUB_SCRATCH, args, STUB_SCRATCH + STUB_SCRATCH_SIZE - 64, -1)
    assert len(image) < STUB_SCRATCH_SIZE // 2

    def restorer(pid: int) -> bytes:
        raw, _ = tracer.run_blob(pid, run, ARGS.size, None)
        return raw

    benchmark.group = "restore"
    try:
        raw = benchmark.pedantic(restorer, setup=seized_stub, rounds=20, warmup_rounds=1)  # type: ignore[no-untyped-call]
        outcome = Program.outcome(raw)
        assert outcome.ok and outcome.done == calls, outcome
    finally:
        for stub in stubs:
            stub.kill()
            stub.wait(10)
            if stub.control is not None:
                stub.control.close()


@pytest.fixture(scope="module")
def heap_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pool, Template]]:
    """A small Python heap (20,000 records) captured, its working set not recorded: all pages cold."""
    work = tmp_path_factory.mktemp("micro")
    pool = Pool.create(work / "pool", backend="tmpfs", node=0, size=1 << 30)
    try:
        records = bench_codecs.REPO / "daemon" / "examples" / "records"
        guest = start_parked(records, {"RECORDS": "20000"}, cwd=bench_codecs.REPO)
        try:
            template = capture(guest.pid, pool, "micro-heap")
        finally:
            guest.kill()
        with template:
            yield pool, template
    finally:
        pool.destroy()


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd", "deflate"])
def test_pager_fault_service(benchmark: BenchmarkFixture, heap_template: tuple[Pool, Template], codec: str) -> None:
    pool, template = heap_template
    if codec != "none" and codec not in available_codecs():
        pytest.skip(f"{codec} does not load here")
    benchmark.group = "pager"
    if codec == "none":
        pages = sum(r.length for _, r in template.manifest.memory.own_runs(with_stacks=False)) // 4096
        per_page = benchmark(bench_codecs.fault_read_us, template, False)
    else:
        with compress(pool, template.name, get_codec(codec), f"micro-heap.{codec}", hot=[]) as z:
            pages = sum(size for _, size in z.cold_spans()) // 4096
            per_page = benchmark(bench_codecs.fault_read_us, z, True)
        Template.delete(pool, f"micro-heap.{codec}")
    benchmark.extra_info["operations"] = pages  # bench_micro reports the time per page
    assert pages > 100 and per_page > 0


@pytest.fixture
def idle_sandbox(tmp_path: Path) -> Iterator[tuple[Sandbox, list[SandboxSpec]]]:
    specs = []
    for name in ("a", "b"):
        fn = tmp_path / f"fn-{name}"
        fn.mkdir()
        (fn / "handler.py").write_text("def handle(event, context):\n    return {}\n")
        specs.append(SandboxSpec(fn, Limits(cpu=1, memory=256 << 20, pids=64), hostname=f"fn-{name}"))
    pool = SandboxPool(
        PoolSettings(prewarm=0, max_size=1, cgroup_tree="thaw-micro"),
        SandboxConfig(runtime_dir=tmp_path / "run"),
        NetworkConfig(bridge="thawm0", subnet="10.247.0.0/24"),
    )
    try:
        sandbox = Sandbox.create(pool.config, pool.tree, pool.network)
        try:
            yield sandbox, specs
        finally:
            sandbox.destroy()
    finally:
        pool.destroy()


def test_sandbox_repurpose(benchmark: BenchmarkFixture, idle_sandbox: tuple[Sandbox, list[SandboxSpec]]) -> None:
    sandbox, specs = idle_sandbox
    turn = itertools.cycle(specs)
    benchmark.group = "sandbox"
    benchmark(lambda: sandbox.repurpose(next(turn)))
    stub = sandbox.spawn_stub([])  # still a working sandbox: it starts a stub for its function
    assert stub.pid > 0
    sandbox.release()


def test_publish_a_segment(benchmark: BenchmarkFixture, tmpfs_pool: Pool) -> None:
    data = os.urandom(1 << 20)
    names = (f"micro-{i}" for i in itertools.count())

    def publish() -> str:
        name = next(names)
        with tmpfs_pool.create_segment(name, len(data)) as w:
            w.write(0, data)
            w.publish()
        return name

    def publish_and_delete() -> None:
        tmpfs_pool.delete(publish())

    benchmark.group = "pool"
    benchmark(publish_and_delete)
    name = publish()
    with tmpfs_pool.open_segment(name) as seg:  # verified on open: what was published is intact
        assert os.pread(seg.fd, 4096, seg.base) == data[:4096]

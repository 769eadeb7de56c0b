"""The sandbox pool on the real kernel: an exact count under concurrent acquires (some failing),
waiting at the maximum for a sandbox on its way back, idle sandboxes given back after a while."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sandbox.cgroups import Limits
from sandbox.errors import PoolExhausted, SandboxError
from sandbox.network import NetworkConfig
from sandbox.pool import PoolSettings, SandboxPool
from sandbox.sandbox import Sandbox, SandboxConfig, SandboxSpec
from tests.test_sandbox import _function

pytestmark = pytest.mark.privileged
TREE = "thaw-test-pool"
BRIDGE, SUBNET = "thawt8", "10.248.0.0/24"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sandboxes")


@pytest.fixture
def fn(tmp_path: Path) -> Path:
    return _function(tmp_path / "fn")


def _pool(runtime: Path, **settings: object) -> SandboxPool:
    return SandboxPool(
        PoolSettings(cgroup_tree=TREE, **settings),  # type: ignore[arg-type]
        SandboxConfig(runtime_dir=runtime),
        NetworkConfig(bridge=BRIDGE, subnet=SUBNET),
    )


def _existing(pool: SandboxPool) -> int:
    """Sandboxes that exist on the host, counted by their agent cgroups (not by the pool's books) in
    one hierarchy: a union over several, listed one after the other, could count a sandbox that
    went in one and the sandbox built after it in another."""
    root = pool.tree.roots()[0]
    return sum(1 for p in root.iterdir() if p.name.startswith("agent-")) if root.is_dir() else 0


@contextlib.contextmanager
def watching(pool: SandboxPool) -> Iterator[list[int]]:
    """Samples how many sandboxes exist, as often as it can, for the block."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_existing(pool))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()


def test_the_count_never_exceeds_the_maximum_under_concurrent_acquires(runtime: Path, fn: Path) -> None:
    """Sixteen threads acquire and release at once against a maximum of four; some repurposes fail
    (a cpuset node the kernel refuses: the sandbox is destroyed), some sandboxes die in use (their
    agent killed: release destroys them). Sandboxes being built, scrubbed or destroyed count too."""
    pool = _pool(runtime, prewarm=1, max_size=4)
    outcomes: dict[str, int] = {"acquired": 0, "exhausted": 0, "refused": 0}
    lock = threading.Lock()
    bad = SandboxSpec(fn, Limits(cpuset_mems="4095"))  # valid to read, refused by the kernel on write

    def note(what: str) -> None:
        with lock:
            outcomes[what] += 1

    def churn(worker: int) -> None:
        for round_ in range(12):
            try:
                sandbox = pool.acquire(bad if (worker + round_) % 5 == 0 else SandboxSpec(fn), wait=0.5)
            except PoolExhausted:
                note("exhausted")
                continue
            except SandboxError:
                note("refused")
                continue
            note("acquired")
            assert pool.size() <= 4
            if (worker + round_) % 7 == 0:
                os.kill(sandbox.agent.pid, 9)
                sandbox.agent.starter.wait()
            pool.release(sandbox)

    try:
        with watching(pool) as samples:
            workers = [threading.Thread(target=churn, args=(i,)) for i in range(16)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        assert pool.size() == len(pool.idle) <= 4  # nothing busy, built, scrubbed or destroyed any more
        assert _existing(pool) == len(pool.idle)
    finally:
        pool.destroy()
    assert outcomes["acquired"] > 16 and outcomes["refused"] > 0, outcomes
    assert samples and max(samples) <= 4, f"{max(samples)} sandboxes existed at once with a maximum of 4"
    assert _existing(pool) == 0


def test_at_the_maximum_an_acquire_waits_for_a_sandbox_on_its_way_back(runtime: Path, fn: Path) -> None:
    pool = _pool(runtime, prewarm=0, max_size=1)
    try:
        first = pool.acquire(SandboxSpec(fn))
        with pytest.raises(PoolExhausted, match=r"all 1 sandboxes are in use \(1 busy"):
            pool.acquire(SandboxSpec(fn), wait=5.0)  # nothing on its way back: no waiting
        scrubbing = threading.Event()
        scrub = first.release

        def slow_release() -> None:
            scrubbing.set()
            time.sleep(0.3)  # the scrub of a sandbox that held a big instance
            scrub()

        first.release = slow_release  # type: ignore[method-assign]
        releaser = threading.Thread(target=pool.release, args=(first,))
        releaser.start()
        scrubbing.wait()
        second = pool.acquire(SandboxSpec(fn), wait=30.0)
        releaser.join()
        assert second is first  # the same sandbox, once clean: never a second one beyond the maximum
        pool.release(second)
    finally:
        pool.destroy()


def test_idle_sandboxes_beyond_prewarm_are_given_back_after_the_idle_timeout(runtime: Path, fn: Path) -> None:
    pool = _pool(runtime, prewarm=1, max_size=4, idle_timeout=0.5)
    try:
        burst = [pool.acquire(SandboxSpec(fn)) for _ in range(4)]
        agents = [s.agent.pid for s in burst]
        for sandbox in burst:
            pool.release(sandbox)
        last = burst[-1]
        assert pool.shrink() == 0  # idle, but not for long yet
        assert len(pool.idle) == 4
        time.sleep(0.6)
        assert pool.shrink() == 3
        assert pool.idle == [last]  # the most recently used one stays: prewarm = 1
        assert _existing(pool) == pool.size() == 1
        assert [psutil.pid_exists(pid) for pid in agents] == [False, False, False, True]
        time.sleep(0.6)
        assert pool.shrink() == 0  # the prewarmed ones stay however long they idle
        again = pool.acquire(SandboxSpec(fn))  # and the pool still grows on demand
        assert again is last and pool.acquire(SandboxSpec(fn)) is not last
    finally:
        pool.destroy()
    assert _existing(pool) == 0


def test_destroy_takes_everything_down_and_later_acquires_are_refused(runtime: Path, fn: Path) -> None:
    pool = _pool(runtime, prewarm=2, max_size=8)
    busy: list[Sandbox] = [pool.acquire(SandboxSpec(fn)) for _ in range(6)]
    agents = [s.agent.pid for s in [*busy, *pool.idle]]
    pool.destroy()
    assert _existing(pool) == 0
    assert not any(psutil.pid_exists(pid) for pid in agents)
    with pytest.raises(SandboxError, match="the sandbox pool is shut down"):
        pool.acquire(SandboxSpec(fn))

"""Shared fixtures. Tests run as root against the real kernel; they skip only on a probed missing
feature and say which. Every privileged test is checked for leaks: mounts and hugepages must be
the same after it as before (the machine may have its own)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from native.kerndat import kerndat
from shmpool.errors import HugepagesUnavailable
from shmpool.pool import Pool
from tests.qpl_standin import HEADER_JOB_SIZE, HEADER_OFFSETS, build_standin

ROOT_MISSING = "needs root (mounts, ptrace, hugepages, NUMA syscalls)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        for item in items:
            if item.get_closest_marker("privileged"):
                item.add_marker(pytest.mark.skip(reason=ROOT_MISSING))


def _mount_count() -> int:
    return len(Path("/proc/self/mountinfo").read_text().splitlines())


def _hugepages() -> dict[str, int]:
    base = Path("/sys/devices/system/node")
    return {str(p): int(p.read_text()) for p in base.glob("node*/hugepages/hugepages-*/nr_hugepages")}


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    if not request.node.get_closest_marker("privileged"):
        yield
        return
    mounts, pages = _mount_count(), _hugepages()
    yield
    assert _mount_count() == mounts, "the test left mounts behind"
    assert _hugepages() == pages, "the test left hugepages reserved"


@pytest.fixture
def pool_root(tmp_path: Path) -> Path:
    return tmp_path / "pool"


@pytest.fixture
def tmpfs_pool(pool_root: Path) -> Iterator[Pool]:
    pool = Pool.create(pool_root, backend="tmpfs", node=0, size=64 << 20)
    yield pool
    pool.destroy()


@pytest.fixture
def hugetlbfs_pool(pool_root: Path) -> Iterator[Pool]:
    if 2048 not in kerndat().hugepage_sizes_kib:
        pytest.skip("needs 2 MiB hugepages (kerndat: none)")
    try:
        pool = Pool.create(pool_root, backend="hugetlbfs", node=0, size=16 << 20)
    except HugepagesUnavailable as e:
        pytest.skip(f"needs 2 MiB hugepages on node 0: {e}")
    yield pool
    pool.destroy()


@pytest.fixture
def memfd_pool(pool_root: Path) -> Iterator[Pool]:
    pool = Pool.create(pool_root, backend="memfd", node=0, size=64 << 20)
    yield pool
    pool.destroy()


def run_python(code: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter of this venv (for work that must not touch the test process)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


def spawn_python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libqpl.so built from tests/qpl_standin.c (QPL's entry points over zlib), for the IAA codec."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the QPL stand-in")
    if not Path("/usr/include/zlib.h").exists():
        pytest.skip("needs /usr/include/zlib.h (Debian: zlib1g-dev) to build the QPL stand-in")
    out = tmp_path_factory.mktemp("qpl") / "libqpl.so"
    try:
        # The offsets are the literals in tests/qpl_standin.py, from the header: not the binding's.
        return build_standin(out, HEADER_OFFSETS, HEADER_JOB_SIZE)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"building the QPL stand-in failed:\n{e.stderr}")

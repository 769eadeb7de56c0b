"""Kernel features, probed once per process (CRIU's kerndat).

Everything in thaw branches on these flags, never on kernel version strings. Tests skip on the
same flags and print the probed reason. `python -m native.kerndat [--json]` shows them.

Probes are real attempts (open a uffd, pidfd_getfd our own fd, ptrace a short-lived child for its
rseq configuration, ask prctl for the PR_SET_MM_MAP size), not lookups of config files.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from native import mounts, pidfd, ptrace, uffd
from native._native import ffi
from native.constants import PR_SET_MM_MAP_SIZE, Prctl, UffdFeature
from native.process import prctl

SYS_NODE = Path("/sys/devices/system/node")
SYS_HUGEPAGES = Path("/sys/kernel/mm/hugepages")
SYS_DAX = Path("/sys/bus/dax/devices")
SYS_DSA = Path("/sys/bus/dsa/devices")
CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class NumaNode:
    node: int
    cpus: list[int]
    mem_total_kib: int
    # hugepage size in KiB -> (nr_hugepages, free_hugepages) on this node
    hugepages: dict[int, tuple[int, int]]


@dataclass(frozen=True)
class DaxDevice:
    path: str
    size: int
    align: int


@dataclass(frozen=True)
class KernDat:
    uffd: bool
    uffd_via: str | None  # "/dev/userfaultfd" | "syscall" | None
    uffd_features: int
    uffd_missing_shmem: bool
    uffd_missing_hugetlbfs: bool
    uffd_minor_shmem: bool
    uffd_wp: bool
    pidfd_getfd: bool
    ptrace_rseq_config: bool
    pr_set_mm_map: bool
    cgroup_mode: str  # "v1" | "v2" | "hybrid" | "none"
    hugepage_sizes_kib: list[int]
    nodes: list[NumaNode]
    devdax: list[DaxDevice]
    iaa_devices: list[str]
    qpl_library: str | None
    errors: dict[str, str] = field(default_factory=dict)  # probe -> why it failed

    def node(self, node: int) -> NumaNode | None:
        return next((n for n in self.nodes if n.node == node), None)

    @property
    def node_ids(self) -> list[int]:
        return [n.node for n in self.nodes]


# ---------------------------------------------------------------------------------------------
# sysfs helpers


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]"""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def _node_mem_total_kib(node_dir: Path) -> int:
    for line in _read(node_dir / "meminfo").splitlines():
        if "MemTotal:" in line:
            return int(line.split()[-2])
    return 0


def _node_hugepages(node_dir: Path) -> dict[int, tuple[int, int]]:
    pools: dict[int, tuple[int, int]] = {}
    for d in sorted((node_dir / "hugepages").glob("hugepages-*kB")):
        size = int(d.name.removeprefix("hugepages-").removesuffix("kB"))
        pools[size] = (int(_read(d / "nr_hugepages", "0")), int(_read(d / "free_hugepages", "0")))
    return pools


def probe_nodes() -> list[NumaNode]:
    """Online nodes that have memory (the only ones a pool can bind to)."""
    online = parse_cpulist(_read(SYS_NODE / "online", "0"))
    with_memory = set(parse_cpulist(_read(SYS_NODE / "has_memory", "0")))
    nodes = []
    for n in online:
        if n not in with_memory:
            continue
        d = SYS_NODE / f"node{n}"
        nodes.append(NumaNode(n, parse_cpulist(_read(d / "cpulist")), _node_mem_total_kib(d), _node_hugepages(d)))
    return nodes


def probe_hugepage_sizes() -> list[int]:
    return sorted(int(d.name[len("hugepages-") : -2]) for d in SYS_HUGEPAGES.glob("hugepages-*kB"))


def probe_devdax() -> list[DaxDevice]:
    devices = []
    for d in sorted(SYS_DAX.glob("dax*")):
        dev = Path("/dev") / d.name
        if dev.exists():
            devices.append(DaxDevice(str(dev), int(_read(d / "size", "0")), int(_read(d / "align", "0") or 0)))
    return devices


def probe_iaa() -> list[str]:
    return sorted(d.name for d in SYS_DSA.glob("iax*")) if SYS_DSA.exists() else []


def probe_qpl() -> str | None:
    """The Intel QPL library the codecs would use (native.qpl's lookup, so the two agree), else None."""
    from native.qpl import Qpl, QplUnavailable  # cffi's ABI-mode parse only when probing

    try:
        with Qpl.load() as qpl:
            return qpl.library
    except QplUnavailable:
        return None


def probe_cgroup_mode() -> str:
    try:
        root = mounts.statfs_type(CGROUP_ROOT)
    except OSError:
        return "none"
    if root == mounts.FsMagic.CGROUP2:
        return "v2"
    try:
        unified = mounts.statfs_type(f"{CGROUP_ROOT}/unified")
    except OSError:
        unified = 0
    return "hybrid" if unified == mounts.FsMagic.CGROUP2 else "v1"


# ---------------------------------------------------------------------------------------------
# syscall probes


def probe_uffd(errors: dict[str, str]) -> tuple[str | None, int]:
    try:
        fd, via = uffd.open_userfaultfd()
    except OSError as e:
        errors["uffd"] = str(e)
        return None, 0
    try:
        features, _ = uffd.api(fd, 0)
    except OSError as e:
        errors["uffd"] = str(e)
        return None, 0
    finally:
        os.close(fd)
    return via, features


def probe_pidfd_getfd(errors: dict[str, str]) -> bool:
    try:
        pfd = pidfd.pidfd_open(os.getpid())
        try:
            os.close(pidfd.pidfd_getfd(pfd, pfd))
        finally:
            os.close(pfd)
        return True
    except OSError as e:
        errors["pidfd_getfd"] = str(e)
        return False


def probe_rseq_config(errors: dict[str, str]) -> bool:
    """Seize a throw-away child (glibc >= 2.35 registers rseq in every thread) and ask for its rseq."""
    child = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        ptrace.seize(child.pid)
        ptrace.interrupt(child.pid)
        ptrace.wait(child.pid)
        ptrace.get_rseq_configuration(child.pid)
        return True
    except OSError as e:
        errors["ptrace_rseq_config"] = str(e)
        return False
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def probe_pr_set_mm_map(errors: dict[str, str]) -> bool:
    size = ffi.new("unsigned int *")
    try:
        prctl(Prctl.SET_MM, PR_SET_MM_MAP_SIZE, int(ffi.cast("uintptr_t", size)))
    except OSError as e:
        errors["pr_set_mm_map"] = str(e)
        return False
    return bool(size[0] > 0)


# ---------------------------------------------------------------------------------------------


def probe() -> KernDat:
    errors: dict[str, str] = {}
    via, features = probe_uffd(errors)
    return KernDat(
        uffd=via is not None,
        uffd_via=via,
        uffd_features=features,
        uffd_missing_shmem=bool(features & UffdFeature.MISSING_SHMEM),
        uffd_missing_hugetlbfs=bool(features & UffdFeature.MISSING_HUGETLBFS),
        uffd_minor_shmem=bool(features & UffdFeature.MINOR_SHMEM),
        uffd_wp=bool(features & UffdFeature.PAGEFAULT_FLAG_WP),
        pidfd_getfd=probe_pidfd_getfd(errors),
        ptrace_rseq_config=probe_rseq_config(errors),
        pr_set_mm_map=probe_pr_set_mm_map(errors),
        cgroup_mode=probe_cgroup_mode(),
        hugepage_sizes_kib=probe_hugepage_sizes(),
        nodes=probe_nodes(),
        devdax=probe_devdax(),
        iaa_devices=probe_iaa(),
        qpl_library=probe_qpl(),
        errors=errors,
    )


@functools.cache
def kerndat() -> KernDat:
    """The probed features of this kernel, computed on first use and shared afterwards."""
    return probe()


def _table(kd: KernDat) -> str:
    rows: list[tuple[str, str]] = []
    for key, value in asdict(kd).items():
        if key == "nodes":
            for n in kd.nodes:
                pools = ", ".join(f"{s} KiB: {nr} ({free} free)" for s, (nr, free) in n.hugepages.items())
                rows.append((f"node {n.node}", f"cpus {n.cpus}, {n.mem_total_kib // 1024} MiB, hugepages {pools}"))
        elif key == "uffd_features":
            rows.append((key, f"{value:#x} {UffdFeature(value)!r}"))
        elif key == "errors":
            rows.extend((f"({probe} failed)", why) for probe, why in value.items())
        else:
            rows.append((key, str(value) if value not in ([], None) else "-"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m native.kerndat", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the flags as JSON")
    args = parser.parse_args(argv)
    kd = kerndat()
    print(json.dumps(asdict(kd), indent=2) if args.json else _table(kd))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cgroups for sandboxes: one interface, a v1 and a v2 implementation, and hybrid mode.

The mode is read once from the mount table:

- `v2`: one cgroup2 hierarchy holds every controller;
- `v1`: one hierarchy per controller (cpu, memory, pids, cpuset, freezer);
- `hybrid` (this project's test machines): the v1 hierarchies hold the controllers and a cgroup2
  hierarchy (/sys/fs/cgroup/unified) holds none of ours, but its non-root cgroups still have
  `cgroup.kill` and `cgroup.freeze`. Limits go to v1; killing goes to v2.

thaw's cgroups sit under the daemon's own cgroup in each hierarchy (what systemd's Delegate=yes
hands a service), in a directory named after the tree (`thaw`); where that is not writable they go
under a configurable fallback root instead.

A process joins a cgroup by writing "0" into its `cgroup.procs`: `Cgroup.procs_files()` lists
those files, which the sandbox agent keeps open so that the stubs it forks join the instance
cgroup before they stop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import InvalidLimits, SandboxError

V1_CONTROLLERS = ("cpu", "memory", "pids", "cpuset", "freezer")
CPU_PERIOD_US = 100_000
MIN_MEMORY = 4 << 20
EMPTY_TIMEOUT = 5.0


@dataclass(frozen=True)
class Limits:
    """What a sandbox's instances may use. None means unlimited (or, for cpuset_mems, inherited)."""

    cpu: float | None = None  # cores, e.g. 0.5
    memory: int | None = None  # bytes
    pids: int | None = None
    cpuset_mems: str | None = None  # NUMA nodes, e.g. "0" or "0-1"

    def validate(self) -> Limits:
        if self.cpu is not None and not (0.01 <= self.cpu <= 1024):
            raise InvalidLimits(f"cpu limit must be between 0.01 and 1024 cores, not {self.cpu}")
        if self.memory is not None and self.memory < MIN_MEMORY:
            raise InvalidLimits(f"memory limit must be at least {MIN_MEMORY >> 20} MiB, not {self.memory} bytes")
        if self.pids is not None and self.pids < 1:
            raise InvalidLimits(f"pids limit must be at least 1, not {self.pids}")
        if self.cpuset_mems is not None and not _is_node_list(self.cpuset_mems):
            raise InvalidLimits(f"cpuset_mems must be a node list like '0' or '0-1,3', not {self.cpuset_mems!r}")
        return self


def _is_node_list(text: str) -> bool:
    return re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text) is not None


def _node_set(text: str) -> set[int]:
    """The nodes of a list like "0-1,3" (empty text: none)."""
    nodes: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        nodes.update(range(int(first), int(last or first) + 1))
    return nodes


# -- the hierarchies on this machine ---------------------------------------------------------------
@dataclass(frozen=True)
class Hierarchies:
    mode: str  # "v1", "v2" or "hybrid"
    v1: dict[str, Path]  # controller -> mount point
    v2: Path | None


def detect(mountinfo: str = "/proc/self/mountinfo") -> Hierarchies:
    """Which cgroup hierarchies are mounted, and so the mode (read once per process)."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in Path(mountinfo).read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, (fstype, _source, options) = left.split(), right.split()[:3]
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(fields[4])
        elif fstype == "cgroup":
            for option in options.split(","):
                if option in V1_CONTROLLERS and option not in v1:
                    v1[option] = Path(fields[4])
    if v1 and v2 is not None:
        mode = "hybrid"
    elif v1:
        mode = "v1"
    elif v2 is not None:
        mode = "v2"
    else:
        raise SandboxError("no cgroup hierarchy is mounted (looked for cgroup and cgroup2 in the mount table)")
    return Hierarchies(mode, v1, v2)


def own_cgroup(controller: str) -> str:
    """This process's cgroup path in the hierarchy of `controller` ("" for cgroup2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller == "" and controllers == "") or controller in controllers.split(","):
            return path
    return "/"


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise SandboxError(f"writing {value!r} to {path}: {os.strerror(e.errno or 0)}") from e


def _inherit_cpuset(path: Path) -> None:
    """A new v1 cpuset has no cpus and no mems and admits no task (ENOSPC): copy the parent's."""
    for knob in ("cpuset.cpus", "cpuset.mems"):
        if not (path / knob).read_text().strip():
            _write(path / knob, (path.parent / knob).read_text().strip())


def _pids(procs: Path) -> set[int]:
    try:
        return {int(x) for x in procs.read_text().split()}
    except FileNotFoundError:
        return set()


def _rmdir(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


# -- one cgroup ------------------------------------------------------------------------------------
class Cgroup(ABC):
    """One cgroup of thaw's, in however many hierarchies the mode needs."""

    name: str

    @abstractmethod
    def set_limits(self, limits: Limits) -> None: ...

    @abstractmethod
    def directories(self) -> list[Path]: ...

    @abstractmethod
    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer has killed in this cgroup."""

    @abstractmethod
    def kill(self) -> None:
        """Kill every process in the cgroup (not waiting for them)."""

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.directories()]

    def pids(self) -> set[int]:
        out: set[int] = set()
        for procs in self.procs_files():
            out |= _pids(procs)
        return out

    def kill_and_wait(self, timeout: float = EMPTY_TIMEOUT) -> None:
        """Kill everything inside and wait until the cgroup is empty; SandboxError if it stays not."""
        self.kill()
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            if time.monotonic() > deadline:
                raise SandboxError(f"cgroup {self.name} still holds pids {sorted(pids)} after {timeout} s")
            time.sleep(0.0005)

    def remove(self) -> None:
        _remove_dirs(self.directories())


def _remove_dirs(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        for attempt in range(200):  # a task killed a moment ago may still hold the directory
            try:
                _rmdir(d)
                break
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == 199:
                    raise SandboxError(f"removing cgroup {d}: {os.strerror(e.errno or 0)}") from e
                time.sleep(0.01)


def _kill_pids(cgroup: Cgroup) -> None:
    for pid in cgroup.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class V2Cgroup(Cgroup):
    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name

    def directories(self) -> list[Path]:
        return [self.path]

    def set_limits(self, limits: Limits) -> None:
        p = self.path
        cpu = "max" if limits.cpu is None else str(round(limits.cpu * CPU_PERIOD_US))
        _write(p / "cpu.max", f"{cpu} {CPU_PERIOD_US}")
        _write(p / "memory.max", "max" if limits.memory is None else str(limits.memory))
        if (p / "memory.swap.max").exists():
            _write(p / "memory.swap.max", "max" if limits.memory is None else "0")
        _write(p / "pids.max", "max" if limits.pids is None else str(limits.pids))
        if limits.cpuset_mems is not None:
            _write(p / "cpuset.mems", limits.cpuset_mems)

    def oom_kills(self) -> int:
        try:
            text = (self.path / "memory.events").read_text()
        except FileNotFoundError:
            return 0
        fields = dict(line.split() for line in text.splitlines())
        return int(fields.get("oom_kill", 0))

    def kill(self) -> None:
        kill_file = self.path / "cgroup.kill"
        if kill_file.exists():
            _write(kill_file, "1")
        else:  # before 5.14: freeze, kill, thaw (no fork can slip through a frozen cgroup)
            _write(self.path / "cgroup.freeze", "1")
            _kill_pids(self)
            _write(self.path / "cgroup.freeze", "0")


class V1Cgroup(Cgroup):
    def __init__(self, paths: dict[str, Path], name: str) -> None:
        self.paths, self.name = paths, name

    def directories(self) -> list[Path]:
        return list(self.paths.values())

    def set_limits(self, limits: Limits) -> None:
        if cpu := self.paths.get("cpu"):
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", "-1" if limits.cpu is None else str(round(limits.cpu * CPU_PERIOD_US)))
        if memory := self.paths.get("memory"):
            self._set_memory(memory, limits.memory)
        if pids := self.paths.get("pids"):
            _write(pids / "pids.max", "max" if limits.pids is None else str(limits.pids))
        if (cpuset := self.paths.get("cpuset")) and limits.cpuset_mems is not None:
            _write(cpuset / "cpuset.mems", limits.cpuset_mems)

    @staticmethod
    def _set_memory(memory: Path, limit: int | None) -> None:
        value = "-1" if limit is None else str(limit)
        swap = memory / "memory.memsw.limit_in_bytes"
        if not swap.exists():
            _write(memory / "memory.limit_in_bytes", value)
            return
        # memsw (memory + swap) must never be below the memory limit: raise it first, lower it last
        current = int((memory / "memory.limit_in_bytes").read_text())
        if limit is None or limit > current:
            _write(swap, value)
            _write(memory / "memory.limit_in_bytes", value)
        else:
            _write(memory / "memory.limit_in_bytes", value)
            _write(swap, value)

    def oom_kills(self) -> int:
        memory = self.paths.get("memory")
        if memory is None:
            return 0
        fields = dict(line.split() for line in (memory / "memory.oom_control").read_text().splitlines())
        return int(fields.get("oom_kill", 0))

    def kill(self) -> None:
        freezer = self.paths.get("freezer")
        if freezer is None:
            _kill_pids(self)
            return
        _write(freezer / "freezer.state", "FROZEN")
        try:
            _kill_pids(self)
        finally:
            _write(freezer / "freezer.state", "THAWED")


class HybridCgroup(Cgroup):
    """Limits in v1, killing through the v2 cgroup (cgroup.kill) that every member also joins."""

    def __init__(self, v1: V1Cgroup, v2: V2Cgroup) -> None:
        self.v1, self.v2, self.name = v1, v2, v1.name

    def directories(self) -> list[Path]:
        return [*self.v1.directories(), *self.v2.directories()]

    def set_limits(self, limits: Limits) -> None:
        self.v1.set_limits(limits)

    def oom_kills(self) -> int:
        return self.v1.oom_kills()

    def kill(self) -> None:
        self.v2.kill()


# -- thaw's tree -------------------------------------------------------------------------------------
class CgroupTree:
    """thaw's directory in each hierarchy, and the cgroups made in it."""

    def __init__(self, name: str = "thaw", fallback_root: str = "/", hierarchies: Hierarchies | None = None) -> None:
        self.h = hierarchies or detect()
        self.name = name
        self.fallback_root = fallback_root
        self.v1_roots = {c: self._root(mount, own_cgroup(c)) for c, mount in self.h.v1.items()}
        if "cpuset" in self.v1_roots:
            _inherit_cpuset(self.v1_roots["cpuset"])
        self.v2_root = self._root(self.h.v2, own_cgroup("")) if self.h.v2 is not None else None

    @property
    def mode(self) -> str:
        return self.h.mode

    def _root(self, mount: Path, own: str) -> Path:
        for base in (own, self.fallback_root):
            root = mount / base.lstrip("/") / self.name
            try:
                root.mkdir(exist_ok=True)
                return root
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise SandboxError(f"creating {root}: {os.strerror(e.errno or 0)}") from e
        raise SandboxError(f"neither the daemon's own cgroup nor {self.fallback_root} is writable under {mount}")

    def remove(self) -> None:
        """Remove thaw's directories if no cgroup is left in them (the machine as it was)."""
        if not self.children():
            _remove_dirs(self.roots())

    def roots(self) -> list[Path]:
        return [*self.v1_roots.values(), *([self.v2_root] if self.v2_root else [])]

    def create(self, name: str) -> Cgroup:
        """A new, empty cgroup (SandboxError if it exists: a leftover of a crash is removed first)."""
        made: list[Path] = []
        try:
            return self._build(name, lambda path: self._mkdir(path, made), new=True)
        except BaseException:
            for d in reversed(made):
                _rmdir(d)
            raise

    def open(self, name: str) -> Cgroup:
        """The existing cgroup `name` of thaw's tree (a leftover to kill and remove)."""
        return self._build(name, lambda path: path, new=False)

    def _build(self, name: str, directory: Callable[[Path], Path], new: bool) -> Cgroup:
        if self.h.mode == "v2":
            assert self.v2_root is not None
            self._enable_v2_controllers()
            return V2Cgroup(directory(self.v2_root / name), name)
        paths = {c: directory(root / name) for c, root in self.v1_roots.items()}
        if "cpuset" in paths and new:
            _inherit_cpuset(paths["cpuset"])
        v1 = V1Cgroup(paths, name)
        if self.h.mode == "v1" or self.v2_root is None:
            return v1
        return HybridCgroup(v1, V2Cgroup(directory(self.v2_root / name), name))

    def reap_orphans(self) -> list[str]:
        """Kill and remove every cgroup in thaw's tree: what a daemon that died left behind (its
        sandboxes' agents and instances). Returns their names."""
        names = self.children()
        for name in names:
            cgroup = self.open(name)  # a crash may have left it in only some hierarchies: signal pids directly
            deadline = time.monotonic() + EMPTY_TIMEOUT
            while cgroup.pids() and time.monotonic() < deadline:
                _kill_pids(cgroup)
                time.sleep(0.001)
            cgroup.remove()
        return names

    @staticmethod
    def _mkdir(path: Path, made: list[Path]) -> Path:
        try:
            path.mkdir()
        except FileExistsError:
            raise SandboxError(f"cgroup {path} already exists") from None
        made.append(path)
        return path

    def _enable_v2_controllers(self) -> None:
        """In pure v2, thaw's root must delegate cpu, memory, pids and cpuset to its children; the
        daemon's own cgroup then must hold no process ("no internal processes"), so the daemon
        moves itself into a leaf next to thaw's tree when it is in the way."""
        assert self.v2_root is not None
        wanted = {"cpu", "memory", "pids", "cpuset"}
        parent = self.v2_root.parent
        available = set((parent / "cgroup.controllers").read_text().split())
        missing = " ".join(f"+{c}" for c in sorted(wanted & available - set(self._subtree(self.v2_root))))
        if not missing:
            return
        try:
            _write(parent / "cgroup.subtree_control", missing)
        except SandboxError:
            leaf = parent / "daemon"
            leaf.mkdir(exist_ok=True)
            for pid in _pids(parent / "cgroup.procs"):
                _write(leaf / "cgroup.procs", str(pid))
            _write(parent / "cgroup.subtree_control", missing)
        _write(self.v2_root / "cgroup.subtree_control", missing)

    @staticmethod
    def _subtree(path: Path) -> list[str]:
        return (path / "cgroup.subtree_control").read_text().split()

    def check_mems(self, nodes: str) -> None:
        """SandboxError unless thaw's cgroups may use NUMA `nodes` (a node list like "0-1,3")."""
        allowed_file = self._allowed_mems()
        if allowed_file is None:
            raise SandboxError(f"cpuset.mems {nodes} asked for, but no cgroup hierarchy has the cpuset controller")
        allowed = _node_set(allowed_file.read_text().strip())
        if not _node_set(nodes) <= allowed:
            raise SandboxError(f"NUMA nodes {nodes} are not all in {allowed_file} ({sorted(allowed)})")

    def _allowed_mems(self) -> Path | None:
        """The file naming the nodes thaw's cgroups may use: v1's tree root copied its parent's."""
        if "cpuset" in self.v1_roots:
            return self.v1_roots["cpuset"] / "cpuset.mems"
        effective = self.v2_root.parent / "cpuset.mems.effective" if self.v2_root else None
        return effective if self.h.mode == "v2" and effective and effective.exists() else None

    def children(self) -> list[str]:
        """Names of the cgroups in thaw's tree."""
        names: set[str] = set()
        for root in self.roots():
            names |= {p.name for p in root.iterdir() if p.is_dir()}
        return sorted(names)

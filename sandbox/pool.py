"""The pool of sandboxes: built ahead, repurposed per function, returned scrubbed.

    pool = SandboxPool(PoolSettings(prewarm=4, max_size=32), SandboxConfig(), NetworkConfig())
    sandbox = pool.acquire(SandboxSpec(Path("/srv/fn"), Limits(memory=256 << 20)))
    ...
    pool.release(sandbox)
    pool.destroy()

`acquire` takes an idle sandbox (or builds one while the pool is below its maximum) and
repurposes it: no new namespaces, no new veth. With `cpuset_mems` (the daemon passes the memory
pool's node), every instance cgroup gets that cpuset.mems unless the spec's limits name nodes.
`release` kills the instances and scrubs; a sandbox that cannot be made clean is destroyed
instead of going back. Thread-safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from sandbox.cgroups import CgroupTree, Limits
from sandbox.errors import InvalidSpec, PoolExhausted, SandboxError
from sandbox.network import Network, NetworkConfig
from sandbox.sandbox import Sandbox, SandboxConfig, SandboxSpec


@dataclass(frozen=True)
class PoolSettings:
    prewarm: int = 2
    max_size: int = 32
    cgroup_tree: str = "thaw"
    cgroup_fallback_root: str = "/"
    network: bool = True
    # NUMA nodes the instances allocate from unless a spec says otherwise: the memory pool's node.
    # Pages an instance faults into the pool's tmpfs follow the mount's bind policy only where its
    # cpuset allows that node (else the kernel ignores the policy and allocates from the cpuset).
    cpuset_mems: str | None = None

    def validate(self) -> PoolSettings:
        if not 0 <= self.prewarm <= self.max_size or self.max_size < 1:
            raise SandboxError(f"need 0 <= prewarm <= max_size and max_size >= 1, got {self.prewarm}, {self.max_size}")
        Limits(cpuset_mems=self.cpuset_mems).validate()
        return self


class SandboxPool:
    def __init__(
        self,
        settings: PoolSettings | None = None,
        config: SandboxConfig | None = None,
        network: NetworkConfig | None = None,
    ) -> None:
        self.settings = (settings or PoolSettings()).validate()
        self.config = (config or SandboxConfig()).validate()
        self.tree = CgroupTree(self.settings.cgroup_tree, self.settings.cgroup_fallback_root)
        if self.settings.cpuset_mems is not None:
            self.tree.check_mems(self.settings.cpuset_mems)
        self.network: Network | None = None
        if self.settings.network:
            self.network = Network(network or NetworkConfig())
            self.network.setup()
        self.idle: list[Sandbox] = []
        self.busy: set[Sandbox] = set()
        self.lock = threading.Lock()
        self.building = 0
        try:
            for _ in range(self.settings.prewarm):
                self.idle.append(self._create())
        except BaseException:
            self.destroy()
            raise

    def _create(self) -> Sandbox:
        return Sandbox.create(self.config, self.tree, self.network)

    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.building

    def acquire(self, spec: SandboxSpec) -> Sandbox:
        """A sandbox repurposed for `spec`; PoolExhausted at the maximum, InvalidSpec/InvalidLimits
        for a bad spec (checked before any sandbox is touched)."""
        spec.validate()
        if self.settings.cpuset_mems is not None and spec.limits.cpuset_mems is None:
            spec = replace(spec, limits=replace(spec.limits, cpuset_mems=self.settings.cpuset_mems))
        with self.lock:
            sandbox = self.idle.pop() if self.idle else None
            if sandbox is None:
                if self.size() >= self.settings.max_size:
                    raise PoolExhausted(f"all {self.settings.max_size} sandboxes are in use")
                self.building += 1
        if sandbox is None:
            try:
                sandbox = self._create()
            finally:
                with self.lock:
                    self.building -= 1
        try:
            sandbox.repurpose(spec)
        except InvalidSpec:
            self._put_back(sandbox)
            raise
        except BaseException:
            sandbox.destroy()
            raise
        with self.lock:
            self.busy.add(sandbox)
        return sandbox

    def _put_back(self, sandbox: Sandbox) -> None:
        try:
            sandbox.release()
        except SandboxError:
            sandbox.destroy()
            return
        with self.lock:
            self.idle.append(sandbox)

    def release(self, sandbox: Sandbox) -> None:
        """Kill the sandbox's instances, scrub it and keep it for the next function."""
        with self.lock:
            if sandbox not in self.busy:
                raise SandboxError(f"sandbox {sandbox.id} is not in use in this pool")
            self.busy.discard(sandbox)
        if not sandbox.alive():
            sandbox.destroy()
            return
        self._put_back(sandbox)

    def destroy(self) -> None:
        """Destroy every sandbox and the bridge this pool made."""
        with self.lock:
            everything = [*self.idle, *self.busy]
            self.idle, self.busy = [], set()
        errors = []
        for sandbox in everything:
            try:
                sandbox.destroy()
            except SandboxError as e:
                errors.append(str(e))
        if self.network is not None:
            self.network.teardown()
            self.network = None
        try:
            self.tree.remove()
        except SandboxError as e:
            errors.append(str(e))
        if errors:
            raise SandboxError("; ".join(errors))

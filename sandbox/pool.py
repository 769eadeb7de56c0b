"""The pool of sandboxes: built ahead, repurposed per function, returned scrubbed, given back when idle.

    pool = SandboxPool(PoolSettings(prewarm=4, max_size=32), SandboxConfig(), NetworkConfig())
    sandbox = pool.acquire(SandboxSpec(Path("/srv/fn"), Limits(memory=256 << 20)))
    ...
    pool.release(sandbox)
    pool.shrink()          # now and then: idle sandboxes beyond `prewarm` go after `idle_timeout`
    pool.destroy()

`acquire` takes an idle sandbox (or builds one while the pool is below its maximum) and
repurposes it: no new namespaces, no new veth. With `cpuset_mems` (the daemon passes the memory
pool's node), every instance cgroup gets that cpuset.mems unless the spec's limits name nodes.
`release` kills the instances and scrubs; a sandbox that cannot be made clean is destroyed
instead of going back. Thread-safe.

The count is exact: every sandbox that exists is in exactly one state, and all of them count
against `max_size`, whatever the state:

    building   made by an acquire (Sandbox.create), not yet handed out
    busy       handed out: being repurposed, or in use
    returning  being scrubbed by release() (or a refused repurpose), about to be idle
    idle       scrubbed, waiting for a function
    leaving    being destroyed (a failed scrub, a dead agent, shrink)

A state changes only under the lock, at the moment the work it names starts or ends: a
sandbox is never out of the count while something is done to it. At the maximum, an acquire
waits (up to `wait` seconds) only for a sandbox that is returning or leaving: that work is
already running on another thread and ends on its own, so waiting for it cannot deadlock a
caller whose own threads would have to do the giving back. Otherwise it fails at once with
PoolExhausted.

`destroy` takes the sandboxes down on a few threads at once: most of a sandbox's teardown is
the kernel's (the veth's deletion waits for RCU grace periods under the RTNL lock; the agent's
death tears down its namespaces), and sixty-four of them one after another took seconds.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from sandbox.cgroups import CgroupTree, Limits
from sandbox.errors import InvalidSpec, PoolExhausted, SandboxError
from sandbox.network import Network, NetworkConfig
from sandbox.sandbox import Sandbox, SandboxConfig, SandboxSpec

RETURN_WAIT = 5.0  # seconds an acquire at the maximum waits for a sandbox on its way back or out
TEARDOWN_THREADS = 8  # sandboxes destroy() takes down at once


@dataclass(frozen=True)
class PoolSettings:
    prewarm: int = 2  # built at start, and this many idle ones are kept however long they idle
    max_size: int = 32
    cgroup_tree: str = "thaw"
    cgroup_fallback_root: str = "/"
    network: bool = True
    # NUMA nodes the instances allocate from unless a spec says otherwise: the memory pool's node.
    # Pages an instance faults into the pool's tmpfs follow the mount's bind policy only where its
    # cpuset allows that node (else the kernel ignores the policy and allocates from the cpuset).
    cpuset_mems: str | None = None
    idle_timeout: float = 120.0  # seconds an idle sandbox beyond `prewarm` is kept (see shrink())
    # Idle sandboxes hold a stub that waits for its restore (Sandbox.prepare_stub), forked when
    # the sandbox is built or given back, so a thaw into one does not wait for a fork.
    waiting_stubs: bool = False

    def validate(self) -> PoolSettings:
        if not 0 <= self.prewarm <= self.max_size or self.max_size < 1:
            raise SandboxError(f"need 0 <= prewarm <= max_size and max_size >= 1, got {self.prewarm}, {self.max_size}")
        if not self.idle_timeout >= 0:  # also refuses NaN
            raise SandboxError(f"idle_timeout must not be negative, not {self.idle_timeout}")
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
        self.idle: list[Sandbox] = []  # the most recently released last: acquire takes that one
        self.idle_since: dict[Sandbox, float] = {}
        self.busy: set[Sandbox] = set()
        self.building = self.returning = self.leaving = 0
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified whenever a sandbox changes state
        self.closed = False
        try:
            for _ in range(self.settings.prewarm):
                sandbox = self._create()
                self._idle(sandbox)
                self._prepare(sandbox)
        except BaseException:
            self.destroy()
            raise

    def _create(self) -> Sandbox:
        return Sandbox.create(self.config, self.tree, self.network)

    def _prepare(self, sandbox: Sandbox) -> None:
        if self.settings.waiting_stubs:
            sandbox.prepare_stub()

    def available(self) -> int:
        """Sandboxes an acquire could have now without waiting: idle ones, and room to build."""
        with self.lock:
            return len(self.idle) + max(self.settings.max_size - self.size(), 0)

    def size(self) -> int:
        """Every sandbox that exists, whatever it is doing (never above settings.max_size)."""
        return len(self.idle) + len(self.busy) + self.building + self.returning + self.leaving

    def acquire(self, spec: SandboxSpec, wait: float = RETURN_WAIT) -> Sandbox:
        """A sandbox repurposed for `spec`; PoolExhausted at the maximum, InvalidSpec/InvalidLimits
        for a bad spec (checked before any sandbox is touched)."""
        spec.validate()
        if self.settings.cpuset_mems is not None and spec.limits.cpuset_mems is None:
            spec = replace(spec, limits=replace(spec.limits, cpuset_mems=self.settings.cpuset_mems))
        sandbox = self._take(wait, spec.function_dir)
        if sandbox is None:
            try:
                sandbox = self._create()
            except BaseException:
                with self.changed:
                    self.building -= 1
                    self.changed.notify_all()
                raise
            with self.changed:  # building -> busy in one step: it never leaves the count
                self.building -= 1
                late = self.closed  # destroy() came meanwhile and did not see this one
                if late:
                    self.leaving += 1
                else:
                    self.busy.add(sandbox)
            if late:
                self._leave(sandbox)
                raise SandboxError("the sandbox pool is shut down")
        try:
            sandbox.repurpose(spec)
        except InvalidSpec:
            self._give_back(sandbox)
            raise
        except BaseException:
            self._discard(sandbox)
            raise
        return sandbox

    def acquire_ready(self, spec: SandboxSpec) -> Sandbox | None:
        """An idle sandbox that needs nothing done for `spec` (it holds the function's mount,
        limits and hostname already, and a stub waits in it), now busy; None when there is none.
        Never waits for the agent or a build, so an event loop may call it (thawd's thaws try it
        before a trip to a worker thread for `acquire`)."""
        spec.validate()
        if self.settings.cpuset_mems is not None and spec.limits.cpuset_mems is None:
            spec = replace(spec, limits=replace(spec.limits, cpuset_mems=self.settings.cpuset_mems))
        with self.lock:
            for i in range(len(self.idle) - 1, -1, -1) if not self.closed else ():
                sandbox = self.idle[i]
                if sandbox.ready_for(spec):
                    del self.idle[i]
                    del self.idle_since[sandbox]
                    self.busy.add(sandbox)
                    sandbox.spec = spec
                    return sandbox
        return None

    def _take(self, wait: float, function_dir: Path) -> Sandbox | None:
        """An idle sandbox, now busy; or None with a build counted (the caller builds it). The
        most recently used one that holds `function_dir` already (its repurpose then has nothing
        to do), else the most recently used."""
        deadline = time.monotonic() + wait
        with self.changed:
            while True:
                if self.closed:
                    raise SandboxError("the sandbox pool is shut down")
                if self.idle:
                    sandbox = self.idle.pop(self._steer(function_dir))
                    del self.idle_since[sandbox]
                    self.busy.add(sandbox)
                    return sandbox
                if self.size() < self.settings.max_size:
                    self.building += 1
                    return None
                left = deadline - time.monotonic()
                if not (self.returning or self.leaving) or left <= 0:
                    raise PoolExhausted(
                        f"all {self.settings.max_size} sandboxes are in use "
                        f"({len(self.busy)} busy, {self.building} being built, "
                        f"{self.returning + self.leaving} on their way back or out)"
                    )
                self.changed.wait(left)

    def _steer(self, function_dir: Path) -> int:
        """Where in `idle` the sandbox for `function_dir` is (the lock is held)."""
        for i in range(len(self.idle) - 1, -1, -1):
            if self.idle[i].mounted == function_dir:
                return i
        return -1

    def release(self, sandbox: Sandbox) -> None:
        """Kill the sandbox's instances, scrub it and keep it for the next function."""
        self._give_back(sandbox)

    def _give_back(self, sandbox: Sandbox) -> None:
        with self.lock:
            if sandbox not in self.busy:
                if self.closed:  # destroy() took it down already, with the pool
                    return
                raise SandboxError(f"sandbox {sandbox.id} is not in use in this pool")
            self.busy.discard(sandbox)
            self.returning += 1
        clean = False
        try:
            if sandbox.alive():
                sandbox.release()
                self._prepare(sandbox)  # on this thread, the releasing one: off the next thaw's path
                clean = True
        except SandboxError:
            pass  # it cannot be made clean: it goes
        finally:  # on any other error too: the sandbox is neither kept nor lost from the count
            with self.changed:
                self.returning -= 1
                kept = clean and not self.closed
                if kept:
                    self._idle(sandbox)
                else:
                    self.leaving += 1
                self.changed.notify_all()
            if not kept:
                self._leave(sandbox)

    def _idle(self, sandbox: Sandbox) -> None:
        self.idle.append(sandbox)
        self.idle_since[sandbox] = time.monotonic()

    def _discard(self, sandbox: Sandbox) -> None:
        """Destroy a busy sandbox (a failed repurpose)."""
        with self.lock:
            if sandbox not in self.busy:  # destroy() took it down already, with the pool
                return
            self.busy.discard(sandbox)
            self.leaving += 1
        self._leave(sandbox)

    def _leave(self, sandbox: Sandbox) -> None:
        """Destroy a sandbox counted as leaving; the slot is free once it is gone."""
        try:
            sandbox.destroy()
        finally:
            with self.changed:
                self.leaving -= 1
                self.changed.notify_all()

    def shrink(self, now: float | None = None) -> int:
        """Destroy the sandboxes idle longer than idle_timeout, keeping `prewarm` idle ones (the most
        recently used); returns how many went. Call it now and then (thawd does)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            surplus = len(self.idle) - self.settings.prewarm
            stale = [s for s in self.idle[: max(surplus, 0)] if now - self.idle_since[s] >= self.settings.idle_timeout]
            for sandbox in stale:
                self.idle.remove(sandbox)
                del self.idle_since[sandbox]
            self.leaving += len(stale)
        errors = []
        for sandbox in stale:
            try:
                self._leave(sandbox)
            except SandboxError as e:
                errors.append(str(e))
        if errors:
            raise SandboxError("shrinking the sandbox pool: " + "; ".join(errors))
        return len(stale)

    def destroy(self) -> None:
        """Destroy every sandbox (a few at a time) and the bridge this pool made; acquires fail from now on."""
        with self.changed:
            self.closed = True
            everything = [*self.idle, *self.busy]
            self.idle, self.busy, self.idle_since = [], set(), {}
            self.leaving += len(everything)
            self.changed.notify_all()
        with ThreadPoolExecutor(TEARDOWN_THREADS, thread_name_prefix="sandbox-teardown") as teardown:
            errors = [e for e in teardown.map(self._leave_quietly, everything) if e]
        with self.changed:  # what other threads still build, scrub or destroy ends first
            self.changed.wait_for(lambda: not (self.building or self.returning or self.leaving), RETURN_WAIT)
        if self.network is not None:
            self.network.teardown()
            self.network = None
        try:
            self.tree.remove()
        except SandboxError as e:
            errors.append(str(e))
        if errors:
            raise SandboxError("; ".join(errors))

    def _leave_quietly(self, sandbox: Sandbox) -> str:
        """_leave() for a teardown thread: the error's text, or "" (map() would stop at the first)."""
        try:
            self._leave(sandbox)
        except SandboxError as e:
            return str(e)
        return ""

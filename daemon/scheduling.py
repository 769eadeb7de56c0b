"""Which instance serves which request, and when thaws start (admission), keep and release.

A request takes an idle instance of its function when there is one. Else it waits in the
function's queue, and admission starts the thaws the queue needs: one per waiting request not
covered by a thaw under way, bounded by the function's maximum, the daemon's and the sandboxes
free. Every instance that becomes free, thawed or done with a request, goes to the oldest
waiting request, whichever request's thaw made it: under a burst, a request is served by the
first instance free, not by the thaw it started, and none fails because instances are still
thawing. A thaw that fails fails one waiting request (the oldest) with its error; the others
are admitted again. At the daemon's maximum, the instance idle the longest (of any function)
is released to make room, and its end admits the waiting requests again.

One invocation at a time per instance. Idle instances are kept for their keep-alive, or as many
as the scale target (`min_warm`) says; `fill` thaws up to that target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from daemon.config import DaemonConfig
from daemon.errors import NotFound, ThawError, Unavailable
from daemon.metrics import Metrics
from daemon.state import FunctionState, LiveInstance, Waiter
from daemon.templates import Templates
from daemon.thawing import Thawer
from sandbox.errors import SandboxError

log = logging.getLogger("thawd")


class Scheduler:
    def __init__(
        self,
        config: DaemonConfig,
        functions: Mapping[str, FunctionState],
        thawer: Thawer,
        templates: Templates,
        metrics: Metrics,
        recapture: Callable[[FunctionState], Awaitable[None]],
        spawn: Callable[[Awaitable[Any]], None],
    ) -> None:
        self.config, self.functions, self.thawer, self.templates = config, functions, thawer, templates
        self.metrics, self.recapture, self.spawn = metrics, recapture, spawn
        self.starting = 0  # thaws under way, every function's
        self.retiring = 0  # instances whose sandboxes are not back in the pool yet: they still count
        self.closing = False

    # -- counts ------------------------------------------------------------------------------------
    def max_instances(self, fs: FunctionState) -> int:
        return min(fs.spec.max_instances or self.config.instances_max_per_function, self.config.instances_max)

    def total_instances(self) -> int:
        return sum(len(fs.instances) for fs in self.functions.values()) + self.starting + self.retiring

    def in_flight(self) -> int:
        return sum(1 for fs in self.functions.values() for i in fs.instances if i.busy)

    # -- requests ----------------------------------------------------------------------------------
    async def checkout(self, fs: FunctionState) -> LiveInstance:
        """An instance of `fs` for one request, busy: an idle one, else the first that is free."""
        while True:
            if self.closing:
                raise Unavailable("thawd is shutting down")
            if fs.broken:
                raise Unavailable(fs.broken)
            if fs.idle:
                instance = fs.idle.pop()
                instance.busy = True
                self.metrics.starts.labels(fs.name, "warm").inc()
                return instance
            waiter: Waiter = asyncio.get_running_loop().create_future()
            fs.waiters.append(waiter)
            self.admit(fs)
            try:
                got = await waiter
            except asyncio.CancelledError:  # the request timed out or its client went away
                with contextlib.suppress(ValueError):
                    fs.waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    handed = waiter.result()
                    if handed is not None:  # handed over as the request went: to the next one
                        handed.busy = False
                        self._offer(fs, handed)
                raise
            if got is not None:
                return got

    def check_in(self, fs: FunctionState, instance: LiveInstance) -> None:
        """The instance answered its request: to the next request, idle, or released."""
        instance.busy = False
        instance.invocations += 1
        instance.last_used = time.monotonic()
        stale = instance.template is not fs.template or self.closing
        if stale or (fs.spec.idle_timeout == 0 and len(fs.instances) > fs.min_warm):
            self.retire_soon(instance)  # a new revision's, or a fresh instance per call (idle_timeout 0)
            self.admit(fs)
            return
        self._offer(fs, instance)

    def _offer(self, fs: FunctionState, instance: LiveInstance) -> None:
        """A free instance to the oldest waiting request, else to the idle list."""
        while fs.waiters:
            waiter = fs.waiters.popleft()
            if not waiter.done():
                instance.busy = True
                self.metrics.starts.labels(fs.name, "warm").inc()
                waiter.set_result(instance)
                return
        fs.idle.append(instance)

    def fail_waiters(self, fs: FunctionState, error: BaseException) -> None:
        while fs.waiters:
            waiter = fs.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def _waiting(self, fs: FunctionState) -> int:
        return sum(1 for w in fs.waiters if not w.done())

    # -- admission ---------------------------------------------------------------------------------
    def admit(self, fs: FunctionState) -> None:
        """Start the thaws the waiting requests of `fs` need, within the maxima and free sandboxes."""
        if self.closing or fs.broken or self.functions.get(fs.name) is not fs:
            return
        while (
            fs.starting < self._waiting(fs)
            and len(fs.instances) + fs.starting < self.max_instances(fs)
            and self._room_for_one()
        ):
            self._count_start(fs)
            self.spawn(self._thaw_for_waiters(fs))

    def admit_all(self) -> None:
        for fs in list(self.functions.values()):
            if fs.waiters:
                self.admit(fs)

    def _room_for_one(self) -> bool:
        """Room for one more instance under the daemon's maximum, with a sandbox free for it;
        else, when an instance idles, the one idle the longest goes to make room (its end
        admits again: its sandbox must be back before another is asked for)."""
        if self.total_instances() < self.config.instances_max and self.thawer.sandboxes_free() > 0:
            return True
        idle = [i for fs in self.functions.values() for i in fs.idle]
        if idle:
            self.retire_soon(min(idle, key=lambda i: i.last_used))
        return False

    async def _thaw_for_waiters(self, fs: FunctionState) -> None:
        try:
            instance = await self._thaw_counted(fs)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            if not isinstance(e, ThawError | SandboxError):
                log.exception("%s: thawing an instance failed", fs.name)
            for waiter in fs.waiters:
                if not waiter.done():
                    waiter.set_exception(e)
                    break
            else:
                log.warning("%s: %s", fs.name, e)
            self.admit(fs)  # the others may still want thaws
            return
        self._offer(fs, instance)

    # -- starting instances ------------------------------------------------------------------------
    def _count_start(self, fs: FunctionState) -> None:
        fs.starting += 1
        self.starting += 1

    async def start(self, fs: FunctionState) -> LiveInstance:
        """Thaw one instance of `fs` (not busy, not listed idle: the caller places it)."""
        self._count_start(fs)
        return await self._thaw_counted(fs)

    async def _thaw_counted(self, fs: FunctionState) -> LiveInstance:
        """Thaw an instance of `fs` from its template (capturing it again first if the keep-alive
        evicted it); its start was counted already."""
        try:
            if fs.template is None and fs.evicted:
                await self.recapture(fs)
            ref = fs.template
            if ref is None:
                raise Unavailable(f"{fs.name} has no template: {fs.broken or 'it was deleted'}")
            self.templates.use(ref)
            try:
                instance = await self.thawer.thaw(fs, ref)
            except BaseException:
                self.templates.done_with(ref)
                raise
        finally:
            fs.starting -= 1
            self.starting -= 1
        fs.instances.add(instance)
        self.metrics.instances.labels(fs.name).set(len(fs.instances))
        self.metrics.starts.labels(fs.name, "restored").inc()
        if self.closing or self.functions.get(fs.name) is not fs:  # stopping, or deleted during the thaw
            await self.retire(instance)
            raise Unavailable("thawd is shutting down") if self.closing else NotFound(f"{fs.name} was deleted")
        return instance

    # -- scale target and keep-alive ---------------------------------------------------------------
    async def scale(self, fs: FunctionState, replicas: int) -> None:
        """Keep `replicas` instances warm: thaw up to it now, release idle ones above it."""
        fs.min_warm = min(replicas, self.max_instances(fs))
        while fs.idle and len(fs.instances) > fs.min_warm:
            await self.retire(fs.idle[0])
        errors = await self._fill(fs)
        if errors:
            raise errors[0]

    async def fill(self, fs: FunctionState) -> None:
        """Thaw instances of the revision in force up to the scale target; failures are logged."""
        for error in await self._fill(fs):
            log.warning("%s: keeping %d instances warm: %s", fs.name, fs.min_warm, error)

    async def _fill(self, fs: FunctionState) -> list[BaseException]:
        missing = min(fs.min_warm - len(fs.current()) - fs.starting, self.max_instances(fs) - fs.starting)
        started = await asyncio.gather(*(self.start(fs) for _ in range(max(missing, 0))), return_exceptions=True)
        for instance in started:
            if isinstance(instance, LiveInstance):
                instance.last_used = time.monotonic()
                self._offer(fs, instance)
        return [e for e in started if isinstance(e, BaseException)]

    def expire(self, fs: FunctionState, keepalive_s: float, now: float) -> None:
        """Release instances idle longer than `keepalive_s`, keeping the scale target."""
        for instance in list(fs.idle):
            if len(fs.instances) <= fs.min_warm:
                break
            if now - instance.last_used >= keepalive_s:
                self.retire_soon(instance)

    # -- release -----------------------------------------------------------------------------------
    def unlist(self, instance: LiveInstance) -> FunctionState | None:
        fs = self.functions.get(instance.function)
        if fs is None or instance not in fs.instances:
            return None
        fs.instances.discard(instance)
        with contextlib.suppress(ValueError):
            fs.idle.remove(instance)
        self.metrics.instances.labels(fs.name).set(len(fs.instances))
        return fs

    def retire_soon(self, instance: LiveInstance) -> None:
        """retire() in the background; out of the lists and counted as retiring at once."""
        self.spawn(self.retire(instance))

    def retire(self, instance: LiveInstance) -> Awaitable[None]:
        fs = self.unlist(instance)
        if instance.retired:
            return asyncio.sleep(0)
        instance.retired = True
        self.retiring += 1  # now, not when the task runs: admission counts it meanwhile
        return self._retire(instance, fs)

    async def _retire(self, instance: LiveInstance, fs: FunctionState | None) -> None:
        """Kill the instance, release its sandbox, and drop its template once nothing uses it."""
        try:
            await self.thawer.put_away(instance)
        finally:
            self.retiring -= 1
        instance.log_task.cancel()
        self.templates.done_with(instance.template)
        self.admit_all()  # room under the maxima, a sandbox back: for any function's waiting requests

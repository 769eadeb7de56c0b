"""The instance manager: functions, their templates and their live instances.

Deploy: the function's guest starts in a sandbox (thawed from the runtime template, told to load
the function: daemon/layering.py; or cold), initialises, says READY and stops itself; it is
captured into a template in the pool (a child of the runtime's) and its sandbox is released.
Invoke: an idle instance of the function serves the request, else the first one free, thawed
from the template into a repurposed sandbox (scale-out on concurrency, up to the function's and the daemon's maximum).
One invocation at a time per instance. Idle instances are kept warm for the idle timeout (or the
scale target set by the gateway), then released.

The Manager ties collaborators together, each handed what it needs (none imports this module):

    daemon/thawing.py         sandboxes for captures and thaws; capture a guest, thaw an instance
    daemon/layering.py        the runtime template; deploys captured as its children
    daemon/ptrace_workers.py  the threads that do the ptrace work, one per CPU thawd may use
    daemon/scheduling.py      which instance serves which request; admission, keep-alive, scale
    daemon/templates.py       templates in force, retired, deleted once unused
    daemon/forms.py           templates' forms: warm, compressed, evicted (the planner's or a user's)
    daemon/guestio.py         the channel on an instance's fd 3, request frames, request ids
    daemon/state.py           the records: FunctionState, LiveInstance, TemplateRef
    daemon/views.py           what the API shows of them

Threads: the event loop owns all state here. Blocking work goes to threads: ptrace (capture,
restore) to the ptrace workers (DESIGN.md, "Threading"); sandbox requests and releases to the
default executor. A template is deleted from the pool once it is out of force and no instance
uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, DaemonConfig
from daemon.errors import (
    Conflict,
    DeployFailed,
    HandlerFailed,
    InstanceCrashed,
    Invalid,
    InvocationTimeout,
    NotFound,
    ThawError,
    Unavailable,
    describe,
)
from daemon.forms import Forms
from daemon.guestio import Invocation, Reply, request_frame, request_id
from daemon.keepalive import CostsError, Form, MeasuredCosts, load_costs
from daemon.layering import Layering
from daemon.logs import FunctionLog
from daemon.metrics import Metrics
from daemon.planner import MIB, Planner
from daemon.ptrace_workers import PtraceWorkers
from daemon.registry import Deployed, FunctionSpec, Registry, RegistryError, RequirementsFailed
from daemon.replies import checked_reply
from daemon.scheduling import Scheduler
from daemon.scrubber import Scrubber
from daemon.state import FunctionState, LiveInstance, TemplateRef
from daemon.templates import Templates
from daemon.thawing import Thawer
from daemon.views import describe_function, describe_instance
from sandbox.guest import protocol
from sandbox.pool import SandboxPool
from sandbox.sandbox import paged_restore_refusal
from shmpool import Pool, SegmentNotFound
from shmpool.errors import PoolError, SegmentCorrupt
from snapshot.errors import SnapshotError, TemplateCorrupt, TemplateTooOld
from snapshot.template import Template, working_set_name

log = logging.getLogger("thawd")


class Manager:
    def __init__(self, config: DaemonConfig, pool: Pool, sandboxes: SandboxPool, metrics: Metrics) -> None:
        self.config, self.pool, self.sandboxes, self.metrics = config, pool, sandboxes, metrics
        self.registry = Registry(Path(config.state_dir))
        self.functions: dict[str, FunctionState] = {}
        self.deploying: dict[str, asyncio.Lock] = {}
        self.request_ids = itertools.count(1)
        self.background: set[asyncio.Task[Any]] = set()
        self.ptrace = PtraceWorkers()
        self.templates = Templates(pool, self.functions)
        self.thawer = Thawer(config, pool, sandboxes, self.templates, self.ptrace, metrics)
        self.layering = Layering(config, pool, self.thawer, self.ptrace)
        self.planner = Planner.create(
            config.keepalive_policy,
            config.instances_idle_timeout,
            _measured_costs(config),
            config.keepalive_budget / MIB,
            config.keepalive_plan_interval,
        )
        self.forms = Forms(
            config,
            pool,
            sandboxes.config,
            self.planner,
            self.templates,
            self.layering.capture_function,
            self.functions,
            self._lock,
        )
        self.scheduler = Scheduler(
            config, self.functions, self.thawer, self.templates, metrics, self.forms.recapture, self._spawn
        )
        self.scrubber = Scrubber(
            pool, config.integrity_scrub_interval, config.integrity_scrub_bandwidth, self.quarantine
        )

    @property
    def closing(self) -> bool:
        return self.scheduler.closing

    # -- start and stop --------------------------------------------------------------------------
    async def load(self) -> None:
        """Open every deployed function's template (verified); a function whose template is gone
        or corrupt stays listed as broken until it is snapshotted again. What a thawd killed in the
        middle of a capture left half-written in the pool is collected first. Scale targets stored
        with the functions are thawed up to in the background."""
        collected = await asyncio.to_thread(self.pool.gc)
        if collected.abandoned_writes:
            log.info("pool: collected %d abandoned writes", collected.abandoned_writes)
        for deployed in await asyncio.to_thread(self.registry.load):
            fs = FunctionState.of(deployed, None, FunctionLog(deployed.log_path))
            try:
                template = await asyncio.to_thread(self.templates.open, deployed)
                if template is None:  # evicted (or a pool made anew): captured again when invoked
                    fs.evicted = True
                else:
                    fs.template = TemplateRef(template, deployed.revision_dir)
            except TemplateTooOld as e:  # captured again when invoked, into the format of today
                log.info("%s: %s", fs.name, e)
                await asyncio.to_thread(Template.delete, self.pool, deployed.template_name)
                fs.evicted = True
            except (SegmentCorrupt, TemplateCorrupt) as e:  # quarantined: captured again when invoked
                await self._take_out_of_use(deployed.template_name)
                self._say_quarantined(fs, deployed.template_name, e)
                fs.evicted = True
            except (PoolError, SnapshotError) as e:
                fs.broken = f"template {deployed.template_name} cannot be used ({e}): run `thaw snapshot {fs.name}`"
                log.warning("%s: %s", fs.name, fs.broken)
            self.functions[fs.name] = fs
            if fs.min_warm and not fs.broken:
                self._spawn(self.scheduler.fill(fs))
        self._spawn(self._keep_alive())
        if self.config.integrity_scrub_interval > 0:
            self._spawn(self.scrubber.run())

    def in_flight(self) -> int:
        return self.scheduler.in_flight()

    def total_instances(self) -> int:
        return self.scheduler.total_instances()

    async def close(self, drain_timeout: float) -> None:
        """Wait up to `drain_timeout` for in-flight invocations, then release every instance."""
        self.scheduler.closing = True
        deadline = time.monotonic() + drain_timeout
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self.background:
            task.cancel()
        for fs in self.functions.values():
            await asyncio.gather(*(self.scheduler.retire(i) for i in list(fs.instances)), return_exceptions=True)
            self.scheduler.fail_waiters(fs, Unavailable("thawd is shutting down"))
            if fs.template is not None:
                fs.template.template.close()
            fs.log.close()
        await self._save_counts()
        self.layering.close()
        self.ptrace.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # -- functions ---------------------------------------------------------------------------------
    def get(self, name: str) -> FunctionState:
        fs = self.functions.get(name)
        if fs is None:
            raise NotFound(f"no function named {name!r}")
        return fs

    def _lock(self, name: str) -> asyncio.Lock:
        return self.deploying.setdefault(name, asyncio.Lock())

    async def deploy(self, spec: FunctionSpec, source: Path, update: bool = False) -> FunctionState:
        """Deploy a new function (update=False) or a new revision of one; returns once its template
        is in force and, for an update, its instances are thawed up to the scale target."""
        if self.closing:
            raise Unavailable("thawd is shutting down")
        if spec.mode == "lazy" and (refusal := paged_restore_refusal(self.sandboxes.config)):
            raise Invalid(f"{spec.name} cannot be restored lazily here: {refusal}")
        async with self._lock(spec.name):
            fs = self.functions.get(spec.name)
            if fs is None and update:
                raise NotFound(f"no function named {spec.name!r} to update")
            if fs is not None and not update:
                raise Conflict(f"function {spec.name!r} exists; update it instead")
            previous = fs.deployed if fs else None
            try:
                staged = await asyncio.to_thread(self.registry.stage, spec, source, previous)
            except RequirementsFailed as e:
                raise DeployFailed(f"deploying {spec.name}: {e}") from e
            except RegistryError as e:
                raise Invalid(str(e)) from e
            function_log = fs.log if fs else FunctionLog(staged.log_path)
            try:
                template = await self.layering.capture_function(staged, function_log)
            except BaseException:
                await asyncio.to_thread(self.registry.discard, staged)
                if fs is None:
                    function_log.close()
                raise
            if fs is not None:  # the counts stay with the function
                staged.min_warm, staged.invocations = fs.min_warm, fs.invocations
            await asyncio.to_thread(self.registry.commit, staged)
            fs = self._put_in_force(staged, TemplateRef(template, staged.revision_dir), fs, function_log)
        if update:
            await self._replace_instances(fs)
        return fs

    def _put_in_force(
        self, deployed: Deployed, ref: TemplateRef, fs: FunctionState | None, function_log: FunctionLog
    ) -> FunctionState:
        if fs is None:
            fs = FunctionState.of(deployed, ref, function_log)
            self.functions[deployed.spec.name] = fs
            return fs
        old, fs.template, fs.deployed, fs.broken, fs.evicted = fs.template, ref, deployed, "", False
        if old is not None:
            self.templates.retire(old)
        return fs

    async def _replace_instances(self, fs: FunctionState) -> None:
        """After an update: the new revision thawed up to the scale target first, so the function
        stays available (the OpenFaaS gateway waits for availableReplicas), then the old
        revision's idle instances go; busy ones go when they finish."""
        await self.scheduler.fill(fs)
        for instance in [i for i in fs.idle if i.template is not fs.template]:
            self.scheduler.retire_soon(instance)
        self.scheduler.admit(fs)  # requests that waited for one of the old instances

    async def snapshot(self, name: str) -> FunctionState:
        """Capture the function again from its code (a new revision of the same code and spec)."""
        fs = self.get(name)
        source = fs.deployed.revision_dir / "code"
        return await self.deploy(fs.spec, source, update=True)

    async def delete(self, name: str) -> None:
        async with self._lock(name):
            fs = self.get(name)
            del self.functions[name]
            await asyncio.gather(*(self.scheduler.retire(i) for i in list(fs.instances)), return_exceptions=True)
            self.scheduler.fail_waiters(fs, NotFound(f"function {name!r} was deleted"))
            if fs.template is not None:
                self.templates.retire(fs.template)
            fs.log.close()
            await asyncio.to_thread(self.registry.remove, name)
            self.metrics.forget(name)
            self.planner.forget(name)  # a function deployed again under this name starts afresh
        self.deploying.pop(name, None)

    # -- invoking ----------------------------------------------------------------------------------
    async def invoke(self, name: str, request: Invocation) -> Reply:
        fs = self.get(name)
        timeout = fs.spec.timeout or self.config.instances_default_timeout
        number = next(self.request_ids)
        frame = request_frame(request, number, self.config.max_frame)
        rid = request_id(request.headers, number)
        t0 = time.perf_counter()
        outcome = "error"
        self.planner.arrived(name, time.monotonic())
        try:
            try:
                async with asyncio.timeout(timeout):
                    instance = await self.scheduler.checkout(fs)
            except TimeoutError:
                raise InvocationTimeout(f"no instance of {name} was free within the {timeout:g} s timeout") from None
            t1 = time.perf_counter()
            self.metrics.invocation_steps.labels("instance").observe(t1 - t0)
            reply = await self._exchange(fs, instance, frame, timeout)
            self.metrics.invocation_steps.labels("exchange").observe(time.perf_counter() - t1)
            outcome = "ok" if reply.status < 500 else "5xx"
            return reply
        except ThawError as e:
            outcome = e.code
            self._log_failure(fs, rid, e)
            raise
        finally:
            fs.invocations += 1
            self.planner.finished(name, time.monotonic())
            self.metrics.invocations.labels(name, outcome).inc()
            self.metrics.invocation_seconds.labels(name).observe(time.perf_counter() - t0)

    @staticmethod
    def _log_failure(fs: FunctionState, request_id: str, error: ThawError) -> None:
        """A failed invocation in thawd's log and the function's (`thaw logs`), with its request id."""
        text = f"request {request_id} failed ({error.code}): {describe(error)}"
        log.warning("%s: %s", fs.name, text)
        fs.log.write("thawd", text)

    async def _exchange(self, fs: FunctionState, instance: LiveInstance, frame: bytes, timeout: float) -> Reply:
        instance.channel.send(frame)
        try:
            async with asyncio.timeout(timeout):
                answer = await instance.channel.recv()
        except TimeoutError:
            self.scheduler.retire_soon(instance)
            self.scheduler.admit(fs)
            raise InvocationTimeout(
                f"{fs.name} did not answer within its {timeout:g} s timeout; instance {instance.id} was killed"
            ) from None
        except (protocol.ProtocolError, ConnectionError) as e:
            raise await self._crashed(fs, instance, str(e)) from None
        if answer is None:
            raise await self._crashed(fs, instance, "")
        self.scheduler.check_in(fs, instance)
        if answer.get("type") == "error":
            error = answer.get("error") or {}
            raise HandlerFailed(
                f"{error.get('type', 'Exception')}: {error.get('message', '')}", traceback=error.get("traceback", "")
            )
        return Reply(*checked_reply(fs.name, answer))  # BadReply (502) for what HTTP cannot carry

    async def _crashed(self, fs: FunctionState, instance: LiveInstance, detail: str) -> InstanceCrashed:
        exit_ = await asyncio.to_thread(instance.process.wait_exit, 2.0)
        how = exit_.describe() if exit_ else f"closed its channel{': ' + detail if detail else ''}"
        await self.scheduler.retire(instance)
        return InstanceCrashed(f"instance {instance.id} of {fs.name} died during the invocation: it {how}")

    # -- scaling and keep-alive ------------------------------------------------------------------
    async def scale(self, name: str, replicas: int) -> None:
        """Keep `replicas` instances warm (the gateway's scale-function): thaw up to it, release
        above it. The target is stored with the function: a restarted thawd thaws up to it."""
        fs = self.get(name)
        if replicas < 0:
            raise Invalid(f"replicas must not be negative, not {replicas}")
        try:
            await self.scheduler.scale(fs, replicas)
        finally:
            await self._save_counts(fs)

    async def _save_counts(self, *only: FunctionState) -> None:
        """Store scale targets and invocation counts that changed (function.json). Never while a
        deploy holds the function (its commit writes the record of the new revision): the next
        round stores them."""
        for fs in only or list(self.functions.values()):
            d, lock = fs.deployed, self._lock(fs.name)
            if (d.min_warm, d.invocations) == (fs.min_warm, fs.invocations) or lock.locked():
                continue
            async with lock:
                d.min_warm, d.invocations = fs.min_warm, fs.invocations
                try:
                    await asyncio.to_thread(self.registry.save_counts, d)
                except OSError as e:
                    log.warning("%s: storing its scale target and invocation count: %s", fs.name, e)

    async def _keep_alive(self) -> None:
        next_plan = next_punch = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for fs in list(self.functions.values()):
                self.scheduler.expire(fs, self.planner.instance_keepalive_s(fs.name, fs.spec.idle_timeout), now)
                if len(fs.current()) + fs.starting < fs.min_warm and not fs.broken:
                    self._spawn(self.scheduler.fill(fs))  # an instance at the target crashed or timed out
            self.scheduler.admit_all()  # sandboxes given back by other work (a capture) meanwhile
            await self._save_counts()
            if now >= next_plan:
                next_plan = now + self.config.keepalive_plan_interval
                await self._guarded(self.plan_templates())
            if now >= next_punch:
                next_punch = now + self.config.keepalive_cache_ttl / 4
                await self._guarded(self.forms.punch_cold_pages())
            self.refresh_gauges()

    async def _guarded(self, work: Awaitable[Any]) -> None:
        """Keep-alive work that fails is logged; the loop goes on."""
        try:
            await work
        except (ThawError, PoolError, SnapshotError, OSError) as e:
            log.warning("keep-alive: %s", e)

    # -- templates' forms (daemon/forms.py) ------------------------------------------------------
    async def plan_templates(self) -> dict[str, Form]:
        return await self.forms.plan()

    async def set_template_form(self, name: str, form: str, codec: str | None = None) -> FunctionState:
        fs = self.get(name)
        await self.forms.set_template_form(fs, form, codec)
        return fs

    # -- integrity (daemon/scrubber.py) ----------------------------------------------------------
    async def quarantine(self, segment: str, error: Exception) -> None:
        """`segment` failed a checksum: no restore uses it again. It leaves the pool's namespace
        at once (for every daemon attached), the function's template is retired and idle instances
        thawed from it go; the function is captured again from its code when next invoked, as
        after an eviction. A parent (the runtime template) takes its children with it."""
        await self._take_out_of_use(segment)
        self.layering.forget(segment)
        for fs in list(self.functions.values()):
            ref = fs.template
            if ref is None or segment not in (ref.name, working_set_name(ref.name), *ref.template.ancestor_names):
                continue
            which = (
                ref.name if segment in (ref.name, working_set_name(ref.name)) else f"{ref.name} (layered on {segment})"
            )
            self._say_quarantined(fs, which, error)
            fs.template, fs.evicted = None, True
            self.templates.retire(ref, keep_revision=True)
            for instance in [i for i in fs.instances if i.template is ref and not i.busy]:
                self.scheduler.retire_soon(instance)

    async def _take_out_of_use(self, segment: str) -> None:
        with contextlib.suppress(SegmentNotFound):  # out of the namespace even while children need it
            await asyncio.to_thread(self.pool.delete, segment, True)
        self.metrics.quarantined.inc()

    @staticmethod
    def _say_quarantined(fs: FunctionState, template: str, error: Exception) -> None:
        message = f"template {template} quarantined: {error}; it is captured again from its code when next invoked"
        log.error("%s: %s", fs.name, message)
        fs.log.write("thawd", message)

    def refresh_gauges(self) -> None:
        with contextlib.suppress(PoolError, OSError):
            status = self.pool.status()
            self.metrics.pool_bytes.labels("capacity").set(status.capacity)
            self.metrics.pool_bytes.labels("used").set(status.used)
        self.metrics.sandboxes.labels("idle").set(len(self.sandboxes.idle))
        self.metrics.sandboxes.labels("busy").set(len(self.sandboxes.busy))

    # -- views (daemon/views.py) -------------------------------------------------------------------
    def describe(self, fs: FunctionState) -> dict[str, Any]:
        return describe_function(fs)

    def instances(self, name: str | None = None) -> list[dict[str, Any]]:
        chosen = [self.get(name)] if name else list(self.functions.values())
        return [describe_instance(i) for fs in chosen for i in sorted(fs.instances, key=lambda i: i.started_at)]


def _measured_costs(config: DaemonConfig) -> MeasuredCosts | None:
    """The cost model's figures, when the budget is on (config.validate makes sure both are named)."""
    if not config.keepalive_budget:
        return None
    try:
        return load_costs(
            Path(config.keepalive_restore_costs), Path(config.keepalive_codec_costs), config.keepalive_codec
        )
    except (CostsError, OSError) as e:
        raise ConfigError(f"keepalive.restore_costs / keepalive.codec_costs: {e}") from e

"""The instance manager: functions, their templates and their live instances.

Deploy: the function's guest starts in a sandbox, initialises, says READY and stops itself; it is
captured into a template in the pool and its sandbox is released. Invoke: a warm instance of the
function serves the request, else a new one is thawed from the template into a repurposed sandbox
(scale-out on concurrency, up to the function's and the daemon's maximum). One invocation at a
time per instance. Idle instances are kept warm for the idle timeout (or the scale target set by
the gateway), then released.

Threads: the event loop owns all state here. Blocking work goes to threads: every ptrace (capture,
restore) on the one tracer thread (DESIGN.md, "Threading"); sandbox requests and releases on the
default executor. A template is deleted from the pool once it is out of force and no instance
uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from daemon.config import ConfigError, DaemonConfig
from daemon.errors import (
    Conflict,
    DeployFailed,
    HandlerFailed,
    InstanceCrashed,
    Invalid,
    InvocationTimeout,
    NotFound,
    PoolFull,
    ThawError,
    TooLarge,
    Unavailable,
    describe,
)
from daemon.keepalive import CostsError, Form, MeasuredCosts, load_costs
from daemon.logs import FunctionLog, follow_pipe
from daemon.metrics import Metrics
from daemon.planner import MIB, Held, Planner
from daemon.registry import FUNCTION_MOUNT, Deployed, FunctionSpec, Registry, RegistryError, RequirementsFailed
from daemon.replies import checked_reply
from daemon.scrubber import Scrubber
from native.qpl import QplUnavailable as CodecUnavailable
from native.seccomp import program as seccomp_program
from sandbox.cgroups import Limits
from sandbox.errors import SandboxError
from sandbox.guest import protocol
from sandbox.pool import SandboxPool
from sandbox.sandbox import Sandbox, SandboxProcess, SandboxSpec, paged_restore_refusal
from shmpool import Pool, SegmentExists, SegmentNotFound
from shmpool.codecs import get_codec
from shmpool.errors import PoolError, SegmentCorrupt
from shmpool.errors import PoolFull as PoolIsFull
from snapshot.capture import capture
from snapshot.compress import compress, compressed_name, expand
from snapshot.errors import SnapshotError, TemplateCorrupt, TemplateTooOld
from snapshot.restore import Instance as Restored
from snapshot.restore import Stub, restore
from snapshot.template import Template, working_set_name
from snapshot.vocabulary import ColdCodec, choices

log = logging.getLogger("thawd")
T = TypeVar("T")
RESTORED_TIMEOUT = 10.0
STOP_POLL = 0.001
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,80}")
GUEST_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}  # threads are captured: no OMP cap


class Tracer:
    """The one thread all ptrace work happens on."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thaw-tracer")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class Channel:
    """The daemon's end of a guest's fd 3: length-prefixed JSON frames, on the event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int) -> None:
        self.reader, self.writer, self.max_frame = reader, writer, max_frame

    @classmethod
    async def open(cls, sock: socket.socket, max_frame: int) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=max_frame + 64)
        return cls(reader, writer, max_frame)

    def send(self, frame: bytes) -> None:
        self.writer.write(frame)

    async def recv(self) -> protocol.Message | None:
        try:
            header = await self.reader.readexactly(4)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise protocol.ProtocolError("the guest closed its channel inside a frame header") from e
            return None
        size = int.from_bytes(header, "big")
        if size > self.max_frame:
            raise protocol.FrameTooLarge(size, self.max_frame)
        try:
            return protocol.decode(await self.reader.readexactly(size))
        except asyncio.IncompleteReadError as e:
            raise protocol.ProtocolError("the guest closed its channel inside a frame") from e

    def close(self) -> None:
        self.writer.close()


@dataclass(eq=False)
class TemplateRef:
    """A template in force or retired, and how many instances use it."""

    template: Template
    revision_dir: Path | None = None  # removed with the template: a retired revision's instances still read it
    users: int = 0
    retired: bool = False

    @property
    def name(self) -> str:
        return self.template.name


@dataclass(eq=False)
class LiveInstance:
    id: str
    function: str
    revision: int
    template: TemplateRef
    sandbox: Sandbox
    process: SandboxProcess
    restored: Restored
    channel: Channel
    log_task: asyncio.Task[None]
    restore_ms: float
    started_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    invocations: int = 0
    busy: bool = False
    retired: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "function": self.function,
            "revision": self.revision,
            "pid": self.pid,
            "sandbox": self.sandbox.id,
            "address": str(self.sandbox.lease.address) if self.sandbox.lease else None,
            "state": "busy" if self.busy else "idle",
            "mode": self.restored.mode,
            "template": self.template.name,
            "started_at": self.started_at,
            "idle_seconds": 0.0 if self.busy else round(time.monotonic() - self.last_used, 3),
            "invocations": self.invocations,
            "restore_ms": round(self.restore_ms, 3),
            "memory": _memory(self.pid),
        }


@dataclass(eq=False)
class FunctionState:
    deployed: Deployed
    template: TemplateRef | None
    log: FunctionLog
    instances: set[LiveInstance] = field(default_factory=set)
    idle: list[LiveInstance] = field(default_factory=list)  # most recently used last
    starting: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    min_warm: int = 0
    invocations: int = 0
    broken: str = ""  # why the function cannot start instances (its template is corrupt)
    evicted: bool = False  # no template held: the next start captures it again (a cold start)

    @property
    def name(self) -> str:
        return self.deployed.spec.name

    @property
    def spec(self) -> FunctionSpec:
        return self.deployed.spec


@dataclass
class Invocation:
    method: str = "POST"
    path: str = "/"
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Manager:
    def __init__(self, config: DaemonConfig, pool: Pool, sandboxes: SandboxPool, metrics: Metrics) -> None:
        self.config, self.pool, self.sandboxes, self.metrics = config, pool, sandboxes, metrics
        self.registry = Registry(Path(config.state_dir))
        self.tracer = Tracer()
        self.functions: dict[str, FunctionState] = {}
        self.deploying: dict[str, asyncio.Lock] = {}
        self.ids = itertools.count(1)
        self.request_ids = itertools.count(1)
        self.starting = 0
        self.retiring = 0  # instances whose sandboxes are not back in the pool yet: they still count
        self.closing = False
        self.background: set[asyncio.Task[Any]] = set()
        self.scrubber = Scrubber(
            pool, config.integrity_scrub_interval, config.integrity_scrub_bandwidth, self.quarantine
        )
        self.planner = Planner.create(
            config.keepalive_policy,
            config.instances_idle_timeout,
            _measured_costs(config),
            config.keepalive_budget / MIB,
            config.keepalive_plan_interval,
        )

    # -- start and stop --------------------------------------------------------------------------
    async def load(self) -> None:
        """Open every deployed function's template (verified); a function whose template is gone
        or corrupt stays listed as broken until it is snapshotted again. What a thawd killed in the
        middle of a capture left half-written in the pool is collected first."""
        collected = await asyncio.to_thread(self.pool.gc)
        if collected.abandoned_writes:
            log.info("pool: collected %d abandoned writes", collected.abandoned_writes)
        for deployed in await asyncio.to_thread(self.registry.load):
            fs = FunctionState(deployed, None, FunctionLog(deployed.log_path))
            try:
                template = await asyncio.to_thread(self._open_template, deployed)
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
        self._spawn(self._keep_alive())
        if self.config.integrity_scrub_interval > 0:
            self._spawn(self.scrubber.run())

    def _in_force(self, template_name: str) -> bool:
        return any(fs.template is not None and fs.template.name == template_name for fs in self.functions.values())

    def _open_template(self, deployed: Deployed) -> Template | None:
        """The function's template as captured or compressed, verified; None when neither is there."""
        mounts = {FUNCTION_MOUNT: str(deployed.revision_dir)}
        for name in (deployed.template_name, compressed_name(deployed.template_name)):
            with contextlib.suppress(SegmentNotFound):
                return Template.open(self.pool, name, True, mounts)
        return None

    def in_flight(self) -> int:
        return sum(1 for fs in self.functions.values() for i in fs.instances if i.busy)

    async def close(self, drain_timeout: float) -> None:
        """Wait up to `drain_timeout` for in-flight invocations, then release every instance."""
        self.closing = True
        deadline = time.monotonic() + drain_timeout
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self.background:
            task.cancel()
        for fs in self.functions.values():
            await asyncio.gather(*(self._retire(i) for i in list(fs.instances)), return_exceptions=True)
            self._wake(fs)
            if fs.template is not None:
                fs.template.template.close()
            fs.log.close()
        self.tracer.close()

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
        """Deploy a new function (update=False) or a new revision of one; returns once its template is in force."""
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
                template = await self._capture(staged, function_log)
            except BaseException:
                await asyncio.to_thread(self.registry.discard, staged)
                if fs is None:
                    function_log.close()
                raise
            await asyncio.to_thread(self.registry.commit, staged)
            return self._put_in_force(staged, TemplateRef(template, staged.revision_dir), fs, function_log)

    def _put_in_force(
        self, deployed: Deployed, ref: TemplateRef, fs: FunctionState | None, function_log: FunctionLog
    ) -> FunctionState:
        if fs is None:
            fs = FunctionState(deployed, ref, function_log)
            self.functions[deployed.spec.name] = fs
            return fs
        old, fs.template, fs.deployed, fs.broken = fs.template, ref, deployed, ""
        if old is not None:
            self._retire_template(old)
        for instance in list(fs.idle):  # idle instances of the old revision go now, busy ones when done
            self._spawn(self._retire(instance))
        return fs

    async def snapshot(self, name: str) -> FunctionState:
        """Capture the function again from its code (a new revision of the same code and spec)."""
        fs = self.get(name)
        source = fs.deployed.revision_dir / "code"
        return await self.deploy(fs.spec, source, update=True)

    async def delete(self, name: str) -> None:
        async with self._lock(name):
            fs = self.get(name)
            del self.functions[name]
            await asyncio.gather(*(self._retire(i) for i in list(fs.instances)), return_exceptions=True)
            self._wake(fs)
            if fs.template is not None:
                self._retire_template(fs.template)
            fs.log.close()
            await asyncio.to_thread(self.registry.remove, name)
            self.metrics.forget(name)
            self.planner.forget(name)  # a function deployed again under this name starts afresh
        self.deploying.pop(name, None)

    def _retire_template(self, ref: TemplateRef, keep_revision: bool = False) -> None:
        """Out of force: deleted once no instance uses it, with its revision's code unless
        `keep_revision` (the template changed form, the revision is still the function's)."""
        ref.retired = True
        if keep_revision:
            ref.revision_dir = None
        if ref.users == 0:
            ref.template.close()
            if not self._in_force(ref.name):  # a capture since may have taken the name again
                Template.delete(self.pool, ref.name)
            if ref.revision_dir is not None:
                shutil.rmtree(ref.revision_dir, ignore_errors=True)

    async def _capture(self, deployed: Deployed, function_log: FunctionLog) -> Template:
        """Start the guest in a sandbox, wait for READY and its stop, capture it, release the sandbox."""
        spec = deployed.spec
        sandbox = await self._acquire(deployed)
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe2(os.O_CLOEXEC)
        logger = asyncio.ensure_future(follow_pipe(log_read, function_log, f"deploy-{deployed.revision}"))
        channel: Channel | None = None
        try:
            argv = [sys.executable, "-m", "sandbox.guest", f"{FUNCTION_MOUNT}/code", "--handler", spec.handler]
            argv += ["--site-dir", f"{FUNCTION_MOUNT}/site", "--max-frame", str(self.config.max_frame)]
            started = time.perf_counter()
            seccomp = seccomp_program(frozenset(spec.syscalls))  # built once per set of opt-outs
            guest = await asyncio.to_thread(sandbox.spawn, argv, theirs.fileno(), log_write, seccomp=seccomp)
            theirs.close()
            os.close(log_write)
            log_write = -1
            channel = await Channel.open(ours, self.config.max_frame)
            await self._wait_parked(channel, guest, function_log)
            deployed.init_ms = _ms(started)
            name = deployed.template_name
            await asyncio.to_thread(self._clear_name, name)
            t0 = time.perf_counter()
            mounts = {FUNCTION_MOUNT: str(deployed.revision_dir)}
            template = await self.tracer.run(capture, guest.pid, self.pool, name, mounts)
            log.info("%s: captured revision %d in %.0f ms", spec.name, deployed.revision, _ms(t0))
            self.metrics.starts.labels(spec.name, "cold").inc()
            return template
        except PoolIsFull as e:
            raise PoolFull(f"capturing {spec.name}: the pool is full") from e
        except (SnapshotError, PoolError, SandboxError) as e:
            raise DeployFailed(f"capturing {spec.name} failed") from e
        finally:
            if channel is not None:
                channel.close()
            else:
                ours.close()
            theirs.close()
            if log_write >= 0:
                os.close(log_write)
            await self._release_sandbox(sandbox)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(logger, 1.0)  # the guest's last words, before we say why it failed

    def _clear_name(self, name: str) -> None:
        """Make room for template `name`: a published leftover of an interrupted deploy is
        deleted, and a write that a dead process left unfinished under it is collected."""
        Template.delete(self.pool, name)
        if any(r.name == name for r in self.pool.list(include_all=True)):
            self.pool.gc()

    async def _wait_parked(self, channel: Channel, guest: SandboxProcess, function_log: FunctionLog) -> None:
        timeout = self.config.instances_deploy_timeout
        try:
            first = await asyncio.wait_for(channel.recv(), timeout)
        except TimeoutError:
            raise DeployFailed(f"the function's init did not finish within {timeout:g} s") from None
        except protocol.ProtocolError as e:
            raise DeployFailed(f"the guest broke the protocol: {e}") from e
        if first != {"type": "ready"}:
            exit_ = await asyncio.to_thread(guest.wait_exit, 5.0)
            how = exit_.describe() if exit_ else f"said {first}"
            await asyncio.sleep(0.05)  # let the log reader take the traceback in
            tail = "\n".join(e["text"] for e in function_log.recent(tail=12) if e["instance"].startswith("deploy"))
            raise DeployFailed(f"the function's init failed (the guest {how}):\n{tail}")
        while _state(guest.pid) != "T":
            if guest.wait(0) is not None:
                raise DeployFailed("the guest exited after READY instead of stopping for capture")
            await asyncio.sleep(STOP_POLL)

    async def _acquire(self, deployed: Deployed) -> Sandbox:
        return await _to_the_end(self._acquire_now, deployed, undo=self._release_sandbox)

    def _acquire_now(self, deployed: Deployed) -> Sandbox:
        spec = deployed.spec
        limits = Limits(cpu=spec.cpu, memory=spec.memory)
        env = {**GUEST_ENV, **spec.env}
        box = SandboxSpec(deployed.revision_dir, limits, env, hostname=spec.name)
        try:
            return self.sandboxes.acquire(box)
        except SandboxError as e:
            raise Unavailable(f"no sandbox for {spec.name}") from e

    def _sandbox_with_stub(
        self, deployed: Deployed, fds: list[int], control_fd: int, log_fd: int, paged: bool
    ) -> tuple[Sandbox, SandboxProcess]:
        """A sandbox for `deployed` and a stub in it, in one trip to a worker thread (a trip and
        back cost a few hundred microseconds here). Without a stub, the sandbox goes back."""
        sandbox = self._acquire_now(deployed)
        try:
            return sandbox, sandbox.spawn_stub(fds, control_fd, log_fd, paged)
        except BaseException:
            try:
                self.sandboxes.release(sandbox)
            except SandboxError as e:
                log.warning("releasing sandbox %s: %s", sandbox.id, e)
            raise

    async def _release_sandbox(self, sandbox: Sandbox) -> None:
        try:
            await asyncio.to_thread(self.sandboxes.release, sandbox)
        except SandboxError as e:
            log.warning("releasing sandbox %s: %s", sandbox.id, e)

    # -- invoking ----------------------------------------------------------------------------------
    async def invoke(self, name: str, request: Invocation) -> Reply:
        fs = self.get(name)
        timeout = fs.spec.timeout or self.config.instances_default_timeout
        number = next(self.request_ids)
        message = {
            "type": "request",
            "id": number,
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers,
            "body": protocol.b64(request.body),
        }
        try:
            frame = protocol.encode(message, self.config.max_frame)
        except protocol.FrameTooLarge as e:
            raise TooLarge(f"the request is too large: {e}") from e
        request_id = _request_id(request.headers, number)
        t0 = time.perf_counter()
        outcome = "error"
        self.planner.arrived(name, time.monotonic())
        try:
            try:
                async with asyncio.timeout(timeout):
                    instance = await self._checkout(fs)
            except TimeoutError:
                raise InvocationTimeout(f"no instance of {name} was free within the {timeout:g} s timeout") from None
            reply = await self._exchange(fs, instance, frame, timeout)
            outcome = "ok" if reply.status < 500 else "5xx"
            return reply
        except ThawError as e:
            outcome = e.code
            self._log_failure(fs, request_id, e)
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
            self._spawn(self._retire(instance))
            raise InvocationTimeout(
                f"{fs.name} did not answer within its {timeout:g} s timeout; instance {instance.id} was killed"
            ) from None
        except (protocol.ProtocolError, ConnectionError) as e:
            raise await self._crashed(fs, instance, str(e)) from None
        if answer is None:
            raise await self._crashed(fs, instance, "")
        self._check_in(fs, instance)
        if answer.get("type") == "error":
            error = answer.get("error") or {}
            raise HandlerFailed(
                f"{error.get('type', 'Exception')}: {error.get('message', '')}", traceback=error.get("traceback", "")
            )
        return Reply(*checked_reply(fs.name, answer))  # BadReply (502) for what HTTP cannot carry

    async def _crashed(self, fs: FunctionState, instance: LiveInstance, detail: str) -> InstanceCrashed:
        exit_ = await asyncio.to_thread(instance.process.wait_exit, 2.0)
        how = exit_.describe() if exit_ else f"closed its channel{': ' + detail if detail else ''}"
        await self._retire(instance)
        return InstanceCrashed(f"instance {instance.id} of {fs.name} died during the invocation: it {how}")

    def _check_in(self, fs: FunctionState, instance: LiveInstance) -> None:
        instance.busy = False
        instance.invocations += 1
        instance.last_used = time.monotonic()
        if instance.template is not fs.template or self.closing:
            self._spawn(self._retire(instance))
            return
        idle_timeout = fs.spec.idle_timeout
        if idle_timeout == 0 and len(fs.instances) > fs.min_warm:
            self._spawn(self._retire(instance))
            return
        fs.idle.append(instance)
        self._wake(fs)

    def _wake(self, fs: FunctionState) -> None:
        while fs.waiters:
            waiter = fs.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        for fs in self.functions.values():
            self._wake(fs)

    def _max_instances(self, fs: FunctionState) -> int:
        return min(fs.spec.max_instances or self.config.instances_max_per_function, self.config.instances_max)

    def total_instances(self) -> int:
        return sum(len(fs.instances) for fs in self.functions.values()) + self.starting + self.retiring

    async def _checkout(self, fs: FunctionState) -> LiveInstance:
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
            if len(fs.instances) + fs.starting < self._max_instances(fs) and self._room_for_one():
                instance = await self._start(fs)
                instance.busy = True
                return instance
            waiter = asyncio.get_running_loop().create_future()
            fs.waiters.append(waiter)
            await waiter

    def _room_for_one(self) -> bool:
        """Under the daemon's maximum; else makes room by retiring the longest-idle instance, whose end
        wakes the waiters (its sandbox must be back before another is asked for)."""
        if self.total_instances() < self.config.instances_max:
            return True
        idle = [i for fs in self.functions.values() for i in fs.idle]
        if not idle:
            return False
        oldest = min(idle, key=lambda i: i.last_used)
        self._unlist(oldest)
        self._spawn(self._retire(oldest))
        return False

    async def _start(self, fs: FunctionState) -> LiveInstance:
        """Thaw a new instance of `fs` from its template into a repurposed sandbox (capturing the
        template again first if the keep-alive evicted it)."""
        if fs.template is None and fs.evicted:
            await self._recapture(fs)
        ref = fs.template
        if ref is None:
            raise Unavailable(f"{fs.name} has no template: {fs.broken or 'it was deleted'}")
        ref.users += 1
        fs.starting += 1
        self.starting += 1
        try:
            instance = await self._thaw(fs, ref)
        except BaseException:
            ref.users -= 1
            if ref.retired and ref.users == 0:
                self._retire_template(ref)
            raise
        finally:
            fs.starting -= 1
            self.starting -= 1
        fs.instances.add(instance)
        self.metrics.instances.labels(fs.name).set(len(fs.instances))
        self.metrics.starts.labels(fs.name, "restored").inc()
        return instance

    async def _thaw(self, fs: FunctionState, ref: TemplateRef) -> LiveInstance:
        t0 = time.perf_counter()
        deployed = fs.deployed
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe2(os.O_CLOEXEC)
        instance_id = f"{fs.name}-{next(self.ids)}"
        logger = asyncio.ensure_future(follow_pipe(log_read, fs.log, instance_id))
        acquired: Sandbox | None = None  # to give back if the thaw fails
        try:
            try:  # the stub comes from the agent off the tracer thread, which only does the ptrace work
                fds = ref.template.restore_fds(fs.spec.mode)
                paged = ref.template.paged(fs.spec.mode)
                give_back = lambda got: self._release_sandbox(got[0])  # noqa: E731
                trip = (self._sandbox_with_stub, deployed, fds, theirs.fileno(), log_write, paged)
                sandbox, stub = await _to_the_end(*trip, undo=give_back)
                acquired = sandbox
            finally:
                theirs.close()
                os.close(log_write)
            seccomp = seccomp_program(frozenset(fs.spec.syscalls))  # the restorer's last step installs it
            restored = await self.tracer.run(
                restore, ref.template, Stub(stub.pid, stub.wait, stub.kill), fs.spec.mode, seccomp
            )
            channel = await Channel.open(ours, self.config.max_frame)
            try:
                hello = await asyncio.wait_for(channel.recv(), RESTORED_TIMEOUT)
            except BaseException:
                channel.close()
                raise
            if not hello or hello.get("type") != "restored":
                channel.close()
                raise InstanceCrashed(_not_restored(fs, hello))
        except BaseException as e:
            ours.close()
            logger.cancel()
            if acquired is not None:
                await self._release_sandbox(acquired)
            if isinstance(e, PoolIsFull):
                raise PoolFull(f"restoring {fs.name}: the pool is full") from e
            if isinstance(e, SnapshotError | SandboxError | PoolError | TimeoutError):
                raise Unavailable(f"restoring an instance of {fs.name} failed") from e
            raise
        elapsed = time.perf_counter() - t0
        self.metrics.restore_seconds.observe(elapsed)
        return LiveInstance(
            instance_id, fs.name, deployed.revision, ref, sandbox, stub, restored, channel, logger, elapsed * 1e3
        )

    def _unlist(self, instance: LiveInstance) -> FunctionState | None:
        fs = self.functions.get(instance.function)
        if fs is None or instance not in fs.instances:
            return None
        fs.instances.discard(instance)
        with contextlib.suppress(ValueError):
            fs.idle.remove(instance)
        self.metrics.instances.labels(fs.name).set(len(fs.instances))
        return fs

    async def _retire(self, instance: LiveInstance) -> None:
        """Kill the instance, release its sandbox, and drop its template once nothing uses it."""
        fs = self._unlist(instance)
        if instance.retired:
            return
        instance.retired = True
        instance.channel.close()
        self.retiring += 1
        try:
            try:
                await asyncio.to_thread(instance.restored.close)
            except (OSError, SandboxError) as e:
                log.warning("stopping instance %s: %s", instance.id, e)
            await self._release_sandbox(instance.sandbox)
        finally:
            self.retiring -= 1
        instance.log_task.cancel()
        ref = instance.template
        ref.users -= 1
        if ref.retired and ref.users == 0:
            self._retire_template(ref)
        if fs is not None:
            self._wake(fs)
        self._wake_all()  # room under the daemon's maximum for any function

    # -- scaling and keep-alive ------------------------------------------------------------------
    async def scale(self, name: str, replicas: int) -> None:
        """Keep `replicas` instances warm (the gateway's scale-function): thaw up to it, release above it."""
        fs = self.get(name)
        if replicas < 0:
            raise Invalid(f"replicas must not be negative, not {replicas}")
        fs.min_warm = min(replicas, self._max_instances(fs))
        while len(fs.idle) and len(fs.instances) > fs.min_warm:
            await self._retire(fs.idle[0])
        missing = fs.min_warm - len(fs.instances) - fs.starting
        started = await asyncio.gather(*(self._start(fs) for _ in range(missing)), return_exceptions=True)
        for instance in started:
            if isinstance(instance, LiveInstance):
                instance.last_used = time.monotonic()
                fs.idle.append(instance)
                self._wake(fs)
        errors = [e for e in started if isinstance(e, BaseException)]
        if errors:
            raise errors[0]

    async def _keep_alive(self) -> None:
        next_plan = next_punch = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for fs in list(self.functions.values()):
                timeout = self.planner.instance_keepalive_s(fs.name, fs.spec.idle_timeout)
                for instance in list(fs.idle):
                    if len(fs.instances) <= fs.min_warm:
                        break
                    if now - instance.last_used >= timeout:
                        self._unlist(instance)
                        self._spawn(self._retire(instance))
            if now >= next_plan:
                next_plan = now + self.config.keepalive_plan_interval
                await self._guarded(self.plan_templates())
            if now >= next_punch:
                next_punch = now + self.config.keepalive_cache_ttl / 4
                await self._guarded(self._punch_cold_pages())
            self.refresh_gauges()

    async def _guarded(self, work: Awaitable[Any]) -> None:
        """Keep-alive work that fails is logged; the loop goes on."""
        try:
            await work
        except (ThawError, PoolError, SnapshotError, OSError) as e:
            log.warning("keep-alive: %s", e)

    # -- templates' forms (daemon/planner.py) ----------------------------------------------------
    async def plan_templates(self) -> dict[str, Form]:
        """Compress, expand or evict idle functions' templates as the planner says; returns the plan."""
        now = time.monotonic()
        held = [self._held(fs, now) for fs in self.functions.values() if fs.template is not None and not fs.broken]
        forms = self.planner.forms(held)
        for name, form in forms.items():
            fs = self.functions.get(name)
            if fs is None or fs.instances or fs.starting:
                continue
            async with self._lock(name):
                if fs.template is not None and not fs.instances and not fs.starting:
                    await self._take_form(fs, fs.template, form)
        return forms

    async def set_template_form(self, name: str, form: str, codec: str | None = None) -> FunctionState:
        """Put the function's template in `form` now (warm, compressed or evicted), whatever the
        keep-alive would choose; the planner may change it again at its next plan (with a budget)."""
        fs = self.get(name)
        try:
            wanted = Form(form)
        except ValueError:
            raise Invalid(f"form must be one of {', '.join(f.value for f in Form)}, not {form!r}") from None
        if codec is not None and codec not in choices(ColdCodec):
            raise Invalid(f"codec must be {', '.join(choices(ColdCodec))}, not {codec!r}")
        if wanted is Form.COMPRESSED and (refusal := paged_restore_refusal(self.sandboxes.config)):
            raise Invalid(f"{name}'s template cannot be compressed here: {refusal}")
        async with self._lock(name):
            if fs.broken:
                raise Unavailable(f"{name} has no usable template: {fs.broken}")
            if fs.template is None and wanted is not Form.EVICTED:
                await self._recapture_locked(fs)
            if fs.template is not None:
                try:
                    if self._other_codec(fs.template, wanted, codec):  # recompress, by way of the warm form
                        await self._take_form(fs, fs.template, Form.WARM)
                    await self._take_form(fs, fs.template, wanted, codec)
                except PoolIsFull as e:
                    raise PoolFull(f"changing {name}'s template: the pool is full") from e
                except SegmentExists as e:
                    raise Conflict(
                        f"{name}'s template in that form is still held by instances of an earlier change: "
                        "try again once they are gone"
                    ) from e
                except CodecUnavailable as e:
                    raise Unavailable(f"codec {codec or self.config.keepalive_codec}: {e}") from e
        return fs

    @staticmethod
    def _other_codec(ref: TemplateRef, wanted: Form, codec: str | None) -> bool:
        """Whether `wanted` asks for the template compressed with another codec than it is."""
        cold = ref.template.manifest.cold
        return wanted is Form.COMPRESSED and codec is not None and cold is not None and cold.codec != codec

    def _held(self, fs: FunctionState, now: float) -> Held:
        assert fs.template is not None
        template = fs.template.template
        memory_mib = template.manifest.data_bytes / MIB
        working_set = len(template.working_set()) * 4096 / MIB or memory_mib
        busy = bool(fs.instances or fs.starting or fs.min_warm)
        return Held(fs.name, memory_mib, working_set, self.planner.idle_s(fs.name, now), busy)

    async def _take_form(self, fs: FunctionState, ref: TemplateRef, form: Form, codec: str | None = None) -> None:
        compressed = ref.template.manifest.cold is not None
        if form is Form.EVICTED:
            log.info("%s: evicting its template (captured again when invoked)", fs.name)
            fs.template, fs.evicted = None, True
            self._retire_template(ref, keep_revision=True)
            return
        if form is Form.COMPRESSED and not compressed:
            if paged_restore_refusal(self.sandboxes.config):
                return  # the planner's choice, which these sandboxes could not restore: kept warm
            chosen = get_codec(codec or self.config.keepalive_codec)
            template = await asyncio.to_thread(compress, self.pool, ref.name, chosen)
        elif form is Form.WARM and compressed:
            template = await asyncio.to_thread(expand, self.pool, ref.name, fs.deployed.template_name)
        else:
            return
        if fs.template is not ref:  # quarantined (or replaced) while we worked: the new form goes
            await asyncio.to_thread(Template.delete, self.pool, template.name)
            template.close()
            return
        log.info("%s: template %s is now %s (%s)", fs.name, ref.name, template.name, form)
        fs.template = TemplateRef(template, ref.revision_dir)
        self._retire_template(ref, keep_revision=True)

    async def _recapture(self, fs: FunctionState) -> None:
        async with self._lock(fs.name):
            await self._recapture_locked(fs)

    async def _recapture_locked(self, fs: FunctionState) -> None:
        if fs.template is not None or not fs.evicted:
            return
        template = await self._capture(fs.deployed, fs.log)
        fs.template, fs.evicted = TemplateRef(template, fs.deployed.revision_dir), False

    # -- integrity (daemon/scrubber.py) ----------------------------------------------------------
    async def quarantine(self, segment: str, error: Exception) -> None:
        """`segment` failed a checksum: no restore uses it again. It leaves the pool's namespace
        at once (for every daemon attached), the function's template is retired and idle instances
        thawed from it go; the function is captured again from its code when next invoked, as
        after an eviction."""
        await self._take_out_of_use(segment)
        for fs in list(self.functions.values()):
            ref = fs.template
            if ref is None or segment not in (ref.name, working_set_name(ref.name)):
                continue
            self._say_quarantined(fs, ref.name, error)
            fs.template, fs.evicted = None, True
            self._retire_template(ref, keep_revision=True)
            for instance in [i for i in fs.instances if i.template is ref and not i.busy]:
                self._unlist(instance)
                self._spawn(self._retire(instance))

    async def _take_out_of_use(self, segment: str) -> None:
        with contextlib.suppress(SegmentNotFound):
            await asyncio.to_thread(self.pool.delete, segment)
        self.metrics.quarantined.inc()

    @staticmethod
    def _say_quarantined(fs: FunctionState, template: str, error: Exception) -> None:
        message = f"template {template} quarantined: {error}; it is captured again from its code when next invoked"
        log.error("%s: %s", fs.name, message)
        fs.log.write("thawd", message)

    async def _punch_cold_pages(self) -> None:
        """Free cold pages decompressed more than cache_ttl ago: an instance still using them faults
        and the pager refills them."""
        ttl = self.config.keepalive_cache_ttl
        for fs in list(self.functions.values()):
            if fs.template is not None and fs.template.template.manifest.cold is not None:
                freed = await asyncio.to_thread(fs.template.template.punch_cold, ttl)
                if freed:
                    log.debug("%s: punched %d bytes of cold pages out of the cache", fs.name, freed)

    def refresh_gauges(self) -> None:
        with contextlib.suppress(PoolError, OSError):
            status = self.pool.status()
            self.metrics.pool_bytes.labels("capacity").set(status.capacity)
            self.metrics.pool_bytes.labels("used").set(status.used)
        self.metrics.sandboxes.labels("idle").set(len(self.sandboxes.idle))
        self.metrics.sandboxes.labels("busy").set(len(self.sandboxes.busy))

    # -- views -------------------------------------------------------------------------------------
    def describe(self, fs: FunctionState) -> dict[str, Any]:
        d = fs.deployed
        return {
            **fs.spec.to_json(),
            "revision": d.revision,
            "template": fs.template.name if fs.template else None,
            "status": "broken" if fs.broken else "ready",
            "error": fs.broken or None,
            "created_at": d.created_at,
            "updated_at": d.updated_at,
            "instances": len(fs.instances),
            "idle": len(fs.idle),
            "min_warm": fs.min_warm,
            "invocations": fs.invocations,
            "template_bytes": fs.template.template.manifest.data_bytes if fs.template else 0,
            "template_form": _form(fs),
            "template_codec": _codec(fs),
            "template_stored_bytes": _stored_bytes(fs.template.template) if fs.template else 0,
            "init_ms": None if d.init_ms is None else round(d.init_ms, 1),
        }

    def instances(self, name: str | None = None) -> list[dict[str, Any]]:
        chosen = [self.get(name)] if name else list(self.functions.values())
        return [i.describe() for fs in chosen for i in sorted(fs.instances, key=lambda i: i.started_at)]


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


def _stored_bytes(template: Template) -> int:
    """What the template holds of the pool now (holes and punched pages excluded), with the cold
    pages of a compressed one that are decompressed in its cache segment."""
    try:
        held = os.fstat(template.segment.fd).st_blocks * 512
        if template.manifest.cold is not None:
            held += os.fstat(template.cache().fd).st_blocks * 512
    except (OSError, PoolError):
        return 0
    return held


def _form(fs: FunctionState) -> str:
    if fs.template is None:
        return str(Form.EVICTED) if fs.evicted else "none"
    return str(Form.COMPRESSED if fs.template.template.manifest.cold is not None else Form.WARM)


def _not_restored(fs: FunctionState, hello: protocol.Message | None) -> str:
    """Why a thawed instance did not say RESTORED (an after-thaw hook's error goes to its log)."""
    if hello and hello.get("type") == "error":
        error = hello.get("error") or {}
        fs.log.write("thawd", f"after the thaw: {error.get('traceback') or error.get('message')}")
        return f"the instance failed after the thaw: {error.get('type')}: {error.get('message')}"
    return f"the restored instance said {hello} instead of RESTORED"


def _request_id(headers: dict[str, str], number: int) -> str:
    """The caller's X-Call-Id (what the OpenFaaS gateway sends) when it is a sane token, else ours."""
    given = next((v for k, v in headers.items() if k.lower() == "x-call-id"), "")
    return given if REQUEST_ID.fullmatch(given) else f"thaw-{number}"


def _codec(fs: FunctionState) -> str | None:
    cold = fs.template.template.manifest.cold if fs.template else None
    return cold.codec if cold else None


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "X"
    return stat[stat.rindex(")") + 2]


def _memory(pid: int) -> dict[str, int] | None:
    """rss: all the pages it maps; uss: the pages only it has (what the instance costs beyond the
    template it shares); pss: its share of everything. None once the process is gone."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.Error, OSError):
        return None
    return {"rss": info.rss, "pss": info.pss, "uss": info.uss}


async def _to_the_end(call: Callable[..., T], *args: Any, undo: Callable[[T], Awaitable[object]]) -> T:
    """asyncio.to_thread, but not abandoned when cancelled (a timeout, a client gone): the thread
    goes on regardless, so wait for it, give back what it got (`undo`), then re-raise. Abandoned,
    a sandbox it acquired stayed busy for good, and the fds it was using were closed under it."""
    trip = asyncio.ensure_future(asyncio.to_thread(call, *args))
    try:
        return await asyncio.shield(trip)
    except asyncio.CancelledError:
        await asyncio.wait([trip])
        if not trip.cancelled() and trip.exception() is None:
            await undo(trip.result())
        raise


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3

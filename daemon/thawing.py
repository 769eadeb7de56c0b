"""Starting processes in sandboxes: a function's guest for its capture, and instances thawed from
its template.

A thaw, step by step: a sandbox from the pool (repurposed for the function: nothing to do when
the function held it last), its stub (waiting in it already, stopped; else forked by its agent
now), the restore on a ptrace worker thread (daemon/ptrace_workers.py), then the instance's
RESTORED on its channel. The sandbox trip runs on the default executor, so the ptrace threads
only do ptrace work, and thaws of any functions run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from daemon.config import DaemonConfig
from daemon.errors import DeployFailed, InstanceCrashed, PoolFull, Unavailable
from daemon.guestio import Channel, not_restored
from daemon.logs import FunctionLog, follow_pipe
from daemon.metrics import Metrics
from daemon.ptrace_workers import PtraceWorkers
from daemon.registry import FUNCTION_MOUNT, Deployed
from daemon.state import FunctionState, LiveInstance, TemplateRef
from daemon.templates import Templates
from native.seccomp import program as seccomp_program
from sandbox.cgroups import Limits
from sandbox.errors import SandboxError
from sandbox.guest import protocol
from sandbox.pool import SandboxPool
from sandbox.sandbox import HANDOFF_PLACES, Sandbox, SandboxProcess, SandboxSpec
from shmpool import Pool
from shmpool.errors import PoolError
from shmpool.errors import PoolFull as PoolIsFull
from snapshot.capture import capture
from snapshot.errors import SnapshotError
from snapshot.restore import Instance, Stub, restore
from snapshot.template import Template

log = logging.getLogger("thawd")
T = TypeVar("T")
RESTORED_TIMEOUT = 10.0
STOP_POLL = 0.001
GUEST_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}  # threads are captured: no OMP cap


class Thawer:
    def __init__(
        self,
        config: DaemonConfig,
        pool: Pool,
        sandboxes: SandboxPool,
        templates: Templates,
        workers: PtraceWorkers,
        metrics: Metrics,
    ) -> None:
        self.config, self.pool, self.sandboxes, self.templates = config, pool, sandboxes, templates
        self.workers, self.metrics = workers, metrics
        self.ids = itertools.count(1)
        self.acquiring = 0  # sandbox trips under way: sandboxes promised, not yet taken
        self.releasing: set[asyncio.Task[None]] = set()

    # -- sandboxes -----------------------------------------------------------------------------------
    def spec_of(self, deployed: Deployed) -> SandboxSpec:
        spec = deployed.spec
        env = {**GUEST_ENV, **spec.env}
        return SandboxSpec(deployed.revision_dir, Limits(cpu=spec.cpu, memory=spec.memory), env, hostname=spec.name)

    def sandboxes_free(self) -> int:
        """Sandboxes an acquire could have now without waiting, less those promised already."""
        return self.sandboxes.available() - self.acquiring

    async def acquire(self, deployed: Deployed) -> Sandbox:
        return await to_the_end(self._acquire_now, deployed, undo=self.release)

    def _acquire_now(self, deployed: Deployed) -> Sandbox:
        try:
            return self.sandboxes.acquire(self.spec_of(deployed))
        except SandboxError as e:
            raise Unavailable(f"no sandbox for {deployed.spec.name}") from e

    def _sandbox_with_stub(
        self, deployed: Deployed, fds: list[int], control_fd: int, log_fd: int, paged: bool
    ) -> tuple[Sandbox, SandboxProcess, int]:
        """A sandbox for `deployed` and a stub in it holding the restore fds, in one trip to a
        worker thread (a trip and back cost a few hundred microseconds here): the stub waiting in
        the sandbox, handed the fds (the third value: the fd it receives them on), else one forked
        now (-1). Without a stub, the sandbox goes back."""
        sandbox = self._acquire_now(deployed)
        try:
            stub, handoff = sandbox.take_stub(fds, control_fd, log_fd, paged)
            return sandbox, stub, handoff
        except BaseException:
            try:
                self.sandboxes.release(sandbox)
            except SandboxError as e:
                log.warning("releasing sandbox %s: %s", sandbox.id, e)
            raise

    def _ready_sandbox_with_stub(
        self, deployed: Deployed, fds: list[int], control_fd: int, log_fd: int, paged: bool
    ) -> tuple[Sandbox, SandboxProcess, int] | None:
        """The fast path, on the event loop: a sandbox the function holds already, with a stub
        waiting in it (no request to its agent, one sendmsg to hand the stub its fds), when a
        trip to a worker thread and back would cost more than the work. None: take the trip. A
        paged restore takes the trip (its check reads procfs)."""
        sandbox = None if paged else self.sandboxes.acquire_ready(self.spec_of(deployed))
        if sandbox is None:
            return None
        try:  # a stub that died waiting is replaced by a fork here: rare enough to do on the loop
            stub, handoff = sandbox.take_stub(fds, control_fd, log_fd)
        except BaseException:
            task = asyncio.ensure_future(self.release(sandbox))
            self.releasing.add(task)
            task.add_done_callback(self.releasing.discard)
            raise
        return sandbox, stub, handoff

    async def put_away(self, instance: LiveInstance) -> None:
        """Kill a thawed instance, then close its channel and give its sandbox back (one trip
        to a worker thread). Killed first: an instance that reads the end of its channel exits
        on its own, and Python's finalization then walks its heap, copy-on-write faults and all
        (with the kill 2-5 ms late, the instances' CPU per request went from ~3 ms to 5-7 ms),
        and while Instance.close reads a first instance's mapped pages, into the working set."""
        restored = instance.restored
        needs_close = restored.pager is not None or not restored.template.working_set()
        if not needs_close:
            instance.process.kill()  # one pidfd_send_signal, on the loop
            instance.channel.close()
        try:
            await asyncio.to_thread(self._put_away, instance.id, restored if needs_close else None, instance.sandbox)
        finally:
            instance.channel.close()  # closed already, or after Instance.close killed it

    def _put_away(self, instance_id: str, restored: Instance | None, sandbox: Sandbox) -> None:
        """The release kills every process in the sandbox: the instance needs its own stop
        (`restored`) only for what Instance.close does besides (stop its pager, record the
        template's working set); one request to the agent less (~0.1 ms) without."""
        if restored is not None:
            try:
                restored.close()
            except (OSError, SandboxError) as e:
                log.warning("stopping instance %s: %s", instance_id, e)
        try:
            self.sandboxes.release(sandbox)
        except SandboxError as e:
            log.warning("releasing sandbox %s: %s", sandbox.id, e)

    async def release(self, sandbox: Sandbox) -> None:
        try:
            await asyncio.to_thread(self.sandboxes.release, sandbox)
        except SandboxError as e:
            log.warning("releasing sandbox %s: %s", sandbox.id, e)

    # -- capture ---------------------------------------------------------------------------------------
    async def capture(self, deployed: Deployed, function_log: FunctionLog) -> Template:
        """Start the guest in a sandbox, wait for READY and its stop, capture it, release the sandbox."""
        spec = deployed.spec
        sandbox = await self.acquire(deployed)
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
            await self.wait_parked(channel, guest, function_log, "deploy")
            deployed.init_ms = ms_since(started)
            return await self.capture_parked(deployed, guest.pid)
        except (PoolIsFull, SnapshotError, PoolError, SandboxError) as e:
            raise capture_failure(spec.name, e) from e
        finally:
            if channel is not None:
                channel.close()
            else:
                ours.close()
            theirs.close()
            if log_write >= 0:
                os.close(log_write)
            await self.release(sandbox)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(logger, 1.0)  # the guest's last words, before we say why it failed

    async def capture_parked(self, deployed: Deployed, pid: int, parent: Template | None = None) -> Template:
        """Capture the parked guest `pid` as `deployed`'s template (a dense child of `parent`, the
        runtime template, if given: daemon/layering.py): its name made free first, the time
        logged, the start counted (its init ran, from scratch or in a thaw of the runtime)."""
        spec = deployed.spec
        name = deployed.template_name
        await asyncio.to_thread(self.templates.clear_name, name)
        t0 = time.perf_counter()
        mounts = {FUNCTION_MOUNT: str(deployed.revision_dir)}
        template = await self.workers.run(capture, pid, self.pool, name, mounts, parent, parent is not None)
        how = f" as a child of {parent.name}" if parent else ""
        log.info("%s: captured revision %d%s in %.0f ms", spec.name, deployed.revision, how, ms_since(t0))
        self.metrics.starts.labels(spec.name, "cold").inc()
        return template

    async def wait_parked(
        self, channel: Channel, guest: SandboxProcess, function_log: FunctionLog, instance: str
    ) -> None:
        """Until `guest` said READY and stopped itself; DeployFailed with the tail of its log
        (the lines of `instance`...) if it did not."""
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
            tail = "\n".join(e["text"] for e in function_log.recent(tail=12) if e["instance"].startswith(instance))
            raise DeployFailed(f"the function's init failed (the guest {how}):\n{tail}")
        while _state(guest.pid) != "T":
            if guest.wait(0) is not None:
                raise DeployFailed("the guest exited after READY instead of stopping for capture")
            await asyncio.sleep(STOP_POLL)

    # -- thaw ------------------------------------------------------------------------------------------
    async def thaw(self, fs: FunctionState, ref: TemplateRef) -> LiveInstance:
        """A new instance of `fs` from `ref`, said RESTORED; Unavailable (or PoolFull,
        InstanceCrashed) naming why not. Nothing of it is left on failure."""
        t0 = time.perf_counter()
        steps = Steps(t0)
        deployed = fs.deployed
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe2(os.O_CLOEXEC)
        instance_id = f"{fs.name}-{next(self.ids)}"
        logger = asyncio.ensure_future(follow_pipe(log_read, fs.log, instance_id))
        acquired: Sandbox | None = None  # to give back if the thaw fails
        try:
            try:  # the stub comes from the sandbox off the ptrace threads, which only do the ptrace work
                fds = ref.template.restore_fds(fs.spec.mode)
                paged = ref.template.paged(fs.spec.mode)
                ready = self._ready_sandbox_with_stub(deployed, fds, theirs.fileno(), log_write, paged)
                if ready is not None:
                    sandbox, stub, handoff = ready
                else:
                    give_back = lambda got: self.release(got[0])  # noqa: E731
                    trip = (self._sandbox_with_stub, deployed, fds, theirs.fileno(), log_write, paged)
                    self.acquiring += 1
                    try:
                        sandbox, stub, handoff = await to_the_end(*trip, undo=give_back)
                    finally:
                        self.acquiring -= 1
                acquired = sandbox
            finally:
                theirs.close()
                os.close(log_write)
            steps.mark("sandbox")
            seccomp = seccomp_program(frozenset(fs.spec.syscalls))  # the restorer's last step installs it
            target = Stub(stub.pid, stub.wait, stub.kill, handoff=handoff, handoff_places=HANDOFF_PLACES)
            restored, began, ended = await self.workers.run(_timed_restore, ref.template, target, fs.spec.mode, seccomp)
            steps.at("to_worker", began)
            steps.at("restore", ended)
            steps.mark("from_worker")
            channel = await Channel.open(ours, self.config.max_frame)
            steps.mark("channel")
            try:
                hello = await asyncio.wait_for(channel.recv(), RESTORED_TIMEOUT)
            except BaseException:
                channel.close()
                raise
            steps.mark("restored")
            if not hello or hello.get("type") != "restored":
                channel.close()
                why, for_log = not_restored(hello)
                if for_log:
                    fs.log.write("thawd", for_log)
                raise InstanceCrashed(why)
        except BaseException as e:
            ours.close()
            logger.cancel()
            if acquired is not None:
                await self.release(acquired)
            if isinstance(e, PoolIsFull):
                raise PoolFull(f"restoring {fs.name}: the pool is full") from e
            if isinstance(e, SnapshotError | SandboxError | PoolError | TimeoutError):
                raise Unavailable(f"restoring an instance of {fs.name} failed") from e
            raise
        elapsed = time.perf_counter() - t0
        self.metrics.restore_seconds.observe(elapsed)
        for step, seconds in steps.taken:
            self.metrics.thaw_steps.labels(step).observe(seconds)
        return LiveInstance(
            instance_id, fs.name, deployed.revision, ref, sandbox, stub, restored, channel, logger, elapsed * 1e3
        )


class Steps:
    """How long each step of a thaw took (the metric thaw_thaw_step_seconds): where its time goes."""

    def __init__(self, t0: float) -> None:
        self.last = t0
        self.taken: list[tuple[str, float]] = []

    def at(self, step: str, when: float) -> None:
        """`step` ended at `when` (a perf_counter reading, of any thread)."""
        self.taken.append((step, when - self.last))
        self.last = when

    def mark(self, step: str) -> None:
        self.at(step, time.perf_counter())


def _timed_restore(template: Template, stub: Stub, mode: str, seccomp: bytes) -> tuple[Instance, float, float]:
    """restore(), with when it began and ended on the worker thread."""
    began = time.perf_counter()
    restored = restore(template, stub, mode, seccomp)
    return restored, began, time.perf_counter()


def capture_failure(function: str, error: BaseException) -> DeployFailed | PoolFull:
    """What a deploy answers when capturing `function` failed on the way (the cause is chained)."""
    if isinstance(error, PoolIsFull):
        return PoolFull(f"capturing {function}: the pool is full")
    return DeployFailed(f"capturing {function} failed")


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "X"
    return stat[stat.rindex(")") + 2]


async def to_the_end(call: Callable[..., T], *args: Any, undo: Callable[[T], Awaitable[object]]) -> T:
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


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3

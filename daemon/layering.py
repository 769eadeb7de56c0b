"""Layered deploys: the runtime template, and functions captured as its children (snapshot/pages.py).

thawd keeps one *runtime template* per runtime: a guest (`python -m sandbox.guest --runtime`) with
the interpreter started, thaw's guest loaded and `[layers] preload` imported, parked and captured
like any template, densely (one run per VMA, so its children see few VMAs). Its name carries a
digest of what makes the runtime (the interpreter and its version, the venv, the preload list,
the guest's code): when any of those changes, the next deploy builds a new one, and an old one
goes once no child needs it any more (the pool refuses to delete a template a child needs).

A deploy thaws the runtime template (cow) into the function's sandbox, tells the instance to
`load` the function (its environment, its module, its init), waits for it to park again and
captures it as a child: it stores only the pages the init wrote. A function that cannot start
from the runtime is captured cold, as before (the reason in thawd's log): one whose spec says
`layered: false` (a function whose restores must be as lean as can be: a child maps every module
the runtime preloads), one whose environment sets what the interpreter reads at start (PYTHON*,
LD_*), or any deploy when layers are off, the pool cannot map pages copy-on-write, or the runtime
template cannot be built.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import sys
import time
from pathlib import Path

import sandbox.guest
from daemon.config import DaemonConfig
from daemon.errors import DeployFailed
from daemon.guestio import Channel
from daemon.logs import FunctionLog, follow_pipe
from daemon.ptrace_workers import PtraceWorkers
from daemon.registry import FUNCTION_MOUNT, Deployed
from daemon.thawing import GUEST_ENV, Thawer, capture_failure, ms_since
from native.seccomp import program as seccomp_program
from sandbox.cgroups import Limits
from sandbox.errors import SandboxError
from sandbox.guest import protocol
from sandbox.sandbox import HANDOFF_PLACES, Sandbox, SandboxSpec
from shmpool import Pool, SegmentInUse, SegmentNotFound
from shmpool.errors import PoolError, SegmentCorrupt
from shmpool.errors import PoolFull as PoolIsFull
from snapshot.capture import capture
from snapshot.errors import SnapshotError, TemplateCorrupt
from snapshot.restore import Stub, restore
from snapshot.template import Template

log = logging.getLogger("thawd")
RUNTIME_PREFIX = "runtime-"
RESTORED_TIMEOUT = 10.0
# What the interpreter reads when it starts: a function that sets one is captured cold.
START_VARIABLES = ("PYTHON", "LD_")


def runtime_key(preload: list[str]) -> str:
    """A digest of what makes the runtime: another interpreter, venv, preload list or guest code
    is another runtime template."""
    h = hashlib.sha256()
    python = os.path.realpath(sys.executable)
    st = os.stat(python)
    for part in (python, sys.version, sys.prefix, str(st.st_size), str(st.st_mtime_ns), ",".join(preload)):
        h.update(part.encode() + b"\0")
    guest = Path(sandbox.guest.__file__).parent
    for source in sorted(guest.glob("*.py")):
        h.update(source.name.encode() + b"\0" + source.read_bytes())
    return h.hexdigest()[:12]


class Layering:
    def __init__(self, config: DaemonConfig, pool: Pool, thawer: Thawer, workers: PtraceWorkers) -> None:
        self.config, self.pool, self.thawer, self.workers = config, pool, thawer, workers
        self.preload = [m.strip() for m in config.layers_preload.split(",") if m.strip()]
        self.name = RUNTIME_PREFIX + runtime_key(self.preload)
        self.directory = Path(config.state_dir) / "runtimes" / self.name
        self.runtime: Template | None = None
        self.lock = asyncio.Lock()

    def refusal(self, deployed: Deployed) -> str | None:
        """Why `deployed` is captured cold rather than from the runtime template (None: it is not)."""
        if not self.config.layers_enabled:
            return "layers are off"
        if not deployed.spec.layered:
            return "its spec says layered: false"
        if not (self.pool.caps.private_cow and self.pool.caps.sparse):
            return f"a {self.pool.config.backend} pool cannot hold layered templates"
        started = [k for k in deployed.spec.env if k.startswith(START_VARIABLES)]
        if started:
            return f"its environment sets {', '.join(sorted(started))}, which the interpreter reads when it starts"
        return None

    # -- the runtime template ------------------------------------------------------------------------
    async def runtime_template(self) -> Template:
        """The runtime template, opened (verified) or built; stale ones no child needs are deleted."""
        async with self.lock:
            if self.runtime is None:
                try:
                    self.runtime = await asyncio.to_thread(Template.open, self.pool, self.name)
                except SegmentNotFound:
                    self.runtime = await self._build()
                except (SegmentCorrupt, TemplateCorrupt) as e:  # quarantined, its children with it
                    log.error("runtime template %s quarantined: %s; it is built again", self.name, e)
                    await asyncio.to_thread(self.pool.delete, self.name, True)
                    self.runtime = await self._build()
                await asyncio.to_thread(self._delete_stale)
            return self.runtime

    async def _build(self) -> Template:
        for part in ("code", "site"):
            (self.directory / part).mkdir(parents=True, exist_ok=True)
        spec = SandboxSpec(self.directory, Limits(), dict(GUEST_ENV), hostname="runtime")
        box = await asyncio.to_thread(self.thawer.sandboxes.acquire, spec)
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe2(os.O_CLOEXEC)
        runtime_log = FunctionLog(self.directory / "log")
        logger = asyncio.ensure_future(follow_pipe(log_read, runtime_log, "build"))
        try:
            argv = [sys.executable, "-m", "sandbox.guest", "--runtime", "--preload", ",".join(self.preload)]
            argv += ["--max-frame", str(self.config.max_frame)]
            t0 = time.perf_counter()
            seccomp = seccomp_program(frozenset())
            guest = await asyncio.to_thread(box.spawn, argv, theirs.fileno(), log_write, seccomp=seccomp)
            theirs.close()
            os.close(log_write)
            log_write = -1
            channel = await Channel.open(ours, self.config.max_frame)
            try:
                await self.thawer.wait_parked(channel, guest, runtime_log, "build")
                await asyncio.to_thread(Template.delete, self.pool, self.name)  # a leftover of an interrupted build
                template = await self.workers.run(capture, guest.pid, self.pool, self.name, None, None, True)
            finally:
                channel.close()
            log.info("runtime template %s built in %.0f ms (%s)", self.name, ms_since(t0), ", ".join(self.preload))
            return template
        except (SnapshotError, PoolError, SandboxError) as e:
            raise DeployFailed(f"building the runtime template {self.name} failed: {e}") from e
        finally:
            ours.close()
            theirs.close()
            if log_write >= 0:
                os.close(log_write)
            await self.thawer.release(box)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(logger, 1.0)
            runtime_log.close()

    def _delete_stale(self) -> None:
        for record in self.pool.list():
            if record.name.startswith(RUNTIME_PREFIX) and record.name != self.name and record.kind == "template":
                with contextlib.suppress(SegmentInUse, SegmentNotFound):
                    Template.delete(self.pool, record.name)

    def forget(self, segment: str) -> None:
        """`segment` was quarantined: if it is the runtime template, the next deploy builds it anew."""
        if self.runtime is not None and segment == self.runtime.name:
            self.runtime.close()
            self.runtime = None

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None

    # -- a layered deploy ------------------------------------------------------------------------------
    async def capture_function(self, deployed: Deployed, function_log: FunctionLog) -> Template:
        """The function's template: a child of the runtime template, else captured cold (the
        module's docstring says when, and thawd's log why)."""
        refusal = self.refusal(deployed)
        if refusal is None:
            try:
                await self.runtime_template()
            except DeployFailed as e:
                refusal = f"the runtime template cannot be built: {e.__cause__ or e}"
                log.warning("%s", refusal)
        if refusal is not None:
            log.info("%s: captured cold: %s", deployed.spec.name, refusal)
            return await self.thawer.capture(deployed, function_log)
        return await self.capture(deployed, function_log)

    async def capture(self, deployed: Deployed, function_log: FunctionLog) -> Template:
        """Thaw the runtime template into `deployed`'s sandbox, load the function there, capture the child."""
        runtime = await self.runtime_template()
        spec = deployed.spec
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe2(os.O_CLOEXEC)
        logger = asyncio.ensure_future(follow_pipe(log_read, function_log, f"deploy-{deployed.revision}"))
        box: Sandbox | None = None
        channel: Channel | None = None
        try:
            box = await self.thawer.acquire(deployed)
            started = time.perf_counter()
            fds = runtime.restore_fds("cow")
            stub, handoff = await asyncio.to_thread(box.take_stub, fds, theirs.fileno(), log_write, False)
            theirs.close()
            os.close(log_write)
            log_write = -1
            target = Stub(stub.pid, stub.wait, stub.kill, handoff=handoff, handoff_places=HANDOFF_PLACES)
            await self.workers.run(restore, runtime, target, "cow", seccomp_program(frozenset(spec.syscalls)))
            channel = await Channel.open(ours, self.config.max_frame)
            await self._load(channel, deployed, box.exec_env())
            await self.thawer.wait_parked(channel, stub, function_log, "deploy")
            deployed.init_ms = ms_since(started)
            return await self.thawer.capture_parked(deployed, stub.pid, runtime)
        except (PoolIsFull, SnapshotError, PoolError, SandboxError) as e:
            raise capture_failure(f"{spec.name} from {runtime.name}", e) from e
        finally:
            if channel is not None:
                channel.close()
            ours.close()
            theirs.close()
            if log_write >= 0:
                os.close(log_write)
            if box is not None:
                await self.thawer.release(box)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(logger, 1.0)

    async def _load(self, channel: Channel, deployed: Deployed, env: dict[str, str]) -> None:
        """The runtime's instance says RESTORED; it is told which function to become, with the
        environment a cold guest of the function would have been started with (`env`)."""
        try:
            hello = await asyncio.wait_for(channel.recv(), RESTORED_TIMEOUT)
        except (TimeoutError, protocol.ProtocolError) as e:
            raise DeployFailed(f"the runtime's instance did not come up: {e or 'no word'}") from e
        if not hello or hello.get("type") != "restored":
            raise DeployFailed(f"the runtime's instance said {hello} instead of RESTORED")
        spec = deployed.spec
        message = {
            "type": "load",
            "function_dir": f"{FUNCTION_MOUNT}/code",
            "handler": spec.handler,
            "site_dir": f"{FUNCTION_MOUNT}/site",
            "env": env,
        }
        channel.send(protocol.encode(message, self.config.max_frame))

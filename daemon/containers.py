"""thawd's side of containers: instances that containerd-shim-thaw-v2 asks for (daemon/shim/).

A container is an instance of the function its image holds. The first container of an image
deploys that function (a cold start: its init runs once, in a sandbox of thaw's, and is captured
into the pool as the template of the function `ctr-<image key>`); every container after it,
while thawd keeps the template, is thawed from it (`start` says which happened). Unlike an
invocation's instance, a container's lives in a sandbox built for it alone:

- its agent joins the network namespace the OCI spec names (the pod's, which the CNI set up)
  instead of making one (`--netns-fd`, native/src/agent.c); with no path, it gets a namespace
  of thaw's own with a veth on thaw's bridge, as an invocation's sandbox has;
- its instance cgroup is the OCI spec's `cgroupsPath` in every hierarchy thaw uses (the pod's
  accounting and limits; systemd's "slice:prefix:name" form is expanded as runc does), created
  here and removed with the container, with the parents we created;
- after its thaw the instance is told `serve-http`: it listens on :8080 itself, the OpenFaaS
  watchdog's port (sandbox/guest/httpmode.py), so faas-netes and Knative route to the pod.

Kill signals the instance; its exit (status 128+signal for a signal, as runc reports) answers
GET /containers/{namespace}/{id}/wait, which the shim long-polls. Delete kills what is left and
takes the sandbox and cgroups down; the template stays in the pool for the next container.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.errors import Conflict, InstanceCrashed, Invalid, NotFound, ThawError, Unavailable
from daemon.guestio import not_restored
from daemon.logs import follow_pipe
from daemon.registry import FunctionSpec
from native import pidfd
from native.seccomp import program as seccomp_program
from sandbox.cgroups import Cgroup, CgroupTree, HybridCgroup, Limits, V1Cgroup, V2Cgroup
from sandbox.errors import SandboxError
from sandbox.guest import protocol
from sandbox.sandbox import Sandbox, SandboxProcess, SandboxSpec
from snapshot.errors import SnapshotError
from snapshot.restore import Stub, restore

log = logging.getLogger("thawd")
NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,75}")  # containerd's namespace and id rules
HANDLER = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)
IMAGE_KEY = re.compile(r"[0-9a-f]{64}")
RESTORED_TIMEOUT = 10.0
SERVING_TIMEOUT = 10.0
GUEST_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


@dataclass(eq=False)
class Container:
    namespace: str
    id: str
    function: str
    start: str  # "cold": deployed from the image for this container; "thawed": from the template
    sandbox: Sandbox
    process: SandboxProcess
    template: Any  # the function's template reference (daemon's), whose users count holds it
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    log_task: asyncio.Task[None]
    created_cgroups: list[Path]
    init_ms: float | None
    thaw_ms: float
    state: str = "created"
    exit_status: int | None = None
    exited_at: float | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    created_at: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.id

    def describe(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "id": self.id,
            "function": self.function,
            "template": self.template.name,
            "start": self.start,
            "init_ms": None if self.init_ms is None else round(self.init_ms, 3),
            "thaw_ms": round(self.thaw_ms, 3),
            "pid": self.process.pid,
            "sandbox": self.sandbox.id,
            "address": str(self.sandbox.lease.address) if self.sandbox.lease else None,
            "state": self.state,
            "exit_status": self.exit_status,
            "exited_at": self.exited_at,
            "created_at": self.created_at,
        }


class Containers:
    """The containers thawd holds, by (namespace, id). `manager` is the instance manager: its
    public deploy/get/set_template_form, and what it was built with (config, sandboxes)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.containers: dict[tuple[str, str], Container] = {}
        self.creating: set[tuple[str, str]] = set()
        self.deploying: dict[str, asyncio.Lock] = {}
        self.reaping: set[asyncio.Future[None]] = set()

    # -- create ------------------------------------------------------------------------------------
    async def create(self, body: dict[str, Any]) -> Container:
        request = _check(body)
        key = (request["namespace"], request["id"])
        if key in self.containers or key in self.creating:
            raise Conflict(f"container {key[0]}/{key[1]} exists")
        self.creating.add(key)
        try:
            fs, start, init_ms = await self._function(request)
            container = await self._thaw(request, fs, start, init_ms)
        finally:
            self.creating.discard(key)
        self.containers[key] = container
        log.info("container %s/%s: %s (%s, thaw %.1f ms)", *key, start, container.template.name, container.thaw_ms)
        return container

    async def _function(self, request: dict[str, Any]) -> tuple[Any, str, float | None]:
        """The image's function: deployed now (a cold start) unless thawd holds its template."""
        name = "ctr-" + request["image"][:20]
        lock = self.deploying.setdefault(name, asyncio.Lock())
        async with lock:
            with contextlib.suppress(NotFound):
                fs = self.manager.get(name)
                if fs.template is not None:
                    return fs, "thawed", None
                if getattr(fs, "evicted", False):  # the keep-alive gave its template up: capture again
                    fs = await self.manager.set_template_form(name, "warm")
                    return fs, "cold", fs.deployed.init_ms
                raise Unavailable(f"{name} has no template: {getattr(fs, 'broken', '') or 'it was deleted'}")
            spec = FunctionSpec(
                name=name,
                handler=request["handler"],
                env=request["env"],
                image=f"containerd:{request['image']}",
                labels={"com.thaw.container": f"{request['namespace']}/{request['id']}"},
            ).validate()
            staging = Path(tempfile.mkdtemp(prefix="thaw-image-"))
            try:
                await asyncio.to_thread(_copy_function, Path(request["function_dir"]), staging / "function")
                fs = await self.manager.deploy(spec, staging / "function")
            finally:
                await asyncio.to_thread(shutil.rmtree, staging, True)
            return fs, "cold", fs.deployed.init_ms

    async def _thaw(self, request: dict[str, Any], fs: Any, start: str, init_ms: float | None) -> Container:
        t0 = time.perf_counter()
        ref = fs.template
        ref.users += 1  # the template stays while this container uses it
        ours, theirs = socket.socketpair()
        log_read, log_write = os.pipe2(os.O_CLOEXEC)
        instance_name = f"{request['namespace']}/{request['id']}"
        logger = asyncio.ensure_future(follow_pipe(log_read, fs.log, instance_name))
        acquired: tuple[Sandbox, list[Path]] | None = None  # to take down if the thaw fails
        try:
            try:
                sandbox, created, stub = await asyncio.to_thread(
                    self._sandbox_with_stub, request, fs, ref, theirs.fileno(), log_write
                )
                acquired = sandbox, created
            finally:
                theirs.close()
                os.close(log_write)
            seccomp = seccomp_program(frozenset(fs.spec.syscalls))
            target = Stub(stub.pid, stub.wait, stub.kill)
            await self.manager.ptrace.run(restore, ref.template, target, fs.spec.mode, seccomp)
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            try:
                hello = await asyncio.wait_for(_recv(reader, self.manager.config.max_frame), RESTORED_TIMEOUT)
            except BaseException:
                writer.close()
                raise
            if not hello or hello.get("type") != "restored":
                writer.close()
                raise InstanceCrashed(await self._not_restored(fs, stub, hello))
        except BaseException as e:
            ours.close()
            logger.cancel()
            ref.users -= 1
            if acquired is not None:
                await asyncio.to_thread(_take_down, *acquired)
            if isinstance(e, SnapshotError | SandboxError | OSError | TimeoutError):
                raise Unavailable(f"thawing container {instance_name} from {ref.name} failed") from e
            raise
        container = Container(
            request["namespace"], request["id"], fs.name, start, sandbox, stub, ref, reader, writer, logger,
            created, init_ms, (time.perf_counter() - t0) * 1e3,
        )  # fmt: skip
        self._watch(container)
        return container

    def _sandbox_with_stub(
        self, request: dict[str, Any], fs: Any, ref: Any, control_fd: int, log_fd: int
    ) -> tuple[Sandbox, list[Path], SandboxProcess]:
        """A sandbox of the container's own (its netns, its cgroup) and a stub in it (blocking work)."""
        pool = self.manager.sandboxes
        netns_fd = os.open(request["netns"], os.O_RDONLY | os.O_CLOEXEC) if request["netns"] else None
        created: list[Path] = []
        sandbox: Sandbox | None = None
        try:
            cgroup = None
            if request["cgroups_path"]:
                cgroup, created = oci_cgroup(pool.tree, request["cgroups_path"])
            network = None if netns_fd is not None else pool.network
            sandbox = Sandbox.create(pool.config, pool.tree, network, netns_fd=netns_fd, instance_cgroup=cgroup)
            limits = Limits(cpu=request["cpu"], memory=request["memory"])
            spec = SandboxSpec(fs.deployed.revision_dir, limits, {**GUEST_ENV, **fs.spec.env}, hostname=fs.name)
            sandbox.repurpose(spec)
            fds = ref.template.restore_fds(fs.spec.mode)  # the template's own: not ours to close
            stub = sandbox.spawn_stub(fds, control_fd, log_fd, ref.template.paged(fs.spec.mode))
            return sandbox, created, stub
        except BaseException:
            if sandbox is not None:
                _take_down(sandbox, created)
            else:
                _remove_created(created)
            raise
        finally:
            if netns_fd is not None:
                os.close(netns_fd)

    @staticmethod
    async def _not_restored(fs: Any, stub: SandboxProcess, hello: protocol.Message | None) -> str:
        """How the instance died, and why (an after-thaw hook's error: its traceback to the log)."""
        exit_ = await asyncio.to_thread(stub.wait_exit, 2.0)
        how = exit_.describe() if exit_ else "closed its channel"
        why, for_log = not_restored(hello)
        if for_log:
            fs.log.write("thawd", for_log)
        return f"the instance of {fs.name} crashed during its thaw (it {how}): {why}"

    # -- exits ---------------------------------------------------------------------------------------
    def _watch(self, container: Container) -> None:
        """Learn of the instance's exit as it happens: its pidfd turns readable."""
        loop = asyncio.get_running_loop()
        fd = container.process.pidfd

        def readable() -> None:
            loop.remove_reader(fd)
            self.reaping.add(task := asyncio.ensure_future(self._reap(container)))
            task.add_done_callback(self.reaping.discard)

        loop.add_reader(fd, readable)

    async def _reap(self, container: Container) -> None:
        exit_ = await asyncio.to_thread(container.process.wait_exit, 5.0)
        if exit_ is None:
            status = 128 + signal.SIGKILL
        elif exit_.code is not None:
            status = exit_.code
        else:
            status = 128 + (exit_.signal or 0)
        container.state, container.exit_status, container.exited_at = "stopped", status, time.time()
        container.exited.set()
        how = exit_.describe() if exit_ else "is gone"
        log.info("container %s/%s: the instance %s", container.namespace, container.id, how)

    # -- the other verbs -----------------------------------------------------------------------------
    def get(self, namespace: str, container_id: str) -> Container:
        container = self.containers.get((namespace, container_id))
        if container is None:
            raise NotFound(f"no container {namespace}/{container_id}")
        return container

    async def start(self, namespace: str, container_id: str, port: int) -> Container:
        container = self.get(namespace, container_id)
        if container.state != "created":
            raise Conflict(f"container {namespace}/{container_id} is {container.state}, not created")
        if not 1 <= port <= 65535:
            raise Invalid(f"port must be 1-65535, not {port}")
        container.writer.write(protocol.encode({"type": "serve-http", "port": port}))
        try:
            answer = await asyncio.wait_for(_recv(container.reader, self.manager.config.max_frame), SERVING_TIMEOUT)
        except (TimeoutError, protocol.ProtocolError, ConnectionError):
            answer = None
        if not answer or answer.get("type") != "serving":
            error = (answer or {}).get("error", {}).get("message") or "it did not say it serves"
            raise InstanceCrashed(f"container {namespace}/{container_id} could not serve HTTP on :{port}: {error}")
        container.state = "running"
        return container

    async def kill(self, namespace: str, container_id: str, signo: int) -> Container:
        container = self.get(namespace, container_id)
        try:
            sig = signal.Signals(signo)
        except ValueError:
            raise Invalid(f"no signal numbered {signo}") from None
        if container.exited.is_set():
            raise Conflict(f"container {namespace}/{container_id}: the instance exited already")
        with contextlib.suppress(ProcessLookupError, OSError):
            pidfd.pidfd_send_signal(container.process.pidfd, sig)
        return container

    async def wait(self, namespace: str, container_id: str) -> Container:
        container = self.get(namespace, container_id)
        await container.exited.wait()
        return container

    async def delete(self, namespace: str, container_id: str) -> Container:
        """Kill what is left, take the sandbox and its cgroups down; the template stays."""
        container = self.get(namespace, container_id)
        del self.containers[container.key]
        if not container.exited.is_set():
            with contextlib.suppress(ProcessLookupError, OSError):
                pidfd.pidfd_send_signal(container.process.pidfd, signal.SIGKILL)
            try:
                await asyncio.wait_for(container.exited.wait(), 10.0)
            except TimeoutError:
                log.warning("container %s/%s: no exit seen 10 s after SIGKILL", namespace, container_id)
        container.writer.close()
        container.log_task.cancel()
        try:
            await asyncio.to_thread(_take_down, container.sandbox, container.created_cgroups)
        finally:
            container.template.users -= 1
        if container.exit_status is None:
            container.state, container.exit_status, container.exited_at = "stopped", 128 + signal.SIGKILL, time.time()
        container.state = "deleted"
        return container

    def list(self) -> list[dict[str, Any]]:
        return [c.describe() for c in self.containers.values()]

    async def close(self) -> None:
        """thawd stops: every container's instance goes with it."""
        for namespace, container_id in list(self.containers):
            with contextlib.suppress(ThawError):
                await self.delete(namespace, container_id)


# -- helpers -------------------------------------------------------------------------------------------
def _check(body: Any) -> dict[str, Any]:
    """The POST /containers body, every field checked and named."""
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object")
    known = {"namespace", "id", "function_dir", "handler", "image", "env", "netns", "cgroups_path", "memory", "cpu"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise Invalid(f"unknown container field(s): {', '.join(unknown)}")
    out: dict[str, Any] = {"env": {}, "netns": "", "cgroups_path": "", "memory": None, "cpu": None}
    out["handler"] = "handler:handle"
    out.update(body)
    for name in ("namespace", "id"):
        if not isinstance(out.get(name), str) or not NAME_PART.fullmatch(out[name]):
            raise Invalid(f"{name} must be 1-76 of [A-Za-z0-9_.-], starting with a letter or digit")
    if not isinstance(out.get("image"), str) or not IMAGE_KEY.fullmatch(out["image"]):
        raise Invalid("image must be the image's key: 64 lowercase hex digits (sha256)")
    if not isinstance(out["handler"], str) or not HANDLER.fullmatch(out["handler"]):
        raise Invalid(f"handler must be module:callable, not {str(out['handler'])[:80]!r}")
    for name in ("function_dir", "netns", "cgroups_path"):
        if not isinstance(out.get(name), str):
            raise Invalid(f"{name} must be a string")
    directory = Path(out["function_dir"])
    if not directory.is_absolute() or not directory.is_dir():
        raise Invalid(f"function_dir {out['function_dir']!r} is not an absolute path to a directory")
    module = out["handler"].partition(":")[0].split(".")[0]
    if not (directory / f"{module}.py").is_file() and not (directory / module / "__init__.py").is_file():
        raise Invalid(f"function_dir {directory} has no module {module!r} (handler {out['handler']})")
    if out["netns"] and not Path(out["netns"]).exists():
        raise Invalid(f"network namespace {out['netns']} does not exist")
    if ".." in out["cgroups_path"].split("/"):
        raise Invalid(f"cgroups_path {out['cgroups_path']!r} must not climb with '..'")
    if not isinstance(out["env"], dict) or not all(isinstance(v, str) for v in out["env"].values()):
        raise Invalid("env must map names to strings")
    if out["memory"] is not None and (not isinstance(out["memory"], int) or out["memory"] < (4 << 20)):
        raise Invalid("memory must be a number of bytes, at least 4 MiB")
    if out["cpu"] is not None and (not isinstance(out["cpu"], int | float) or out["cpu"] <= 0):
        raise Invalid("cpu must be a positive number of cores")
    return out


def _integer(value: Any, name: str) -> int:
    """A JSON integer (4797.0 is one too, as JSON Schema counts)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise Invalid(f"{name} must be an integer")
    return int(value)


def _copy_function(source: Path, target: Path) -> None:
    """The image's function as a deploy source. requirements.txt stays behind: the image carries
    them installed, and nothing is fetched at container start (the node may have no index)."""
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("requirements.txt"))


async def _recv(reader: asyncio.StreamReader, max_frame: int) -> protocol.Message | None:
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError:
        return None
    (length,) = struct.unpack(">I", header)
    if length > max_frame:
        raise protocol.FrameTooLarge(length, max_frame)
    return protocol.decode(await reader.readexactly(length))


def systemd_path(cgroups_path: str) -> str:
    """runc's reading of systemd's "slice:prefix:name": name.scope under the slice's ancestry
    ("kubepods-burstable-pod1.slice" is /kubepods.slice/kubepods-burstable.slice/...)."""
    slice_, prefix, name = cgroups_path.split(":")
    parts: list[str] = []
    if slice_ and slice_ != "-.slice":
        stem = slice_.removesuffix(".slice")
        words = stem.split("-")
        parts = ["-".join(words[: i + 1]) + ".slice" for i in range(len(words))]
    return "/" + "/".join([*parts, f"{prefix}-{name}.scope" if prefix else f"{name}.scope"])


def oci_cgroup(tree: CgroupTree, cgroups_path: str) -> tuple[Cgroup, list[Path]]:
    """The OCI spec's cgroup in every hierarchy thaw uses, and the directories made for it."""
    relative = (systemd_path(cgroups_path) if cgroups_path.count(":") == 2 else cgroups_path).strip("/")
    created: list[Path] = []
    try:
        v1 = {c: _make(mount / relative, created, cpuset=c == "cpuset") for c, mount in tree.h.v1.items()}
        v2 = _make(tree.h.v2 / relative, created) if tree.h.v2 is not None else None
    except OSError as e:
        _remove_created(created)
        raise SandboxError(f"creating the container's cgroup {cgroups_path}: {e}") from e
    name = Path(relative).name
    if tree.mode == "v2":
        assert v2 is not None
        return V2Cgroup(v2, name), created
    if tree.mode == "v1" or v2 is None:
        return V1Cgroup(v1, name), created
    return HybridCgroup(V1Cgroup(v1, name), V2Cgroup(v2, name)), created


def _make(path: Path, created: list[Path], cpuset: bool = False) -> Path:
    """mkdir -p, recording what was made; a new cpuset level gets its parent's cpus and mems
    (an empty cpuset takes no process)."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        created.append(directory)
        if cpuset:
            for knob in ("cpuset.cpus", "cpuset.mems"):
                value = (directory.parent / knob).read_text().strip()
                (directory / knob).write_text(value)
    return path


def _remove_created(created: list[Path]) -> None:
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()


def _take_down(sandbox: Sandbox, created: list[Path]) -> None:
    try:
        sandbox.destroy()
    finally:
        _remove_created(created)


# -- the API (daemon/openapi.json: /containers) --------------------------------------------------------
def add_routes(app: Any, manager: Any) -> Containers:
    """POST/GET /containers, GET/DELETE /containers/{namespace}/{id}, and its start, kill and
    wait. Every container goes when thawd stops (its sandbox goes with thawd anyway)."""
    from aiohttp import web

    from daemon.bodies import json_body, json_response

    containers = Containers(manager)

    def ids(request: web.Request) -> tuple[str, str]:
        return request.match_info["namespace"], request.match_info["id"]

    async def create(request: web.Request) -> web.Response:
        return json_response((await containers.create(await json_body(request))).describe(), 201)

    async def list_all(request: web.Request) -> web.Response:
        return json_response(containers.list())

    async def get(request: web.Request) -> web.Response:
        return json_response(containers.get(*ids(request)).describe())

    async def start(request: web.Request) -> web.Response:
        body = await json_body(request) if request.can_read_body else {}
        port = _integer(body.get("port", 8080) if isinstance(body, dict) else None, "port")
        return json_response((await containers.start(*ids(request), port)).describe())

    async def kill(request: web.Request) -> web.Response:
        body = await json_body(request)
        signo = _integer(body.get("signal") if isinstance(body, dict) else None, "signal")
        return json_response((await containers.kill(*ids(request), signo)).describe())

    async def wait(request: web.Request) -> web.Response:
        return json_response((await containers.wait(*ids(request))).describe())

    async def delete(request: web.Request) -> web.Response:
        return json_response((await containers.delete(*ids(request))).describe())

    async def shutdown(app: web.Application) -> None:
        await containers.close()

    r = app.router
    r.add_post("/containers", create)
    r.add_get("/containers", list_all)
    r.add_get("/containers/{namespace}/{id}", get)
    r.add_delete("/containers/{namespace}/{id}", delete)
    r.add_post("/containers/{namespace}/{id}/start", start)
    r.add_post("/containers/{namespace}/{id}/kill", kill)
    r.add_get("/containers/{namespace}/{id}/wait", wait)
    app.on_shutdown.append(shutdown)
    return containers

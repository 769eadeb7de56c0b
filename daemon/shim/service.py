"""containerd's Task service (shim.proto, containerd.task.v2.Task) for thaw containers.

A container's life, and who does what:
    Create   the shim mounts the rootfs containerd hands it, reads the bundle (daemon/shim/oci.py)
             and asks thawd for an instance (POST /containers): thawd deploys the image's function
             once per image (a cold start, captured into the pool) and thaws every container from
             that template, into a sandbox that joins the pod's network namespace and the OCI
             spec's cgroup. thawd says which happened ("start": "cold" or "thawed"); the shim
             writes it on the container's stdout and in containerd's log.
    Start    thawd tells the instance to serve HTTP on 8080 (the OpenFaaS watchdog's port).
    Wait     answered when the instance exits; a waiter thread long-polls thawd for that exit
             and forwards TaskExit to containerd (daemon/shim/events.py) at that moment.
    Kill     thawd signals the instance.  Delete: thawd takes the sandbox and cgroup down, the
             shim unmounts the rootfs.  Shutdown (after every Delete): the server stays.
One server serves every container of its containerd and namespace (daemon/shim/start.py says
why): it leaves after IDLE seconds without a task or a connection, or on SIGTERM.
A pod's sandbox ("pause") container, when CRI runs it with this runtime, holds no function: the
shim keeps a sleeping process of its own as its task (its netns is CRI's, bind-mounted).
Pause, Resume, Checkpoint, Exec, ResizePty, Update and Stats answer Unimplemented.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from daemon.cli import ApiError, Client, Unreachable
from daemon.shim import events, oci
from daemon.shim.proto.containerd.runtime.task.v2 import shim_pb2
from daemon.shim.proto.containerd.types.task import task_pb2
from daemon.shim.start import NAME, THAWD_SOCKET, Flags, socket_path
from daemon.shim.ttrpc import Code, Method, RpcError, Server

log = logging.getLogger(NAME)
SERVICE = "containerd.task.v2.Task"
HTTP_PORT = 8080  # the OpenFaaS watchdog's, which faas-netes and Knative route to
CREATE_TIMEOUT = 600.0  # a first container of an image waits for its function's cold start and capture
IDLE_CHECK = 5.0  # how often the server looks whether it is idle, in seconds


def thawd() -> Client:
    return Client(os.environ.get("THAW_SOCKET", THAWD_SOCKET))


def thawd_call(method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
    """thawd's answer; its errors become RpcErrors containerd passes on, with thawd's message."""
    client = thawd()
    try:
        return client.call(method, path, body, timeout=timeout)
    except Unreachable as e:
        raise RpcError(Code.UNAVAILABLE, f"thawd is not running: {e}") from e
    except ApiError as e:
        code = {404: Code.NOT_FOUND, 409: Code.ALREADY_EXISTS, 400: Code.INVALID_ARGUMENT}.get(e.status, Code.UNKNOWN)
        raise RpcError(code, f"thawd: {e}") from e


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


@dataclass
class Task:
    id: str
    bundle: Path
    stdout: str
    status: int = task_pb2.CREATED
    pid: int = 0
    exit_status: int = 0
    exited_at: float = 0.0
    mounted: Path | None = None  # the rootfs we mounted
    holder: subprocess.Popen[bytes] | None = None  # a pod sandbox's process (no function)
    exited: threading.Event = field(default_factory=threading.Event)
    start: str = ""  # thawd's word: cold or thawed


class TaskService:
    def __init__(self, flags: Flags, on_shutdown: Callable[[], None]) -> None:
        self.flags = flags
        self.publisher = events.Publisher(flags.publish_binary, flags.address, flags.namespace)
        self.tasks: dict[str, Task] = {}
        self.lock = threading.Lock()
        self.on_shutdown = on_shutdown
        self.empty_since = time.monotonic()  # when the last task went (the idle rule)

    def methods(self) -> dict[str, Method]:
        table: dict[str, tuple[type[Message], Callable[[Any], Message]]] = {
            "Create": (shim_pb2.CreateTaskRequest, self.create),
            "Start": (shim_pb2.StartRequest, self.start),
            "State": (shim_pb2.StateRequest, self.state),
            "Wait": (shim_pb2.WaitRequest, self.wait),
            "Kill": (shim_pb2.KillRequest, self.kill),
            "Delete": (shim_pb2.DeleteRequest, self.delete),
            "Pids": (shim_pb2.PidsRequest, self.pids),
            "Connect": (shim_pb2.ConnectRequest, self.connect),
            "Shutdown": (shim_pb2.ShutdownRequest, self.shutdown),
            "CloseIO": (shim_pb2.CloseIORequest, lambda _: empty_pb2.Empty()),
        }
        methods = {f"{SERVICE}/{name}": _unary(kind, fn) for name, (kind, fn) in table.items()}
        for name in ("Pause", "Resume", "Checkpoint", "Exec", "ResizePty", "Update", "Stats"):
            methods[f"{SERVICE}/{name}"] = _unimplemented(name)
        return methods

    def _task(self, task_id: str, exec_id: str = "") -> Task:
        if exec_id:
            raise RpcError(Code.NOT_FOUND, f"exec {exec_id} of {task_id}: thaw containers have no exec processes")
        task = self.tasks.get(task_id)
        if task is None:
            raise RpcError(Code.NOT_FOUND, f"container {task_id} is not in this shim")
        return task

    def _path(self, task_id: str) -> str:
        return f"/containers/{self.flags.namespace}/{task_id}"

    # -- Create, Start ---------------------------------------------------------------------------
    def create(self, request: shim_pb2.CreateTaskRequest) -> shim_pb2.CreateTaskResponse:
        with self.lock:
            if request.id in self.tasks:
                raise RpcError(Code.ALREADY_EXISTS, f"container {request.id} exists in this shim")
        if request.checkpoint:
            raise RpcError(Code.UNIMPLEMENTED, "thaw containers cannot be created from a checkpoint")
        bundle = Path(request.bundle)
        task = Task(request.id, bundle, request.stdout)
        try:
            container = oci.read(bundle)
            task.mounted, lowerdirs = mount_rootfs(request, container.rootfs)
            if container.is_pod_sandbox:
                task.holder = subprocess.Popen(["/bin/sleep", "infinity"], stdin=subprocess.DEVNULL)
                task.pid, task.start = task.holder.pid, "pod-sandbox"
            else:
                oci.check_function(container)
                answer = thawd_call(
                    "POST", "/containers", self._create_body(request.id, container, lowerdirs), timeout=CREATE_TIMEOUT
                )
                task.pid, task.start = int(answer["pid"]), str(answer["start"])
                self._say(task, _describe_start(answer))
        except oci.BundleError as e:
            unmount(task.mounted)
            raise RpcError(Code.FAILED_PRECONDITION, str(e)) from e
        except BaseException:
            unmount(task.mounted)
            raise
        with self.lock:
            self.tasks[request.id] = task
        self.publisher.publish("/tasks/create", events.task_create(request, task.pid))
        return shim_pb2.CreateTaskResponse(pid=task.pid)

    def _create_body(self, task_id: str, container: oci.Container, lowerdirs: str) -> dict[str, Any]:
        if container.netns is None:
            raise oci.BundleError(
                "the container shares the host's network namespace (hostNetwork): a thaw instance lives in "
                "a network namespace of its own or the pod's"
            )
        return {
            "namespace": self.flags.namespace,
            "id": task_id,
            "function_dir": str(container.function_dir),
            "handler": container.handler,
            "image": oci.image_key(container, lowerdirs),
            "env": container.env,
            "netns": container.netns,
            "cgroups_path": container.cgroups_path,
            "memory": container.memory,
            "cpu": container.cpu,
        }

    def _say(self, task: Task, line: str) -> None:
        """A line on the container's stdout (what `ctr run` shows), in containerd's log (through
        the bundle's `log` fifo, which containerd copies into it for each task) and in ours."""
        log.info("%s: %s", task.id, line)
        if task.stdout and not task.stdout.startswith(("binary://", "file://")):
            _write_fifo(task.stdout, f"thaw: {line}\n")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_fifo(str(task.bundle / "log"), f"{stamp} {NAME}[{os.getpid()}] {task.id}: {line}\n")

    def start(self, request: shim_pb2.StartRequest) -> shim_pb2.StartResponse:
        task = self._task(request.id, request.exec_id)
        if task.status != task_pb2.CREATED:
            raise RpcError(Code.FAILED_PRECONDITION, f"container {task.id} was started already")
        if task.holder is None:
            thawd_call("POST", self._path(task.id) + "/start", {"port": HTTP_PORT})
            self._say(task, f"serving HTTP on :{HTTP_PORT} (pid {task.pid})")
        task.status = task_pb2.RUNNING
        threading.Thread(target=self._await_exit, args=(task,), daemon=True, name=f"wait-{task.id}").start()
        self.publisher.publish("/tasks/start", events.task_start(task.id, task.pid))
        return shim_pb2.StartResponse(pid=task.pid)

    # -- exits -----------------------------------------------------------------------------------
    def _await_exit(self, task: Task) -> None:
        """Wait for the instance's end (thawd's long poll, or our own child), then say so once."""
        if task.holder is not None:
            code = task.holder.wait()
            status = 128 - code if code < 0 else code
        else:
            try:
                answer = thawd().call("GET", self._path(task.id) + "/wait", timeout=None)  # type: ignore[arg-type]
                status = int(answer["exit_status"])
            except (ApiError, Unreachable, OSError, ValueError, KeyError) as e:
                # thawd gone (its sandboxes, the instance's included, go with it) or the container deleted
                log.warning("%s: waiting for the instance through thawd failed: %s", task.id, e)
                status = 128 + signal.SIGKILL
        self._exited(task, status)

    def _exited(self, task: Task, status: int) -> None:
        with self.lock:
            if task.exited.is_set():
                return
            task.status, task.exit_status, task.exited_at = task_pb2.STOPPED, status, time.time()
            task.exited.set()
        self.publisher.publish("/tasks/exit", events.task_exit(task.id, task.pid, status, task.exited_at))

    def wait(self, request: shim_pb2.WaitRequest) -> shim_pb2.WaitResponse:
        task = self._task(request.id, request.exec_id)
        task.exited.wait()
        return shim_pb2.WaitResponse(exit_status=task.exit_status, exited_at=timestamp(task.exited_at))

    def kill(self, request: shim_pb2.KillRequest) -> empty_pb2.Empty:
        task = self._task(request.id, request.exec_id)
        if task.exited.is_set():
            raise RpcError(Code.NOT_FOUND, f"container {task.id}: process already finished")
        if task.holder is not None:
            task.holder.send_signal(request.signal)
        elif task.status == task_pb2.CREATED:
            # Never started: no waiter runs yet, so this is where its end is learnt.
            answer = thawd_call("DELETE", self._path(task.id))
            self._exited(task, int(answer["exit_status"]))
        else:
            thawd_call("POST", self._path(task.id) + "/kill", {"signal": request.signal})
        return empty_pb2.Empty()

    # -- Delete, State, Pids, Connect, Shutdown --------------------------------------------------
    def delete(self, request: shim_pb2.DeleteRequest) -> shim_pb2.DeleteResponse:
        task = self._task(request.id, request.exec_id)
        if task.holder is not None:
            if task.holder.poll() is None:
                task.holder.kill()
            self._exited(task, 128 - (task.holder.wait()))
        else:
            try:
                answer = thawd_call("DELETE", self._path(task.id))
                self._exited(task, int(answer["exit_status"]))
            except RpcError as e:
                if e.code != Code.NOT_FOUND:
                    raise
                self._exited(task, 128 + signal.SIGKILL)  # thawd lost it (restarted): nothing of it is left
        unmount(task.mounted)
        with self.lock:
            del self.tasks[task.id]
            if not self.tasks:
                self.empty_since = time.monotonic()
        self.publisher.publish("/tasks/delete", events.task_delete(task.id, task.pid, task.exit_status, task.exited_at))
        return shim_pb2.DeleteResponse(pid=task.pid, exit_status=task.exit_status, exited_at=timestamp(task.exited_at))

    def state(self, request: shim_pb2.StateRequest) -> shim_pb2.StateResponse:
        task = self._task(request.id, request.exec_id)
        return shim_pb2.StateResponse(
            id=task.id,
            bundle=str(task.bundle),
            pid=task.pid,
            status=task_pb2.Status.Name(task.status),
            stdout=task.stdout,
            exit_status=task.exit_status,
            exited_at=timestamp(task.exited_at) if task.exited.is_set() else None,
        )

    def pids(self, request: shim_pb2.PidsRequest) -> shim_pb2.PidsResponse:
        task = self._task(request.id)
        processes = [] if task.exited.is_set() else [task_pb2.ProcessInfo(pid=task.pid)]
        return shim_pb2.PidsResponse(processes=processes)

    def connect(self, request: shim_pb2.ConnectRequest) -> shim_pb2.ConnectResponse:
        task = self.tasks.get(request.id)
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=task.pid if task else 0, version="thaw 0.1.0")

    def shutdown(self, request: shim_pb2.ShutdownRequest) -> empty_pb2.Empty:
        """containerd asks after every Delete; the server stays for the next container (the next
        `start` finds it), and leaves by the idle rule. `now` with no task left: it goes."""
        with self.lock:
            if request.now and not self.tasks:
                self.on_shutdown()
        return empty_pb2.Empty()

    def idle_for(self) -> float:
        """Seconds without a task (0 while one is held)."""
        with self.lock:
            return 0.0 if self.tasks else time.monotonic() - self.empty_since


def _write_fifo(path: str, text: str) -> None:
    with contextlib.suppress(OSError):  # gone, or full (EAGAIN): the line is in our log anyway
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)  # O_RDWR: never blocks on a fifo
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _describe_start(answer: dict[str, Any]) -> str:
    if answer["start"] == "cold":
        return (
            f"cold start: deployed {answer['function']} from the image (init {answer.get('init_ms') or 0:.0f} ms, "
            f"captured as {answer['template']}), then thawed in {answer['thaw_ms']:.1f} ms"
        )
    return f"thawed from template {answer['template']} in {answer['thaw_ms']:.1f} ms (no cold start)"


def _unary(kind: type[Message], fn: Callable[[Any], Message]) -> Method:
    def call(payload: bytes) -> bytes:
        request = kind()
        try:
            request.ParseFromString(payload)
        except DecodeError as e:
            raise RpcError(Code.INVALID_ARGUMENT, f"bad {kind.__name__}: {e}") from e
        return fn(request).SerializeToString()

    return call


def _unimplemented(name: str) -> Method:
    def call(payload: bytes) -> bytes:
        raise RpcError(Code.UNIMPLEMENTED, f"{name}: not supported by thaw containers")

    return call


# -- the rootfs ------------------------------------------------------------------------------------
def mount_rootfs(request: shim_pb2.CreateTaskRequest, target: Path) -> tuple[Path | None, str]:
    """Mount what containerd gives (an overlay of the image's snapshots, usually) on the bundle's
    rootfs, as its own shims do. Returns what was mounted and the overlay's lower layers."""
    from native import mounts
    from native.constants import MountFlag

    if not request.rootfs:
        return None, ""
    if len(request.rootfs) > 1:
        raise RpcError(Code.INVALID_ARGUMENT, f"{len(request.rootfs)} rootfs mounts: thaw takes one")
    m = request.rootfs[0]
    options = list(m.options)
    lowerdirs = next((o.partition("=")[2] for o in options if o.startswith("lowerdir=")), "")
    target.mkdir(exist_ok=True)
    try:
        if m.type == "bind" or "bind" in options or "rbind" in options:
            flags = MountFlag.BIND | (MountFlag.REC if "rbind" in options else 0)
            mounts.mount(m.source, str(target), None, flags)
            if "ro" in options:
                mounts.mount(None, str(target), None, MountFlag.BIND | MountFlag.REMOUNT | MountFlag.RDONLY)
        else:
            mounts.mount(m.source, str(target), m.type, 0, ",".join(options))
    except OSError as e:
        raise RpcError(Code.INTERNAL, f"mounting the rootfs ({m.type} {m.source}) on {target}: {e}") from e
    return target, lowerdirs


def unmount(target: Path | None) -> None:
    if target is None:
        return
    from native import mounts
    from native.constants import UmountFlag

    try:
        mounts.umount2(str(target))
    except OSError:
        with contextlib.suppress(OSError):
            mounts.umount2(str(target), UmountFlag.DETACH)


def mounted(target: Path) -> bool:
    text = Path("/proc/self/mountinfo").read_text()
    return any(line.split()[4] == str(target) for line in text.splitlines())


# -- the process -----------------------------------------------------------------------------------
def serve(flags: Flags, listen_fd: int, idle_timeout: float) -> int:
    """The resident server: the Task service on the socket `start` bound, until it has held no
    task and no connection for `idle_timeout` seconds (a `start` that found it connected, so an
    address it printed is never one that just went), or SIGTERM, or Shutdown with `now`."""
    import socket

    logging.basicConfig(
        level=logging.DEBUG if flags.debug else logging.INFO,
        format=f"%(asctime)s {NAME}[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    listener = socket.socket(fileno=listen_fd)
    done = threading.Event()
    service = TaskService(flags, done.set)
    server = Server(listener, service.methods())
    threading.Thread(target=server.serve_forever, daemon=True, name="ttrpc-accept").start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    log.info("shim server for namespace %s of containerd %s serves", flags.namespace, flags.address)
    path = socket_path(flags.address, flags.namespace)

    def idle() -> bool:
        return min(service.idle_for(), server.idle_for()) >= idle_timeout

    while not done.wait(min(idle_timeout, IDLE_CHECK)):
        if idle() and _leave_if(idle, path):
            log.info("no container for %.0f s", idle_timeout)
            break
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a `start` from now on leaves a new server
    time.sleep(0.05)  # a Shutdown reply is on its way out
    server.close()
    with contextlib.suppress(OSError):
        if Path(path + ".pid").read_text() == str(os.getpid()):
            os.unlink(path + ".pid")
    log.info("shim server for namespace %s exits", flags.namespace)
    return 0


def _leave_if(idle: Callable[[], bool], path: str) -> bool:
    """Remove the socket if the server is still idle, holding the lock `start` shares while it
    probes and prints: a start that found this server has printed, and its probe counts."""
    import fcntl

    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not idle():
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(lock)


def delete_dead(namespace: str, task_id: str, bundle: Path) -> int:
    """`delete`: containerd cleans up after a shim that died. Whatever thawd still holds of the
    container goes, the rootfs is unmounted, and a DeleteResponse goes to stdout."""
    try:
        thawd().call("DELETE", f"/containers/{namespace}/{task_id}", timeout=30.0)
    except (ApiError, Unreachable) as e:
        print(f"{NAME} delete: thawd: {e}", file=sys.stderr)
    rootfs = bundle / "rootfs"
    if mounted(rootfs):
        unmount(rootfs)
    response = shim_pb2.DeleteResponse(exit_status=128 + signal.SIGKILL, exited_at=timestamp(time.time()))
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0

"""Task events, forwarded to containerd.

containerd gives a shim two ways, and its own Go shims use the first: its ttrpc socket, named by
TTRPC_ADDRESS in the shim's environment, whose Events service's Forward takes an Envelope
(timestamp, namespace, topic, the event as a `google.protobuf.Any`); and -publish-binary, its
own binary, where `BIN --address ADDR publish --topic T --namespace NS` reads the Any on stdin.
The binary costs a process start (containerd's, ~20 ms of CPU) per event, next to the container
that is starting; so the shim forwards over ttrpc, and runs the binary only when there is no
TTRPC_ADDRESS or Forward fails. The Any's type URL is the event's full protobuf name without a
prefix ("containerd.events.TaskExit"), the form containerd's typeurl registry resolves. CRI
learns of a container's exit from /tasks/exit; `ctr events` shows them all.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
import time

from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from daemon.shim.proto.containerd.events import task_pb2 as events_pb2
from daemon.shim.proto.containerd.runtime.task.v2 import shim_pb2
from daemon.shim.proto.containerd.services.events.ttrpc.v1 import events_pb2 as forward_pb2
from daemon.shim.ttrpc import Client, FramingError, RpcError

log = logging.getLogger("containerd-shim-thaw-v2")
PUBLISH_TIMEOUT = 10.0
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"


class Publisher:
    """Events in order (a TaskExit must not overtake its TaskStart), by one worker thread, off
    the caller's thread."""

    def __init__(self, binary: str, address: str, namespace: str) -> None:
        self.binary, self.address, self.namespace = binary, address, namespace
        ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
        self.client = Client(ttrpc_address.removeprefix("unix://")) if ttrpc_address else None
        self.queue: queue.SimpleQueue[tuple[str, Message, float]] = queue.SimpleQueue()
        threading.Thread(target=self._forward_all, daemon=True, name="publish").start()

    def publish(self, topic: str, event: Message) -> None:
        self.queue.put((topic, event, time.time()))

    def _forward_all(self) -> None:
        while True:
            topic, event, at = self.queue.get()
            try:
                envelope = any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())
                if not self._forward(topic, envelope, at):
                    self._run_binary(topic, envelope)
            except Exception:  # a bug here must not stop every later event
                log.exception("publishing %s failed", topic)

    def _forward(self, topic: str, event: any_pb2.Any, at: float) -> bool:
        if self.client is None:
            return False
        envelope = forward_pb2.Envelope(timestamp=_ts(at), namespace=self.namespace, topic=topic, event=event)
        request = forward_pb2.ForwardRequest(envelope=envelope)
        try:
            self.client.call(EVENTS_SERVICE, "Forward", request.SerializeToString())
            return True
        except (OSError, FramingError, RpcError) as e:
            log.warning("forwarding %s to containerd's ttrpc socket failed (%s): the publish binary then", topic, e)
            return False

    def _run_binary(self, topic: str, envelope: any_pb2.Any) -> None:
        if not self.binary:
            return
        argv = [self.binary, "--address", self.address, "publish", "--topic", topic, "--namespace", self.namespace]
        try:
            result = subprocess.run(
                argv, input=envelope.SerializeToString(), capture_output=True, timeout=PUBLISH_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("publishing %s failed: %s", topic, e)
            return
        if result.returncode != 0:
            log.error("publishing %s failed: %s", topic, result.stderr.decode(errors="replace").strip())


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def task_create(request: shim_pb2.CreateTaskRequest, pid: int) -> events_pb2.TaskCreate:
    io = events_pb2.TaskIO(stdin=request.stdin, stdout=request.stdout, stderr=request.stderr, terminal=request.terminal)
    return events_pb2.TaskCreate(
        container_id=request.id, bundle=request.bundle, rootfs=list(request.rootfs), io=io, pid=pid
    )


def task_start(container_id: str, pid: int) -> events_pb2.TaskStart:
    return events_pb2.TaskStart(container_id=container_id, pid=pid)


def task_exit(container_id: str, pid: int, status: int, at: float) -> events_pb2.TaskExit:
    return events_pb2.TaskExit(
        container_id=container_id, id=container_id, pid=pid, exit_status=status, exited_at=_ts(at)
    )


def task_delete(container_id: str, pid: int, status: int, at: float) -> events_pb2.TaskDelete:
    return events_pb2.TaskDelete(container_id=container_id, pid=pid, exit_status=status, exited_at=_ts(at))

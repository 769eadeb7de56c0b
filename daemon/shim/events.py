"""Task events, published through containerd's publish binary.

containerd passes its own binary as -publish-binary; `BIN --address ADDR publish --topic T
--namespace NS` reads a protobuf `google.protobuf.Any` on stdin and forwards it to containerd's
event service. The Any's type URL is the event's full protobuf name without a prefix
("containerd.events.TaskExit"), the form containerd's typeurl registry resolves. CRI learns of a
container's exit from /tasks/exit; `ctr events` shows them all.
"""

from __future__ import annotations

import logging
import subprocess
import threading

from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from daemon.shim.proto.containerd.events import task_pb2 as events_pb2
from daemon.shim.proto.containerd.runtime.task.v2 import shim_pb2

log = logging.getLogger("containerd-shim-thaw-v2")
PUBLISH_TIMEOUT = 10.0


class Publisher:
    """Events in order, each by one run of the publish binary, off the caller's thread."""

    def __init__(self, binary: str, address: str, namespace: str) -> None:
        self.binary, self.address, self.namespace = binary, address, namespace
        self.lock = threading.Lock()  # one at a time: a TaskExit must not overtake its TaskStart

    def publish(self, topic: str, event: Message) -> None:
        if not self.binary:
            return
        threading.Thread(target=self._run, args=(topic, event), daemon=True, name="publish").start()

    def _run(self, topic: str, event: Message) -> None:
        envelope = any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())
        argv = [self.binary, "--address", self.address, "publish", "--topic", topic, "--namespace", self.namespace]
        with self.lock:
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

"""A ttrpc server: containerd's RPC protocol for shims, over a Unix socket.

Some facts about ttrpc (containerd/ttrpc PROTOCOL.md), the ones a unary server needs:
- Every message is a frame: a 10-byte header (4-byte big-endian data length, 4-byte big-endian
  stream id, 1-byte type, 1-byte flags) and that many bytes of data. Data over 4 MiB is refused.
- The client opens a stream with a Request frame (type 1) on an odd stream id; the data is a
  protobuf `ttrpc.Request {service, method, payload, timeout_nano, metadata}`. A unary call has
  empty flags, and the server ends the stream with one Response frame (type 2) on the same id,
  whose data is `ttrpc.Response {status (google.rpc.Status), payload}`. A status code other than
  0 is an error; containerd maps the gRPC codes (NotFound 5, Unimplemented 12...) to its own.
- Calls on one connection overlap: containerd's Wait blocks until the task exits while State,
  Kill and Delete arrive on the same socket. So every request runs in its own thread, and the
  responses are written whole under one lock (frames of two streams must not interleave).
- Streams (Data frames, type 3) serve only streaming RPCs, which the Task service has none of:
  a Data frame or a non-unary request is answered with Unimplemented.
- The shim is a client too: containerd's own ttrpc socket (TTRPC_ADDRESS in the shim's
  environment) serves the Events service, whose Forward takes the shim's task events.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from enum import IntEnum

from daemon.shim.proto.google.rpc import status_pb2
from daemon.shim.proto.ttrpc import request_pb2

log = logging.getLogger("containerd-shim-thaw-v2")
HEADER = struct.Struct(">IIBB")
MAX_DATA = 4 << 20


class FrameType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Code(IntEnum):
    """gRPC status codes, as containerd's errdefs reads them."""

    OK = 0
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class RpcError(Exception):
    """An error answered to the caller as a ttrpc status: `code` and the message."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


class FramingError(Exception):
    """The peer broke the framing: the connection is closed."""


Method = Callable[[bytes], bytes]  # the request's payload in, the response's payload out (protobuf)


def read_frame(sock: socket.socket) -> tuple[int, FrameType, int, bytes] | None:
    """(stream id, type, flags, data), or None at a clean end of the connection."""
    header = _read_exact(sock, HEADER.size)
    if header is None:
        return None
    length, stream, kind, flags = HEADER.unpack(header)
    if length > MAX_DATA:
        raise FramingError(f"frame of {length} bytes on stream {stream} exceeds ttrpc's {MAX_DATA}-byte maximum")
    data = _read_exact(sock, length) if length else b""
    if data is None:
        raise FramingError(f"connection closed inside a frame on stream {stream}")
    try:
        return stream, FrameType(kind), flags, data
    except ValueError:
        raise FramingError(f"unknown frame type {kind} on stream {stream}") from None


def frame(stream: int, kind: FrameType, data: bytes, flags: int = 0) -> bytes:
    if len(data) > MAX_DATA:
        raise FramingError(f"frame of {len(data)} bytes exceeds ttrpc's {MAX_DATA}-byte maximum")
    return HEADER.pack(len(data), stream, kind, flags) + data


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            if got == 0:
                return None
            raise FramingError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _code(value: int) -> Code:
    try:
        return Code(value)
    except ValueError:  # one this shim never answers with (DeadlineExceeded...): its message says the rest
        return Code.UNKNOWN


class Client:
    """Unary calls on one connection, one at a time, reconnecting once if the peer hung up."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path, self.timeout = path, timeout
        self.sock: socket.socket | None = None
        self.stream = 1  # a client's streams are odd
        self.lock = threading.Lock()

    def call(self, service: str, method: str, payload: bytes) -> bytes:
        """The response's payload; RpcError with the peer's status, OSError or FramingError if
        the connection fails twice."""
        with self.lock:
            try:
                return self._call(service, method, payload)
            except (OSError, FramingError):
                self.close()
                return self._call(service, method, payload)

    def _call(self, service: str, method: str, payload: bytes) -> bytes:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(self.path)
        stream, self.stream = self.stream, self.stream + 2
        request = request_pb2.Request(service=service, method=method, payload=payload)
        self.sock.sendall(frame(stream, FrameType.REQUEST, request.SerializeToString()))
        while (got := read_frame(self.sock)) is not None:
            if got[0] == stream and got[1] == FrameType.RESPONSE:
                response = request_pb2.Response.FromString(got[3])
                if response.status.code != Code.OK:
                    raise RpcError(_code(response.status.code), response.status.message)
                return response.payload
        raise FramingError(f"{self.path} closed the connection before answering {method}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Server:
    """Serve `methods` ({"containerd.task.v2.Task/Create": fn, ...}) on a listening Unix socket."""

    def __init__(self, listener: socket.socket, methods: dict[str, Method]) -> None:
        self.listener, self.methods = listener, methods
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.quiet_since = time.monotonic()  # when the last connection closed

    def idle_for(self) -> float:
        """Seconds without an open connection (0 while one is open)."""
        with self.lock:
            return 0.0 if self.connections else time.monotonic() - self.quiet_since

    def serve_forever(self) -> None:
        """Accept connections until close(); each is read by its own thread."""
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self.closed.is_set():
                    return
                raise
            with self.lock:
                self.connections.add(conn)
            threading.Thread(target=self._connection, args=(conn,), daemon=True, name="ttrpc-conn").start()

    def close(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _connection(self, conn: socket.socket) -> None:
        write_lock = threading.Lock()
        try:
            while (got := read_frame(conn)) is not None:
                stream, kind, flags, data = got
                if kind != FrameType.REQUEST or flags:
                    what = "stream data" if kind != FrameType.REQUEST else "a streaming request"
                    self._respond(conn, write_lock, stream, None, RpcError(Code.UNIMPLEMENTED, f"{what}: not served"))
                    continue
                threading.Thread(
                    target=self._call, args=(conn, write_lock, stream, data), daemon=True, name="ttrpc-call"
                ).start()
        except (FramingError, OSError) as e:
            if not self.closed.is_set():
                log.warning("ttrpc connection dropped: %s", e)
        finally:
            with self.lock:
                self.connections.discard(conn)
                self.quiet_since = time.monotonic()
            conn.close()

    def _call(self, conn: socket.socket, write_lock: threading.Lock, stream: int, data: bytes) -> None:
        request = request_pb2.Request()
        t0 = time.perf_counter()
        try:
            request.ParseFromString(data)
            name = f"{request.service}/{request.method}"
            method = self.methods.get(name)
            if method is None:
                raise RpcError(Code.UNIMPLEMENTED, f"{name} is not implemented by containerd-shim-thaw-v2")
            payload, error = method(request.payload), None
            log.debug("%s answered in %.1f ms", request.method, (time.perf_counter() - t0) * 1e3)
        except RpcError as e:
            payload, error = None, e
        except Exception as e:  # a bug here must not kill the shim: containerd gets it as an error
            log.exception("ttrpc call on stream %d failed", stream)
            payload, error = None, RpcError(Code.INTERNAL, f"{type(e).__name__}: {e}")
        self._respond(conn, write_lock, stream, payload, error)

    @staticmethod
    def _respond(
        conn: socket.socket, write_lock: threading.Lock, stream: int, payload: bytes | None, error: RpcError | None
    ) -> None:
        response = request_pb2.Response()
        if error is not None:
            response.status.CopyFrom(status_pb2.Status(code=error.code, message=str(error)))
        else:
            response.payload = payload or b""
        data = frame(stream, FrameType.RESPONSE, response.SerializeToString())
        with write_lock, contextlib.suppress(OSError):  # a caller that hung up takes no answer
            conn.sendall(data)

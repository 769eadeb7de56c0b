"""The guest protocol: what the daemon and a guest say to each other on the guest's fd 3.

Frames are a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. The maximum
frame size is a setting (default 6 MiB, like common FaaS payload limits); a sender refuses to
build a larger frame and a receiver refuses to read one, so an oversized request never reaches
a guest. Bodies travel base64-encoded (JSON has no bytes).

Messages (the `type` field):
    ready                              guest: init done, about to stop itself for capture
    restored {pid}                     guest: running again (after restore or resume), its pid
    request {id, method, path, query, headers, body}      daemon -> guest
    response {id, statusCode, headers, body}              guest -> daemon
    error {id, error: {type, message, traceback}}         guest -> daemon: the handler raised
    preload {modules}                  daemon -> a runtime's instance: import these, park again (runtime.py)
    load {function_dir, handler, site_dir, env}   daemon -> a runtime's instance: become this function
    serve-http {port}                  daemon -> instance: serve HTTP on `port` from now on (httpmode.py)
    serving {port, pid}                instance: listening; fd 3 carries nothing more
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any

DEFAULT_MAX_FRAME = 6 << 20
_HEADER = struct.Struct(">I")

Message = dict[str, Any]


class ProtocolError(Exception):
    """The peer broke the framing (short read, bad JSON, a frame over the limit)."""


class FrameTooLarge(ProtocolError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {limit}-byte limit")
        self.size, self.limit = size, limit


def encode(message: Message, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > max_frame:
        raise FrameTooLarge(len(data), max_frame)
    return _HEADER.pack(len(data)) + data


def send(fd: int, message: Message, max_frame: int = DEFAULT_MAX_FRAME) -> None:
    view = memoryview(encode(message, max_frame))
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise ProtocolError(f"peer closed the connection after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(fd: int, max_frame: int = DEFAULT_MAX_FRAME) -> Message | None:
    """The next message, or None at a clean end of stream."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > max_frame:
        raise FrameTooLarge(size, max_frame)
    data = _read_exact(fd, size)
    if data is None:
        raise ProtocolError("peer closed the connection between a frame's header and its body")
    return decode(data)


def decode(data: bytes) -> Message:
    """A frame's body as a message."""
    try:
        message = json.loads(data)
    except ValueError as e:
        raise ProtocolError(f"frame is not JSON: {e}") from e
    except RecursionError:  # a hostile guest's [[[[...]]]]: a bad frame, not the daemon's problem
        raise ProtocolError("frame is JSON nested too deeply") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("frame is not a message (a JSON object with a 'type')")
    return message


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)

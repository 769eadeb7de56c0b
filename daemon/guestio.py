"""Talking to a guest or an instance on its fd 3 (DESIGN.md, "Guest protocol"): the channel, the
request frame an invocation becomes, and what a reply or a failed thaw says."""

from __future__ import annotations

import asyncio
import re
import socket
from dataclasses import dataclass, field

from daemon.errors import TooLarge
from sandbox.guest import protocol

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,80}")


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


def request_frame(request: Invocation, number: int, max_frame: int) -> bytes:
    """The request as one frame; TooLarge (413) before it reaches any guest."""
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
        return protocol.encode(message, max_frame)
    except protocol.FrameTooLarge as e:
        raise TooLarge(f"the request is too large: {e}") from e


def request_id(headers: dict[str, str], number: int) -> str:
    """The caller's X-Call-Id (what the OpenFaaS gateway sends) when it is a sane token, else ours."""
    given = next((v for k, v in headers.items() if k.lower() == "x-call-id"), "")
    return given if REQUEST_ID.fullmatch(given) else f"thaw-{number}"


def not_restored(hello: protocol.Message | None) -> tuple[str, str]:
    """Why a thawed instance did not say RESTORED, and what of it goes to the function's log
    (an after-thaw hook's traceback), or "" for nothing."""
    if hello and hello.get("type") == "error":
        error = hello.get("error") or {}
        for_log = f"after the thaw: {error.get('traceback') or error.get('message')}"
        return f"the instance failed after the thaw: {error.get('type')}: {error.get('message')}", for_log
    return f"the restored instance said {hello} instead of RESTORED", ""

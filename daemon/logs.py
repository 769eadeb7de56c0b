"""Per-function logs: what instances write on fds 0-2, line by line.

Each instance's stdout and stderr are one pipe the daemon reads (`follow_pipe`). Lines go to the
function's log file as JSON lines (`{"timestamp", "instance", "text"}`, the OpenFaaS log message
shape without name/namespace), into a ring of recent lines, and to live followers (`thaw logs -f`,
the gateway's `/system/logs?follow=true`). The file is rotated once it passes `MAX_FILE` bytes.

A follower is a client on the other end of a socket, and it may stop reading while the function
keeps logging: each has a buffer of at most `FOLLOW_BUFFER` lines (the HTTP side waits for the
socket to drain, so lines pile up here). A follower that falls further behind loses its oldest
lines, and the next line it reads is a marker (`"dropped": N`) saying how many: memory stays
bounded whoever follows, and a slow reader still sees the newest lines and knows what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
from collections import deque
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

MAX_FILE = 16 << 20
RING = 2000
MAX_LINE = 16 << 10
FOLLOW_BUFFER = 1000


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Follower:
    """One live reader's lines not yet read: at most `limit`, the oldest dropped and counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(limit)  # None: the log closed
        self.dropped = 0

    def put(self, entry: dict[str, Any] | None) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(entry)

    def marker(self) -> dict[str, Any]:
        """The line that stands for the lines dropped since the last marker (and resets the count)."""
        count, self.dropped = self.dropped, 0
        text = f"{count} log lines dropped: this reader fell more than {self.limit} lines behind"
        return {"timestamp": _timestamp(), "instance": "thawd", "text": text, "dropped": count}


class FunctionLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.ring: deque[dict[str, Any]] = deque(maxlen=RING)
        self.followers: set[_Follower] = set()
        self.closed = False
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the function
        self._load_tail()

    def _load_tail(self) -> None:
        """After a restart, `thaw logs` still shows what was logged before it."""
        with contextlib.suppress(OSError), open(self.path, errors="replace") as f:
            for line in deque(f, maxlen=RING):
                with contextlib.suppress(ValueError):
                    self.ring.append(json.loads(line))

    def write(self, instance: str, text: str) -> None:
        entry = {"timestamp": _timestamp(), "instance": instance, "text": text}
        self.ring.append(entry)
        self.file.write(json.dumps(entry) + "\n")
        if self.file.tell() > MAX_FILE:
            self._rotate()
        for follower in self.followers:
            follower.put(entry)

    def _rotate(self) -> None:
        self.file.close()
        os.replace(self.path, self.path.with_suffix(".1"))
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115

    def recent(self, tail: int | None = None, since: datetime.datetime | None = None) -> list[dict[str, Any]]:
        entries = list(self.ring)
        if since is not None:
            entries = [e for e in entries if _parse_time(e["timestamp"]) >= since]
        if tail is not None:
            entries = entries[-tail:] if tail > 0 else []
        return entries

    async def follow(self, buffer: int = FOLLOW_BUFFER) -> AsyncGenerator[dict[str, Any], None]:
        """New lines as they are written; `buffer` lines at most wait for a slow reader."""
        if self.closed:
            return
        follower = _Follower(buffer)
        self.followers.add(follower)
        try:
            while True:
                entry = await follower.queue.get()
                # Drops take the oldest lines, so every line dropped so far was older than this one:
                # the marker goes where the gap is.
                if follower.dropped:
                    yield follower.marker()
                if entry is None:
                    return
                yield entry
        finally:
            self.followers.discard(follower)

    def close(self) -> None:
        """Followers end (their streams end as at the end of a log), so that neither a deleted
        function nor a stopping thawd waits for a follower that may never see another line."""
        self.closed = True
        for follower in self.followers:
            follower.put(None)
        self.file.close()


def _parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


async def follow_pipe(fd: int, log: FunctionLog, instance: str) -> None:
    """Read `fd` (the read end of an instance's log pipe) into `log` until every writer closed it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # a line over the limit: keep what fits, drop the rest of it
                line = await reader.read(MAX_LINE)
            if not line:
                return
            log.write(instance, line.decode(errors="replace").rstrip("\n"))
    finally:
        transport.close()

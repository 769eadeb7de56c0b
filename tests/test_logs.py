"""Function logs (daemon/logs.py): a log file of JSON lines, the recent ring, and live followers
whose buffers stay bounded however slowly they read."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from daemon.logs import FOLLOW_BUFFER, FunctionLog


def test_a_follower_that_does_not_read_holds_a_bounded_buffer_then_sees_what_it_missed(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], int]:
        log = FunctionLog(tmp_path / "f.log")
        follower = log.follow()
        first = asyncio.ensure_future(anext(follower))  # following from now on; not reading yet
        await asyncio.sleep(0)
        lines = 10 * FOLLOW_BUFFER
        for i in range(lines):
            log.write("f-1", f"line {i}")
        (held,) = log.followers
        assert held.queue.qsize() == FOLLOW_BUFFER  # not 10 x: the rest was dropped
        seen = [await first]
        while seen[-1].get("text") != f"line {lines - 1}":
            seen.append(await asyncio.wait_for(anext(follower), 5))
        await follower.aclose()
        assert not log.followers  # a follower that goes takes its buffer along
        log.close()
        return seen, lines

    seen, lines = asyncio.run(scenario())
    # The marker first (the oldest lines went), then the newest lines in order.
    marker, dropped = seen[0], lines - FOLLOW_BUFFER
    assert marker["dropped"] == dropped and marker["instance"] == "thawd"
    assert f"{dropped} log lines dropped" in marker["text"]
    assert [e["text"] for e in seen[1:]] == [f"line {i}" for i in range(dropped, lines)]
    # The file keeps every line: only the slow follower lost some.
    written = [json.loads(line)["text"] for line in (tmp_path / "f.log").read_text().splitlines()]
    assert written == [f"line {i}" for i in range(lines)]


def test_a_follower_that_keeps_up_loses_nothing_and_sees_no_marker(tmp_path: Path) -> None:
    async def scenario() -> list[dict[str, Any]]:
        log = FunctionLog(tmp_path / "f.log")
        follower = log.follow(buffer=4)
        pending = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0)
        seen = []
        for i in range(50):
            log.write("f-1", f"line {i}")
            if i % 4 == 3:  # reads a buffer's worth at a time: always in time
                seen.append(await pending)
                seen += [await anext(follower) for _ in range(3)]
                pending = asyncio.ensure_future(anext(follower))
                await asyncio.sleep(0)
        pending.cancel()
        log.close()
        return seen

    seen = asyncio.run(scenario())
    assert [e["text"] for e in seen] == [f"line {i}" for i in range(48)]


def test_drops_are_counted_afresh_after_each_marker(tmp_path: Path) -> None:
    async def scenario() -> list[dict[str, Any]]:
        log = FunctionLog(tmp_path / "f.log")
        follower = log.follow(buffer=2)
        first = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0)
        for i in range(5):  # 0, 1, 2 dropped; 3, 4 held
            log.write("f-1", f"line {i}")
        seen = [await first, await anext(follower), await anext(follower)]
        for i in range(5, 9):  # 5, 6 dropped; 7, 8 held
            log.write("f-1", f"line {i}")
        seen += [await anext(follower) for _ in range(3)]
        await follower.aclose()
        log.close()
        return seen

    seen = asyncio.run(scenario())
    assert [e.get("dropped", e["text"]) for e in seen] == [3, "line 3", "line 4", 2, "line 7", "line 8"]


def test_closing_the_log_ends_its_followers(tmp_path: Path) -> None:
    """A deleted function, or a thawd stopping, must not wait for a follower that may never see
    another line: its stream ends, after the lines it had not read yet."""

    async def scenario() -> list[dict[str, Any]]:
        log = FunctionLog(tmp_path / "f.log")
        follower = log.follow()
        pending = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0)
        log.write("f-1", "last words")
        log.close()
        seen = [await pending]
        seen += [entry async for entry in follower]
        assert not log.followers
        assert [entry async for entry in log.follow()] == []  # following a closed log ends at once
        return seen

    assert [e["text"] for e in asyncio.run(scenario())] == ["last words"]

"""The `thaw` CLI: what it imports to start, its tables, and following logs; and log followers
that stop reading, through a real thawd."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.logs import FOLLOW_BUFFER
from tests.guests import REPO
from tests.thawd import Thawd, write_function

# What a quick command must not load: each costs tens of milliseconds before anything is done.
# snapshot.vocabulary (the restore modes and codecs, for --help) is standard library only.
HEAVY = {"aiohttp", "rich", "asyncio", "shmpool", "native", "snapshot", "sandbox", "yarl", "multidict"}
LIGHT = {"snapshot", "snapshot.vocabulary"}
LONG_NAME = "a-function-name-as-long-as-thaw-allows-sixty-three-characters-x"
assert len(LONG_NAME) == 63  # the longest name thawd takes
SPEW = """
import sys
def handle(event, context):
    tag, n = event.path.strip("/") or "line", int(event.body or b"1")
    for i in range(n):
        print(f"{tag} {i} " + "x" * 80)
    sys.stdout.flush()
    return {"lines": n}
"""


def _imported_at_start(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Runs `python -X importtime -m daemon.cli ARGV`: its result and the top-level packages it
    imported (but for the LIGHT modules)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "daemon.cli", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", result.stderr, re.MULTILINE)
    assert names, result.stderr  # -X importtime spoke
    return result, {name.split(".")[0] for name in names if name not in LIGHT}


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["invoke", "--help"],
        ["--socket", "/nonexistent/thaw.sock", "ls"],
        ["--socket", "/nonexistent/thaw.sock", "invoke", "f", "--data", "{}"],
        ["--socket", "/nonexistent/thaw.sock", "logs", "f", "-f"],
    ],
)
def test_quick_commands_start_without_heavy_imports(argv: list[str]) -> None:
    result, packages = _imported_at_start(*argv)
    assert result.returncode in (0, 69), result.stderr[-2000:]  # 69: no thawd there, after the imports
    assert packages & HEAVY == set()


def test_unreachable_thawd_is_exit_69_with_the_socket_named() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--socket", "/nonexistent/thaw.sock", "ls"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 69
    assert "cannot reach thawd at /nonexistent/thaw.sock" in result.stderr and "is thawd running?" in result.stderr


# -- through a real thawd ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def thawd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thawd]:
    with Thawd(tmp_path_factory.mktemp("thawd"), "thawc1", "10.239.0.0/24", sandboxes_prewarm=1).serving() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def spew(thawd: Thawd, tmp_path_factory: pytest.TempPathFactory) -> str:
    thawd.deploy(LONG_NAME, write_function(tmp_path_factory.mktemp("spew"), SPEW), timeout=60)
    return LONG_NAME


def _narrow_cli(thawd: Thawd, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with its output in a pipe and a terminal width of 20 columns said."""
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--socket", str(thawd.socket), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "20"},
    )


@pytest.mark.privileged
def test_ls_and_instances_never_cut_a_name(thawd: Thawd, spew: str) -> None:
    assert thawd.invoke(spew, 1)[0] == 200
    listed = _narrow_cli(thawd, "ls")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(spew))
    assert row.split()[:3] == [spew, "ready", "handler:handle"]  # whole, and one row per line
    instances = _narrow_cli(thawd, "instances", spew)
    (instance,) = thawd.api("GET", f"/instances?function={spew}")[1]["instances"]
    assert re.search(rf"^{instance['id']}\s+{spew}\s", instances.stdout, re.MULTILINE), instances.stdout
    as_json = json.loads(_narrow_cli(thawd, "ls", "--json").stdout)
    assert [f["name"] for f in as_json["functions"]] == [spew]


def _lines_of(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.privileged
def test_logs_follow_prints_new_lines_as_they_come(thawd: Thawd, spew: str) -> None:
    argv = [sys.executable, "-m", "daemon.cli", "--socket", str(thawd.socket), "logs", spew, "-f", "--tail", "0"]
    follower = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _lines_of(follower)
        seen = ""
        for attempt in range(60):  # until the follower is following: it sees a line logged after it started
            assert thawd.invoke(spew, 1, path=f"/follow-{attempt}")[0] == 200
            with contextlib.suppress(queue.Empty):
                seen = lines.get(timeout=1)
                break
        assert re.search(rf" {spew}-\d+: follow-\d+ 0 x+$", seen), seen
        assert follower.poll() is None  # still following
    finally:
        follower.terminate()
        follower.wait(30)


class _Follower:
    """GET /functions/NAME/logs?follow=true over the Unix socket, read only when asked to."""

    def __init__(self, thawd: Thawd, name: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for us
        sock.settimeout(60)  # a broken stream fails the test instead of hanging it
        sock.connect(str(thawd.socket))
        self.connection = http.client.HTTPConnection("thawd")
        self.connection.sock = sock
        self.connection.request("GET", f"/functions/{name}/logs?follow=true&tail=0")
        self.response: http.client.HTTPResponse | None = None

    def next(self) -> dict[str, Any]:
        if self.response is None:  # thawd sends its headers with the first line
            self.response = self.connection.getresponse()
            assert self.response.status == 200
        entry: dict[str, Any] = json.loads(self.response.readline())
        return entry


def _wait_logged(thawd: Thawd, name: str, text: str) -> None:
    """Until thawd has read `text` from the instance's pipe into the log (a bounded number of looks)."""
    for _ in range(600):
        status, tail = thawd.api("GET", f"/functions/{name}/logs?tail=1")
        if status == 200 and tail and json.loads(tail)["text"].startswith(text):
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"{text!r} never reached {name}'s log")


@pytest.mark.privileged
def test_a_follower_that_stops_reading_loses_lines_counted_in_a_marker(thawd: Thawd, spew: str) -> None:
    follower = _Follower(thawd, spew)
    try:
        first: queue.Queue[dict[str, Any]] = queue.Queue()
        reader = threading.Thread(target=lambda: first.put(follower.next()), daemon=True)
        reader.start()
        for attempt in range(60):  # until it is following: it reads a line logged after it came
            assert thawd.invoke(spew, 1, path=f"/ready-{attempt}")[0] == 200
            with contextlib.suppress(queue.Empty):
                assert first.get(timeout=1)["text"].startswith("ready-")
                break
        reader.join()
        # Not reading now: far more lines than the socket's buffers and the follower's buffer hold.
        lines = 50 * FOLLOW_BUFFER
        assert thawd.invoke(spew, lines, path="/line")[1] == {"lines": lines}
        _wait_logged(thawd, spew, f"line {lines - 1} ")
        # Now reading: what was in the pipes, then the marker, then the newest lines.
        numbers: list[int] = []
        dropped: list[int] = []
        while not numbers or numbers[-1] != lines - 1:
            entry = follower.next()
            if "dropped" in entry:
                dropped.append(entry["dropped"])
                assert entry["instance"] == "thawd" and f"{entry['dropped']} log lines dropped" in entry["text"]
            elif entry["text"].startswith("line "):
                numbers.append(int(entry["text"].split()[1]))
        assert dropped and sum(dropped) == lines - len(numbers)
        assert numbers == sorted(set(numbers))  # in order, none twice
        assert len(numbers) < lines // 2
    finally:
        follower.connection.close()


@pytest.mark.privileged
def test_deleting_a_function_ends_its_log_followers(thawd: Thawd, tmp_path: Path) -> None:
    thawd.deploy("gone", write_function(tmp_path / "gone", SPEW))
    argv = [sys.executable, "-m", "daemon.cli", "--socket", str(thawd.socket), "logs", "gone", "-f", "--tail", "0"]
    follower = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _lines_of(follower)
        for attempt in range(60):  # until it is following
            assert thawd.invoke("gone", 1, path=f"/before-{attempt}")[0] == 200
            with contextlib.suppress(queue.Empty):
                lines.get(timeout=1)
                break
        thawd.remove("gone")
        assert follower.wait(30) == 0  # the stream ended as a log ends; not a lost connection
    finally:
        follower.kill()
        follower.wait()

"""The guest program and its protocol, run as a real process on a real socket (the warm path:
the stopped guest is resumed with SIGCONT instead of being captured and restored)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sandbox.guest import protocol

HANDLER = """
import json, os, random
STATE = {"loaded": [i * i for i in range(1000)]}   # module level: the function's init
def init():
    STATE["init_ran"] = True
def handle(event, context):
    if event.path == "/boom":
        raise ValueError("the handler failed on purpose")
    if event.path == "/plain":
        return {"sum": sum(STATE["loaded"]), "init": STATE["init_ran"]}
    return {
        "statusCode": 201,
        "headers": {"X-Pid": str(context.pid)},
        "body": json.dumps({"echo": event.body.decode(), "method": event.method, "query": event.query,
                            "random": random.random()}),
    }
"""


@pytest.fixture
def function_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fn"
    d.mkdir()
    (d / "handler.py").write_text(HANDLER)
    return d


def launch_guest(function_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the guest with one end of a socketpair as its fd 3 (via the shell's redirection)."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [
            "sh",
            "-c",
            'exec "$@" 3<&0 </dev/null',
            "sh",
            sys.executable,
            "-m",
            "sandbox.guest",
            str(function_dir),
            *extra,
        ],
        stdin=theirs.fileno(),
        stderr=subprocess.PIPE,
    )
    theirs.close()
    return proc, ours


@pytest.fixture
def guest(function_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    proc, sock = launch_guest(function_dir)
    yield proc, sock
    sock.close()
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 10
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, "guest did not stop itself"
        time.sleep(0.005)


def _request(sock: socket.socket, rid: int, path: str, body: bytes = b"") -> protocol.Message:
    protocol.send(sock.fileno(), {"type": "request", "id": rid, "method": "POST", "path": path,
                                  "query": {"q": "1"}, "headers": {}, "body": protocol.b64(body)})  # fmt: skip
    reply = protocol.recv(sock.fileno())
    assert reply is not None
    return reply


def test_guest_parks_after_init_and_serves_after_resume(guest: tuple[subprocess.Popen[bytes], socket.socket]) -> None:
    proc, sock = guest
    assert protocol.recv(sock.fileno()) == {"type": "ready"}
    _wait_stopped(proc.pid)
    os.kill(proc.pid, signal.SIGCONT)
    assert protocol.recv(sock.fileno()) == {"type": "restored", "pid": proc.pid}

    reply = _request(sock, 1, "/echo", b"hello")
    assert reply["type"] == "response" and reply["id"] == 1 and reply["statusCode"] == 201
    assert reply["headers"] == {"X-Pid": str(proc.pid)}
    body = json.loads(protocol.unb64(reply["body"]))
    assert body["echo"] == "hello" and body["method"] == "POST" and body["query"] == {"q": "1"}

    plain = _request(sock, 2, "/plain")
    assert plain["statusCode"] == 200 and plain["headers"]["Content-Type"] == "application/json"
    assert json.loads(protocol.unb64(plain["body"])) == {"sum": sum(i * i for i in range(1000)), "init": True}

    err = _request(sock, 3, "/boom")
    assert err["type"] == "error" and err["id"] == 3
    assert err["error"]["type"] == "ValueError" and "on purpose" in err["error"]["message"]
    assert "Traceback" in err["error"]["traceback"]

    sock.shutdown(socket.SHUT_WR)  # the daemon hangs up: the guest exits cleanly
    assert proc.wait(timeout=10) == 0


def test_guest_refuses_a_missing_function_directory(tmp_path: Path) -> None:
    proc, sock = launch_guest(tmp_path / "nowhere")
    try:
        assert proc.wait(timeout=30) != 0
        assert proc.stderr is not None and b"does not exist" in proc.stderr.read()
    finally:
        sock.close()


def test_guest_without_fd3_says_so(function_dir: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "sandbox.guest", str(function_dir)], capture_output=True, timeout=30)
    assert run.returncode == 2 and b"fd 3" in run.stderr


def test_frames_over_the_limit_are_refused_both_ways() -> None:
    with pytest.raises(protocol.FrameTooLarge, match="exceeds the 100-byte limit"):
        protocol.encode({"type": "request", "body": "x" * 200}, max_frame=100)
    a, b = socket.socketpair()
    try:
        a.sendall(struct.pack(">I", 7 << 20))  # a peer announcing more than the default 6 MiB
        with pytest.raises(protocol.FrameTooLarge):
            protocol.recv(b.fileno())
        a.sendall(struct.pack(">I", 5) + b"nope!")
        with pytest.raises(protocol.ProtocolError, match="not JSON"):
            protocol.recv(b.fileno())
        a.sendall(struct.pack(">I", 10) + b"{}")
        a.close()
        with pytest.raises(protocol.ProtocolError, match="closed"):
            protocol.recv(b.fileno())
    finally:
        b.close()


def test_roundtrip_of_a_frame_near_the_limit() -> None:
    a, b = socket.socketpair()
    try:
        body = os.urandom(3 << 20)  # larger than the socket buffer: send from a thread while we read
        t = threading.Thread(target=protocol.send, args=(a.fileno(), {"type": "request", "body": protocol.b64(body)}))
        t.start()
        got = protocol.recv(b.fileno())
        t.join()
        assert got is not None and protocol.unb64(got["body"]) == body
    finally:
        a.close()
        b.close()


def test_a_frame_nested_too_deeply_is_a_protocol_error() -> None:
    """A hostile guest's reply cannot crash the daemon's reader with a RecursionError."""
    with pytest.raises(protocol.ProtocolError, match="nested too deeply"):
        protocol.decode(b"[" * 100_000 + b"]" * 100_000)

"""`python -m snapshot demo`: thaw's main job, shown end to end without the daemon.

Creates (or attaches) the pool, starts a guest running a small function whose init builds 64 MiB
of state, captures it into a template, kills it, and thaws instances from the template in every
mode, printing the time to first reply of each, then a cold start of the same function for
comparison. Uses snapshot's own stub launcher (no sandbox) and leaves the pool as it found it.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sandbox.guest import protocol
from shmpool import Pool
from snapshot import procfs
from snapshot.capture import capture
from snapshot.restore import restore
from snapshot.stub import launch_stub
from snapshot.template import MODES, Template

FUNCTION = """
import hashlib, random
STATE = bytearray(random.Random(42).randbytes(1 << 20)) * 64      # init: 64 MiB of state
DIGEST = hashlib.sha256(STATE[:1 << 20]).hexdigest()[:16]
def handle(event, context):
    return {"pid": context.pid, "digest": DIGEST, "random": random.random()}
"""
TEMPLATE = "quickstart-demo"


def _recv(sock: socket.socket, timeout: float = 60) -> Any:
    if not select.select([sock], [], [], timeout)[0]:
        raise RuntimeError(f"no answer within {timeout} s")
    return protocol.recv(sock.fileno())


def _ask(sock: socket.socket) -> Any:
    protocol.send(sock.fileno(), {"type": "request", "id": 1, "path": "/", "body": ""})
    reply = _recv(sock)
    return protocol.unb64(reply["body"]).decode()


def _start_guest(function_dir: Path) -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair()
    popen = subprocess.Popen(
        ["sh", "-c", 'exec "$@" 3<&0 </dev/null', "sh", sys.executable, "-m", "sandbox.guest", str(function_dir)],
        stdin=theirs.fileno(),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    theirs.close()
    if _recv(ours) != {"type": "ready"}:
        raise RuntimeError("the guest did not say READY")
    while procfs.state(popen.pid) != "T":
        time.sleep(0.001)
    return popen, ours


def run_demo(root: str, node: int, size: int, runs: int) -> None:
    pool = Pool.open_or_create(root, backend="tmpfs", node=node, size=size)
    print(f"pool {root}: {pool.config.backend} on node {pool.config.node}")
    with tempfile.TemporaryDirectory(prefix="thaw-demo-") as tmp:
        function_dir = Path(tmp)
        (function_dir / "handler.py").write_text(FUNCTION)
        t0 = time.perf_counter()
        popen, sock = _start_guest(function_dir)
        print(f"  - guest started, imported and initialized in {(time.perf_counter() - t0) * 1e3:.0f} ms; it parked")
        try:
            t0 = time.perf_counter()
            template = capture(popen.pid, pool, TEMPLATE)
            m = template.manifest
            print(
                f"  - captured pid {popen.pid} into template {TEMPLATE!r} "
                f"in {(time.perf_counter() - t0) * 1e3:.0f} ms: "
                f"{len(m.vmas)} VMAs, {m.data_bytes >> 20} MiB of pages, {len(m.files)} files re-mapped"
            )
            os.kill(popen.pid, signal.SIGCONT)  # the original goes on as a cold start would
            _recv(sock)
            t0 = time.perf_counter()
            reference = _ask(sock)
            print(f"  - the original answers {reference}")
        finally:
            popen.kill()
            popen.wait()
            sock.close()
        try:
            for mode in MODES:
                times = []
                for _ in range(runs):
                    stub = launch_stub(template.restore_fds(mode))
                    assert stub.control is not None
                    t0 = time.perf_counter()
                    instance = restore(template, stub, mode)
                    _recv(stub.control)
                    answer = _ask(stub.control)
                    times.append((time.perf_counter() - t0) * 1e3)
                    instance.close()
                    stub.control.close()
                print(
                    f"  - {mode:>4}: {runs} instances, "
                    f"restore to first reply median {statistics.median(times):.2f} ms; "
                    f"last said {answer}"
                )
        finally:
            template.close()
            Template.delete(pool, TEMPLATE)
    print("done; the pool stays (remove it with: python -m shmpool destroy)")

"""`python -m daemon.demo`: thaw's main job end to end, until the daemon itself exists.

Creates (or attaches) the pool, starts a guest running a small function whose init builds 64 MiB
of state, captures it into a template, kills it, and thaws instances from the template in every
mode, printing the time to first reply of each. It wires the guest launcher (sandbox.guest) to
the snapshot engine as the daemon will, with snapshot's own stub launcher instead of sandboxes,
and deletes its template afterwards.

    python -m daemon.demo [--root POOL] [--node N] [--size SIZE] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sandbox.guest.launch import decode_body, invoke, recv, start_parked
from shmpool import Pool, PoolError
from shmpool.cli import parse_size
from shmpool.pool import DEFAULT_ROOT
from snapshot.capture import capture
from snapshot.errors import SnapshotError
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


def _answer(sock: socket.socket) -> str:
    return str(decode_body(invoke(sock)).decode())


def _capture_function(pool: Pool, function_dir: Path) -> Template:
    t0 = time.perf_counter()
    guest = start_parked(function_dir)
    print(f"  - guest started, imported and initialized in {(time.perf_counter() - t0) * 1e3:.0f} ms; it parked")
    try:
        t0 = time.perf_counter()
        template = capture(guest.pid, pool, TEMPLATE)
        m = template.manifest
        print(
            f"  - captured pid {guest.pid} into template {TEMPLATE!r} in {(time.perf_counter() - t0) * 1e3:.0f} ms: "
            f"{len(m.memory.vmas)} VMAs, {m.data_bytes >> 20} MiB of pages, {len(m.files.identities)} files re-mapped"
        )
        os.kill(guest.pid, signal.SIGCONT)  # the original goes on, as a cold start would
        recv(guest.control)  # RESTORED: the guest says it after any stop
        print(f"  - the original answers {_answer(guest.control)}")
        return template
    finally:
        guest.kill()


def _thaw_each_mode(template: Template, runs: int) -> None:
    for mode in MODES:
        times, answer = [], ""
        for _ in range(runs):
            stub = launch_stub(template.restore_fds(mode))
            assert stub.control is not None
            t0 = time.perf_counter()
            instance = restore(template, stub, mode)
            recv(stub.control)
            answer = _answer(stub.control)
            times.append((time.perf_counter() - t0) * 1e3)
            instance.close()
            stub.control.close()
        print(
            f"  - {mode:>4}: {runs} instances, restore to first reply median {statistics.median(times):.2f} ms; "
            f"last said {answer}"
        )


def run_demo(root: str, node: int, size: int, runs: int) -> None:
    pool = Pool.open_or_create(root, backend="tmpfs", node=node, size=size)
    print(f"pool {root}: {pool.config.backend} on node {pool.config.node}")
    with tempfile.TemporaryDirectory(prefix="thaw-demo-") as tmp:
        (Path(tmp) / "handler.py").write_text(FUNCTION)
        template = _capture_function(pool, Path(tmp))
        try:
            _thaw_each_mode(template, runs)
        finally:
            template.close()
            Template.delete(pool, TEMPLATE)
    print("done; the pool stays (remove it with: python -m shmpool destroy)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"pool directory (default {DEFAULT_ROOT})")
    parser.add_argument("--node", type=int, default=0, help="NUMA node of a new pool (default 0)")
    parser.add_argument("--size", type=parse_size, default=parse_size("8G"), help="size of a new pool (default 8G)")
    parser.add_argument("--runs", type=int, default=5, help="instances per mode (default 5)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m daemon.demo: needs root (ptrace, pool mounts)", file=sys.stderr)
        return 2
    try:
        run_demo(args.root, args.node, args.size, args.runs)
    except (SnapshotError, PoolError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

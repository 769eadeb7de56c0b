"""Sandbox benchmark: fresh creation vs repurpose vs release, median and p90 of --reps runs.

- create     Sandbox.create: cgroups, the agent (namespaces, rootfs, pivot_root), veth and address
- repurpose  Sandbox.repurpose: cgroup limits, the function mount swapped, a fresh /tmp, hostname
- release    Sandbox.release with one stopped stub inside: kill it, wait for an empty cgroup, scrub

Prints a table and the repurpose/create ratio; `--json PATH` writes rows with `op`, `median_ms`,
`p90_ms`, `runs`. Root, after scripts/setup.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox.cgroups import Limits
from sandbox.network import NetworkConfig
from sandbox.pool import PoolSettings, SandboxPool
from sandbox.sandbox import Sandbox, SandboxConfig, SandboxSpec


def _ms(action: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    action()
    return (time.perf_counter() - t0) * 1e3


def _row(op: str, times: list[float]) -> dict[str, Any]:
    ordered = sorted(times)
    return {
        "op": op,
        "median_ms": round(statistics.median(ordered), 3),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "runs": len(ordered),
    }


def measure(pool: SandboxPool, specs: list[SandboxSpec], reps: int) -> list[dict[str, Any]]:
    sandboxes: list[Sandbox] = []
    created = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sandboxes.append(Sandbox.create(pool.config, pool.tree, pool.network))
        created.append((time.perf_counter() - t0) * 1e3)
    repurposed, released = [], []
    try:
        for i in range(reps):
            sandbox = sandboxes[i % len(sandboxes)]
            repurposed.append(_ms(functools.partial(sandbox.repurpose, specs[i % len(specs)])))
            sandbox.spawn_stub([])
            released.append(_ms(sandbox.release))
    finally:
        for sandbox in sandboxes:
            sandbox.destroy()
    return [_row("create", created), _row("repurpose", repurposed), _row("release", released)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="runs per figure (default 30, at least 20)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_sandbox: needs root (namespaces, cgroups, mounts, veths)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="thaw-bench-") as tmp:
        specs = []
        for name in ("a", "b"):
            fn = Path(tmp) / f"fn-{name}"
            fn.mkdir()
            (fn / "handler.py").write_text("def handle(event, context):\n    return {}\n")
            specs.append(SandboxSpec(fn, Limits(cpu=1, memory=256 << 20, pids=64), hostname=f"fn-{name}"))
        runtime = Path(tmp) / "run"
        pool = SandboxPool(
            PoolSettings(prewarm=0, max_size=args.reps, cgroup_tree="thaw-bench"),
            SandboxConfig(runtime_dir=runtime),
            NetworkConfig(bridge="thawb0", subnet="10.234.0.0/24"),
        )
        try:
            rows = measure(pool, specs, args.reps)
        finally:
            pool.destroy()
    create, repurpose = rows[0]["median_ms"], rows[1]["median_ms"]
    print(f"{'op':>10} {'median ms':>10} {'p90 ms':>9} {'runs':>5}")
    for row in rows:
        print(f"{row['op']:>10} {row['median_ms']:>10.3f} {row['p90_ms']:>9.3f} {row['runs']:>5}")
    print(f"create / repurpose: {create / repurpose:.1f}x")
    print(f"host: {platform.node()} kernel {platform.release()}, {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

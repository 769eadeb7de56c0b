"""Sandbox benchmark: fresh creation vs repurpose vs release, median and p90 of --reps runs.

- create     Sandbox.create: cgroups, the agent (namespaces, rootfs, pivot_root), veth and address
- repurpose  Sandbox.repurpose: cgroup limits, the function mount swapped, a fresh /tmp, hostname
- release    Sandbox.release with one stopped stub inside: kill it, wait for an empty cgroup, scrub

Prints a table and the repurpose/create ratio; `--json PATH` (default bench-results/bench_sandbox.json)
writes rows (daemon/bench.py's SandboxRow: `op`, `median_ms`, `p90_ms`, `runs`). `--quick`: 5 runs.
Root, after scripts/setup.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

from daemon import bench
from daemon.bench import SandboxRow
from sandbox.cgroups import Limits
from sandbox.network import NetworkConfig
from sandbox.pool import PoolSettings, SandboxPool
from sandbox.sandbox import Sandbox, SandboxConfig, SandboxSpec


def _row(op: str, times: list[float]) -> SandboxRow:
    stats = bench.summarize(times)
    return SandboxRow(op=op, median_ms=round(stats.median, 3), p90_ms=round(stats.p90, 3), runs=stats.runs)


def measure(pool: SandboxPool, specs: list[SandboxSpec], reps: int) -> list[SandboxRow]:
    sandboxes: list[Sandbox] = []
    created = []
    for _ in range(reps):
        created.append(bench.time_ms(lambda: sandboxes.append(Sandbox.create(pool.config, pool.tree, pool.network))))
    repurposed, released = [], []
    try:
        for i in range(reps):
            sandbox = sandboxes[i % len(sandboxes)]
            repurposed.append(bench.time_ms(functools.partial(sandbox.repurpose, specs[i % len(specs)])))
            sandbox.spawn_stub([])
            released.append(bench.time_ms(sandbox.release))
    finally:
        for sandbox in sandboxes:
            sandbox.destroy()
    return [_row("create", created), _row("repurpose", repurposed), _row("release", released)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, help="runs per figure (default 30, at least 20)")
    bench.arguments(parser, "bench_sandbox", "5 runs per figure")
    args = parser.parse_args(argv)
    reps = args.reps or (5 if args.quick else 30)
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
            PoolSettings(prewarm=0, max_size=reps, cgroup_tree="thaw-bench"),
            SandboxConfig(runtime_dir=runtime),
            NetworkConfig(bridge="thawb0", subnet="10.234.0.0/24"),
        )
        try:
            rows = measure(pool, specs, reps)
        finally:
            pool.destroy()
    print(bench.table(("op", "median ms", "p90 ms", "runs"), ((r.op, r.median_ms, r.p90_ms, r.runs) for r in rows)))
    print(f"create / repurpose: {rows[0].median_ms / rows[1].median_ms:.1f}x")
    bench.write(args.json, bench.Document("bench_sandbox", {"sandbox": rows}, {"reps": reps, "quick": args.quick}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

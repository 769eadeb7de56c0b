"""NUMA-host microbenchmark of the pool (run it as `scripts/bench_numa`).

For each NUMA node with memory and each backend that works here (tmpfs 4 KiB pages, hugetlbfs
2 MiB pages, memfd), with a CPU of node 0 doing the work and the hot loops in C (native/bench.c):

- seq_read      sequential read bandwidth over a segment mapped from the pool (GB/s)
- copy          pool -> local anonymous memory copy bandwidth (GB/s)
- latency       dependent random loads, one cache line per hop, over a pool segment (ns)
- map_read      mmap MAP_SHARED + first read of each page: what a cow restore pays per page (ns/page)
- map_cow       mmap MAP_PRIVATE + first write of each page: a copy-on-write fault per page (ns/page)

Each figure is the median of --reps runs. Prints a table; `--json PATH` also writes the rows
(`node`, `backend`, `metric`, `value`, `unit`) with the conditions. On a one-node machine it
measures node 0 and says that the local-vs-CXL comparison needs a second node.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from native import bench, memory
from native.constants import MapFlag
from native.kerndat import kerndat
from shmpool.cli import parse_size
from shmpool.errors import PoolError
from shmpool.pool import Pool, Segment

BACKENDS = ("tmpfs", "hugetlbfs", "memfd")
CHASE_SLOT = 64  # one cache line per hop


def _median(fn: Callable[[], float], reps: int) -> float:
    return statistics.median(fn() for _ in range(reps))


def _fill(pool: Pool, name: str, size: int) -> None:
    """A segment of varied bytes (every page differs from its neighbours)."""
    block = os.urandom(1 << 20)
    with pool.create_segment(name, size) as w:
        for off in range(0, size, len(block)):
            w.write(off, block[: min(len(block), size - off)])
        w.publish()


def _fill_chase(pool: Pool, name: str, size: int) -> None:
    """A segment holding one random cycle of offsets through all its cache lines."""
    local = bytearray(size)
    bench.chase_init(memory.address_of(local), size // CHASE_SLOT, CHASE_SLOT, seed=12345)
    with pool.create_segment(name, size) as w:
        w.write(0, local)
        w.publish()


def _measure(pool: Pool, size: int, reps: int, chase_steps: int) -> list[tuple[str, float, str]]:
    _fill(pool, "bench-data", size)
    _fill_chase(pool, "bench-chase", size)
    return [
        *_bandwidth(pool, size, reps),
        ("latency", _latency(pool, size, reps, chase_steps), "ns"),
        *_map_costs(pool, reps),
    ]


def _bandwidth(pool: Pool, size: int, reps: int) -> list[tuple[str, float, str]]:
    with pool.open_segment("bench-data", verify=False) as seg, seg.map(private=False, writable=False) as view:
        src = memory.address_of(view)
        memory.touch(src, size, pool.config.page_size, write=False)  # measure memory, not faults
        local = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            dst = memory.address_of(local)
            memory.touch(dst, size, mmap.PAGESIZE, write=True)
            read = _median(lambda: _gbps(size, lambda: bench.read_sum(src, size)), reps)
            copy = _median(lambda: _gbps(size, lambda: bench.copy(dst, src, size)), reps)
        finally:
            local.close()
    return [("seq_read", read, "GB/s"), ("copy", copy, "GB/s")]


def _latency(pool: Pool, size: int, reps: int, steps: int) -> float:
    with pool.open_segment("bench-chase", verify=False) as seg, seg.map(private=False, writable=False) as view:
        addr = memory.address_of(view)
        memory.touch(addr, size, pool.config.page_size, write=False)
        return _median(lambda: _ns_per(steps, lambda: bench.chase(addr, steps)), reps)


def _map_costs(pool: Pool, reps: int) -> list[tuple[str, float, str]]:
    page = pool.config.page_size
    with pool.open_segment("bench-data", verify=False) as seg:
        rows = [("map_read", _median(lambda: _map_touch(seg, page, mmap.MAP_SHARED, False), reps), "ns/page")]
        if pool.caps.private_cow:
            cow_flags = mmap.MAP_PRIVATE | MapFlag.NORESERVE
            rows.append(("map_cow", _median(lambda: _map_touch(seg, page, cow_flags, True), reps), "ns/page"))
    return rows


def _gbps(nbytes: int, fn: Callable[[], object]) -> float:
    t0 = bench.now_ns()
    fn()
    return nbytes / (bench.now_ns() - t0)  # bytes per ns == GB/s


def _ns_per(count: int, fn: Callable[[], object]) -> float:
    t0 = bench.now_ns()
    fn()
    return (bench.now_ns() - t0) / count


def _map_touch(seg: Segment, page: int, flags: int, write: bool) -> float:
    length = seg.size - seg.size % page
    return bench.map_touch_ns(seg.fd, seg.base, length, page, flags, write) / (length // page)


def _pool_for(backend: str, node: int, size: int, root: Path) -> Pool:
    # Room for the two segments, one private copy of a segment (hugetlbfs charges copy-on-write
    # copies of its files' pages to the mount) and the catalog.
    return Pool.create(root, backend=backend, node=node, size=3 * size + (4 << 20))


def run(size: int, reps: int, chase_steps: int, backends: list[str]) -> dict[str, Any]:
    kd = kerndat()
    worker_cpu = kd.node(0).cpus[0] if kd.node(0) and kd.node(0).cpus else 0  # type: ignore[union-attr]
    os.sched_setaffinity(0, {worker_cpu})
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if len(kd.nodes) < 2:
        notes.append(
            f"one NUMA node with memory (node {kd.node_ids[0]}): measured it alone; the local-vs-CXL "
            "comparison needs a second (CPU-less or remote) node"
        )
    for node in kd.node_ids:
        for backend in backends:
            with tempfile.TemporaryDirectory(prefix="thaw-bench-") as tmp:
                try:
                    pool = _pool_for(backend, node, size, Path(tmp) / "pool")
                except PoolError as e:
                    notes.append(f"node {node} {backend}: skipped ({e})")
                    continue
                try:
                    for metric, value, unit in _measure(pool, size, reps, chase_steps):
                        rows.append({"node": node, "backend": backend, "metric": metric,
                                     "value": round(value, 3), "unit": unit})  # fmt: skip
                finally:
                    pool.destroy()
    return {
        "benchmark": "bench_numa",
        "conditions": {
            "buffer_bytes": size,
            "reps": reps,
            "statistic": "median",
            "chase_steps": chase_steps,
            "worker_cpu": worker_cpu,
            "kernel": platform.release(),
            "nodes": kd.node_ids,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "rows": rows,
        "notes": notes,
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{'node':>4}  {'backend':<10} {'metric':<10} {'value':>10}  unit", "-" * 46]
    lines += [
        f"{r['node']:>4}  {r['backend']:<10} {r['metric']:<10} {r['value']:>10.2f}  {r['unit']}" for r in result["rows"]
    ]
    c = result["conditions"]
    lines.append(f"({c['buffer_bytes'] >> 20} MiB buffers, median of {c['reps']}, CPU {c['worker_cpu']})")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_numa", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"), help="buffer size (default 256M)")
    parser.add_argument("--reps", type=int, default=5, help="runs per figure; the median is reported (default 5)")
    parser.add_argument("--chase-steps", type=int, default=2_000_000, help="hops per latency run")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="limit to these backends")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_numa: needs root (it mounts pools and reserves hugepages)", file=sys.stderr)
        return 1
    result = run(args.size, args.reps, args.chase_steps, args.backend or list(BACKENDS))
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

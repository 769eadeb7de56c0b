"""NUMA-host microbenchmark of the pool (run it as `scripts/bench_numa`).

For each NUMA node with memory and each backend that works here (tmpfs 4 KiB pages, hugetlbfs
2 MiB pages, memfd), with a CPU of node 0 doing the work and the hot loops in C (native/bench.c):

- seq_read      sequential read bandwidth over a segment mapped from the pool (GB/s)
- copy          pool -> local anonymous memory copy bandwidth (GB/s)
- latency       dependent random loads, one cache line per hop, over a pool segment (ns)
- map_read      mmap MAP_SHARED + first read of each page: what a cow restore pays per page (ns/page)
- map_cow       mmap MAP_PRIVATE + first write of each page: a copy-on-write fault per page (ns/page)

Each figure is the median of --reps runs. Prints a table; `--json PATH` (default
bench-results/bench_numa.json) writes the rows (daemon/bench.py's PoolRow: `node`, `backend`,
`metric`, `value`, `unit`) with the conditions. On a one-node machine it measures node 0 and says
that the local-vs-CXL comparison needs a second node. `--quick`: 32 MiB buffers, 2 runs, 200,000 hops.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from daemon import bench
from daemon.bench import PoolRow
from native import bench as loops  # the C loops
from native import memory
from native.constants import MapFlag
from native.kerndat import kerndat
from shmpool.cli import parse_size
from shmpool.errors import PoolError
from shmpool.pool import Pool, Segment

BACKENDS = ("tmpfs", "hugetlbfs", "memfd")
CHASE_SLOT = 64  # one cache line per hop


def _median(fn: Callable[[], float], reps: int) -> float:
    return bench.median(fn() for _ in range(reps))


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
    loops.chase_init(memory.address_of(local), size // CHASE_SLOT, CHASE_SLOT, seed=12345)
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
            read = _median(lambda: _gbps(size, lambda: loops.read_sum(src, size)), reps)
            copy = _median(lambda: _gbps(size, lambda: loops.copy(dst, src, size)), reps)
        finally:
            local.close()
    return [("seq_read", read, "GB/s"), ("copy", copy, "GB/s")]


def _latency(pool: Pool, size: int, reps: int, steps: int) -> float:
    with pool.open_segment("bench-chase", verify=False) as seg, seg.map(private=False, writable=False) as view:
        addr = memory.address_of(view)
        memory.touch(addr, size, pool.config.page_size, write=False)
        return _median(lambda: _ns_per(steps, lambda: loops.chase(addr, steps)), reps)


def _map_costs(pool: Pool, reps: int) -> list[tuple[str, float, str]]:
    page = pool.config.page_size
    with pool.open_segment("bench-data", verify=False) as seg:
        rows = [("map_read", _median(lambda: _map_touch(seg, page, mmap.MAP_SHARED, False), reps), "ns/page")]
        if pool.caps.private_cow:
            cow_flags = mmap.MAP_PRIVATE | MapFlag.NORESERVE
            rows.append(("map_cow", _median(lambda: _map_touch(seg, page, cow_flags, True), reps), "ns/page"))
    return rows


def _gbps(nbytes: int, fn: Callable[[], object]) -> float:
    t0 = loops.now_ns()
    fn()
    return nbytes / (loops.now_ns() - t0)  # bytes per ns == GB/s


def _ns_per(count: int, fn: Callable[[], object]) -> float:
    t0 = loops.now_ns()
    fn()
    return (loops.now_ns() - t0) / count


def _map_touch(seg: Segment, page: int, flags: int, write: bool) -> float:
    length = seg.size - seg.size % page
    return loops.map_touch_ns(seg.fd, seg.base, length, page, flags, write) / (length // page)


def _pool_for(backend: str, node: int, size: int, root: Path) -> Pool:
    # Room for the two segments, one private copy of a segment (hugetlbfs charges copy-on-write
    # copies of its files' pages to the mount) and the catalog.
    return Pool.create(root, backend=backend, node=node, size=3 * size + (4 << 20))


def run(size: int, reps: int, chase_steps: int, backends: list[str]) -> bench.Document:
    kd = kerndat()
    worker_cpu = kd.node(0).cpus[0] if kd.node(0) and kd.node(0).cpus else 0  # type: ignore[union-attr]
    os.sched_setaffinity(0, {worker_cpu})
    rows: list[PoolRow] = []
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
                        rows.append(PoolRow(node, backend, metric, round(value, 3), unit))
                finally:
                    pool.destroy()
    conditions = {
        "buffer_bytes": size,
        "reps": reps,
        "statistic": "median",
        "chase_steps": chase_steps,
        "worker_cpu": worker_cpu,
        "nodes": kd.node_ids,
    }
    return bench.Document("bench_numa", {"pool": rows}, conditions, notes)


def table(doc: bench.Document) -> str:
    rows = doc.rows("pool", PoolRow)
    lines = [bench.table(("node", "backend", "metric", "value", "unit"), ((r.node, r.backend, r.metric, r.value,
                                                                          r.unit) for r in rows))]  # fmt: skip
    c = doc.conditions
    lines.append(f"({c['buffer_bytes'] >> 20} MiB buffers, median of {c['reps']}, CPU {c['worker_cpu']})")
    lines += [f"note: {n}" for n in doc.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_numa", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, help="buffer size (default 256M)")
    parser.add_argument("--reps", type=int, help="runs per figure; the median is reported (default 5)")
    parser.add_argument("--chase-steps", type=int, help="hops per latency run (default 2,000,000)")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="limit to these backends")
    bench.arguments(parser, "bench_numa", "32 MiB buffers, 2 runs, 200,000 hops")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_numa: needs root (it mounts pools and reserves hugepages)", file=sys.stderr)
        return 1
    size = args.size or parse_size("32M" if args.quick else "256M")
    reps = args.reps or (2 if args.quick else 5)
    steps = args.chase_steps or (200_000 if args.quick else 2_000_000)
    doc = run(size, reps, steps, args.backend or list(BACKENDS))
    doc.conditions["quick"] = args.quick
    print(table(doc))
    bench.write(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

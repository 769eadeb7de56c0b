"""The quickstart's demo: a segment's life in the default pool, printed step by step.

It is what `scripts/quickstart` runs until the daemon exists: create (or attach) the tmpfs pool on
node 0, publish a 64 MiB segment of varied bytes, reopen it with checksum verification, check where
its pages live, show that a copy-on-write mapping leaves the pool's bytes untouched, then delete it.
"""

from __future__ import annotations

import os
import time

from shmpool.cli import human
from shmpool.errors import PoolNotFound
from shmpool.pool import Pool

DEMO_SEGMENT = "quickstart-demo"
DEMO_BYTES = 64 << 20


def _step(msg: str) -> None:
    print(f"  - {msg}", flush=True)


def run_demo(root: str, node: int, size: int) -> None:
    try:
        pool = Pool(root)
        print(f"attached existing pool at {root}")
    except PoolNotFound:
        pool = Pool.create(root, backend="tmpfs", node=node, size=size)
        print(f"created tmpfs pool at {root} bound to NUMA node {node} ({human(size)})")
    with pool:
        if DEMO_SEGMENT in {o.name for o in pool.list()}:
            pool.delete(DEMO_SEGMENT)  # left by an interrupted earlier run
        payload = os.urandom(1 << 20) * (DEMO_BYTES >> 20)
        t0 = time.perf_counter()
        with pool.create_segment(DEMO_SEGMENT, DEMO_BYTES) as writer:
            writer.write(0, payload)
            record = writer.publish(meta={"demo": True})
        _step(
            f"published {record.name!r}: {human(record.size)} in {len(record.sums)} checksummed chunks "
            f"({(time.perf_counter() - t0) * 1000:.0f} ms, written + read back + renamed atomically)"
        )
        with pool.open_segment(DEMO_SEGMENT) as seg:
            _step(f"reopened with every chunk verified: {seg.chunk_count} chunks OK")
            where = seg.placement()
            _step("pages by NUMA node (move_pages): " + ", ".join(f"node {n}: {c}" for n, c in sorted(where.items())))
            with seg.map(private=True) as view:
                view[0:5] = b"WRITE"
            same = seg.read_chunk(0)[:5] == payload[:5]
            _step(f"a copy-on-write mapping was written; the pool's bytes unchanged: {same}")
        pool.delete(DEMO_SEGMENT)
        _step(f"deleted {DEMO_SEGMENT!r}; pool now holds {len(pool.list())} segments")
        st = pool.status()
        print(f"pool {st.root}: {st.backend} on node {st.node}, {human(st.used)} used of {human(st.capacity)}")
        print(f"(the pool stays mounted for later runs; remove it with: python -m shmpool --root {root} destroy)")

"""shmpool: the memory pool that templates and tensors live in (emulated CXL memory).

- `backends`  where bytes live (tmpfs on a node, hugetlbfs, devdax, memfd) and what each can map
- `catalog`   published objects, holders with leases, refs, garbage collection (SQLite)
- `pool`      `Pool` (create/attach/destroy, status, gc), `SegmentWriter` (atomic publish),
              `Segment` (verified reads, copy-on-write mappings, placement)
- `errors`    what a user can hit: PoolFull, SegmentCorrupt, UnknownNode, UnsupportedMapping, ...
- `cli`       `python -m shmpool`
"""

from shmpool.errors import (
    HugepagesUnavailable,
    InvalidName,
    PoolError,
    PoolExists,
    PoolFull,
    PoolNotFound,
    SegmentCorrupt,
    SegmentExists,
    SegmentInUse,
    SegmentNotFound,
    UnknownNode,
    UnsupportedMapping,
)
from shmpool.pool import DEFAULT_ROOT, Pool, Segment, SegmentWriter

__all__ = [
    "DEFAULT_ROOT",
    "HugepagesUnavailable",
    "InvalidName",
    "Pool",
    "PoolError",
    "PoolExists",
    "PoolFull",
    "PoolNotFound",
    "Segment",
    "SegmentCorrupt",
    "SegmentExists",
    "SegmentInUse",
    "SegmentNotFound",
    "SegmentWriter",
    "UnknownNode",
    "UnsupportedMapping",
]

"""The errors a pool user can hit. Each names the pool/segment and the cause."""

from __future__ import annotations


class PoolError(Exception):
    """Base of every shmpool error."""


class PoolNotFound(PoolError):
    pass


class PoolExists(PoolError):
    pass


class PoolFull(PoolError):
    """The pool has no room for what was asked (ENOSPC). Nothing half-written remains."""


class SegmentNotFound(PoolError):
    pass


class SegmentExists(PoolError):
    pass


class SegmentInUse(PoolError):
    """The segment cannot be deleted: another published segment needs it (a layered template's parent)."""


class SegmentCorrupt(PoolError):
    """Stored bytes do not match the checksums recorded when the segment was published."""


class InvalidName(PoolError):
    pass


class UnknownNode(PoolError):
    """The NUMA node does not exist, is offline, or has no memory."""


class UnsupportedMapping(PoolError):
    """The backend cannot map the way asked (devdax has no private copy-on-write mappings)."""


class HugepagesUnavailable(PoolError):
    """The kernel could not reserve the hugepages a hugetlbfs pool needs on its node."""

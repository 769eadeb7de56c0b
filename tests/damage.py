"""Damage a published segment behind the pool's back, as a flipped bit in (CXL) memory would.

Published segment files are immutable (shmpool.backends.seal_file): no path thaw uses can write
them, root's included. A test that needs a damaged segment lifts the flag for one write, the way
only a fault outside thaw could change the bytes, and puts it back.
"""

from __future__ import annotations

import os
from pathlib import Path

from native import fileattr
from shmpool import Pool


def segment_path(pool: Pool, name: str) -> Path:
    record = pool.catalog.lookup(name)
    return Path(pool.backend._path(record.storage_key))  # type: ignore[attr-defined]


def write_behind(path: Path, offset: int, data: bytes) -> None:
    """Write `data` at `offset` of a published segment file, keeping it immutable afterwards."""
    sealed = fileattr.is_immutable(path)
    fileattr.set_immutable(path, False)
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
    finally:
        if sealed:
            fileattr.set_immutable(path, True)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        byte = f.read(1)
    write_behind(path, offset, bytes([byte[0] ^ 0xFF]))

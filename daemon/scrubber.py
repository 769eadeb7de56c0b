"""The scrubber: re-verifies the pool's published segments in the background, on a budget.

A template's checksums are verified when it is published and when thawd opens it, and the pager
checks each compressed chunk it reads; a cow restore maps pages without reading them. So a byte
that changes later in the pool (the emulated CXL memory, or anything outside thaw that writes the
pool's files: published files are immutable to thaw's own processes, see shmpool.backends) would
reach every instance thawed afterwards. The scrubber reads every published segment again, one
chunk at a time, at most `bandwidth` bytes per second, one pass every `interval` seconds, and
reports a chunk that does not match its checksum at once; thawd then quarantines the template
(daemon/instances.py, `Manager.quarantine`).

Mutable segments (the lazy caches, whose bytes change by design) have no checksums and are
skipped. A segment deleted while it is being read is skipped too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shmpool import Pool, SegmentNotFound
from shmpool.catalog import ObjectRecord
from shmpool.errors import PoolError, SegmentCorrupt

log = logging.getLogger("thawd.scrubber")
OnCorrupt = Callable[[str, Exception], Awaitable[None]]


@dataclass
class ScrubReport:
    segments: int = 0
    chunks: int = 0
    bytes: int = 0
    corrupt: int = 0


class Scrubber:
    def __init__(self, pool: Pool, interval: float, bandwidth: int, on_corrupt: OnCorrupt) -> None:
        self.pool, self.interval, self.bandwidth, self.on_corrupt = pool, interval, bandwidth, on_corrupt
        self.last = ScrubReport()
        self.passes = 0

    async def run(self) -> None:
        """A pass every `interval` seconds, forever (cancel to stop). The first waits one interval:
        thawd verified every template it opened at start."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.last = await self.scrub_pass()
                self.passes += 1
            except PoolError as e:
                log.warning("scrub pass stopped: %s", e)

    async def scrub_pass(self) -> ScrubReport:
        report = ScrubReport()
        records = await asyncio.to_thread(self.pool.list)
        for record in records:
            if record.meta.get("mutable") or not record.sums:
                continue
            await self._scrub(record, report)
        log.debug("scrub pass: %s", report)
        return report

    async def _scrub(self, record: ObjectRecord, report: ScrubReport) -> None:
        try:
            segment = await asyncio.to_thread(self.pool.open_segment, record.name, False)
        except SegmentNotFound:
            return  # deleted since the listing
        if segment.record.id != record.id:  # the name was published again since the listing
            segment.close()
            return
        report.segments += 1
        try:
            for index in range(segment.chunk_count):
                t0 = time.monotonic()
                try:
                    data = await asyncio.to_thread(segment.read_chunk, index)
                except SegmentCorrupt as e:
                    report.corrupt += 1
                    log.error("scrubber: %s", e)
                    await self.on_corrupt(record.name, e)
                    return
                report.chunks += 1
                report.bytes += len(data)
                # Keep to the budget: a chunk of n bytes takes at least n / bandwidth seconds.
                await asyncio.sleep(max(0.0, len(data) / self.bandwidth - (time.monotonic() - t0)))
        finally:
            segment.close()

"""The threads thawd does its ptrace work on (captures and restores).

ptrace ties a tracee to the *thread* that attached it: every later request for it, and the wait
for its stops, must come from that thread (DESIGN.md, "Threading"). A capture or a restore
seizes its process, does all its ptrace work and detaches it within one call, so any thread may
take the whole call, and several calls may run at once, each on its own thread: a restore no
longer queues behind another (the C tracer pins the calling thread and its stub to one CPU while
it works, native/tracer.py, so two restores on two threads use two CPUs).

One thread per CPU thawd may use (its affinity mask): more would only make the restores share a
CPU, each round trip then a context switch away from its tracee. Not to be confused with
native/tracer.py, the C code these threads run.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1


class PtraceWorkers:
    """A pool of threads for calls that seize, trace and detach a process within the call."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or usable_cpus()
        self.executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="thaw-ptrace")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on one of the threads, all of it (seize to detach) on that one."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

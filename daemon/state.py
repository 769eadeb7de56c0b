"""What thawd holds of each function: its template (in force or retired), its live instances, and
the requests waiting for one. Plain records; the event loop owns them, the collaborators in
daemon/ (scheduling, thawing, templates, forms, views) change them."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from daemon.guestio import Channel
from daemon.logs import FunctionLog
from daemon.registry import Deployed, FunctionSpec
from sandbox.sandbox import Sandbox, SandboxProcess
from snapshot.restore import Instance as Restored
from snapshot.template import Template


@dataclass(eq=False)
class TemplateRef:
    """A template in force or retired, and how many instances use it."""

    template: Template
    revision_dir: Path | None = None  # removed with the template: a retired revision's instances still read it
    users: int = 0
    retired: bool = False

    @property
    def name(self) -> str:
        return self.template.name


@dataclass(eq=False)
class LiveInstance:
    id: str
    function: str
    revision: int
    template: TemplateRef
    sandbox: Sandbox
    process: SandboxProcess
    restored: Restored
    channel: Channel
    log_task: asyncio.Task[None]
    restore_ms: float
    started_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    invocations: int = 0
    busy: bool = False
    retired: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


# A request waiting for an instance: resolved with the instance it gets (already busy), with None
# to look again (room for a thaw, the function changed), or with the error of a failed thaw.
Waiter = asyncio.Future[LiveInstance | None]


@dataclass(eq=False)
class FunctionState:
    deployed: Deployed
    template: TemplateRef | None
    log: FunctionLog
    instances: set[LiveInstance] = field(default_factory=set)
    idle: list[LiveInstance] = field(default_factory=list)  # most recently used last
    starting: int = 0  # thaws under way
    waiters: deque[Waiter] = field(default_factory=deque)  # oldest first
    min_warm: int = 0  # the scale target (stored with the function)
    invocations: int = 0  # stored with the function, now and then
    saved_invocations: int = 0
    broken: str = ""  # why the function cannot start instances (its template is corrupt)
    evicted: bool = False  # no template held: the next start captures it again (a cold start)

    @classmethod
    def of(cls, deployed: Deployed, template: TemplateRef | None, log: FunctionLog) -> FunctionState:
        fs = cls(deployed, template, log, min_warm=deployed.min_warm, invocations=deployed.invocations)
        fs.saved_invocations = fs.invocations
        return fs

    @property
    def name(self) -> str:
        return self.deployed.spec.name

    @property
    def spec(self) -> FunctionSpec:
        return self.deployed.spec

    def current(self) -> list[LiveInstance]:
        """The instances of the revision in force (an update's old ones go as they finish)."""
        return [i for i in self.instances if i.template is self.template]

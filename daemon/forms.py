"""The forms of functions' templates (daemon/planner.py, daemon/keepalive.py): warm as captured,
compressed (cold pages served by a pager), or evicted (captured again from the code when next
invoked). The planner chooses for functions without live instances; `set` obeys a user."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from daemon.config import DaemonConfig
from daemon.errors import Conflict, Invalid, PoolFull, Unavailable
from daemon.keepalive import Form
from daemon.logs import FunctionLog
from daemon.planner import MIB, Held, Planner
from daemon.registry import Deployed
from daemon.state import FunctionState, TemplateRef
from daemon.templates import Templates
from native.qpl import QplUnavailable as CodecUnavailable
from sandbox.sandbox import SandboxConfig, paged_restore_refusal
from shmpool import Pool, SegmentExists
from shmpool.codecs import get_codec
from shmpool.errors import PoolFull as PoolIsFull
from snapshot.compress import compress, expand
from snapshot.template import Template
from snapshot.vocabulary import ColdCodec, choices

log = logging.getLogger("thawd")


class Forms:
    def __init__(
        self,
        config: DaemonConfig,
        pool: Pool,
        sandbox_config: SandboxConfig,
        planner: Planner,
        templates: Templates,
        capture: Callable[[Deployed, FunctionLog], Awaitable[Template]],
        functions: Mapping[str, FunctionState],
        lock: Callable[[str], asyncio.Lock],
    ) -> None:
        self.config, self.pool, self.sandbox_config, self.planner = config, pool, sandbox_config, planner
        self.templates, self.capture, self.functions, self.lock = templates, capture, functions, lock

    async def plan(self) -> dict[str, Form]:
        """Compress, expand or evict idle functions' templates as the planner says; returns the plan."""
        now = time.monotonic()
        held = [self._held(fs, now) for fs in self.functions.values() if fs.template is not None and not fs.broken]
        forms = self.planner.forms(held)
        for name, form in forms.items():
            fs = self.functions.get(name)
            if fs is None or fs.instances or fs.starting:
                continue
            async with self.lock(name):
                if fs.template is not None and not fs.instances and not fs.starting:
                    await self._take_form(fs, fs.template, form)
        return forms

    async def set_template_form(self, fs: FunctionState, form: str, codec: str | None = None) -> None:
        """Put the function's template in `form` now (warm, compressed or evicted), whatever the
        keep-alive would choose; the planner may change it again at its next plan (with a budget)."""
        name = fs.name
        try:
            wanted = Form(form)
        except ValueError:
            raise Invalid(f"form must be one of {', '.join(f.value for f in Form)}, not {form!r}") from None
        if codec is not None and codec not in choices(ColdCodec):
            raise Invalid(f"codec must be {', '.join(choices(ColdCodec))}, not {codec!r}")
        if wanted is Form.COMPRESSED and (refusal := paged_restore_refusal(self.sandbox_config)):
            raise Invalid(f"{name}'s template cannot be compressed here: {refusal}")
        async with self.lock(name):
            if fs.broken:
                raise Unavailable(f"{name} has no usable template: {fs.broken}")
            if fs.template is None and wanted is not Form.EVICTED:
                await self.recapture_locked(fs)
            if fs.template is not None:
                try:
                    if self._other_codec(fs.template, wanted, codec):  # recompress, by way of the warm form
                        await self._take_form(fs, fs.template, Form.WARM)
                    await self._take_form(fs, fs.template, wanted, codec)
                except PoolIsFull as e:
                    raise PoolFull(f"changing {name}'s template: the pool is full") from e
                except SegmentExists as e:
                    raise Conflict(
                        f"{name}'s template in that form is still held by instances of an earlier change: "
                        "try again once they are gone"
                    ) from e
                except CodecUnavailable as e:
                    raise Unavailable(f"codec {codec or self.config.keepalive_codec}: {e}") from e

    @staticmethod
    def _other_codec(ref: TemplateRef, wanted: Form, codec: str | None) -> bool:
        """Whether `wanted` asks for the template compressed with another codec than it is."""
        cold = ref.template.manifest.cold
        return wanted is Form.COMPRESSED and codec is not None and cold is not None and cold.codec != codec

    def _held(self, fs: FunctionState, now: float) -> Held:
        assert fs.template is not None
        template = fs.template.template
        memory_mib = template.manifest.data_bytes / MIB
        working_set = len(template.working_set()) * 4096 / MIB or memory_mib
        busy = bool(fs.instances or fs.starting or fs.min_warm)
        return Held(fs.name, memory_mib, working_set, self.planner.idle_s(fs.name, now), busy)

    async def _take_form(self, fs: FunctionState, ref: TemplateRef, form: Form, codec: str | None = None) -> None:
        compressed = ref.template.manifest.cold is not None
        if form is Form.EVICTED:
            log.info("%s: evicting its template (captured again when invoked)", fs.name)
            fs.template, fs.evicted = None, True
            self.templates.retire(ref, keep_revision=True)
            return
        if form is Form.COMPRESSED and not compressed:
            if paged_restore_refusal(self.sandbox_config):
                return  # the planner's choice, which these sandboxes could not restore: kept warm
            chosen = get_codec(codec or self.config.keepalive_codec)
            template = await asyncio.to_thread(compress, self.pool, ref.name, chosen)
        elif form is Form.WARM and compressed:
            template = await asyncio.to_thread(expand, self.pool, ref.name, fs.deployed.template_name)
        else:
            return
        if fs.template is not ref:  # quarantined (or replaced) while we worked: the new form goes
            await asyncio.to_thread(Template.delete, self.pool, template.name)
            template.close()
            return
        log.info("%s: template %s is now %s (%s)", fs.name, ref.name, template.name, form)
        fs.template = TemplateRef(template, ref.revision_dir)
        self.templates.retire(ref, keep_revision=True)

    async def recapture(self, fs: FunctionState) -> None:
        """Capture an evicted (or quarantined) template again from the function's code."""
        async with self.lock(fs.name):
            await self.recapture_locked(fs)

    async def recapture_locked(self, fs: FunctionState) -> None:
        if fs.template is not None or not fs.evicted:
            return
        template = await self.capture(fs.deployed, fs.log)
        fs.template, fs.evicted = TemplateRef(template, fs.deployed.revision_dir), False

    async def punch_cold_pages(self) -> None:
        """Free cold pages decompressed more than cache_ttl ago: an instance still using them faults
        and the pager refills them."""
        ttl = self.config.keepalive_cache_ttl
        for fs in list(self.functions.values()):
            if fs.template is not None and fs.template.template.manifest.cold is not None:
                freed = await asyncio.to_thread(fs.template.template.punch_cold, ttl)
                if freed:
                    log.debug("%s: punched %d bytes of cold pages out of the cache", fs.name, freed)

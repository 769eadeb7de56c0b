"""The lifetime of functions' templates in the pool: opened at start (verified), in force while
their function's revision is, retired by an update, a change of form or a quarantine, and
deleted (with their revision's files) once no instance uses them."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Mapping

from daemon.registry import FUNCTION_MOUNT, Deployed
from daemon.state import FunctionState, TemplateRef
from shmpool import Pool, SegmentNotFound
from snapshot.compress import compressed_name
from snapshot.template import Template


class Templates:
    def __init__(self, pool: Pool, functions: Mapping[str, FunctionState]) -> None:
        self.pool, self.functions = pool, functions

    def open(self, deployed: Deployed) -> Template | None:
        """The function's template as captured or compressed, verified; None when neither is there."""
        mounts = {FUNCTION_MOUNT: str(deployed.revision_dir)}
        for name in (deployed.template_name, compressed_name(deployed.template_name)):
            with contextlib.suppress(SegmentNotFound):
                return Template.open(self.pool, name, True, mounts)
        return None

    def in_force(self, template_name: str) -> bool:
        return any(fs.template is not None and fs.template.name == template_name for fs in self.functions.values())

    def use(self, ref: TemplateRef) -> None:
        ref.users += 1

    def done_with(self, ref: TemplateRef) -> None:
        """An instance of `ref` is gone (or never started): a retired template goes with its last."""
        ref.users -= 1
        if ref.retired and ref.users == 0:
            self.retire(ref)

    def retire(self, ref: TemplateRef, keep_revision: bool = False) -> None:
        """Out of force: deleted once no instance uses it, with its revision's code unless
        `keep_revision` (the template changed form, the revision is still the function's)."""
        ref.retired = True
        if keep_revision:
            ref.revision_dir = None
        if ref.users == 0:
            ref.template.close()
            if not self.in_force(ref.name):  # a capture since may have taken the name again
                Template.delete(self.pool, ref.name)
            if ref.revision_dir is not None:
                shutil.rmtree(ref.revision_dir, ignore_errors=True)

    def clear_name(self, name: str) -> None:
        """Make room for template `name`: a published leftover of an interrupted deploy is
        deleted, and a write that a dead process left unfinished under it is collected."""
        Template.delete(self.pool, name)
        if any(r.name == name for r in self.pool.list(include_all=True)):
            self.pool.gc()

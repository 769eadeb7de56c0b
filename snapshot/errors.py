"""What capture and restore can fail with. Every message names the cause."""

from __future__ import annotations


class SnapshotError(Exception):
    """Base of every snapshot failure."""


class NotCapturable(SnapshotError):
    """The process cannot be captured as it is (running, inside vfork, shared-writable memory, fds)."""


class CaptureError(SnapshotError):
    """A capture failed on the way (a syscall it needs, an injected one); the guest is left parked."""


class TemplateCorrupt(SnapshotError):
    """A template's header or manifest does not check out: it is never used."""


class FileChanged(SnapshotError):
    """A file a template re-maps (a library, the interpreter) is not the one that was captured."""


class RestoreError(SnapshotError):
    """A restore failed; the stub was killed and nothing of it is left running."""


class TemplateTooOld(TemplateCorrupt):
    """A template an older thaw captured, in a format this one no longer reads: capture it again."""


class ParentUnusable(TemplateCorrupt):
    """A layered template's ancestor is gone, damaged, or not the image it was captured against:
    the template is never used (capture the function again)."""

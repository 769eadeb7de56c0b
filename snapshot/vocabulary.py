"""The snapshot engine's words, as types: how an instance is restored and how a template's cold
pages may be compressed. Standard library only, so the CLI can offer them without loading the
engine (native/ and its C)."""

from __future__ import annotations

from enum import StrEnum


class RestoreMode(StrEnum):
    """How an instance gets the template's pages (DESIGN.md, "Restore modes")."""

    COW = "cow"  # mapped MAP_PRIVATE from the pool: zero copy, shared page cache
    COPY = "copy"  # copied into anonymous memory (the CRIU baseline)
    LAZY = "lazy"  # served on fault by the userfaultfd pager


class ColdCodec(StrEnum):
    """Codecs of a compressed template's cold image (shmpool.codecs implements each)."""

    LZ4 = "lz4"
    ZSTD = "zstd"
    DEFLATE = "deflate"
    IAA = "iaa"  # raw deflate made on Intel IAA; the pager inflates it in software


def choices(kind: type[StrEnum]) -> list[str]:
    return [str(v) for v in kind]

"""Which image holds each page a capture keeps: layered templates and duplicates stored once.

A capture decides, page by page, where the template's memory will come from at restore:

- **ancestor** (`Run.layer` k >= 1): the guest was thawed from a template (its *parent*) and has
  not written this page since: the page is still the parent's page-cache page of the parent's
  segment (pagemap: present and the file's, or never touched). The child records a reference
  to it and stores nothing; every instance of every child maps that one page;
- **duplicate**: a page whose content equals a page stored earlier in this capture, or one of
  an ancestor's stored pages, found by its content hash (xxh3-128) and then compared byte for
  byte: the child refers to the stored one;
- **zeros**: an all-zero page is a hole (anonymous memory reads zeros), stored nowhere;
- **own**: everything else goes into the template's own page area.

A *dense* VMA (a runtime's or a base's, whose children map it) is one run, the pages the guest
never touched left as holes of the segment file (zeros, which the pool does not store): one
mmap at restore, and one VMA in an instance, as in the guest, so a child of it sees few VMAs.

A VMA that maps an ancestor's segment gets a *base* run: the whole VMA from the ancestor, which
the restore maps first, and the pages the guest wrote are runs laid over it (later runs win).
So its ancestor pages cost the restore nothing more, and each stretch of written pages one mmap;
an ancestor's stretch shorter than `MIN_ANCESTOR_GAP` between two written ones is stored too,
making one mmap of the two. A reference elsewhere costs one mmap per stretch: a stretch of
duplicates or zeros shorter than `MIN_SHARED_PAGES` between pages that are stored anyway is
stored as well (zeros next to a hole cost no mmap and are always left out; over a base there
are no holes, zeros are stored). Stacks are always the template's own: a restore reads them,
never maps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import xxhash

from native import memory as native_memory

PAGE = 4096
ZERO_PAGE = bytes(PAGE)
READ_CHUNK = 8 << 20
MIN_ANCESTOR_GAP = 4
MIN_SHARED_PAGES = 16

OWN, ANCESTOR, DUPLICATE, ZEROS = "own", "ancestor", "duplicate", "zeros"


def digest(page: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(page)


@dataclass
class Ancestor:
    """A template the guest's memory may come from: its segment as capture sees it."""

    name: str
    layer: int  # Run.layer of references into it
    dev: int
    ino: int
    base: int  # where the segment starts in its file
    size: int
    read: Callable[[int], bytes]  # the page at a segment offset
    digests: dict[bytes, int]  # content digest -> offset of a page stored in its page area

    def holds(self, dev: int, ino: int, offset: int, length: int) -> bool:
        return (dev, ino) == (self.dev, self.ino) and self.base <= offset and offset + length <= self.base + self.size


@dataclass
class Page:
    """One page of a VMA as the capture decided it. `where`: (layer, segment offset) for an
    ancestor's page; the index of the first copy for a duplicate of a page of this capture."""

    address: int
    kind: str
    where: tuple[int, int] = (0, 0)
    index: int = -1  # own candidates: their number in the capture, in address order
    untouched: bool = False  # own, never touched by the guest: zeros, a hole in the segment


@dataclass
class VmaPages:
    """The pages of one VMA the template will hold (holes are absent), in address order."""

    start: int
    end: int
    stack: bool
    pages: list[Page] = field(default_factory=list)
    base: tuple[int, int] | None = None  # (layer, offset) of an ancestor's segment the whole VMA maps
    dense: bool = False  # one run for the whole VMA: its untouched pages are holes in the segment


@dataclass(frozen=True)
class PlacedRun:
    start: int
    length: int
    layer: int
    offset: int


class PagePlanner:
    """Decides every page of a capture (see the module's docstring), then where each lies."""

    def __init__(self, pid: int, ancestors: Sequence[Ancestor]) -> None:
        self.pid, self.ancestors = pid, list(ancestors)
        self.by_layer = {a.layer: a for a in self.ancestors}
        self.known: dict[bytes, tuple[int, int]] = {}  # digest -> (layer, offset) in an ancestor
        for a in reversed(self.ancestors):  # the nearest ancestor's copy wins
            self.known.update({d: (a.layer, off) for d, off in a.digests.items()})
        self.first: dict[bytes, Page] = {}  # digest -> the first own page with that content
        self.count = 0

    def own(self, address: int, untouched: bool = False) -> Page:
        page = Page(address, OWN, index=self.count, untouched=untouched)
        self.count += 1
        return page

    def decide(self, vmas: Sequence[VmaPages]) -> None:
        """Read every own candidate once: zeros, duplicates and ancestors' copies become references."""
        for vma in vmas:
            if vma.stack:
                continue
            for stretch in _own_stretches(vma.pages):
                for at in range(0, len(stretch), READ_CHUNK // PAGE):
                    chunk = stretch[at : at + READ_CHUNK // PAGE]
                    data = native_memory.read_exact(self.pid, chunk[0].address, len(chunk) * PAGE)
                    for i, page in enumerate(chunk):
                        keep_zeros = vma.base is not None or vma.dense
                        self._decide_one(page, memoryview(data)[i * PAGE : (i + 1) * PAGE], keep_zeros)
            _store_short_stretches(vma)

    def _decide_one(self, page: Page, content: memoryview, keep_zeros: bool) -> None:
        if content == ZERO_PAGE:
            if not keep_zeros:  # else stored as a hole of the segment: costs the pool nothing
                page.kind = ZEROS
            return
        d = digest(content)
        first = self.first.get(d)
        if first is not None and native_memory.read_exact(self.pid, first.address, PAGE) == content:
            page.kind, page.where = DUPLICATE, (0, first.index)
            return
        known = self.known.get(d)
        if known is not None:
            layer, offset = known
            if self.by_layer[layer].read(offset) == content:
                page.kind, page.where = ANCESTOR, known
                return
        self.first.setdefault(d, page)

    def place(self, vmas: Sequence[VmaPages], page_area: int) -> tuple[list[list[PlacedRun]], int]:
        """Runs per VMA, own pages laid out from `page_area` in address order; (runs, bytes stored)."""
        offset_of: dict[int, int] = {}
        at = page_area
        placed: list[list[PlacedRun]] = []
        for vma in vmas:
            runs: list[PlacedRun] = []
            if vma.base is not None:
                layer, offset = vma.base
                runs.append(PlacedRun(vma.start, vma.end - vma.start, layer, offset))  # written pages go over it
            for page in vma.pages:
                if page.kind == ZEROS or (page.kind == ANCESTOR and vma.base is not None):
                    continue
                if page.kind == OWN:
                    layer, offset = 0, at
                    offset_of[page.index] = at
                    at += PAGE
                elif page.kind == DUPLICATE:
                    layer, offset = 0, offset_of[page.where[1]]
                else:
                    layer, offset = page.where
                runs = _extend(runs, page.address, layer, offset)
            placed.append(runs)
        return placed, at - page_area


def _extend(runs: list[PlacedRun], address: int, layer: int, offset: int) -> list[PlacedRun]:
    last = runs[-1] if runs else None
    if (
        last is not None
        and last.layer == layer
        and last.start + last.length == address
        and last.offset + last.length == offset
    ):
        runs[-1] = PlacedRun(last.start, last.length + PAGE, layer, last.offset)
    else:
        runs.append(PlacedRun(address, PAGE, layer, offset))
    return runs


def _own_stretches(pages: list[Page]) -> Iterator[list[Page]]:
    """Own candidates in stretches of consecutive addresses (one read each)."""
    stretch: list[Page] = []
    for page in pages:
        candidate = page.kind == OWN and not page.untouched
        if candidate and stretch and stretch[-1].address + PAGE == page.address:
            stretch.append(page)
            continue
        if stretch:
            yield stretch
        stretch = [page] if candidate else []
    if stretch:
        yield stretch


def _stretch_key(previous: Page, page: Page) -> bool:
    """Does `page` continue `previous`'s stretch (one mmap, or one hole, at restore)?"""
    if previous.kind != page.kind or previous.address + PAGE != page.address:
        return False
    if page.kind == ANCESTOR:
        return previous.where[0] == page.where[0] and previous.where[1] + PAGE == page.where[1]
    if page.kind == DUPLICATE:
        return previous.where[1] + 1 == page.where[1]
    return True


def _store_short_stretches(vma: VmaPages) -> None:
    """Store again what is too short to be worth its own mmap at restore (the module's docstring)."""
    pages = vma.pages
    i = 0
    while i < len(pages):
        j = i + 1
        while j < len(pages) and _stretch_key(pages[j - 1], pages[j]):
            j += 1
        if j - i < _least(vma, i, j):
            for page in pages[i:j]:
                page.kind, page.where = OWN, (0, 0)
        i = j


def _least(vma: VmaPages, i: int, j: int) -> int:
    """The fewest pages a stretch of pages[i:j]'s kind must have to be worth not storing."""
    kind = vma.pages[i].kind
    if kind == OWN or (kind == ZEROS and _next_to_hole(vma, i, j)):
        return 0
    if kind == ANCESTOR:  # under the base: free, unless it parts two stored stretches
        return MIN_ANCESTOR_GAP if i > 0 and j < len(vma.pages) else 0
    return MIN_SHARED_PAGES


def _next_to_hole(vma: VmaPages, i: int, j: int) -> bool:
    """Pages i..j-1 border a page the template does not hold (or the VMA's edge)."""
    pages = vma.pages
    before = pages[i - 1].address + PAGE if i > 0 else vma.start
    after = pages[j].address if j < len(pages) else vma.end
    return before != pages[i].address or after != pages[j - 1].address + PAGE

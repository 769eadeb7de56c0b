"""Codec benchmark (run it as `scripts/bench_codecs`): how small cold template pages get, and what a
fault on them costs.

The data are real template pages: guests are captured into a tmpfs pool on node 0 and every
dumped page of each template is the sample.

- python-heap   daemon/examples/records: a guest that imported a good part of the standard library
                and built an object graph of 150,000 records (strings, ints, floats, lists, dicts)
- torch-weights a guest holding a 16-layer 1024x1024 MLP (random init, fp32); skipped without torch
- sparse        a guest whose 32 MiB buffer has a few bytes written per page, zeros elsewhere

For each codec and level, on each data set, chunked as the pager reads (64 KiB by default):
ratio, compress and decompress MB/s (shmpool.codecs.measure: Python calling the libraries), and
`fault_us`: the end-to-end cost per 4 KiB page of reading a cold region through the real fault
path: the template is compressed with every page cold, its cold ranges are mapped from the cache
segment into this process and registered with userfaultfd, the C pager serves them, and a C loop
reads one byte of every page. A fault on a chunk's first page is answered by decompressing the
whole 64 KiB chunk into the cache segment and waking the thread; the chunk's other pages then map
from the page cache. The time of the whole read divided by the pages is the figure (amortized
within 64 KiB batches); codec "none" is the same path over uncompressed pages (a lazy restore).
Median of --reps runs. Prints a table; `--json PATH` (default bench-results/bench_codecs.json)
writes the rows (daemon/bench.py's CodecRow). IAA rows appear only where libqpl loads. `--quick`:
one run per figure, lz4 1 and zstd 3 only, on python-heap and sparse pages.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon import bench
from daemon.bench import CodecRow
from native import memory, uffd
from native.constants import UffdRegisterMode
from native.pager import RANGE_COLD, RANGE_PLAIN, Pager, PagerRange
from sandbox.guest.launch import start_parked
from shmpool import Pool
from shmpool.codecs import DEFAULT_CHUNK, Codec, available_codecs, get_codec, measure
from snapshot.capture import capture
from snapshot.compress import compress
from snapshot.template import Template

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096
GUESTS = {
    "python-heap": (REPO / "daemon" / "examples" / "records" / "handler.py").read_text(),
    "torch-weights": """
import torch
torch.manual_seed(0)
MODEL = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(16)])
def handle(event, context):
    return {"layers": len(MODEL)}
""",
    "sparse": """
import random
RNG = random.Random(2)
BUFFER = bytearray(32 << 20)
for page in range(0, len(BUFFER), 4096):
    BUFFER[page + RNG.randrange(4000) : page + RNG.randrange(4000, 4096)] = RNG.randbytes(16)[:1] * 8
def handle(event, context):
    return {"size": len(BUFFER)}
""",
}
LEVELS = {"lz4": [1, 9], "zstd": [1, 3, 9], "deflate": [1, 6], "iaa": [1]}


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def capture_guest(pool: Pool, work: Path, name: str) -> Template:
    function_dir = work / name
    function_dir.mkdir()
    (function_dir / "handler.py").write_text(GUESTS[name])
    guest = start_parked(function_dir, {"OMP_NUM_THREADS": "1"}, cwd=REPO)
    try:
        return capture(guest.pid, pool, name)
    finally:
        guest.kill()


def template_pages(template: Template) -> bytes:
    """Every dumped page of the template, concatenated in segment order."""
    runs = sorted((r.offset, r.length) for _, r in template.manifest.memory.own_runs())
    return b"".join(os.pread(template.segment.fd, length, template.segment.base + off) for off, length in runs)


def codecs(levels: dict[str, list[int]]) -> Iterator[tuple[str, int, Codec]]:
    for name in available_codecs():
        for level in levels.get(name, []):
            yield name, level, get_codec(name, level)


@contextmanager
def registered(template: Template, spans: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """The cache segment mapped privately here, `spans` registered with a new userfaultfd:
    (uffd, mapping address, length)."""
    length = template.segment.size
    view = mmap.mmap(template.cache().fd, length, mmap.MAP_PRIVATE, mmap.PROT_READ, offset=template.cache().base)
    fd = uffd.userfaultfd()
    try:
        uffd.api(fd)
        base = memory.address_of(view)
        for off, size in spans:
            uffd.register(fd, base + off, size, UffdRegisterMode.MISSING)
        yield fd, base, length
    finally:
        view.close()


def fault_read_us(template: Template, cold: bool) -> float:
    """Per-page time of reading every page of the template's runs through the pager."""
    if cold:
        spans = template.cold_spans()
    else:
        spans = sorted((r.offset, r.length) for _, r in template.manifest.memory.own_runs(with_stacks=False))
    kind = RANGE_COLD if cold else RANGE_PLAIN
    with registered(template, spans) as (fd, base, _):
        ranges = [PagerRange(base + off, size, off, kind) for off, size in spans]
        pager = Pager(
            os.dup(fd),
            -1,
            ranges,
            template.source_address(),
            template.segment.size,
            template.cache_target(),
            template.cold_image() if cold else None,
        )
        try:
            start = time.perf_counter_ns()
            for off, size in spans:
                memory.touch(base + off, size, PAGE, write=False)
            elapsed = time.perf_counter_ns() - start
        finally:
            pager.close()
            os.close(fd)
    pages = sum(size for _, size in spans) // PAGE
    _empty_cache(template)
    return elapsed / 1e3 / pages


def _empty_cache(template: Template) -> None:
    """The next run decompresses again: punch the cold chunks (or every page, uncompressed)."""
    if template.manifest.cold is not None:
        template.punch_cold()
        return
    fd, base = template.cache_target()
    os.truncate(f"/proc/self/fd/{fd}", base)
    os.truncate(f"/proc/self/fd/{fd}", base + template.segment.size)


def bench_data(pool: Pool, template: Template, reps: int, levels: dict[str, list[int]]) -> list[CodecRow]:
    data = template_pages(template)
    rows = [_row("none", 0, template.name, 1.0, 0.0, 0.0, [fault_read_us(template, cold=False) for _ in range(reps)])]
    _progress(rows[-1])
    for name, level, codec in codecs(levels):
        report = measure(codec, data, DEFAULT_CHUNK)
        with compress(pool, template.name, codec, f"{template.name}.{name}{level}", hot=[]) as z:
            faults = [fault_read_us(z, cold=True) for _ in range(reps)]
        Template.delete(pool, f"{template.name}.{name}{level}")
        rows.append(
            _row(name, level, template.name, report.ratio, report.compress_mb_s, report.decompress_mb_s, faults)
        )
        _progress(rows[-1])
    if 3 in levels.get("zstd", []):  # and zstd with a dictionary trained on the template's own chunks
        z = compress(pool, template.name, get_codec("zstd", 3), f"{template.name}.zd", hot=[], dictionary_size=64 << 10)
        assert z.manifest.cold is not None
        ratio = z.manifest.cold.cold_pages * PAGE / z.manifest.cold.compressed_bytes
        faults = [fault_read_us(z, cold=True) for _ in range(reps)]
        z.close()
        Template.delete(pool, f"{template.name}.zd")
        rows.append(_row("zstd+dict", 3, template.name, ratio, 0.0, 0.0, faults))
        _progress(rows[-1])
    return rows


def _row(codec: str, level: int, data: str, ratio: float, c: float, d: float, faults: list[float]) -> CodecRow:
    return CodecRow(
        codec=codec,
        level=level,
        data=data,
        ratio=round(ratio, 3),
        compress_mb_s=round(c, 1) if c else None,
        decompress_mb_s=round(d, 1) if d else None,
        fault_us=round(bench.median(faults), 3),
        runs=len(faults),
    )


HEADERS = ("data", "codec", "level", "ratio", "compress MB/s", "decompress MB/s", "fault us/4 KiB")


def _cells(r: CodecRow) -> tuple[object, ...]:
    return (r.data, r.codec, r.level, r.ratio, r.compress_mb_s, r.decompress_mb_s, r.fault_us)


def _progress(row: CodecRow) -> None:
    print("  " + " ".join(str(c) for c in _cells(row)), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_codecs", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, help="fault-path runs per figure (default 5)")
    parser.add_argument("--data", help=f"data sets (default {','.join(GUESTS)})")
    bench.arguments(parser, "bench_codecs", "1 run, lz4 1 and zstd 3, python-heap and sparse")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    levels = {"lz4": [1], "zstd": [3]} if args.quick else LEVELS
    names = [n for n in (args.data or ("python-heap,sparse" if args.quick else ",".join(GUESTS))).split(",") if n]
    unknown = [n for n in names if n not in GUESTS]
    if unknown:
        parser.error(f"unknown data set(s) {', '.join(unknown)}: there are {', '.join(GUESTS)}")
    notes = []
    if "torch-weights" in names and not _has_torch():
        notes.append("torch-weights: skipped, torch is not installed (scripts/setup dev,lora installs it)")
        names.remove("torch-weights")
    if "iaa" not in available_codecs():
        notes.append("iaa: skipped, libqpl does not load here (no Intel QPL / IAA on this machine)")
    for note in notes:
        print(note)
    rows: list[CodecRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as tmp:
        work = Path(tmp)
        pool = Pool.create(work / "pool", backend="tmpfs", node=0, size=4 << 30)
        try:
            for name in names:
                with capture_guest(pool, work, name) as template:
                    rows += bench_data(pool, template, reps, levels)
        finally:
            pool.destroy()
    print(bench.table(HEADERS, map(_cells, rows)))
    conditions = {"chunk_size": DEFAULT_CHUNK, "reps": reps, "data": names, "quick": args.quick}
    bench.write(args.json, bench.Document("bench_codecs", {"codecs": rows}, conditions, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

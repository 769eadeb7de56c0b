"""Layered templates benchmark (run it as `scripts/bench_layers`): ten functions, cold and layered.

Ten functions import a common stack (json, re, decimal, sqlite3, asyncio, http.client, email, and
numpy where it is installed) and each builds its own small state. In one run, on one tmpfs pool
(node 0), outside thawd (guests started with sandbox.guest.launch, restores into waiting stubs):

- cold      each function's guest started from scratch, its init run, captured (as thawd did
            before layers)
- layered   the runtime template (the interpreter, thaw's guest and the same stack, captured
            once, densely: daemon/layering.py) thawed copy-on-write, told to load the function,
            its init run, captured as a child that stores only what the init wrote

Rows (daemon/bench.py's LayersRow): `how`, `functions`, `deploy_ms` (median over the ten: the
guest's start, a spawn or a thaw of the runtime, to the template captured), `restore_ms` (median
of --reps restores of each function, cold and layered interleaved: a waiting stub to the first
reply, cow), `pool_mib` (the pool memory the ten templates hold, the runtime template's included
for layered: their segment files' allocated blocks), `pss_mib` (the summed Pss of one instance of
each function, all ten running, after each answered once). The runtime template's build is a
note (it is paid once per runtime, not per deploy). Targets on this machine: pool of the layered
ten <= 35% of the cold ten's; deploy >= 2x faster; restore within 1.1x; summed Pss <= 50%.

The `duplication` table (DuplicationRow) surveys page contents across parked guests, before any
capture looks for duplicates: the bundled examples (daemon/examples: tiny, records, and heavy
unless --quick) and the ten functions. Per set: present pages of their writable private memory,
all-zero pages, pages equal to an earlier page of the same guest, pages whose content another
guest of the set also holds. Contents are compared by xxh3-128 digest (snapshot/pages.py
compares bytes too before it refers).

`--json PATH` (default bench-results/bench_layers.json); `--quick`: 3 restores of each, no heavy.
Root, after scripts/setup.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from daemon import bench
from daemon.bench import DuplicationRow, LayersRow
from native import memory as native_memory
from native.constants import CloneFlag
from sandbox.guest import protocol
from sandbox.guest.launch import become, recv, start_parked, wait_stopped
from shmpool import Pool
from snapshot import procfs
from snapshot.capture import capture
from snapshot.pages import ZERO_PAGE, digest
from snapshot.restore import Instance, restore
from snapshot.stub import LaunchedStub, launch_stub
from snapshot.template import Template

REPO = Path(__file__).resolve().parents[1]
FUNCTIONS = 10
STACK = ["json", "re", "decimal", "sqlite3", "asyncio", "http.client", "email.parser"]
HAS_NUMPY = importlib.util.find_spec("numpy") is not None
FUNCTION = """
import asyncio, decimal, email.parser, http.client, json, re, sqlite3
{numpy}
NAME = {name!r}
WORDS = re.compile(r"[a-z]+")
ROWS = [{{"id": i, "tag": f"{{NAME}}-{{i}}", "price": decimal.Decimal(i) / 7}} for i in range(2000)]
STATE = {{"name": NAME, "rows": ROWS}}
DB = sqlite3.connect(":memory:")
DB.execute("create table t (id integer, tag text)")
DB.executemany("insert into t values (?, ?)", [(r["id"], r["tag"]) for r in STATE["rows"][:500]])

def handle(event, context):
    return {{"name": NAME, "rows": len(STATE["rows"]), "count": DB.execute("select count(*) from t").fetchone()[0]}}
"""
TARGETS = "targets: layered pool <= 35% of cold; deploy >= 2x faster; restore within 1.1x; summed Pss <= 50%"


def write_functions(root: Path) -> list[Path]:
    numpy = "import numpy\nWEIGHTS = numpy.arange(4096, dtype=numpy.float64)" if HAS_NUMPY else ""
    dirs = []
    for i in range(FUNCTIONS):
        d = root / f"f{i}"
        d.mkdir(parents=True)
        (d / "handler.py").write_text(FUNCTION.format(numpy=numpy, name=f"f{i}"))
        dirs.append(d)
    return dirs


def timed_ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def deploy_cold(pool: Pool, function: Path, name: str, surveyed: dict[str, list[bytes]]) -> tuple[Template, float]:
    """Start, init, capture (timed); the parked guest's pages are surveyed before the capture, untimed."""
    t0 = time.perf_counter()
    guest = start_parked(function, cwd=REPO)
    try:
        ready = time.perf_counter()
        surveyed[name] = page_digests(guest.pid)
        t0 += time.perf_counter() - ready
        return capture(guest.pid, pool, name), timed_ms(t0)
    finally:
        guest.kill()


def survey_examples(names: list[str]) -> dict[str, list[bytes]]:
    surveyed = {}
    for name in names:
        guest = start_parked(REPO / "daemon" / "examples" / name, cwd=REPO)
        try:
            surveyed[name] = page_digests(guest.pid)
        finally:
            guest.kill()
    return surveyed


def build_runtime(pool: Pool) -> tuple[Template, float]:
    t0 = time.perf_counter()
    guest = start_parked(None, cwd=REPO, preload=STACK + (["numpy"] if HAS_NUMPY else []))
    try:
        return capture(guest.pid, pool, "runtime", dense=True), timed_ms(t0)
    finally:
        guest.kill()


def deploy_layered(pool: Pool, runtime: Template, function: Path, name: str) -> tuple[Template, float]:
    t0 = time.perf_counter()
    stub = launch_stub(runtime.restore_fds("cow"), namespaces=CloneFlag.NEWPID)
    assert stub.control is not None
    instance = restore(runtime, stub, "cow")
    try:
        hello = recv(stub.control)
        if not hello or hello.get("type") != "restored":
            raise RuntimeError(f"the runtime's instance said {hello} instead of RESTORED (exit {instance.wait(1)})")
        become(stub.control, {"type": "load", "function_dir": str(function), "handler": "handler:handle"})
        wait_stopped(instance.pid)
        return capture(instance.pid, pool, name, parent=runtime, dense=True), timed_ms(t0)
    finally:
        instance.close()
        stub.control.close()


@contextmanager
def thawed(template: Template) -> Iterator[tuple[float, Instance]]:
    """A cow instance, timed from its waiting stub to its first reply. In a pid namespace of its
    own, as in a sandbox: a thread's captured TID is free there (numpy's threads, ten at once)."""
    stub: LaunchedStub = launch_stub(template.restore_fds("cow"), namespaces=CloneFlag.NEWPID)
    assert stub.control is not None
    t0 = time.perf_counter()
    instance = restore(template, stub, "cow")
    try:
        protocol.send(stub.control.fileno(), {"type": "request", "id": 1, "path": "/", "method": "POST", "body": ""})
        restored, reply = recv(stub.control), recv(stub.control)
        if not restored or restored.get("type") != "restored" or not reply or reply.get("type") != "response":
            raise RuntimeError(f"{template.name} answered {restored} and {reply}")
        yield timed_ms(t0), instance
    finally:
        instance.close()
        stub.control.close()


def stored_mib(pool: Pool, templates: list[Template]) -> float:
    return sum(os.fstat(t.segment.fd).st_blocks * 512 for t in templates) / (1 << 20)


def summed_pss_mib(templates: list[Template]) -> float:
    with ExitStack() as stack:
        pids = [stack.enter_context(thawed(t))[1].pid for t in templates]
        return sum(_pss_kib(pid) for pid in pids) / 1024


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss for pid {pid}")


def page_digests(pid: int) -> list[bytes]:
    """The digest of every present page of `pid`'s private memory (what a capture would store,
    before it looks for duplicates); all-zero pages as b""."""
    digests = []
    for vma in procfs.read_maps(pid):
        if vma.shared or vma.special or vma.path == "[vsyscall]" or not vma.writable:
            continue
        for start, length in procfs.present_ranges(pid, vma.start, vma.end):
            with contextlib.suppress(OSError):  # a guard page or a range that went away
                data = memoryview(native_memory.read_exact(pid, start, length))
                digests += [b"" if data[at : at + 4096] == ZERO_PAGE else digest(data[at : at + 4096])
                            for at in range(0, length, 4096)]  # fmt: skip
    return digests


def survey(set_name: str, guests: dict[str, list[bytes]]) -> DuplicationRow:
    """Page contents of parked guests: zeros, duplicates within one, contents shared across them."""
    owners: dict[bytes, set[str]] = collections.defaultdict(set)
    pages = zeros = duplicates = 0
    for name, digests in guests.items():
        seen: set[bytes] = set()
        for d in digests:
            pages += 1
            if not d:
                zeros += 1
                continue
            duplicates += d in seen
            seen.add(d)
            owners[d].add(name)
    shared = sum(len(names) for names in owners.values() if len(names) > 1)
    return DuplicationRow(set_name, pages, zeros, duplicates, shared)


def measure(pool: Pool, tmp: Path, args: argparse.Namespace) -> tuple[list[LayersRow], list[DuplicationRow], list[str]]:
    functions = write_functions(tmp / "functions")
    surveyed: dict[str, list[bytes]] = {}
    cold, cold_deploy = zip(*(deploy_cold(pool, f, f"cold-{f.name}", surveyed) for f in functions), strict=True)
    runtime, runtime_ms = build_runtime(pool)
    layered, layered_deploy = zip(
        *(deploy_layered(pool, runtime, f, f"layered-{f.name}") for f in functions), strict=True
    )
    restores: dict[str, list[float]] = {"cold": [], "layered": []}
    for _ in range(args.reps):
        for how, templates in (("cold", cold), ("layered", layered)):
            for t in templates:
                with thawed(t) as (ms, _):
                    restores[how].append(ms)
    rows = [
        LayersRow(
            "cold", FUNCTIONS, round(bench.median(cold_deploy), 2), round(bench.median(restores["cold"]), 3),
            round(stored_mib(pool, list(cold)), 2), round(summed_pss_mib(list(cold)), 2),
        ),
        LayersRow(
            "layered", FUNCTIONS, round(bench.median(layered_deploy), 2), round(bench.median(restores["layered"]), 3),
            round(stored_mib(pool, [runtime, *layered]), 2), round(summed_pss_mib(list(layered)), 2),
        ),
    ]  # fmt: skip
    examples = ["tiny", "records"] + ([] if args.quick else ["heavy"])
    duplication = [survey("examples (" + ", ".join(examples) + ")", survey_examples(examples))]
    duplication.append(survey("functions", surveyed))
    for t in [*cold, *layered, runtime]:
        t.close()
    notes = [f"runtime template built once in {runtime_ms:.0f} ms ({runtime.manifest.memory.data_bytes >> 20} MiB)"]
    return rows, duplication, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, help="restores of each function (default 10; --quick 3)")
    bench.arguments(parser, "bench_layers", "3 restores of each function, the heavy example left out")
    args = parser.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 10)
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        pool = Pool.create(Path(tmp) / "pool", backend="tmpfs", node=0, size=6 << 30)
        try:
            rows, duplication, notes = measure(pool, Path(tmp), args)
        finally:
            pool.destroy()
    cold, layered = rows
    ratios = {
        "pool": layered.pool_mib / cold.pool_mib,
        "deploy": cold.deploy_ms / layered.deploy_ms,
        "restore": layered.restore_ms / cold.restore_ms,
        "pss": layered.pss_mib / cold.pss_mib,
    }
    print(bench.table(("how", "functions", "deploy ms", "restore ms", "pool MiB", "Pss MiB"), (
        (r.how, r.functions, r.deploy_ms, r.restore_ms, r.pool_mib, r.pss_mib) for r in rows
    )))  # fmt: skip
    summary = (
        f"layered/cold: pool {ratios['pool']:.0%}, deploy {ratios['deploy']:.2f}x faster, "
        f"restore {ratios['restore']:.2f}x, summed Pss {ratios['pss']:.0%}"
    )
    print(summary)
    print(TARGETS)
    print(bench.table(("templates", "pages", "zero", "duplicate within", "shared across"), (
        (d.templates, d.pages, d.zero_pages, d.duplicate_pages, d.shared_pages) for d in duplication
    )))  # fmt: skip
    conditions = {"pool": "tmpfs node 0", "reps": args.reps, "quick": args.quick, "numpy": HAS_NUMPY}
    doc = bench.Document("bench_layers", {"layers": rows, "duplication": duplication}, conditions, [*notes, summary])
    bench.write(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

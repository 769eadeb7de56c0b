"""The bench harness: timing, one percentile formula, the table, `--json`, and the row types every
benchmark writes and everything else reads back.

Every `scripts/bench_*.py`, `scripts/simulate_keepalive.py` and `scripts/bench_micro` uses it to
measure and to write; `scripts/report` and `daemon/keepalive.py` (the cost model) use it to read.

Why it lives in `daemon/`: imports flow `daemon -> snapshot | sandbox -> shmpool -> native`, and
`daemon/keepalive.py` reads restore and codec rows back, so the row types must be importable from
`daemon`; `scripts/` is not an installed package. Lower packages could hold them too, but the rows
speak of restore modes, invocation paths, LoRA systems and keep-alive policies, which the pool knows
nothing of; and nothing below `daemon` reads a benchmark. The module is stdlib only (no rich, no
matplotlib), so the daemon can import it for the cost model at no cost.

A benchmark's JSON is one *document*:

    {"benchmark": "bench_restore", "version": 1, "machine": {...}, "conditions": {...},
     "notes": [...], "tables": {"restore": [{row}, ...]}}

`BENCHMARKS` names each benchmark's tables and their row types. Reading is strict: a missing or
unknown field, at the top, in a table or in a row, is refused with its name (a renamed field must
not silently become a hole in a plot or a cost model).

Statistics: one percentile formula, the linear interpolation between closest ranks (Hyndman and
Fan's type 7, numpy's default, `statistics.quantiles(method="inclusive")`), so the 50th percentile
is the usual median. Quote medians and ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

VERSION = 1
RESULTS = Path("bench-results")

# -- statistics ----------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100), linear between the closest ranks (type 7)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("the percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0..100")
    h = (len(ordered) - 1) * q / 100
    low = math.floor(h)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (h - low) * (ordered[high] - ordered[low])


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def percentile_of_counts(counts: Mapping[float, int], q: float) -> float:
    """The same percentile of a multiset given as value -> count (a simulation's millions of starts)."""
    total = sum(counts.values())
    if total == 0:
        raise ValueError("the percentile of no values")
    h = (total - 1) * q / 100
    low_rank, frac = math.floor(h), h - math.floor(h)
    seen, low_value = 0, None
    for value in sorted(counts):
        seen += counts[value]  # ranks seen - count .. seen - 1 hold `value`
        if low_value is None and seen > low_rank:
            low_value = value
            if frac == 0:
                return value
        if low_value is not None and seen > low_rank + 1:
            return low_value + frac * (value - low_value)
    raise AssertionError("unreachable: rank h + 1 <= total - 1 whenever frac > 0")


def cdf(values: Iterable[float], points: int = 101) -> list[float]:
    """The values at `points` evenly spaced percentiles from 0 to 100: a distribution in a few numbers."""
    ordered = sorted(values)
    return [round(percentile(ordered, 100 * i / (points - 1)), 4) for i in range(points)]


@dataclass(frozen=True)
class Summary:
    median: float
    p90: float
    p99: float
    min: float
    max: float
    runs: int


def summarize(values: Sequence[float]) -> Summary:
    ordered = sorted(values)
    return Summary(
        median(ordered), percentile(ordered, 90), percentile(ordered, 99), ordered[0], ordered[-1], len(ordered)
    )


# -- timing --------------------------------------------------------------------------------------


def time_ms(action: Callable[[], object]) -> float:
    """Wall time of one call, in ms (perf_counter: monotonic, the highest resolution there is)."""
    t0 = time.perf_counter()
    action()
    return (time.perf_counter() - t0) * 1e3


def repeat_ms(action: Callable[[], object], runs: int) -> list[float]:
    return [time_ms(action) for _ in range(runs)]


# -- the table -----------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        digits = 3 if abs(value) < 1 else 2 if abs(value) < 100 else 1 if abs(value) < 1000 else 0
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain text table, numbers right-aligned, never cut (a pipe or a log keeps every column)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


# -- the row types -------------------------------------------------------------------------------
# Field names are the JSON's. A field added here is required in every file from then on: older
# files are refused with the field named, and the benchmark is rerun.


@dataclass(frozen=True)
class RestoreRow:
    """scripts/bench_restore: restore (or cold start) to first reply of a guest holding `size_mib`."""

    size_mib: int
    mode: str  # cold | copy | lazy | cow
    threads: int  # threads of the guest at capture
    instances: int  # live at once when Rss/Pss were read
    state_read: bool  # Rss/Pss read after each instance read all its state (else right after the reply)
    median_ms: float
    p90_ms: float
    rss_mib: float
    pss_mib: float
    runs: int
    ratio_vs_cow: float | None


@dataclass(frozen=True)
class CompressedRow:
    """scripts/bench_restore --compressed: a restore and the first invocation, compressed or not."""

    mode: str
    codec: str | None  # None: uncompressed
    restore_ms: float
    first_invoke_ms: float
    pool_mib: float
    runs: int
    ratio_vs_cow: float


@dataclass(frozen=True)
class CodecRow:
    """scripts/bench_codecs: a codec at a level on a kind of template pages."""

    codec: str  # "none": the same fault path uncompressed
    level: int
    data: str
    ratio: float
    compress_mb_s: float | None
    decompress_mb_s: float | None
    fault_us: float  # per 4 KiB page through the pager
    runs: int


@dataclass(frozen=True)
class InvokeRow:
    """scripts/bench_invoke: one cell of invocations through thawd (or straight to a guest)."""

    path: str  # warm | restore | direct (bursts are BurstRow)
    concurrency: int
    p50_ms: float
    p99_ms: float
    rps: float
    requests: int
    errors: int
    cdf_ms: list[float]  # latency at percentiles 0, 1, ..., 100


@dataclass(frozen=True)
class BurstRow:
    """scripts/bench_invoke: a burst of requests released at one instant to a function scaled to
    zero (no instance live), as the gateway forwards the requests queued during a scale from zero."""

    path: str  # burst
    concurrency: int  # requests in the burst
    p50_ms: float  # each request's latency from the release, over every round
    p99_ms: float
    makespan_ms: float  # from the release to the last answer (the median of the rounds)
    restores: int  # instances thawed for one burst (the median of the rounds)
    errors: int  # non-200 answers, over every round


@dataclass(frozen=True)
class SandboxRow:
    """scripts/bench_sandbox: create, repurpose or release a sandbox."""

    op: str
    median_ms: float
    p90_ms: float
    runs: int


@dataclass(frozen=True)
class PoolRow:
    """scripts/bench_numa: one metric of a pool backend on a NUMA node."""

    node: int
    backend: str
    metric: str  # seq_read | copy | latency | map_read | map_cow
    value: float
    unit: str


@dataclass(frozen=True)
class LoraThroughputRow:
    """scripts/bench_lora: decode throughput of a system with `adapters` adapters."""

    model: str
    device: str
    system: str  # thaw | peft | merge-swap | base
    adapters: int
    popularity: str  # uniform | zipf | - (base)
    tokens_per_s: float


@dataclass(frozen=True)
class LoraLoadRow:
    """scripts/bench_lora: loading a model or an adapter from a source, then a pass over it."""

    model: str
    device: str
    what: str  # model | adapter
    source: str  # pool | safetensors | safetensors-cached
    load_ms: float


@dataclass(frozen=True)
class PolicyRow:
    """scripts/simulate_keepalive: a keep-alive policy replayed over a trace."""

    policy: str
    cold_start_fraction: float
    function_cold_start_p75: float
    memory_mib_s: float
    p99_start_ms: float
    mean_start_ms: float
    starts: dict[str, int]  # warm, decompress, cold
    invocations: int
    peak_mib: float
    budget_mib: float | None
    fixed_cold_start_fraction_at_same_memory: float
    cold_start_fraction_reduction: float | None
    fixed_function_cold_start_p75_at_same_memory: float
    function_cold_start_p75_reduction: float | None
    beyond_sweep: bool


@dataclass(frozen=True)
class SweepRow:
    """scripts/simulate_keepalive: the fixed policy at one keep-alive window (closed form)."""

    keepalive_s: float
    cold_start_fraction: float
    function_cold_start_p75: float
    memory_mib_s: float


@dataclass(frozen=True)
class ShimRow:
    """scripts/bench_shim: container start to first HTTP answer under one containerd runtime."""

    runtime: str  # thaw (containerd-shim-thaw-v2, thawed) | runc (Debian's, the function cold)
    median_ms: float
    p90_ms: float
    runs: int


@dataclass(frozen=True)
class LayersRow:
    """scripts/bench_layers: ten functions deployed one way (cold, or layered on the runtime template)."""

    how: str  # cold | layered
    functions: int
    deploy_ms: float  # median: the guest's start (a spawn, or a thaw of the runtime) to the template captured
    restore_ms: float  # median: a waiting stub to the first reply (cow)
    pool_mib: float  # what the ten templates hold in the pool (layered: with the runtime template)
    pss_mib: float  # summed Pss of one instance of each, all ten running


@dataclass(frozen=True)
class DuplicationRow:
    """scripts/bench_layers: page contents across a set of cold-captured templates (what dedup could save)."""

    templates: str  # which set: examples | functions
    pages: int  # pages the templates store
    zero_pages: int
    duplicate_pages: int  # equal to a page stored earlier in the same template
    shared_pages: int  # equal to a page of another template of the set (and not a duplicate within)


@dataclass(frozen=True)
class CliRow:
    """scripts/bench_cli: a `thaw` command as a whole process."""

    command: str
    argv: str
    min_ms: float
    median_ms: float
    max_ms: float
    runs: int


@dataclass(frozen=True)
class MicroRow:
    """scripts/bench_micro: one pytest-benchmark microbenchmark (its JSON is kept beside)."""

    name: str
    group: str | None
    median_us: float
    min_us: float
    max_us: float
    rounds: int


@dataclass(frozen=True)
class Benchmark:
    name: str
    tables: Mapping[str, type]
    what: str


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("bench_restore", {"restore": RestoreRow}, "restore to first reply per state size and mode"),
        Benchmark("bench_restore_compressed", {"compressed": CompressedRow}, "compressed templates' first invocation"),
        Benchmark("bench_codecs", {"codecs": CodecRow}, "codec ratio and fault cost on template pages"),
        Benchmark(
            "bench_invoke",
            {"invoke": InvokeRow, "burst": BurstRow},
            "invocation latency and throughput through thawd, and bursts from zero",
        ),
        Benchmark("bench_sandbox", {"sandbox": SandboxRow}, "sandbox create, repurpose, release"),
        Benchmark(
            "bench_layers",
            {"layers": LayersRow, "duplication": DuplicationRow},
            "layered templates against cold ones, and page duplication across templates",
        ),
        Benchmark("bench_numa", {"pool": PoolRow}, "pool bandwidth and latency per backend and node"),
        Benchmark(
            "bench_lora",
            {"throughput": LoraThroughputRow, "loads": LoraLoadRow},
            "LoRA decode throughput and load times",
        ),
        Benchmark("simulate_keepalive", {"policies": PolicyRow, "sweep": SweepRow}, "keep-alive policies over a trace"),
        Benchmark("bench_cli", {"commands": CliRow}, "thaw commands as whole processes"),
        Benchmark("bench_shim", {"shim": ShimRow}, "container start to first HTTP answer: thaw's shim vs runc"),
        Benchmark("bench_micro", {"micro": MicroRow}, "pytest-benchmark microbenchmarks"),
    )
}

R = TypeVar("R")


# -- the document --------------------------------------------------------------------------------


class BenchDataError(ValueError):
    """A benchmark's JSON is not what its benchmark writes; the message names the file and the field."""


def machine() -> dict[str, Any]:
    """The machine as the benchmark saw it (the report's first section reads it)."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    nodes = sorted(int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*") if p.name[4:].isdigit())
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpus": os.cpu_count() or 0,
        "memory_mib": pages >> 20,
        "numa_nodes": nodes,
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kerndat": _features(),
    }


def _features() -> dict[str, Any]:
    """kerndat's probed features (native/kerndat.py), what every branch of thaw decides on."""
    from native.kerndat import kerndat  # probed once per process; only writers of documents pay it

    kd = kerndat()
    skip = {"nodes", "devdax", "errors", "uffd_features"}
    found = {f.name: getattr(kd, f.name) for f in dataclasses.fields(kd) if f.name not in skip}
    found["devdax"] = [d.path for d in kd.devdax]
    found["errors"] = dict(kd.errors)
    return found


@dataclass
class Document:
    benchmark: str
    tables: dict[str, list[Any]]
    conditions: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine)
    version: int = VERSION

    def rows(self, table: str, kind: type[R]) -> list[R]:
        """The rows of `table`, typed (the table must be of `kind`)."""
        rows = self.tables.get(table)
        if rows is None:
            raise BenchDataError(f"{self.benchmark} has no table {table!r}")
        if not all(isinstance(r, kind) for r in rows):
            raise BenchDataError(f"{self.benchmark}.{table} holds {BENCHMARKS[self.benchmark].tables[table].__name__}")
        return list(rows)


_TOP = {f.name for f in dataclasses.fields(Document)}


def to_json(doc: Document) -> str:
    benchmark = BENCHMARKS.get(doc.benchmark)
    if benchmark is None:
        raise BenchDataError(f"unknown benchmark {doc.benchmark!r} (known: {', '.join(BENCHMARKS)})")
    if set(doc.tables) != set(benchmark.tables):
        raise BenchDataError(
            f"{doc.benchmark} has the tables {', '.join(benchmark.tables)}, not {', '.join(doc.tables)}"
        )
    for name, rows in doc.tables.items():
        kind = benchmark.tables[name]
        for row in rows:
            if not isinstance(row, kind):
                raise BenchDataError(f"{doc.benchmark}.{name}: a {type(row).__name__} where {kind.__name__} rows go")
    body = {
        "benchmark": doc.benchmark,
        "version": doc.version,
        "machine": doc.machine,
        "conditions": doc.conditions,
        "notes": doc.notes,
        "tables": {name: [dataclasses.asdict(r) for r in rows] for name, rows in doc.tables.items()},
    }
    return json.dumps(body, indent=1) + "\n"


def write(path: Path | str, doc: Document) -> Path:
    """Write the document (checked as it will be read) and say where."""
    path = Path(path)
    text = to_json(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return path


def _type_ok(value: object, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def parse_row(kind: type[R], raw: object, where: str) -> R:
    """One row, every field present, none unknown, each of its declared type."""
    if not isinstance(raw, dict):
        raise BenchDataError(f"{where}: a row must be an object, not {type(raw).__name__}")
    hints = typing.get_type_hints(kind)
    names = [f.name for f in dataclasses.fields(kind)]  # type: ignore[arg-type]
    for name in names:
        if name not in raw:
            raise BenchDataError(f"{where}: missing field {name!r}")
    for name in raw:
        if name not in hints:
            raise BenchDataError(f"{where}: unknown field {name!r} ({kind.__name__} has {', '.join(names)})")
    for name in names:
        if not _type_ok(raw[name], hints[name]):
            raise BenchDataError(f"{where}: field {name!r} is {raw[name]!r}, expected {_type_name(hints[name])}")
    return kind(**raw)


def parse(data: object, source: str, expect: str | None = None) -> Document:
    """A document from its JSON value; `source` names it in errors (a path)."""
    if not isinstance(data, dict):
        raise BenchDataError(f"{source}: expected a benchmark document (an object), not {type(data).__name__}")
    for name in _TOP:
        if name not in data:
            raise BenchDataError(f"{source}: missing field {name!r}")
    for name in data:
        if name not in _TOP:
            raise BenchDataError(f"{source}: unknown field {name!r} (a document has {', '.join(sorted(_TOP))})")
    if data["version"] != VERSION:
        raise BenchDataError(f"{source}: field 'version' is {data['version']!r}; this thaw reads {VERSION}")
    name = data["benchmark"]
    benchmark = BENCHMARKS.get(name) if isinstance(name, str) else None
    if benchmark is None:
        raise BenchDataError(f"{source}: field 'benchmark' is {name!r}, not one of {', '.join(BENCHMARKS)}")
    if expect is not None and name != expect:
        raise BenchDataError(f"{source}: written by {name}, expected {expect}")
    for key, shape in (("machine", dict), ("conditions", dict), ("notes", list), ("tables", dict)):
        if not isinstance(data[key], shape):
            raise BenchDataError(f"{source}: field {key!r} must be a{'n object' if shape is dict else ' list'}")
    raw_tables: dict[str, Any] = data["tables"]
    for table in benchmark.tables:
        if table not in raw_tables:
            raise BenchDataError(f"{source}: missing table {table!r} (field 'tables.{table}')")
    tables: dict[str, list[Any]] = {}
    for table, rows in raw_tables.items():
        kind = benchmark.tables.get(table)
        if kind is None:
            raise BenchDataError(f"{source}: unknown table {table!r} ({name} has {', '.join(benchmark.tables)})")
        if not isinstance(rows, list):
            raise BenchDataError(f"{source}: table {table!r} must be a list of rows")
        tables[table] = [parse_row(kind, r, f"{source}: {table} row {i}") for i, r in enumerate(rows)]
    return Document(name, tables, data["conditions"], data["notes"], data["machine"], VERSION)


def read(path: Path | str, expect: str | None = None) -> Document:
    """Read and check a benchmark's JSON (BenchDataError names the file and the field)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise BenchDataError(f"read {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise BenchDataError(f"{path}: not JSON ({e})") from e
    return parse(data, str(path), expect)


# -- the command line ----------------------------------------------------------------------------


def arguments(parser: argparse.ArgumentParser, name: str, quick: str) -> None:
    """The options every benchmark has: `--json PATH` (default bench-results/NAME.json) and
    `--quick` (fewer repetitions and sizes, for a look or a test; `quick` says what it changes)."""
    default = RESULTS / f"{name}.json"
    parser.add_argument("--json", type=Path, default=default, metavar="PATH", help=f"where the rows go [{default}]")
    parser.add_argument("--quick", action="store_true", help=f"a short run: {quick}")

"""Keep-alive under a memory budget: how long to keep a function's template, and in what form.

Two questions, answered by two published ideas:

**How long** (Shahrad et al., "Serverless in the Wild", USENIX ATC'20, the *hybrid histogram
policy*). Per function, a histogram of idle times (from the end of one invocation to the next
arrival) in 1-minute bins over a 4-hour range; idle times beyond the range are counted apart as
out-of-bound (OOB). After each invocation the policy derives two windows from it:

- pre-warm window: how long after the invocation to unload the function and then load it back; the
  5th percentile of the idle times (the *head*, taken at its bin's lower edge) less a 10% margin.
  0 means "do not unload": keep it from the end of the invocation.
- keep-alive window: how long it then stays loaded; up to the 99th percentile (the *tail*, at its
  bin's upper edge) plus a 10% margin, counted from the end of the pre-warm window.

The histogram is trusted only when it is *representative*: the coefficient of variation (CV) of its
bin counts is at least 2 (the mass sits in a few bins; idle times spread evenly over the range give a
CV near 0). When it is not, the policy falls back to the standard policy: no pre-warm, keep alive
for the whole range (4 hours). So it does while the function has fewer than `min_samples` idle
times: with one sample the CV is already high (one full bin), so the paper's test alone would trust
a single observation; the minimum is thaw's addition. When OOB idle times are the majority (at
least half), the paper forecasts the next idle time with ARIMA; thaw does not (no time-series
model in the daemon) and uses the same fixed fallback instead: no pre-warm, keep-alive of the range.
The rules and constants follow the paper as re-implemented by the dslab-faas simulator
(HEAD 0.05, TAIL 0.99, margin 0.1, CV threshold 2, OOB threshold 0.5) and the OpenDC serverless
policy (head/tail as the 5th/99th percentiles of the range-limited histogram).

**In what form** (Basu Roy et al., "CodeCrunch", ASPLOS'24: compress kept-alive functions when
memory is short). A function inside its keep-alive window is kept `warm` (its template as it is:
the next start is a restore), `compressed` (it holds memory/ratio; the next start also decompresses
its working set) or `evicted` (nothing held; the next start is a cold start). `plan()` chooses, for
all kept functions at once, the forms that minimise the expected start latency within the budget.
A form costs its penalty over a warm start (a decompression, or a cold start; a compressed start is
never worse than a cold one, which it can always fall back to) on every start it applies to. A plan
holds until the next one (made at the latest a planning horizon later, a minute in the simulator) and
the next one is made on the same grounds, so a form chosen now applies to every start before the
next plan, and to the next start after it if that still falls in the keep-alive window (the plan may
well stand till then). The histogram gives the expected number of those starts: the chance of the
next arrival within the horizon or, for a function invoked many times in it, the horizon over its
mean idle time; plus the chance of an arrival after the horizon but within the window. (Counting
starts matters: a function invoked every second and one invoked every minute are both ~certain to
be invoked within a minute, but keeping the first compressed costs sixty decompressions a minute.)
CodeCrunch searches that space with an optimiser; thaw uses the greedy rule of the multiple-choice
knapsack (see `plan`), which is optimal for the fractional problem and good in practice.

The costs (restore, cold start, ratio, decompression speed) are measurements, never constants here:
`load_costs` reads what `scripts/bench_restore` and `scripts/bench_codecs` wrote, through the bench
harness's row types (daemon/bench.py); it is the only function of this module that touches a file.
Everything else is plain data and arithmetic, so thawd's instance manager and `scripts/simulate_keepalive` share it.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from daemon import bench

# -- the idle-time histogram ---------------------------------------------------------------------

BIN_S = 60.0  # 1-minute bins, as the paper
RANGE_S = 4 * 3600.0  # a 4-hour range: idle times beyond it are out-of-bound
HEAD_PERCENTILE = 0.05
TAIL_PERCENTILE = 0.99
MARGIN = 0.10  # the head is lowered and the tail raised by 10%
CV_THRESHOLD = 2.0  # representative when the CV of the bin counts is at least this
OOB_THRESHOLD = 0.5  # out-of-bound-heavy when at least this fraction of idle times is beyond the range
MIN_SAMPLES = 5  # thaw's: fewer idle times than this are not a histogram yet
NO_EVIDENCE = 0.5  # the hit probability of a function never seen idle: no evidence either way


@dataclass
class IdleHistogram:
    """Idle times of one function in `bin_s` bins over `range_s`; longer ones counted apart."""

    bin_s: float = BIN_S
    range_s: float = RANGE_S
    counts: list[int] = field(init=False)
    in_bounds: int = 0
    out_of_bounds: int = 0
    _sum_squares: int = 0  # sum of counts**2, so the CV of the counts costs O(1) per sample
    _sum_in_bounds_s: float = 0.0  # exact, for the mean: a bin would round 0.1 s up to 30 s

    def __post_init__(self) -> None:
        self.counts = [0] * math.ceil(self.range_s / self.bin_s)

    @property
    def samples(self) -> int:
        return self.in_bounds + self.out_of_bounds

    def record(self, idle_s: float) -> None:
        index = int(max(idle_s, 0.0) // self.bin_s)
        if index >= len(self.counts):
            self.out_of_bounds += 1
            return
        count = self.counts[index]
        self._sum_squares += 2 * count + 1  # (c+1)**2 - c**2
        self.counts[index] = count + 1
        self.in_bounds += 1
        self._sum_in_bounds_s += max(idle_s, 0.0)

    def coefficient_of_variation(self) -> float:
        """CV of the bin counts (sample standard deviation over the mean), 0 when empty."""
        n = len(self.counts)
        if self.in_bounds == 0 or n < 2:
            return 0.0
        mean = self.in_bounds / n
        variance = (self._sum_squares - n * mean * mean) / (n - 1)
        return math.sqrt(max(variance, 0.0)) / mean

    def oob_fraction(self) -> float:
        return self.out_of_bounds / self.samples if self.samples else 0.0

    def percentile_bin(self, q: float) -> int:
        """The bin holding the q-th quantile of the in-bound idle times (there must be some)."""
        wanted = q * self.in_bounds
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if count and seen >= wanted:
                return index
        return len(self.counts) - 1

    def head_s(self) -> float:
        """Lower edge of the 5th percentile's bin: pre-warming later than this would miss it."""
        return self.percentile_bin(HEAD_PERCENTILE) * self.bin_s

    def tail_s(self) -> float:
        """Upper edge of the 99th percentile's bin: keeping longer than this rarely pays."""
        return (self.percentile_bin(TAIL_PERCENTILE) + 1) * self.bin_s

    def surviving(self, idle_s: float) -> float:
        """How many recorded idle times lasted longer than `idle_s`: out-of-bound ones all did, and a
        bin's samples are taken as spread evenly over it."""
        idle_s = max(idle_s, 0.0)
        index = int(idle_s // self.bin_s)
        if index >= len(self.counts):
            return float(self.out_of_bounds)
        inside = 1.0 - (idle_s - index * self.bin_s) / self.bin_s
        return self.out_of_bounds + sum(self.counts[index + 1 :]) + self.counts[index] * inside

    def mean_idle_s(self) -> float:
        """Mean idle time, out-of-bound ones counted as the range (so a lower bound); inf when empty."""
        if self.samples == 0:
            return math.inf
        return (self._sum_in_bounds_s + self.out_of_bounds * self.range_s) / self.samples

    def hit_probability(self, elapsed_s: float, until_s: float) -> float:
        """P(the idle time ends by `until_s` | it has lasted `elapsed_s`), from the histogram. With no
        samples there is no evidence either way: NO_EVIDENCE; past every sample, 0."""
        if self.samples == 0:
            return NO_EVIDENCE
        alive = self.surviving(elapsed_s)
        return (alive - self.surviving(max(until_s, elapsed_s))) / alive if alive else 0.0

    def expected_starts(self, elapsed_s: float, until_s: float) -> float:
        """Expected arrivals between `elapsed_s` and `until_s` into the idle time: the chance of the
        next one, or, for a function invoked many times in that span, the span over the mean idle
        time (a form chosen for the span applies to every start in it)."""
        span = max(until_s - elapsed_s, 0.0)
        return max(self.hit_probability(elapsed_s, until_s), span / self.mean_idle_s())


# -- the policies --------------------------------------------------------------------------------


class Windows(NamedTuple):
    """After an invocation: unload for `prewarm_s` (0: not at all), then keep for `keepalive_s`."""

    prewarm_s: float
    keepalive_s: float


class Pattern(enum.StrEnum):
    """Which rule of the hybrid policy set a function's windows."""

    HISTOGRAM = "histogram"  # representative: windows from the head and the tail
    FEW_SAMPLES = "few-samples"  # fewer than min_samples idle times: the standard fallback
    NOT_REPRESENTATIVE = "not-representative"  # CV of the bin counts below the threshold: fallback
    OUT_OF_BOUNDS = "out-of-bounds"  # mostly beyond the range: the paper's ARIMA case, here the fallback


class KeepAlivePolicy(Protocol):
    name: str

    def record(self, function: str, idle_s: float) -> None: ...

    def windows(self, function: str) -> Windows: ...


@dataclass
class FixedKeepAlive:
    """The baseline (AWS Lambda-like): keep every function for `keepalive_s` after each invocation."""

    keepalive_s: float = 600.0
    name: str = "fixed"

    def record(self, function: str, idle_s: float) -> None:
        pass  # a fixed policy learns nothing

    def windows(self, function: str) -> Windows:
        return Windows(0.0, self.keepalive_s)


@dataclass
class HybridHistogramPolicy:
    """Shahrad et al.'s hybrid histogram policy, with the fixed fallback where the paper uses ARIMA.

    `record(function, idle_s)` after each arrival (idle time: end of the previous invocation to this
    arrival), then `windows(function)` for what to do until the next one. See the module docstring
    for the rules; `pattern(function)` says which one applies."""

    bin_s: float = BIN_S
    range_s: float = RANGE_S
    margin: float = MARGIN
    cv_threshold: float = CV_THRESHOLD
    oob_threshold: float = OOB_THRESHOLD
    min_samples: int = MIN_SAMPLES
    name: str = "hybrid"
    histograms: dict[str, IdleHistogram] = field(default_factory=dict)

    def histogram(self, function: str) -> IdleHistogram:
        found = self.histograms.get(function)
        if found is None:
            found = self.histograms[function] = IdleHistogram(self.bin_s, self.range_s)
        return found

    def record(self, function: str, idle_s: float) -> None:
        self.histogram(function).record(idle_s)

    def pattern(self, function: str) -> Pattern:
        h = self.histogram(function)
        if h.samples < self.min_samples:
            return Pattern.FEW_SAMPLES
        if h.oob_fraction() >= self.oob_threshold:
            return Pattern.OUT_OF_BOUNDS
        if h.coefficient_of_variation() < self.cv_threshold:
            return Pattern.NOT_REPRESENTATIVE
        return Pattern.HISTOGRAM

    def windows(self, function: str) -> Windows:
        if self.pattern(function) is not Pattern.HISTOGRAM:
            return Windows(0.0, self.range_s)  # the standard keep-alive: load now, keep the whole range
        h = self.histogram(function)
        prewarm = h.head_s() * (1 - self.margin)
        return Windows(prewarm, h.tail_s() * (1 + self.margin) - prewarm)

    def candidate(self, function: str, costs: Costs, elapsed_s: float, window_s: float, horizon_s: float) -> Candidate:
        """What the cost model needs of a kept function `elapsed_s` into its idle time, whose window
        ends `window_s` into it, planned for the next `horizon_s`: the starts a form chosen now
        applies to, those before the next plan and the next one after it within the window."""
        h = self.histogram(function)
        horizon_end = min(window_s, elapsed_s + horizon_s)
        later = h.hit_probability(elapsed_s, window_s) - h.hit_probability(elapsed_s, horizon_end)
        return Candidate(function, costs, h.expected_starts(elapsed_s, horizon_end) + max(later, 0.0))


# -- the cost model (CodeCrunch) -----------------------------------------------------------------


class Form(enum.StrEnum):
    """What is held of a kept-alive function, and so what its next start costs."""

    WARM = "warm"  # the template as it is: the next start is a restore
    COMPRESSED = "compressed"  # memory/ratio held: the next start restores and decompresses the working set
    EVICTED = "evicted"  # nothing held: the next start is a cold start


@dataclass(frozen=True)
class Costs:
    """What one function's starts cost and what it holds, from the benchmarks' measurements.

    A compressed start never costs more than a cold one: when decompressing the working set would
    take longer, the start is a cold start instead. Compressed is CodeCrunch's model: the whole
    template compressed, the working set decompressed before the start. thaw's own layout (DESIGN.md)
    keeps the working set uncompressed and serves the cold rest through the pager, which would hold
    working set + rest/ratio and pay refaults instead."""

    restore_ms: float  # restore of an uncompressed template to its first reply
    cold_start_ms: float  # spawn, import, init, first reply
    decompress_mb_s: float  # decompression speed of the codec, MB (10**6 bytes) per second
    ratio: float  # compression ratio of the codec on template pages
    memory_mib: float  # the function's template
    working_set_mib: float  # what its next start touches, decompressed before it runs

    def decompress_ms(self) -> float:
        return self.working_set_mib * (1 << 20) / (self.decompress_mb_s * 1e6) * 1e3

    def start_ms(self, form: Form) -> float:
        if form is Form.WARM:
            return self.restore_ms
        if form is Form.COMPRESSED:
            return min(self.restore_ms + self.decompress_ms(), self.cold_start_ms)
        return self.cold_start_ms

    def held_mib(self, form: Form) -> float:
        if form is Form.WARM:
            return self.memory_mib
        if form is Form.COMPRESSED:
            return self.memory_mib / self.ratio
        return 0.0


@dataclass(frozen=True)
class Candidate:
    """A kept-alive function: its costs, and the expected number of starts that the form chosen for it
    now applies to (see the module docstring; `HybridHistogramPolicy.candidate` computes it)."""

    function: str
    costs: Costs
    expected_starts: float


class _Step(NamedTuple):
    efficiency: float  # expected ms saved per MiB
    function: str
    form: Form
    extra_mib: float


def _options(c: Candidate) -> list[tuple[Form, float, float]]:
    """(form, MiB held, expected ms saved over evicting) on the upper convex hull, by memory.

    A form saves (cold start - its start) on each expected start. One that saves no more than a
    cheaper one is dropped (compressed, when decompressing is no faster than a cold start), and so is
    one under the line between its neighbours: the greedy takes each function's forms in order of
    falling return, which the hull guarantees."""
    hull: list[tuple[Form, float, float]] = [(Form.EVICTED, 0.0, 0.0)]
    cold = c.costs.cold_start_ms
    for form in (Form.COMPRESSED, Form.WARM):
        held, saved = c.costs.held_mib(form), c.expected_starts * (cold - c.costs.start_ms(form))
        if saved < hull[-1][2] or (saved == hull[-1][2] and held > hull[-1][1]):
            continue
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], (form, held, saved)):
            hull.pop()
        hull.append((form, held, saved))
    return hull


def _slope(a: tuple[Form, float, float], b: tuple[Form, float, float]) -> float:
    return math.inf if b[1] <= a[1] else (b[2] - a[2]) / (b[1] - a[1])


def plan(candidates: Iterable[Candidate], budget_mib: float) -> dict[str, Form]:
    """The form of each candidate that minimises the expected start latency within `budget_mib`.

    The rule: every function starts evicted; each step up its hull of forms (evicted -> compressed
    -> warm, or straight to warm) saves some expected ms (see `_options`) and costs some MiB.
    Steps are taken in order of ms saved per MiB, best first, while they fit; a function whose step
    does not fit stays where it is. With memory to spare everything worth holding is warm."""
    chosen: dict[str, Form] = {}
    steps: list[_Step] = []
    for c in candidates:
        chosen[c.function] = Form.EVICTED
        hull = _options(c)
        for before, after in itertools.pairwise(hull):
            steps.append(_Step(_slope(before, after), c.function, after[0], after[1] - before[1]))
    steps.sort(key=lambda s: (-s.efficiency, s.function))
    left, stuck = budget_mib, set()
    for step in steps:
        if step.function in stuck:
            continue
        if step.extra_mib > left:
            stuck.add(step.function)  # its later steps build on this one
            continue
        left -= step.extra_mib
        chosen[step.function] = step.form
    return chosen


# -- costs from the benchmarks' JSON -------------------------------------------------------------


class CostsError(ValueError):
    """A benchmark's JSON lacks what the cost model needs; the message names the file and the gap."""


@dataclass(frozen=True)
class SizeCosts:
    size_mib: float
    cold_start_ms: float
    restore_ms: float


@dataclass(frozen=True)
class MeasuredCosts:
    """The measured figures: cold start and restore per state size, and one codec's ratio and speed."""

    sizes: tuple[SizeCosts, ...]  # by size
    restore_mode: str
    codec: str
    level: int | None
    data: str
    ratio: float
    decompress_mb_s: float

    def for_function(self, memory_mib: float, working_set_mib: float) -> Costs:
        """Costs of a function holding `memory_mib`: cold start and restore interpolated linearly
        between the measured sizes (clamped to the smallest and largest measured)."""
        cold, restore = _interpolate(self.sizes, memory_mib)
        return Costs(restore, cold, self.decompress_mb_s, self.ratio, memory_mib, working_set_mib)

    def describe(self) -> str:
        sizes = ", ".join(
            f"{s.size_mib:g} MiB cold {s.cold_start_ms:g} / {self.restore_mode} {s.restore_ms:g} ms" for s in self.sizes
        )
        level = "" if self.level is None else f" level {self.level}"
        return (
            f"{sizes}; {self.codec}{level} on {self.data}: ratio {self.ratio:g}, "
            f"decompress {self.decompress_mb_s:g} MB/s"
        )


def _interpolate(sizes: Sequence[SizeCosts], mib: float) -> tuple[float, float]:
    if mib <= sizes[0].size_mib:
        return sizes[0].cold_start_ms, sizes[0].restore_ms
    for low, high in itertools.pairwise(sizes):
        if mib <= high.size_mib:
            f = (mib - low.size_mib) / (high.size_mib - low.size_mib)
            return (
                low.cold_start_ms + f * (high.cold_start_ms - low.cold_start_ms),
                low.restore_ms + f * (high.restore_ms - low.restore_ms),
            )
    return sizes[-1].cold_start_ms, sizes[-1].restore_ms


def _document(path: Path, benchmark: str) -> bench.Document:
    """The benchmark's document, checked field by field by the bench harness."""
    try:
        return bench.read(path, benchmark)
    except bench.BenchDataError as e:
        raise CostsError(f"{e} (rerun scripts/{benchmark.removesuffix('_compressed')} to write it afresh)") from e


def _restore_costs(path: Path, mode: str) -> tuple[SizeCosts, ...]:
    """Per size: the 'cold' row's and the `mode` row's median (the single-instance rows measured
    right after the first reply; bench_restore also measures cow with several instances alive)."""
    cold: dict[float, float] = {}
    restore: dict[float, float] = {}
    for row in _document(path, "bench_restore").rows("restore", bench.RestoreRow):
        if row.mode not in ("cold", mode) or row.instances != 1 or row.state_read or row.threads != 1:
            continue
        (cold if row.mode == "cold" else restore)[row.size_mib] = _positive(path, row, "median_ms", row.median_ms)
    if not cold:
        raise CostsError(f"{path}: no row with mode 'cold' (scripts/bench_restore writes one per size)")
    for size in sorted(cold.keys() ^ restore.keys()):
        have, lack = ("cold", mode) if size in cold else (mode, "cold")
        raise CostsError(f"{path}: size {size:g} MiB has a {have!r} row but no {lack!r} row")
    return tuple(SizeCosts(size, cold[size], restore[size]) for size in sorted(cold))


def _positive(path: Path, row: object, key: str, value: float | None) -> float:
    if value is None or not value > 0:
        raise CostsError(f"{path}: {row} has {key}={value!r}, expected a positive number")
    return float(value)


def _codec_row(path: Path, codec: str, level: int | None, data: str | None) -> bench.CodecRow:
    rows = _document(path, "bench_codecs").rows("codecs", bench.CodecRow)
    mine = [r for r in rows if r.codec == codec]
    if not mine:
        present = sorted({r.codec for r in rows})
        raise CostsError(f"{path}: no row for codec {codec!r} (codecs present: {', '.join(present) or 'none'})")
    levels = sorted({r.level for r in mine})
    if level is None and len(levels) > 1:
        raise CostsError(f"{path}: {codec} was measured at levels {levels}: choose one")
    wanted = levels[0] if level is None else level
    mine = [r for r in mine if r.level == wanted]
    if not mine:
        raise CostsError(f"{path}: no row for {codec} at level {level} (levels present: {levels})")
    if data is not None:
        kinds = sorted({r.data for r in mine})
        mine = [r for r in mine if r.data == data]
        if not mine:
            raise CostsError(f"{path}: no row for {codec} level {wanted} on data {data!r} (data present: {kinds})")
    # Without a choice of data, the least compressible kind measured: a conservative ratio.
    return min(mine, key=lambda r: _positive(path, r, "ratio", r.ratio))


def load_costs(
    restore_json: Path,
    codecs_json: Path,
    codec: str = "zstd",
    level: int | None = None,
    data: str | None = None,
    restore_mode: str = "cow",
) -> MeasuredCosts:
    """Read the measured costs from the documents `scripts/bench_restore` and `scripts/bench_codecs`
    wrote (daemon/bench.py: RestoreRow's `size_mib`, `mode` of cold, cow, copy or lazy, `median_ms`;
    CodecRow's `codec`, `level`, `data`, `ratio`, `decompress_mb_s`), each checked field by field.

    `level` may be left out when the codec was measured at one level only; `data` (which kind of
    pages) when left out picks the kind with the lowest ratio. Raises CostsError naming the file
    and the missing key or row."""
    sizes = _restore_costs(Path(restore_json), restore_mode)
    row = _codec_row(Path(codecs_json), codec, level, data)
    return MeasuredCosts(
        sizes=sizes,
        restore_mode=restore_mode,
        codec=codec,
        level=row.level,
        data=row.data,
        ratio=_positive(Path(codecs_json), row, "ratio", row.ratio),
        decompress_mb_s=_positive(Path(codecs_json), row, "decompress_mb_s", row.decompress_mb_s),
    )

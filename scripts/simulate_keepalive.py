"""Keep-alive simulator (run it as `scripts/simulate_keepalive`): cold starts and memory-time of keep-alive policies.

Replays a trace of function arrivals through three policies of daemon/keepalive.py:

- fixed               keep every function's template for 10 minutes after each invocation (AWS-like)
- hybrid              Shahrad et al.'s hybrid histogram policy (pre-warm and keep-alive windows per function)
- hybrid+codecrunch   hybrid, with the kept templates warm, compressed or evicted under --budget-mib
                      (default: half the hybrid policy's peak), chosen by the CodeCrunch-style cost model

One template per function is modelled (as the paper's simulation does: concurrency is not), and an
idle time is the time between two arrivals (invocations take no time). A start is `warm` (the template
is held: a restore), `decompress` (held compressed: a restore plus decompressing the working set) or
`cold` (nothing held: spawn, import, init). Start latencies come from the benchmarks' measurements,
never from constants here: --restore-json (`scripts/bench_restore --json`, cold and cow per state
size, interpolated to each function's size) and --codecs-json (`scripts/bench_codecs --json`: the
codec's ratio and decompression speed). Memory-time is the integral of what is held (MiB x s): a
compressed template counts memory/ratio. The time spent compressing is not modelled (it is off the
critical path), nor is an evicted template ever reloaded before its next arrival except by a pre-warm.

Two measures of cold starts: the fraction of all invocations that started cold, and the paper's own,
the 3rd quartile over functions of each one's cold-start fraction (`function_cold_start_p75`; the
first is dominated by the few functions invoked many times a second, whose only cold start is their
first). To compare at the same memory-time, the fixed policy is swept over keep-alive windows from 0
to a day (in closed form: a gap longer than the window is a cold start, every gap holds memory for at
most the window), and each measure is interpolated at each policy's memory-time; the issue's target
is >= 20% fewer cold starts than that.

Traces: `--functions N --hours H --seed S` generate one with the Azure Functions 2019 character
(Shahrad et al.): per-function rates log-uniform from --min-rate (1/day) to --max-rate (10/s), so
over six orders of magnitude; 30% periodic (timer-triggered: a cron-like period, +-1% jitter), 50%
Poisson, 20% bursty (on/off: exponential bursts averaging 1-10 minutes, silences 5-200x longer, the
same mean rate); template sizes log-normal around 170 MiB (90% under ~400 MiB, as the paper's
memory figures roughly say), working sets 10-40% of that (as REAP's recorded working sets). The same
seed gives the same trace. `--trace-out PATH` writes it as CSV (`time_s, function, pattern,
rate_per_s, memory_mib, working_set_mib`; a first `#` line holds the horizon), `--trace PATH`
replays one instead of generating.

Prints a table; `--json PATH` (default bench-results/simulate_keepalive.json) writes a bench
document (daemon/bench.py) whose conditions hold the inputs, the costs and the budget, with the
tables `policies` (PolicyRow: `policy`, `cold_start_fraction`, `function_cold_start_p75`,
`memory_mib_s`, `p99_start_ms`, `mean_start_ms`, `starts` (warm, decompress, cold), `peak_mib`, and
per measure `fixed_<measure>_at_same_memory` and `<measure>_reduction`) and `sweep` (SweepRow: the
fixed policy per window). `--quick`: 20 functions over 2 hours. Pure Python; no root.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import functools
import heapq
import itertools
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import bench
from daemon.bench import PolicyRow, SweepRow
from daemon.keepalive import (
    Costs,
    CostsError,
    FixedKeepAlive,
    Form,
    HybridHistogramPolicy,
    KeepAlivePolicy,
    MeasuredCosts,
    load_costs,
    plan,
)

DAY_S = 86400.0
PATTERN_MIX = {"periodic": 0.3, "poisson": 0.5, "bursty": 0.2}
TIMER_PERIODS_MIN = (1, 2, 5, 10, 15, 20, 30, 60, 120, 180, 240, 360, 720, 1440)  # what cron schedules look like
TIMER_JITTER = 0.01
BURST_ON_S = (60.0, 600.0)
BURST_OFF_RATIO = (5.0, 200.0)
MEMORY_MEDIAN_MIB, MEMORY_SIGMA, MEMORY_RANGE_MIB = 170.0, 0.67, (32.0, 2048.0)
WORKING_SET = (0.1, 0.4)
# The fixed policy's windows swept: seconds (where the busiest functions' gaps lie), then minutes up to a day.
SWEEP_MINUTES = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 240, 360, 720, 1440)
FIXED_SWEEP_S = (0, 1, 2, 5, 10, 20, 30, *(60 * m for m in SWEEP_MINUTES))
REPLAN_S = 60.0  # the cost model is re-run this often (the histogram's bin) as well as on every change
TARGET_REDUCTION = 0.20
START_KIND = {Form.WARM: "warm", Form.COMPRESSED: "decompress", Form.EVICTED: "cold"}


# -- traces --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    pattern: str  # periodic | poisson | bursty
    rate_per_s: float  # the nominal mean rate
    memory_mib: float
    working_set_mib: float


@dataclass
class Trace:
    functions: dict[str, FunctionSpec]
    arrivals: dict[str, list[float]]  # per function, in order
    horizon_s: float

    @functools.cached_property
    def merged(self) -> list[tuple[float, str]]:
        """Every arrival in time order."""
        return sorted((t, name) for name, times in self.arrivals.items() for t in times)

    def invocations(self) -> int:
        return sum(len(times) for times in self.arrivals.values())


def generate_trace(
    functions: int, hours: float, seed: int, min_rate: float = 1 / DAY_S, max_rate: float = 10.0
) -> Trace:
    rng = random.Random(seed)
    horizon = hours * 3600.0
    specs = [_function_spec(rng, i, min_rate, max_rate) for i in range(functions)]
    arrivals = {s.name: _arrivals(rng, s, horizon, max_rate) for s in specs}
    return Trace({s.name: s for s in specs}, arrivals, horizon)


def _function_spec(rng: random.Random, index: int, min_rate: float, max_rate: float) -> FunctionSpec:
    rate = math.exp(rng.uniform(math.log(min_rate), math.log(max_rate)))
    pattern = rng.choices(list(PATTERN_MIX), weights=list(PATTERN_MIX.values()))[0]
    if pattern == "periodic":  # a timer: the nearest cron-like period, in log distance
        period = min(TIMER_PERIODS_MIN, key=lambda m: abs(math.log(m * 60 * rate)))
        rate = 1 / (period * 60)
    memory = min(
        max(rng.lognormvariate(math.log(MEMORY_MEDIAN_MIB), MEMORY_SIGMA), MEMORY_RANGE_MIB[0]), MEMORY_RANGE_MIB[1]
    )
    working_set = memory * rng.uniform(*WORKING_SET)
    return FunctionSpec(f"f{index:04d}", pattern, rate, round(memory, 1), round(working_set, 1))


def _arrivals(rng: random.Random, spec: FunctionSpec, horizon: float, max_rate: float) -> list[float]:
    if spec.pattern == "periodic":
        return _periodic(rng, 1 / spec.rate_per_s, horizon)
    if spec.pattern == "poisson":
        return _poisson(rng, spec.rate_per_s, 0.0, horizon)
    return _bursty(rng, spec.rate_per_s, horizon, max_rate)


def _periodic(rng: random.Random, period: float, horizon: float) -> list[float]:
    times, tick = [], rng.uniform(0, period)
    while tick < horizon:
        times.append(max(0.0, tick + rng.uniform(-TIMER_JITTER, TIMER_JITTER) * period))
        tick += period
    return times


def _poisson(rng: random.Random, rate: float, start: float, end: float) -> list[float]:
    times, t = [], start + rng.expovariate(rate)
    while t < end:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def _bursty(rng: random.Random, rate: float, horizon: float, max_rate: float) -> list[float]:
    """On/off: bursts at rate*(1+k) separated by silences k times longer, so the mean is `rate`;
    k is lowered where the burst rate would exceed 4x --max-rate (keeps the fastest ones tractable)."""
    on_mean = rng.uniform(*BURST_ON_S)
    k = math.exp(rng.uniform(*(math.log(x) for x in BURST_OFF_RATIO)))
    k = max(0.0, min(k, 4 * max_rate / rate - 1))
    times: list[float] = []
    t = rng.expovariate(1 / (on_mean * k)) if k else 0.0
    while t < horizon:
        on = rng.expovariate(1 / on_mean)
        times.extend(_poisson(rng, rate * (1 + k), t, min(t + on, horizon)))
        t += on + (rng.expovariate(1 / (on_mean * k)) if k else 0.0)
    return times


TRACE_COLUMNS = ("time_s", "function", "pattern", "rate_per_s", "memory_mib", "working_set_mib")


def write_trace(trace: Trace, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        f.write(f"# thaw keep-alive trace: horizon_s={trace.horizon_s:g}\n")
        writer = csv.writer(f)
        writer.writerow(TRACE_COLUMNS)
        for t, name in trace.merged:
            s = trace.functions[name]
            writer.writerow((f"{t:.3f}", name, s.pattern, repr(s.rate_per_s), s.memory_mib, s.working_set_mib))


def read_trace(path: Path) -> Trace:
    functions: dict[str, FunctionSpec] = {}
    arrivals: dict[str, list[float]] = {}
    horizon = 0.0
    with path.open(newline="") as f:
        first = f.readline()
        if first.startswith("#") and "horizon_s=" in first:
            horizon = float(first.split("horizon_s=")[1].split()[0])
        else:
            f.seek(0)
        reader = csv.DictReader(f)
        missing = set(TRACE_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a keep-alive trace, columns missing: {', '.join(sorted(missing))}")
        for row in reader:
            name = row["function"]
            if name not in functions:
                functions[name] = FunctionSpec(
                    name,
                    row["pattern"],
                    float(row["rate_per_s"]),
                    float(row["memory_mib"]),
                    float(row["working_set_mib"]),
                )
                arrivals[name] = []
            arrivals[name].append(float(row["time_s"]))
    for times in arrivals.values():
        times.sort()
    last = max((times[-1] for times in arrivals.values() if times), default=0.0)
    return Trace(functions, arrivals, max(horizon, math.ceil(last / 3600) * 3600.0))


# -- the replay ----------------------------------------------------------------------------------


@dataclass
class Result:
    policy: str
    memory_mib_s: float = 0.0
    peak_mib: float = 0.0
    budget_mib: float | None = None
    starts: Counter[str] = field(default_factory=Counter)
    latencies: Counter[float] = field(default_factory=Counter)  # start latency (ms) -> starts
    cold_by_function: Counter[str] = field(default_factory=Counter)
    function_cold_fractions: list[float] = field(default_factory=list)  # of each invoked function

    def invocations(self) -> int:
        return sum(self.starts.values())

    def cold_start_fraction(self) -> float:
        return self.starts["cold"] / self.invocations() if self.invocations() else 0.0

    def function_cold_start_p75(self) -> float:
        return quantile(self.function_cold_fractions, 0.75)

    def mean_start_ms(self) -> float:
        total = sum(latency * n for latency, n in self.latencies.items())
        return total / self.invocations() if self.invocations() else 0.0

    def p99_start_ms(self) -> float:
        return bench.percentile_of_counts(self.latencies, 99) if self.invocations() else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "cold_start_fraction": round(self.cold_start_fraction(), 6),
            "function_cold_start_p75": round(self.function_cold_start_p75(), 4),
            "memory_mib_s": round(self.memory_mib_s, 1),
            "p99_start_ms": round(self.p99_start_ms(), 3),
            "mean_start_ms": round(self.mean_start_ms(), 3),
            "starts": {kind: self.starts[kind] for kind in ("warm", "decompress", "cold")},
            "invocations": self.invocations(),
            "peak_mib": round(self.peak_mib, 1),
            "budget_mib": None if self.budget_mib is None else round(self.budget_mib, 1),
        }


@dataclass
class _Kept:
    """One function's template in the replay: what is held of it since when, and its timers."""

    costs: Costs
    form: Form = Form.EVICTED  # EVICTED also means "not held": before a pre-warm, after expiry
    since: float = 0.0
    last_arrival: float | None = None
    expire_at: float = 0.0
    # One live expiry timer per function: a later window moves it lazily (it re-arms when it fires
    # early), a sooner one replaces it (the old one is void: its generation is stale).
    expire_timer_at: float | None = None
    expire_generation: int = 0
    prewarm_generation: int = 0


PREWARM, ARRIVAL, EXPIRE = 0, 1, 2  # at the same instant: pre-warm, then the arrival, then expiry


class Replay:
    """Replays a trace through a policy; with a budget (hybrid only) the cost model runs on every
    change of what is held and every REPLAN_S, and what it evicts stays evicted until an arrival
    or a pre-warm."""

    def __init__(
        self, trace: Trace, policy: KeepAlivePolicy, costs: MeasuredCosts, budget_mib: float | None = None
    ) -> None:
        if budget_mib is not None and not isinstance(policy, HybridHistogramPolicy):
            raise ValueError("a memory budget needs the hybrid policy's histograms")
        self.trace, self.policy, self.budget = trace, policy, budget_mib
        self.kept = {
            name: _Kept(costs.for_function(s.memory_mib, s.working_set_mib)) for name, s in trace.functions.items()
        }
        name = policy.name if budget_mib is None else f"{policy.name}+codecrunch"
        self.result = Result(name, budget_mib=budget_mib)
        self.timers: list[tuple[float, int, int, str, int]] = []
        self.sequence = itertools.count()
        self.held = 0.0

    def run(self) -> Result:
        if self.budget is not None:
            self._push(REPLAN_S, PREWARM, "", -1)  # the periodic re-plan rides the pre-warm slot
        for t, name in self.trace.merged:
            self._timers_until(t, ARRIVAL)
            self._arrive(t, name)
            self._settled()
        self._timers_until(self.trace.horizon_s, EXPIRE + 1)
        for kept in self.kept.values():
            self._hold(kept, Form.EVICTED, self.trace.horizon_s)
        cold = self.result.cold_by_function
        self.result.function_cold_fractions = [cold[n] / len(t) for n, t in self.trace.arrivals.items() if t]
        return self.result

    def _push(self, at: float, order: int, name: str, generation: int) -> None:
        heapq.heappush(self.timers, (at, order, next(self.sequence), name, generation))

    def _timers_until(self, t: float, order: int) -> None:
        while self.timers and (self.timers[0][0], self.timers[0][1]) < (t, order):
            at, kind, _, name, generation = heapq.heappop(self.timers)
            if not name:
                self._replan(at)
                if at + REPLAN_S < self.trace.horizon_s:
                    self._push(at + REPLAN_S, PREWARM, "", -1)
            elif kind == PREWARM:
                self._prewarm(at, name, generation)
            else:
                self._expire(at, name, generation)
            self._settled()

    def _hold(self, kept: _Kept, form: Form, t: float) -> None:
        """Account what was held until t, then hold `form`."""
        held = kept.costs.held_mib(kept.form)
        self.result.memory_mib_s += held * (t - kept.since)
        self.held += kept.costs.held_mib(form) - held
        kept.form, kept.since = form, t

    def _settled(self) -> None:
        self.result.peak_mib = max(self.result.peak_mib, self.held)

    def _arrive(self, t: float, name: str) -> None:
        kept = self.kept[name]
        latency = kept.costs.start_ms(kept.form)
        kind = START_KIND[kept.form]
        if kept.form is Form.COMPRESSED and latency == kept.costs.cold_start_ms:
            kind = "cold"  # decompressing would have been slower: a cold start instead
        self.result.starts[kind] += 1
        self.result.latencies[latency] += 1
        if kind == "cold":
            self.result.cold_by_function[name] += 1
        if kept.last_arrival is not None:
            self.policy.record(name, t - kept.last_arrival)
        kept.last_arrival = t
        before = kept.form
        prewarm, keepalive = self.policy.windows(name)
        kept.prewarm_generation += 1  # a pre-warm still pending from the last windows is void
        if prewarm > 0:
            self._hold(kept, Form.EVICTED, t)  # unload now, load again in `prewarm` seconds
            self._push(t + prewarm, PREWARM, name, kept.prewarm_generation)
        else:
            self._hold(kept, Form.WARM, t)
        kept.expire_at = t + prewarm + keepalive
        if kept.expire_timer_at is None or kept.expire_at < kept.expire_timer_at:
            self._arm_expiry(kept, name)
        if kept.form is not before:
            self._replan(t)

    def _prewarm(self, t: float, name: str, generation: int) -> None:
        kept = self.kept[name]
        if generation == kept.prewarm_generation:
            self._hold(kept, Form.WARM, t)
            self._replan(t)

    def _arm_expiry(self, kept: _Kept, name: str) -> None:
        kept.expire_generation += 1
        kept.expire_timer_at = kept.expire_at
        self._push(kept.expire_at, EXPIRE, name, kept.expire_generation)

    def _expire(self, t: float, name: str, generation: int) -> None:
        kept = self.kept[name]
        if generation != kept.expire_generation:
            return  # replaced by a sooner one
        if kept.expire_at > t:  # the window moved on since this timer was set: follow it
            self._arm_expiry(kept, name)
            return
        kept.expire_timer_at = None
        if kept.form is not Form.EVICTED:
            self._hold(kept, Form.EVICTED, t)
            self._replan(t)

    def _replan(self, t: float) -> None:
        if self.budget is None:
            return
        assert isinstance(self.policy, HybridHistogramPolicy)
        candidates = []
        for name, kept in self.kept.items():
            if kept.form is Form.EVICTED or kept.last_arrival is None:
                continue
            elapsed, window = t - kept.last_arrival, kept.expire_at - kept.last_arrival
            candidates.append(self.policy.candidate(name, kept.costs, elapsed, window, REPLAN_S))
        for name, form in plan(candidates, self.budget).items():
            if form is not self.kept[name].form:
                self._hold(self.kept[name], form, t)


# -- the fixed policy's sweep --------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """The harness's percentile at q (0..1); 0 of nothing."""
    return bench.percentile(values, 100 * q) if values else 0.0


@dataclass(frozen=True)
class SweepPoint:
    keepalive_s: float
    cold_start_fraction: float
    function_cold_start_p75: float
    memory_mib_s: float


def fixed_sweep(trace: Trace, windows: tuple[float, ...] = FIXED_SWEEP_S) -> list[SweepPoint]:
    """The fixed policy at each window, in closed form: per function, a gap longer than the window
    is a cold start (so is the first arrival), and each gap (and the time after the last arrival, up
    to the horizon) holds the template for min(gap, window)."""
    invoked = {name: times for name, times in trace.arrivals.items() if times}
    gaps = {name: sorted(b - a for a, b in itertools.pairwise(times)) for name, times in invoked.items()}
    prefix = {name: [0.0, *itertools.accumulate(g)] for name, g in gaps.items()}
    invocations = trace.invocations()
    points = []
    for w in windows:
        colds, memory = [], 0.0
        for name, g in gaps.items():
            short = bisect.bisect_right(g, w)  # gaps within the window: warm, held for their length
            colds.append(1 + len(g) - short)
            tail = min(trace.horizon_s - invoked[name][-1], w)
            memory += trace.functions[name].memory_mib * (prefix[name][short] + w * (len(g) - short) + tail)
        fractions = [cold / len(invoked[name]) for cold, name in zip(colds, gaps, strict=True)]
        total = sum(colds) / invocations if invocations else 0.0
        points.append(SweepPoint(w, total, quantile(fractions, 0.75), memory))
    return points


def fixed_at(sweep: list[SweepPoint], memory_mib_s: float, metric: str) -> tuple[float, bool]:
    """The fixed policy's `metric` at this memory-time (linear between sweep points); the flag says
    the memory-time lies beyond the sweep (then the largest window's value)."""
    for low, high in itertools.pairwise(sweep):
        if low.memory_mib_s <= memory_mib_s <= high.memory_mib_s:
            span = high.memory_mib_s - low.memory_mib_s
            f = (memory_mib_s - low.memory_mib_s) / span if span else 0.0
            a, b = getattr(low, metric), getattr(high, metric)
            return float(a + f * (b - a)), False
    return float(getattr(sweep[-1], metric)), True


# -- the whole simulation ------------------------------------------------------------------------


METRICS = ("cold_start_fraction", "function_cold_start_p75")


def compare(result: Result, sweep: list[SweepPoint]) -> dict[str, Any]:
    """The result's row, with the fixed policy's figures at the same memory-time and the reduction."""
    row = result.row()
    for metric in METRICS:
        value = getattr(result, metric)()
        fixed, beyond = fixed_at(sweep, result.memory_mib_s, metric)
        row[f"fixed_{metric}_at_same_memory"] = round(fixed, 6)
        row[f"{metric}_reduction"] = round(1 - value / fixed, 4) + 0.0 if fixed else None  # + 0.0: no -0.0
        row["beyond_sweep"] = beyond
    return row


def simulate(trace: Trace, costs: MeasuredCosts, budget_mib: float | None = None) -> dict[str, Any]:
    """Replay the three policies and compare each with the fixed sweep at its memory-time."""
    results = [Replay(trace, FixedKeepAlive(600.0), costs).run(), Replay(trace, HybridHistogramPolicy(), costs).run()]
    if budget_mib is None:
        budget_mib = results[1].peak_mib / 2
    results.append(Replay(trace, HybridHistogramPolicy(), costs, budget_mib).run())
    sweep = fixed_sweep(trace)
    return {
        "rows": [compare(r, sweep) for r in results],
        "sweep": [vars(p) for p in sweep],
        "budget_mib": budget_mib,
    }


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def print_table(report: dict[str, Any], trace: Trace, costs: MeasuredCosts) -> None:
    print(
        f"keep-alive: {trace.invocations()} invocations of {len(trace.functions)} functions over "
        f"{trace.horizon_s / 3600:g} h; 'fixed @ same' is the fixed policy swept to the same memory-time"
    )
    headers = ("policy", "cold starts", "fixed @ same", "fewer", "p75 fn cold", "fixed @ same", "fewer",
               "memory GiB*h", "p99 start ms", "mean start ms", "warm", "decompress", "cold")  # fmt: skip
    cells = []
    for r in report["rows"]:
        row: list[object] = [r["policy"]]
        for metric in METRICS:
            beyond = " (beyond sweep)" if r["beyond_sweep"] else ""
            fixed = _percent(r[f"fixed_{metric}_at_same_memory"]) + beyond
            row += [_percent(r[metric]), fixed, _percent(r[f"{metric}_reduction"])]
        row += [round(r["memory_mib_s"] / 1024 / 3600, 2), r["p99_start_ms"], r["mean_start_ms"]]
        row += [r["starts"][kind] for kind in ("warm", "decompress", "cold")]
        cells.append(row)
    print(bench.table(headers, cells))
    print(f"costs: {costs.describe()}")
    print(f"budget of hybrid+codecrunch: {report['budget_mib']:.0f} MiB")
    print("p75 fn cold: the 3rd quartile over functions of each one's cold-start fraction (the paper's measure)")
    for r in report["rows"][1:]:
        for metric, label in zip(METRICS, ("cold starts", "p75 fn cold"), strict=True):
            reduction = r[f"{metric}_reduction"]
            met = reduction is not None and reduction >= TARGET_REDUCTION
            print(
                f"target >= {TARGET_REDUCTION:.0%} fewer than fixed at the same memory-time, {r['policy']}, "
                f"{label}: {'met' if met else 'NOT met'}"
            )


# -- the command ---------------------------------------------------------------------------------

MISSING = {
    "restore": "run `scripts/bench_restore --json bench-results/bench_restore.json` (root) to measure them",
    "codecs": "run `scripts/bench_codecs --json bench-results/bench_codecs.json` to measure them",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/simulate_keepalive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--restore-json", type=Path, help="restore and cold-start costs (scripts/bench_restore --json)")
    parser.add_argument("--codecs-json", type=Path, help="compression ratio and speed (scripts/bench_codecs --json)")
    parser.add_argument("--codec", default="zstd", help="the codec of compressed templates (default zstd)")
    parser.add_argument("--level", type=int, help="its level (needed when several were measured)")
    parser.add_argument("--data", help="which kind of pages' ratio (default: the least compressible measured)")
    parser.add_argument("--restore-mode", default="cow", help="how a kept template is restored (default cow)")
    parser.add_argument("--functions", type=int, help="functions in a generated trace (default 100)")
    parser.add_argument("--hours", type=float, help="length of a generated trace (default 12)")
    parser.add_argument("--seed", type=int, default=1, help="seed of a generated trace (default 1)")
    parser.add_argument("--min-rate", type=float, default=1 / DAY_S, help="slowest mean rate, per s (1/day)")
    parser.add_argument("--max-rate", type=float, default=10.0, help="fastest mean rate, per s (default 10)")
    parser.add_argument("--trace", type=Path, help="replay this CSV trace instead of generating one")
    parser.add_argument("--trace-out", type=Path, help="also write the trace as CSV")
    parser.add_argument(
        "--budget-mib",
        type=float,
        help="memory budget of hybrid+codecrunch (default: half of the hybrid policy's peak)",
    )
    bench.arguments(parser, "simulate_keepalive", "20 functions over 2 hours")
    args = parser.parse_args(argv)
    args.functions = args.functions or (20 if args.quick else 100)
    args.hours = args.hours or (2.0 if args.quick else 12.0)
    return args


def _costs(args: argparse.Namespace) -> MeasuredCosts:
    for what, path in (("restore", args.restore_json), ("codecs", args.codecs_json)):
        if path is None or not path.is_file():
            given = f"{path} does not exist" if path else f"--{what}-json is required"
            raise CostsError(f"{given}: the costs come from the benchmarks; {MISSING[what]}")
    return load_costs(args.restore_json, args.codecs_json, args.codec, args.level, args.data, args.restore_mode)


def _inputs(args: argparse.Namespace, costs: MeasuredCosts) -> dict[str, Any]:
    trace = (
        {"trace": str(args.trace)}
        if args.trace
        else {
            "functions": args.functions,
            "hours": args.hours,
            "seed": args.seed,
            "min_rate_per_s": args.min_rate,
            "max_rate_per_s": args.max_rate,
        }
    )
    return {
        **trace,
        "restore_json": str(args.restore_json),
        "codecs_json": str(args.codecs_json),
        "codec": costs.codec,
        "level": costs.level,
        "data": costs.data,
        "restore_mode": costs.restore_mode,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        costs = _costs(args)
    except CostsError as e:
        print(f"simulate_keepalive: {e}", file=sys.stderr)
        return 2
    try:
        trace = (
            read_trace(args.trace)
            if args.trace
            else generate_trace(args.functions, args.hours, args.seed, args.min_rate, args.max_rate)
        )
    except (OSError, ValueError) as e:
        print(f"simulate_keepalive: read trace {args.trace}: {e}", file=sys.stderr)
        return 2
    if args.trace_out:
        write_trace(trace, args.trace_out)
    report = simulate(trace, costs, args.budget_mib)
    print_table(report, trace, costs)
    conditions = {**_inputs(args, costs), "costs": costs.describe(), "budget_mib": report["budget_mib"]}
    tables: dict[str, list[Any]] = {
        "policies": [PolicyRow(**r) for r in report["rows"]],
        "sweep": [SweepRow(**p) for p in report["sweep"]],
    }
    bench.write(args.json, bench.Document("simulate_keepalive", tables, conditions))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The keep-alive policy (daemon/keepalive.py) and its simulator (scripts/simulate_keepalive.py):
the hybrid histogram policy's windows and fallbacks, the CodeCrunch-style cost model, costs read
from the benchmarks' JSON, the trace generator, and the simulator end to end on small traces.
Pure Python: no root, no mounts."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from daemon.keepalive import (
    RANGE_S,
    Candidate,
    Costs,
    CostsError,
    FixedKeepAlive,
    Form,
    HybridHistogramPolicy,
    IdleHistogram,
    Pattern,
    load_costs,
    plan,
)
from scripts import simulate_keepalive as sim

# -- the hybrid histogram policy -----------------------------------------------------------------


def _policy_with(idle_times: list[float]) -> HybridHistogramPolicy:
    policy = HybridHistogramPolicy()
    for idle in idle_times:
        policy.record("f", idle)
    return policy


def test_a_periodic_function_gets_a_tight_window_around_its_period() -> None:
    rng = random.Random(1)
    idle = [1800 + rng.uniform(-20, 20) for _ in range(50)]  # every 30 minutes, +-20 s
    policy = _policy_with(idle)
    assert policy.pattern("f") is Pattern.HISTOGRAM
    prewarm, keepalive = policy.windows("f")
    ordered = sorted(idle)
    p5, p99 = ordered[math.ceil(0.05 * len(idle)) - 1], ordered[math.ceil(0.99 * len(idle)) - 1]
    # The head is the lower edge of the 5th percentile's minute, less 10%.
    assert prewarm == pytest.approx(0.9 * policy.histogram("f").head_s())
    assert 0.9 * (p5 - 60) < prewarm <= 0.9 * p5
    # The window then covers the 99th percentile, with the 10% margin on the tail's upper edge.
    end = prewarm + keepalive
    assert end == pytest.approx(1.1 * policy.histogram("f").tail_s())
    assert 1.1 * p99 <= end < 1.1 * (p99 + 60)
    assert keepalive < 0.3 * 1800  # tight: the function is held around its period, not for all of it


def test_the_fixed_baseline_keeps_ten_minutes() -> None:
    assert FixedKeepAlive().windows("anything") == (0.0, 600.0)


def test_too_few_samples_fall_back_to_keeping_the_whole_range() -> None:
    policy = _policy_with([1800.0] * 4)
    assert policy.pattern("f") is Pattern.FEW_SAMPLES
    assert policy.windows("f") == (0.0, RANGE_S)
    policy.record("f", 1800.0)  # the fifth
    assert policy.pattern("f") is Pattern.HISTOGRAM
    assert policy.windows("f").prewarm_s > 0


def test_spread_out_idle_times_are_not_representative() -> None:
    policy = _policy_with([i * 60.0 + 30 for i in range(200)])  # one per minute over 200 minutes
    h = policy.histogram("f")
    assert h.coefficient_of_variation() == pytest.approx(statistics.stdev(h.counts) / statistics.mean(h.counts))
    assert h.coefficient_of_variation() < 2
    assert policy.pattern("f") is Pattern.NOT_REPRESENTATIVE
    assert policy.windows("f") == (0.0, RANGE_S)


def test_out_of_bound_heavy_functions_fall_back_where_the_paper_uses_arima() -> None:
    policy = _policy_with([6 * 3600.0] * 6 + [1800.0] * 4)
    assert policy.histogram("f").out_of_bounds == 6
    assert policy.pattern("f") is Pattern.OUT_OF_BOUNDS
    assert policy.windows("f") == (0.0, RANGE_S)


def test_hit_probability_and_expected_starts_come_from_the_histogram() -> None:
    assert IdleHistogram().hit_probability(0, 60) == 0.5  # no evidence either way
    h = _policy_with([1800.0 + i for i in range(10)]).histogram("f")  # all in the minute 1800-1860
    assert h.hit_probability(0, 600) == 0.0
    assert h.hit_probability(1000, 2000) == pytest.approx(1.0)
    assert h.hit_probability(0, 1830) == pytest.approx(0.5)  # half-way through the minute
    assert h.hit_probability(1900, 3000) == 0.0  # past every sample
    busy = _policy_with([0.5] * 100).histogram("f")  # twice a second
    assert busy.expected_starts(0, 60) == pytest.approx(120)


# -- the cost model ------------------------------------------------------------------------------

SMALL = Costs(restore_ms=2.0, cold_start_ms=675.0, decompress_mb_s=800.0, ratio=3.5, memory_mib=100, working_set_mib=30)
BIG = Costs(restore_ms=2.0, cold_start_ms=675.0, decompress_mb_s=800.0, ratio=3.5, memory_mib=1000, working_set_mib=200)
FREQUENT = Candidate("small", SMALL, expected_starts=10)
RARE = Candidate("big", BIG, expected_starts=0.3)


def test_plenty_of_memory_keeps_everything_warm() -> None:
    assert plan([FREQUENT, RARE], budget_mib=2000) == {"small": Form.WARM, "big": Form.WARM}


def test_a_big_rarely_invoked_function_is_compressed_rather_than_evicted() -> None:
    assert BIG.decompress_ms() < BIG.cold_start_ms - BIG.restore_ms
    budget = 100 + 1000 / 3.5 + 10  # the small one warm and the big one compressed, not both warm
    assert plan([FREQUENT, RARE], budget) == {"small": Form.WARM, "big": Form.COMPRESSED}


def test_a_tight_budget_evicts() -> None:
    assert plan([FREQUENT, RARE], budget_mib=150) == {"small": Form.WARM, "big": Form.EVICTED}


def test_compression_slower_than_a_cold_start_is_never_chosen() -> None:
    slow = Costs(2.0, 675.0, decompress_mb_s=100.0, ratio=3.5, memory_mib=1000, working_set_mib=200)
    assert slow.decompress_ms() > slow.cold_start_ms
    assert slow.start_ms(Form.COMPRESSED) == slow.cold_start_ms  # it would fall back to a cold start
    assert plan([Candidate("big", slow, 0.3)], budget_mib=400) == {"big": Form.EVICTED}


def test_the_frequent_function_gets_the_memory_to_stay_warm() -> None:
    frequent = Candidate("frequent", SMALL, expected_starts=120)  # invoked twice a second
    rare = Candidate("rare", SMALL, expected_starts=0.5)
    assert plan([frequent, rare], budget_mib=100) == {"frequent": Form.WARM, "rare": Form.EVICTED}
    budget = 100 + 100 / 3.5
    assert plan([frequent, rare], budget) == {"frequent": Form.WARM, "rare": Form.COMPRESSED}
    assert plan([frequent], budget_mib=50) == {"frequent": Form.COMPRESSED}  # still better than cold


def test_a_plan_never_exceeds_its_budget() -> None:
    rng = random.Random(5)
    for _ in range(200):
        candidates = [
            Candidate(
                f"f{i}",
                Costs(
                    2.0, rng.uniform(100, 1000), rng.uniform(50, 2000), rng.uniform(1.5, 5), rng.uniform(30, 800), 40
                ),
                rng.uniform(0, 20),
            )
            for i in range(8)
        ]
        budget = rng.uniform(0, 3000)
        forms = plan(candidates, budget)
        assert sum(c.costs.held_mib(forms[c.function]) for c in candidates) <= budget + 1e-9


# -- costs from the benchmarks' JSON -------------------------------------------------------------


def _restore_rows() -> list[dict[str, Any]]:
    """As scripts/bench_restore writes them (cow at 256 MiB also with 8 instances, their state read)."""
    rows = []
    for size, cold, cow in ((64, 400.0, 1.2), (256, 675.0, 1.8)):
        for mode, ms in (("cold", cold), ("copy", 10 * cold), ("lazy", 50.0), ("cow", cow)):
            rows.append(_restore_row(size, mode, ms, 1))
    rows.append(_restore_row(256, "cow", 9.9, 8))
    return rows


def _restore_row(size: int, mode: str, ms: float, instances: int) -> dict[str, Any]:
    return {"size_mib": size, "mode": mode, "threads": 1, "instances": instances, "state_read": instances > 1,
            "median_ms": ms, "p90_ms": ms, "rss_mib": 9.0, "pss_mib": 4.0, "runs": 5, "ratio_vs_cow": None}  # fmt: skip


def _codec_rows() -> list[dict[str, Any]]:
    def row(codec: str, level: int, data: str, ratio: float, speed: float) -> dict[str, Any]:
        return {"codec": codec, "level": level, "data": data, "ratio": ratio, "compress_mb_s": speed / 3,
                "decompress_mb_s": speed, "fault_us": 12.0, "runs": 5}  # fmt: skip

    return [
        row("zstd", 3, "python-heap", 3.5, 800.0),
        row("zstd", 3, "torch-weights", 1.2, 900.0),
        row("zstd", 3, "zeros", 400.0, 5000.0),
        row("lz4", 1, "python-heap", 2.1, 3000.0),
    ]


def _document(benchmark: str, table: str, rows: list[dict[str, Any]]) -> str:
    """A document as daemon/bench.py writes it."""
    doc = {"benchmark": benchmark, "version": 1, "machine": {}, "conditions": {}, "notes": [], "tables": {table: rows}}
    return json.dumps(doc)


def _restore_doc(rows: list[dict[str, Any]]) -> str:
    return _document("bench_restore", "restore", rows)


def _codecs_doc(rows: list[dict[str, Any]]) -> str:
    return _document("bench_codecs", "codecs", rows)


@pytest.fixture
def cost_files(tmp_path: Path) -> tuple[Path, Path]:
    restore, codecs = tmp_path / "bench_restore.json", tmp_path / "bench_codecs.json"
    restore.write_text(_restore_doc(_restore_rows()))
    codecs.write_text(_codecs_doc(_codec_rows()))
    return restore, codecs


def test_load_costs_reads_the_benchmarks_rows(cost_files: tuple[Path, Path]) -> None:
    costs = load_costs(*cost_files, codec="zstd", data="python-heap")
    assert [(s.size_mib, s.cold_start_ms, s.restore_ms) for s in costs.sizes] == [(64, 400, 1.2), (256, 675, 1.8)]
    assert (costs.codec, costs.level, costs.ratio, costs.decompress_mb_s) == ("zstd", 3, 3.5, 800)
    half = costs.for_function(160, 40)  # half-way between the measured sizes
    assert half.cold_start_ms == pytest.approx(537.5) and half.restore_ms == pytest.approx(1.5)
    assert costs.for_function(4096, 40).cold_start_ms == 675  # clamped to the largest measured
    assert load_costs(*cost_files).data == "torch-weights"  # no data chosen: the least compressible
    assert load_costs(*cost_files, codec="lz4").level == 1


def test_load_costs_refuses_rows_that_are_not_a_benchmark_document(cost_files: tuple[Path, Path]) -> None:
    cost_files[1].write_text(json.dumps(_codec_rows()))  # the bare list older benchmarks wrote
    with pytest.raises(
        CostsError,
        match=rf"{cost_files[1]}: expected a benchmark document \(an object\), not list \(rerun scripts/bench_codecs",
    ):
        load_costs(*cost_files)
    cost_files[1].write_text(_restore_doc(_restore_rows()))
    with pytest.raises(CostsError, match=rf"{cost_files[1]}: written by bench_restore, expected bench_codecs"):
        load_costs(*cost_files)


def test_load_costs_names_the_file_and_the_missing_key(cost_files: tuple[Path, Path]) -> None:
    rows = _restore_rows()
    del rows[3]["median_ms"]
    cost_files[0].write_text(_restore_doc(rows))
    with pytest.raises(CostsError, match=rf"{cost_files[0]}: restore row 3: missing field 'median_ms'"):
        load_costs(*cost_files)
    codec_rows = _codec_rows()
    del codec_rows[0]["decompress_mb_s"]
    cost_files[0].write_text(_restore_doc(_restore_rows()))
    cost_files[1].write_text(_codecs_doc(codec_rows))
    with pytest.raises(CostsError, match=rf"{cost_files[1]}: codecs row 0: missing field 'decompress_mb_s'"):
        load_costs(*cost_files, data="python-heap")
    codec_rows = _codec_rows()
    codec_rows[0]["decompress_mb_s"] = None  # a codec measured without its Python-side speed
    cost_files[1].write_text(_codecs_doc(codec_rows))
    with pytest.raises(CostsError, match=r"decompress_mb_s=None, expected a positive number"):
        load_costs(*cost_files, data="python-heap")


def test_load_costs_names_the_missing_row(cost_files: tuple[Path, Path]) -> None:
    missing_cow = [r for r in _restore_rows() if (r["size_mib"], r["mode"], r["instances"]) != (256, "cow", 1)]
    cost_files[0].write_text(_restore_doc(missing_cow))  # the 8-instance row does not stand in for it
    with pytest.raises(CostsError, match="size 256 MiB has a 'cold' row but no 'cow' row"):
        load_costs(*cost_files)
    cost_files[0].write_text(_restore_doc([r for r in _restore_rows() if r["mode"] != "cold"]))
    with pytest.raises(CostsError, match="no row with mode 'cold'"):
        load_costs(*cost_files)
    cost_files[0].write_text(_restore_doc(_restore_rows()))
    with pytest.raises(CostsError, match=r"no row for codec 'qpl' \(codecs present: lz4, zstd\)"):
        load_costs(*cost_files, codec="qpl")
    with pytest.raises(CostsError, match=r"no row for zstd at level 19 \(levels present: \[3\]\)"):
        load_costs(*cost_files, level=19)
    with pytest.raises(CostsError, match="on data 'python'"):
        load_costs(*cost_files, data="python")
    with pytest.raises(CostsError, match=f"read {cost_files[0].parent / 'absent.json'}"):
        load_costs(cost_files[0].parent / "absent.json", cost_files[1])


def test_several_levels_must_be_chosen_between(cost_files: tuple[Path, Path]) -> None:
    rows = [*_codec_rows(), {**_codec_rows()[0], "level": 19, "ratio": 4.0}]
    cost_files[1].write_text(_codecs_doc(rows))
    with pytest.raises(CostsError, match=r"zstd was measured at levels \[3, 19\]: choose one"):
        load_costs(*cost_files)
    assert load_costs(*cost_files, level=19, data="python-heap").ratio == 4.0


# -- traces --------------------------------------------------------------------------------------


def test_the_trace_generator_is_deterministic_per_seed() -> None:
    a, b, c = sim.generate_trace(30, 2, seed=7), sim.generate_trace(30, 2, seed=7), sim.generate_trace(30, 2, seed=8)
    assert a.functions == b.functions and a.arrivals == b.arrivals
    assert a.arrivals != c.arrivals


def test_generated_rates_span_orders_of_magnitude_with_every_pattern() -> None:
    trace = sim.generate_trace(200, 1, seed=3)
    rates = [s.rate_per_s for s in trace.functions.values()]
    assert max(rates) / min(rates) >= 1e4
    counts = [len(t) for t in trace.arrivals.values() if t]
    assert max(counts) / min(counts) >= 1e4  # observed over one hour, too
    assert {s.pattern for s in trace.functions.values()} == {"periodic", "poisson", "bursty"}
    for name, spec in trace.functions.items():
        gaps = [b - a for a, b in zip(trace.arrivals[name], trace.arrivals[name][1:], strict=False)]
        if spec.pattern == "periodic" and gaps:  # a timer: its period, +-2% of jitter
            assert all(abs(g * spec.rate_per_s - 1) <= 0.021 for g in gaps)


def test_a_trace_survives_csv(tmp_path: Path) -> None:
    trace = sim.generate_trace(20, 1, seed=2, max_rate=0.5)
    sim.write_trace(trace, tmp_path / "trace.csv")
    back = sim.read_trace(tmp_path / "trace.csv")
    assert back.horizon_s == trace.horizon_s
    assert back.functions == {n: s for n, s in trace.functions.items() if trace.arrivals[n]}
    for name, times in back.arrivals.items():
        assert times == pytest.approx(trace.arrivals[name], abs=1e-3)


# -- the simulator -------------------------------------------------------------------------------


def _periodic_trace(periods_min: list[float], hours: float, seed: int) -> sim.Trace:
    rng = random.Random(seed)
    functions, arrivals = {}, {}
    for i, minutes in enumerate(periods_min):
        name = f"p{i}"
        functions[name] = sim.FunctionSpec(name, "periodic", 1 / (minutes * 60), 256.0, 64.0)
        arrivals[name] = sim._periodic(rng, minutes * 60, hours * 3600)
    return sim.Trace(functions, arrivals, hours * 3600)


def test_the_replay_of_the_fixed_policy_agrees_with_the_closed_form_sweep(cost_files: tuple[Path, Path]) -> None:
    trace = sim.generate_trace(30, 3, seed=4, max_rate=0.5)
    result = sim.Replay(trace, FixedKeepAlive(600.0), load_costs(*cost_files)).run()
    point = next(p for p in sim.fixed_sweep(trace) if p.keepalive_s == 600)
    assert result.cold_start_fraction() == point.cold_start_fraction
    assert result.function_cold_start_p75() == point.function_cold_start_p75
    assert result.memory_mib_s == pytest.approx(point.memory_mib_s, rel=1e-9)


def test_hybrid_beats_fixed_on_timers_slower_than_its_window(cost_files: tuple[Path, Path]) -> None:
    """Timers every 12-20 minutes: the fixed 10 minutes miss every one. The hybrid policy keeps the
    whole range while it learns (so only each first start is cold), then holds each function only
    around its period; over 6 hours that is less memory-time than 10 minutes after every start."""
    trace = _periodic_trace([12, 13, 14, 15, 16, 17, 18, 19, 20], hours=6, seed=1)
    costs = load_costs(*cost_files)
    fixed = sim.Replay(trace, FixedKeepAlive(600.0), costs).run()
    hybrid = sim.Replay(trace, HybridHistogramPolicy(), costs).run()
    assert fixed.starts["cold"] == trace.invocations()
    assert hybrid.starts["cold"] == len(trace.functions)
    assert hybrid.memory_mib_s <= fixed.memory_mib_s
    row = sim.compare(hybrid, sim.fixed_sweep(trace))
    assert row["cold_start_fraction_reduction"] >= sim.TARGET_REDUCTION


def test_the_simulator_end_to_end_gives_sane_metrics(cost_files: tuple[Path, Path]) -> None:
    trace = sim.generate_trace(40, 6, seed=1, max_rate=0.5)
    costs = load_costs(*cost_files)
    report = sim.simulate(trace, costs)
    json.dumps(report)
    rows = {r["policy"]: r for r in report["rows"]}
    assert list(rows) == ["fixed", "hybrid", "hybrid+codecrunch"]
    latencies = [costs.for_function(s.memory_mib, s.working_set_mib) for s in trace.functions.values()]
    for r in rows.values():
        assert 0 <= r["cold_start_fraction"] <= 1 and 0 <= r["function_cold_start_p75"] <= 1
        assert sum(r["starts"].values()) == r["invocations"] == trace.invocations()
        assert r["memory_mib_s"] > 0
        assert min(c.restore_ms for c in latencies) <= r["p99_start_ms"] <= max(c.cold_start_ms for c in latencies)
    assert rows["fixed"]["starts"]["decompress"] == rows["hybrid"]["starts"]["decompress"] == 0
    budgeted = rows["hybrid+codecrunch"]
    assert budgeted["budget_mib"] == pytest.approx(rows["hybrid"]["peak_mib"] / 2, abs=0.1)
    assert budgeted["peak_mib"] <= budgeted["budget_mib"] + 0.1
    assert budgeted["memory_mib_s"] < rows["hybrid"]["memory_mib_s"]


def test_a_budget_that_holds_everything_changes_nothing(cost_files: tuple[Path, Path]) -> None:
    trace = sim.generate_trace(20, 3, seed=6, max_rate=0.5)
    costs = load_costs(*cost_files)
    hybrid = sim.Replay(trace, HybridHistogramPolicy(), costs).run()
    roomy = sim.Replay(trace, HybridHistogramPolicy(), costs, budget_mib=10 * hybrid.peak_mib).run()
    assert roomy.starts == hybrid.starts
    assert roomy.memory_mib_s == pytest.approx(hybrid.memory_mib_s)


def test_the_simulator_needs_the_benchmarks_costs(
    cost_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sim.main(["--functions", "2", "--hours", "1"]) == 2
    assert "scripts/bench_restore" in capsys.readouterr().err
    assert sim.main(["--restore-json", str(cost_files[0]), "--codecs-json", str(tmp_path / "no.json")]) == 2
    err = capsys.readouterr().err
    assert "no.json does not exist" in err and "scripts/bench_codecs" in err


def test_the_command_writes_its_json_and_replays_its_trace(cost_files: tuple[Path, Path], tmp_path: Path) -> None:
    costs = ["--restore-json", str(cost_files[0]), "--codecs-json", str(cost_files[1]), "--data", "python-heap"]
    small = ["--functions", "12", "--hours", "2", "--max-rate", "0.2", "--seed", "9"]
    first, second, trace = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "trace.csv"
    assert sim.main([*costs, *small, "--json", str(first), "--trace-out", str(trace)]) == 0
    assert sim.main([*costs, "--trace", str(trace), "--json", str(second)]) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["conditions"]["seed"] == 9 and a["conditions"]["restore_json"] == str(cost_files[0])
    assert b["conditions"]["trace"] == str(trace)
    for row in a["tables"]["policies"]:
        assert {"policy", "cold_start_fraction", "memory_mib_s", "p99_start_ms"} <= row.keys()
    assert [r["starts"] for r in a["tables"]["policies"]] == [r["starts"] for r in b["tables"]["policies"]]

"""The benchmark report (run it as `scripts/report`): every benchmark, one self-contained page of plots.

    scripts/report [--quick] [--out DIR] [--docs DIR] [--only NAME,...]   run the benchmarks, then render
    scripts/report --from DIR [--out DIR] [--docs DIR]                  render saved JSON, run nothing

Runs each benchmark as its own process (`scripts/NAME.py --json OUT/NAME.json`, `--quick` passed
on), its output in OUT/logs/NAME.log, with progress on the terminal; a benchmark that fails is
reported and the others still run. Then reads every OUT/NAME.json through the bench harness
(daemon/bench.py: a file with a missing or unknown field is refused, naming it) and writes
OUT/report.html: the machine first (kernel, CPUs, memory, NUMA nodes, kerndat's features, the pool
backends, the date), then one plot per question, each PNG embedded, with one sentence saying what it
shows, the rows it was drawn from, and the target as a line where there is one. A plot whose rows
do not exist yet (a benchmark not run, or rows a later issue adds) is drawn with the rows there are,
and its caption says which are absent: nothing is invented. Every PNG is also written to OUT, and to
--docs DIR (the README embeds docs/bench/*.png) when given. matplotlib, Agg backend.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from daemon import bench
from daemon.bench import (
    BurstRow,
    CliRow,
    CodecRow,
    CompressedRow,
    Document,
    InvokeRow,
    LayersRow,
    LoraLoadRow,
    LoraThroughputRow,
    MicroRow,
    PolicyRow,
    PoolRow,
    RestoreRow,
    SandboxRow,
    SweepRow,
)

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
DOCS = REPO / "docs" / "bench"

# Targets, as the issues and the README state them.
RESTORE_TARGET_MS = 2.0  # restore to first reply (DESIGN.md: the bar)
WARM_P50_TARGET_MS = 1.0
RESTORE_P50_TARGET_MS = 10.0
RATIO_TARGET = 3.0  # Python heap pages, zstd
FAULT_TARGET_US = 20.0
LORA_VS_PEFT = 3.0  # thaw >= 3x PEFT at 64 adapters
LOAD_SPEEDUP = 10.0  # the pool >= 10x faster than safetensors from storage
KEEPALIVE_REDUCTION = 0.20  # >= 20% fewer cold starts than fixed at the same memory-time
CLI_TARGET_MS = 150.0


@dataclass(frozen=True)
class Run:
    """One benchmark run: its document's name, its script and its arguments."""

    name: str
    script: str
    args: tuple[str, ...] = ()


def runs(out: Path) -> list[Run]:
    # simulate_keepalive reads the costs bench_restore and bench_codecs just measured: after them.
    costs = ("--restore-json", str(out / "bench_restore.json"), "--codecs-json", str(out / "bench_codecs.json"))
    return [
        Run("bench_restore", "bench_restore.py"),
        Run("bench_restore_compressed", "bench_restore.py", ("--compressed",)),
        Run("bench_codecs", "bench_codecs.py"),
        Run("bench_invoke", "bench_invoke.py"),
        Run("bench_sandbox", "bench_sandbox.py"),
        Run("bench_layers", "bench_layers.py"),
        Run("bench_numa", "bench_numa.py"),
        Run("bench_lora", "bench_lora.py"),
        Run("bench_cli", "bench_cli.py"),
        Run("bench_micro", "bench_micro.py"),
        Run("bench_shim", "bench_shim.py"),  # containerd + runc (scripts/setup installs them)
        Run("simulate_keepalive", "simulate_keepalive.py", costs),
    ]


# -- running -------------------------------------------------------------------------------------


def run_all(out: Path, quick: bool, only: set[str] | None) -> dict[str, str]:
    """Run the benchmarks one after the other; returns name -> why it failed."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    chosen = [r for r in runs(out) if only is None or r.name in only]
    failed: dict[str, str] = {}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        overall = progress.add_task("benchmarks", total=len(chosen))
        for run in chosen:
            task = progress.add_task(f"{run.name}{' --quick' if quick else ''}", total=None)
            argv = [str(PYTHON), str(REPO / "scripts" / run.script), *run.args, "--json", str(out / f"{run.name}.json")]
            argv += ["--quick"] if quick else []
            t0 = time.monotonic()
            with (logs / f"{run.name}.log").open("w") as log:
                done = subprocess.run(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=False)
            took = time.monotonic() - t0
            if done.returncode != 0:
                failed[run.name] = f"exited with {done.returncode} after {took:.0f} s; see {logs / run.name}.log"
                progress.console.print(f"[red]{run.name}: {failed[run.name]}")
            progress.update(task, total=1, completed=1, description=f"{run.name} ({took:.0f} s)")
            progress.advance(overall)
    return failed


# -- reading -------------------------------------------------------------------------------------


def load(directory: Path) -> tuple[dict[str, Document], list[str]]:
    """Every benchmark document in `directory` (BenchDataError on a bad one), and the names missing."""
    docs, missing = {}, []
    for name in bench.BENCHMARKS:
        path = directory / f"{name}.json"
        if path.is_file():
            docs[name] = bench.read(path, name)
        else:
            missing.append(name)
    return docs, missing


# -- plots ---------------------------------------------------------------------------------------


@dataclass
class Plot:
    key: str
    title: str
    caption: str
    used: list[str] = field(default_factory=list)  # "bench_restore.restore: 8 rows (...)"
    absent: list[str] = field(default_factory=list)
    png: bytes = b""


def _used(name: str, table: str, rows: Iterable[object], how: str = "") -> str:
    n = len(list(rows))
    return f"{name}.{table}: {n} row{'s' * (n != 1)}{f' ({how})' if how else ''}"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no rows: {what}", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _rows(docs: dict[str, Document], name: str, table: str, kind: type[Any]) -> list[Any]:
    return docs[name].rows(table, kind) if name in docs else []


def plot_restore(docs: dict[str, Document]) -> Plot:
    rows: list[RestoreRow] = _rows(docs, "bench_restore", "restore", RestoreRow)
    single = [r for r in rows if r.instances == 1 and not r.state_read]
    plot = Plot(
        "restore",
        "Restore to first reply against state size",
        "Time from a stopped stub (or, for cold, from nothing) until the guest's first reply, per restore mode "
        f"and state size (median, log scales); the dashed line is the {RESTORE_TARGET_MS:g} ms bar for restore "
        "to first reply.",
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    threads = sorted({r.threads for r in single})
    for mode in ("cold", "copy", "lazy", "cow"):
        for t in threads:
            mine = sorted((r for r in single if r.mode == mode and r.threads == t), key=lambda r: r.size_mib)
            if mine:
                label = mode if t == 1 else f"{mode}, {t} threads"
                ax.plot([r.size_mib for r in mine], [r.median_ms for r in mine], "o-" if t == 1 else "s--", label=label)
    if single:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(RESTORE_TARGET_MS, color="k", ls="--", lw=1, label=f"target {RESTORE_TARGET_MS:g} ms")
        ax.set_xlabel("state (MiB)")
        ax.set_ylabel("to first reply (ms)")
        ax.legend(fontsize=8)
    else:
        _empty(ax, "bench_restore")
    plot.used.append(_used("bench_restore", "restore", single, "one instance, mode cold/copy/lazy/cow"))
    if not any(t > 1 for t in threads):
        plot.absent.append("rows of multi-threaded guests (bench_restore's threads > 1, issue 16) do not exist yet")
    plot.png = _png(fig)
    return plot


def plot_memory(docs: dict[str, Document]) -> Plot:
    rows: list[RestoreRow] = _rows(docs, "bench_restore", "restore", RestoreRow)
    shared = sorted((r for r in rows if r.state_read), key=lambda r: r.instances)
    size = shared[0].size_mib if shared else 0
    plot = Plot(
        "memory",
        "Memory per instance against live instances",
        f"Rss and Pss of each cow instance of a {size} MiB template while N instances are alive, every one having "
        "read all its state: Rss stays the whole state, Pss (its fair share) falls as 1/N because the pages are "
        "shared.",
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if shared:
        n = [r.instances for r in shared]
        ax.plot(n, [r.rss_mib for r in shared], "o-", label="Rss per instance")
        ax.plot(n, [r.pss_mib for r in shared], "o-", label="Pss per instance")
        ax.set_xlabel("live instances")
        ax.set_ylabel("MiB")
        ax.set_xticks(n)
        ax.legend(fontsize=8)
    else:
        _empty(ax, "bench_restore (instances with their state read)")
    plot.used.append(_used("bench_restore", "restore", shared, "state_read"))
    plot.png = _png(fig)
    return plot


def plot_invoke(docs: dict[str, Document]) -> Plot:
    rows: list[InvokeRow] = _rows(docs, "bench_invoke", "invoke", InvokeRow)
    levels = sorted({r.concurrency for r in rows}) or [1]
    plot = Plot(
        "invoke",
        "Invocation latency CDFs per concurrency",
        "Distribution of each invocation's latency through thawd's API, one panel per number of requests in "
        f"flight: warm instances, a restore per request, and (direct) a guest without the API; dashed lines are "
        f"the p50 targets, {WARM_P50_TARGET_MS:g} ms warm and {RESTORE_P50_TARGET_MS:g} ms restore.",
    )
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.8), squeeze=False)
    for ax, c in zip(axes[0], levels, strict=True):
        mine = [r for r in rows if r.concurrency == c]
        for r in mine:
            ax.plot(r.cdf_ms, [i / (len(r.cdf_ms) - 1) for i in range(len(r.cdf_ms))], label=r.path)
        if mine:
            ax.set_xscale("log")
            ax.axvline(WARM_P50_TARGET_MS, color="k", ls="--", lw=1)
            ax.axvline(RESTORE_P50_TARGET_MS, color="k", ls=":", lw=1)
            ax.set_title(f"concurrency {c}", fontsize=9)
            ax.set_xlabel("latency (ms)")
            ax.legend(fontsize=8)
        else:
            _empty(ax, "bench_invoke")
    axes[0][0].set_ylabel("fraction of requests")
    plot.used.append(_used("bench_invoke", "invoke", rows, "path, concurrency, cdf_ms"))
    bursts: list[BurstRow] = _rows(docs, "bench_invoke", "burst", BurstRow)
    if bursts:
        plot.used.append(_used("bench_invoke", "burst", bursts, "not plotted: see the table in bench_invoke's output"))
    else:
        plot.absent.append("burst rows (bench_invoke's table 'burst', issue 17: a burst from zero) are absent")
    plot.png = _png(fig)
    return plot


def plot_compression(docs: dict[str, Document]) -> Plot:
    codecs: list[CodecRow] = _rows(docs, "bench_codecs", "codecs", CodecRow)
    firsts: list[CompressedRow] = _rows(docs, "bench_restore_compressed", "compressed", CompressedRow)
    plot = Plot(
        "compression",
        "Compression: ratio, fault cost, first invocation",
        f"Left: how much smaller each codec makes each kind of template page (target {RATIO_TARGET:g}x on Python "
        f"heap pages); middle: the cost per 4 KiB page of a fault served by the pager from compressed chunks "
        f"('none': uncompressed; target {FAULT_TARGET_US:g} us); right: restore and first invocation of a template "
        "compressed with each codec against uncompressed restores, cache emptied before each.",
    )
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    labels = sorted({(r.codec, r.level) for r in codecs}, key=lambda x: (x[0] != "none", x))
    kinds = sorted({r.data for r in codecs})
    width = 0.8 / max(len(kinds), 1)
    for panel, metric, target in ((axes[0], "ratio", RATIO_TARGET), (axes[1], "fault_us", FAULT_TARGET_US)):
        for k, kind in enumerate(kinds):
            values = {(r.codec, r.level): getattr(r, metric) for r in codecs if r.data == kind}
            xs = [i + k * width for i, label in enumerate(labels) if label in values]
            panel.bar(xs, [values[label] for label in labels if label in values], width, label=kind)
        if codecs:
            panel.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
            panel.set_xticklabels([f"{c} {lv}" if c != "none" else c for c, lv in labels], rotation=30, fontsize=8)
            panel.axhline(target, color="k", ls="--", lw=1, label="target")
            panel.legend(fontsize=7)
        else:
            _empty(panel, "bench_codecs")
    axes[0].set_ylabel("ratio (x)")
    axes[1].set_ylabel("fault us per 4 KiB page")
    if firsts:
        names = [f"{r.mode}" if r.codec is None else f"{r.mode} {r.codec}" for r in firsts]
        xs = list(range(len(firsts)))
        axes[2].bar([x - 0.2 for x in xs], [r.restore_ms for r in firsts], 0.4, label="restore")
        axes[2].bar([x + 0.2 for x in xs], [r.first_invoke_ms for r in firsts], 0.4, label="first invocation")
        axes[2].set_xticks(xs)
        axes[2].set_xticklabels(names, rotation=30, fontsize=8)
        axes[2].set_ylabel("ms")
        axes[2].legend(fontsize=7)
    else:
        _empty(axes[2], "bench_restore --compressed")
    plot.used += [_used("bench_codecs", "codecs", codecs), _used("bench_restore_compressed", "compressed", firsts)]
    plot.png = _png(fig)
    return plot


def plot_keepalive(docs: dict[str, Document]) -> Plot:
    policies: list[PolicyRow] = _rows(docs, "simulate_keepalive", "policies", PolicyRow)
    sweep: list[SweepRow] = _rows(docs, "simulate_keepalive", "sweep", SweepRow)
    plot = Plot(
        "keepalive",
        "Keep-alive replay: cold starts against memory-time",
        "The fraction of invocations that started cold against the memory held over time, for the fixed policy "
        "at every keep-alive window (the curve) and for each policy of the replay (the points); the dashed "
        f"curve is the target, {KEEPALIVE_REDUCTION:.0%} fewer cold starts than fixed at the same memory-time.",
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    gib_h = 1024 * 3600
    if sweep:
        xs = [p.memory_mib_s / gib_h for p in sweep]
        ax.plot(xs, [p.cold_start_fraction for p in sweep], "-", color="gray", label="fixed, swept")
        target = [p.cold_start_fraction * (1 - KEEPALIVE_REDUCTION) for p in sweep]
        ax.plot(xs, target, "--", color="k", lw=1, label="target")
    for p in policies:
        ax.plot([p.memory_mib_s / gib_h], [p.cold_start_fraction], "o", ms=8, label=p.policy)
    if sweep or policies:
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_yscale("log")
        ax.set_xlabel("memory-time (GiB x h)")
        ax.set_ylabel("cold-start fraction")
        ax.legend(fontsize=8)
    else:
        _empty(ax, "simulate_keepalive")
    plot.used += [_used("simulate_keepalive", "policies", policies), _used("simulate_keepalive", "sweep", sweep)]
    plot.png = _png(fig)
    return plot


def plot_lora(docs: dict[str, Document]) -> Plot:
    tps: list[LoraThroughputRow] = _rows(docs, "bench_lora", "throughput", LoraThroughputRow)
    loads: list[LoraLoadRow] = _rows(docs, "bench_lora", "loads", LoraLoadRow)
    plot = Plot(
        "lora",
        "LoRA: throughput against adapters, load time per source",
        "Left: decode tokens/s with requests spread over N adapters (solid uniform, dashed Zipf) for thaw's "
        f"engine, PEFT's mixed batches and the base model without adapters; the dotted line is the target, "
        f"{LORA_VS_PEFT:g}x PEFT. Right: loading a model or an adapter from the pool, from a safetensors file "
        f"in storage and from one in the page cache, each followed by a pass over the data (log scale); a bar's "
        f"tick is the target, {LOAD_SPEEDUP:g}x faster than safetensors from storage.",
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
    models = list(dict.fromkeys(r.model for r in tps))
    for m, model in enumerate(models):
        mine = [r for r in tps if r.model == model]
        for system, color in (("thaw", "C0"), ("peft", "C1")):
            for popularity, style in (("uniform", "-"), ("zipf", "--")):
                # One adapter has one popularity (uniform): it starts both curves.
                picked = (r for r in mine if r.system == system and (r.popularity == popularity or r.adapters == 1))
                cell = sorted(picked, key=lambda r: r.adapters)
                if cell:
                    marker = "os^v"[m % 4]
                    left.plot([r.adapters for r in cell], [r.tokens_per_s for r in cell], style, marker=marker,
                              color=color, label=f"{model} {system} {popularity}")  # fmt: skip
                    if system == "peft" and popularity == "uniform":
                        left.plot([r.adapters for r in cell], [LORA_VS_PEFT * r.tokens_per_s for r in cell], ":",
                                  color="k", lw=1, label=f"{model} target")  # fmt: skip
        for r in mine:
            if r.system == "base":
                left.axhline(r.tokens_per_s, color="C2", lw=1, label=f"{model} base")
    if tps:
        left.set_xscale("log", base=2)
        left.set_xlabel("adapters")
        left.set_ylabel("tokens/s")
        left.legend(fontsize=6)
    else:
        _empty(left, "bench_lora throughput")
    groups = list(dict.fromkeys((r.model, r.what) for r in loads))
    sources = ("pool", "safetensors", "safetensors-cached")
    for s, source in enumerate(sources):
        values = {(r.model, r.what): r.load_ms for r in loads if r.source == source}
        xs = [g + (s - 1) * 0.27 for g, key in enumerate(groups) if key in values]
        right.bar(xs, [values[key] for key in groups if key in values], 0.27, label=source)
    for g, key in enumerate(groups):
        storage = next((r.load_ms for r in loads if (r.model, r.what) == key and r.source == "safetensors"), None)
        if storage is not None:
            right.hlines(storage / LOAD_SPEEDUP, g - 0.4, g - 0.14, color="k", lw=2)
    if loads:
        right.set_yscale("log")
        right.set_xticks(range(len(groups)))
        right.set_xticklabels([f"{m} {w}" for m, w in groups], fontsize=8)
        right.set_ylabel("load + pass (ms)")
        right.legend(fontsize=7)
    else:
        _empty(right, "bench_lora loads")
    plot.used += [_used("bench_lora", "throughput", tps), _used("bench_lora", "loads", loads)]
    plot.png = _png(fig)
    return plot


POOL_METRICS = (("seq_read", "GB/s"), ("copy", "GB/s"), ("latency", "ns"), ("map_read", "ns/page"),
                ("map_cow", "ns/page"))  # fmt: skip


def plot_pool(docs: dict[str, Document]) -> Plot:
    rows: list[PoolRow] = _rows(docs, "bench_numa", "pool", PoolRow)
    nodes = sorted({r.node for r in rows})
    plot = Plot(
        "pool",
        "The pool: bandwidth and latency per backend and node",
        "Sequential read and copy bandwidth, dependent-load latency, and the per-page cost of mapping and first "
        "reading (shared) or writing (copy-on-write) pool pages, per backend and NUMA node, from a CPU of node 0 "
        "(log scales for the per-page costs).",
    )
    fig, axes = plt.subplots(1, len(POOL_METRICS), figsize=(16, 3.8))
    backends = list(dict.fromkeys(r.backend for r in rows))
    for ax, (metric, unit) in zip(axes, POOL_METRICS, strict=True):
        width = 0.8 / max(len(nodes), 1)
        for n, node in enumerate(nodes):
            values = {r.backend: r.value for r in rows if r.metric == metric and r.node == node}
            xs = [b + n * width for b, backend in enumerate(backends) if backend in values]
            ax.bar(xs, [values[b] for b in backends if b in values], width, label=f"node {node}")
        if rows:
            ax.set_title(metric, fontsize=9)
            ax.set_ylabel(unit)
            ax.set_xticks([b + 0.4 - width / 2 for b in range(len(backends))])
            ax.set_xticklabels(backends, fontsize=8)
            if unit == "ns/page":
                ax.set_yscale("log")
        else:
            _empty(ax, "bench_numa")
    if rows:
        axes[0].legend(fontsize=7)
    plot.used.append(_used("bench_numa", "pool", rows))
    if rows and len(nodes) < 2:
        plot.absent.append(f"a second NUMA node (this machine has node {nodes[0]} only): local against the 'CXL' node "
                           "is not applicable here")  # fmt: skip
    plot.png = _png(fig)
    return plot


def _bars(
    key: str,
    title: str,
    caption: str,
    names: list[str],
    values: list[float],
    unit: str,
    log: bool,
    target: float | None,
) -> Plot:
    plot = Plot(key, title, caption)
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * max(len(names), 2)))
    if names:
        ax.barh(range(len(names)), values, color="C0")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        if log:
            ax.set_xscale("log")
        if target is not None:
            ax.axvline(target, color="k", ls="--", lw=1, label="target")
            ax.legend(fontsize=7)
    else:
        _empty(ax, key)
    plot.png = _png(fig)
    return plot


def plot_micro(docs: dict[str, Document]) -> Plot:
    rows: list[MicroRow] = _rows(docs, "bench_micro", "micro", MicroRow)
    plot = _bars(
        "micro",
        "Microbenchmarks (pytest-benchmark)",
        "Median time of each micro-operation on the restore and deploy paths, per operation (log scale): a ptrace "
        "round trip, an injected syscall, a restorer run without a guest, a pager fault per codec, a sandbox "
        "repurpose, publishing a segment.",
        [r.name for r in rows],
        [r.median_us for r in rows],
        "us per operation (median)",
        True,
        None,
    )
    plot.used.append(_used("bench_micro", "micro", rows))
    return plot


def plot_sandbox(docs: dict[str, Document]) -> Plot:
    rows: list[SandboxRow] = _rows(docs, "bench_sandbox", "sandbox", SandboxRow)
    plot = _bars(
        "sandbox",
        "Sandboxes: create, repurpose, release",
        "Median time to create a sandbox from nothing, to repurpose an idle one for another function, and to "
        "release one (kill its instance, scrub): repurposing is what a thaw pays.",
        [r.op for r in rows],
        [r.median_ms for r in rows],
        "ms (median)",
        True,
        None,
    )
    plot.used.append(_used("bench_sandbox", "sandbox", rows))
    return plot


def plot_cli(docs: dict[str, Document]) -> Plot:
    rows: list[CliRow] = _rows(docs, "bench_cli", "commands", CliRow)
    plot = _bars(
        "cli",
        "The thaw CLI as whole processes",
        "Median time of each `thaw` command from process start to exit, against `python -c pass` (the floor); "
        f"the dashed line is the target, {CLI_TARGET_MS:g} ms.",
        [r.command for r in rows],
        [r.median_ms for r in rows],
        "ms (median)",
        False,
        CLI_TARGET_MS,
    )
    plot.used.append(_used("bench_cli", "commands", rows))
    return plot


def plot_layers(docs: dict[str, Document]) -> Plot:
    rows: list[LayersRow] = _rows(docs, "bench_layers", "layers", LayersRow)
    by_how = {r.how: r for r in rows}
    cold, layered = by_how.get("cold"), by_how.get("layered")
    names, values = [], []
    if cold and layered:
        for name, a, b in (
            ("pool (target <= 35%)", layered.pool_mib, cold.pool_mib),
            ("summed Pss (<= 50%)", layered.pss_mib, cold.pss_mib),
            ("deploy time (<= 50%)", layered.deploy_ms, cold.deploy_ms),
            ("restore time (<= 110%)", layered.restore_ms, cold.restore_ms),
        ):
            names.append(name)
            values.append(100 * a / b)
    plot = _bars(
        "layers",
        "Layered templates against cold ones",
        "Ten functions that import a common stack, each with its own small state: what the layered ten "
        "(children of the runtime template) cost as a percentage of the cold ten, with each target in its label.",
        names,
        values,
        "layered, % of cold",
        False,
        None,
    )
    plot.used.append(_used("bench_layers", "layers", rows))
    return plot


PLOTS: tuple[Callable[[dict[str, Document]], Plot], ...] = (
    plot_restore,
    plot_memory,
    plot_invoke,
    plot_compression,
    plot_keepalive,
    plot_lora,
    plot_pool,
    plot_micro,
    plot_sandbox,
    plot_cli,
    plot_layers,
)
SOURCES = {  # which benchmarks each plot reads: a caption names those absent
    "restore": ("bench_restore",),
    "memory": ("bench_restore",),
    "invoke": ("bench_invoke",),
    "compression": ("bench_codecs", "bench_restore_compressed"),
    "keepalive": ("simulate_keepalive",),
    "lora": ("bench_lora",),
    "pool": ("bench_numa",),
    "micro": ("bench_micro",),
    "sandbox": ("bench_sandbox",),
    "cli": ("bench_cli",),
    "layers": ("bench_layers",),
}


def plots(docs: dict[str, Document]) -> list[Plot]:
    made = []
    for make in PLOTS:
        plot = make(docs)
        for name in SOURCES[plot.key]:
            if name not in docs:
                plot.absent.insert(0, f"{name} was not run (no {name}.json)")
        made.append(plot)
    return made


# -- the page ------------------------------------------------------------------------------------


def machine_rows(docs: dict[str, Document]) -> list[tuple[str, str]]:
    first = next(iter(docs.values()))
    m = first.machine
    kd = m.get("kerndat", {})
    features = ", ".join(f"{k}={v}" for k, v in kd.items() if k != "errors") or "not recorded"
    backends = sorted({str(d.conditions["pool"]) for d in docs.values() if "pool" in d.conditions})
    backends += sorted({r.backend for r in _rows(docs, "bench_numa", "pool", PoolRow)})
    whens = sorted(str(d.machine.get("when", "?")) for d in docs.values())
    quick = sorted(n for n, d in docs.items() if d.conditions.get("quick"))
    return [
        ("host", f"{m.get('host', '?')} ({m.get('arch', '?')})"),
        ("kernel", str(m.get("kernel", "?"))),
        ("CPUs", str(m.get("cpus", "?"))),
        ("memory", f"{m.get('memory_mib', 0) / 1024:.1f} GiB"),
        ("NUMA nodes", ", ".join(map(str, m.get("numa_nodes", []))) or "?"),
        ("kerndat", features),
        ("kerndat probe errors", ", ".join(f"{k}: {v}" for k, v in kd.get("errors", {}).items()) or "none"),
        ("pool backends", "; ".join(dict.fromkeys(backends)) or "not recorded"),
        ("load average at the start", " ".join(map(str, m.get("loadavg", [])))),
        ("date", whens[0] if whens[0] == whens[-1] else f"{whens[0]} to {whens[-1]}"),
        ("--quick runs", ", ".join(quick) or "none: full runs"),
    ]


def page(docs: dict[str, Document], made: list[Plot], missing: list[str], failed: dict[str, str]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>thaw benchmark report</title><style>",
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        "figure{margin:2em 0}img{max-width:100%}figcaption{font-size:.95em}.rows,.absent{font-size:.85em;color:#555}"
        ".absent{color:#a40}",
        "</style></head><body><h1>thaw benchmark report</h1><h2 id='machine'>The machine</h2><table>",
    ]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in machine_rows(docs)]
    parts.append("</table>")
    if missing or failed:
        parts.append("<h2 id='missing'>Not in this report</h2><ul>")
        parts += [f"<li>{e(name)}: {e(failed.get(name, 'no JSON'))}</li>" for name in missing]
        parts.append("</ul>")
    for plot in made:
        image = base64.b64encode(plot.png).decode()
        used = "; ".join(plot.used)
        parts.append(
            f"<figure id='plot-{plot.key}' data-rows='{e(used)}'><h2>{e(plot.title)}</h2>"
            f"<img alt='{e(plot.title)}' src='data:image/png;base64,{image}'>"
            f"<figcaption>{e(plot.caption)}<div class='rows'>Rows: {e(used)}</div>"
        )
        if plot.absent:
            parts.append(f"<div class='absent'>Absent: {e('; '.join(plot.absent))}</div>")
        parts.append("</figcaption></figure>")
    notes = [(n, note) for n, d in docs.items() for note in d.notes]
    if notes:
        parts.append("<h2 id='notes'>Notes from the benchmarks</h2><ul>")
        parts += [f"<li>{e(n)}: {e(note)}</li>" for n, note in notes]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "".join(parts)


def render(
    docs: dict[str, Document], missing: list[str], failed: dict[str, str], out: Path, docs_dir: Path | None
) -> Path:
    made = plots(docs)
    out.mkdir(parents=True, exist_ok=True)
    for plot in made:
        (out / f"{plot.key}.png").write_bytes(plot.png)
        if docs_dir is not None:
            docs_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / f"{plot.key}.png", docs_dir / f"{plot.key}.png")
    report = out / "report.html"
    report.write_text(page(docs, made, missing, failed))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/report",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=bench.RESULTS, help=f"where JSON, logs and the page go [{bench.RESULTS}]"
    )
    parser.add_argument("--from", dest="source", type=Path, metavar="DIR", help="render the JSON in DIR, run nothing")
    parser.add_argument("--quick", action="store_true", help="every benchmark's --quick (a look, not figures)")
    parser.add_argument("--only", help="run only these benchmarks (comma-separated), render with what is in --out")
    parser.add_argument("--docs", type=Path, metavar="DIR", help=f"also copy the PNGs there (the README's: {DOCS})")
    args = parser.parse_args(argv)
    failed: dict[str, str] = {}
    if args.source is None:
        only = set(args.only.split(",")) if args.only else None
        unknown = sorted((only or set()) - set(bench.BENCHMARKS))
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)} (there are {', '.join(bench.BENCHMARKS)})")
        failed = run_all(args.out, args.quick, only)
    source = args.source or args.out
    try:
        docs, missing = load(source)
    except bench.BenchDataError as e:
        print(f"report: refused: {e}", file=sys.stderr)
        return 2
    if not docs:
        print(f"report: no benchmark JSON in {source}: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    if missing:
        print(f"report: missing in {source}: {', '.join(missing)} (their plots say so)", file=sys.stderr)
    report = render(docs, missing, failed, args.out, args.docs)
    print(f"wrote {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

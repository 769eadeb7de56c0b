"""LoRA adapters on the device: slots, batched deltas (SGMV and BGMV), merging, and a reference.

Two cache levels (S-LoRA): every registered adapter sits in the pool, mapped zero-copy
(`AdapterWeights`); `DeviceSlots` holds the ones in use in stacked per-projection tensors, stored
transposed, A^T [slots, in, R] and B^T [slots, R, out], with R the largest rank resident (smaller
ranks are zero-padded, so padding never changes a result). Slots are LRU; a slot whose adapter has a running
sequence is pinned; `prefetch` loads what the waiting queue will need. On CUDA the copies run on a
side stream and the compute stream waits for them by event.

The batched forms (Punica's names):
- SGMV, segment form, for prefill: tokens are packed sequence by sequence, consecutive tokens of one
  adapter form a segment, one pair of matmuls per segment;
- BGMV, gathered form, for decode: one token per row, each row reading its own adapter's A and B by
  slot index. On the CPU this is two `embedding_bag` calls (fbgemm's weighted-sum kernels) over the
  flattened stacks: v[b] = sum_i x[b, i] A^T[slot_b, i] and y[b] = sum_r v[b, r] B^T[slot_b, r],
  which reads each row's adapter once and copies nothing (a gather + bmm copies every row's A and
  B first, and on small models costs more than the base projection itself).
Both compute x @ A^T in fp32 and fold the scaling into B (done at import).

`MergedWeights` is dLoRA's merge: when one adapter owns the batch, W + B A is computed once into a
separate tensor and used instead of W, with no LoRA work per token. The base weight is never
written, so unmerging is switching back to it: exact by construction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from daemon.lora.spec import AdapterModule, ModelShape

Key = tuple[int, str]  # (layer, module)


class NoFreeSlot(RuntimeError):
    """Every device slot holds an adapter a running sequence uses."""


@dataclass
class AdapterWeights:
    """One adapter's tensors (A [r, in], B [out, r] scaled), by (layer, module); host memory."""

    name: str
    modules: list[AdapterModule]
    a: dict[Key, torch.Tensor]
    b: dict[Key, torch.Tensor]

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules)

    @classmethod
    def from_tensors(
        cls, name: str, modules: Sequence[AdapterModule], tensors: Mapping[str, torch.Tensor]
    ) -> AdapterWeights:
        a = {(m.layer, m.module): tensors[f"layers.{m.layer}.{m.module}.A"] for m in modules}
        b = {(m.layer, m.module): tensors[f"layers.{m.layer}.{m.module}.B"] for m in modules}
        return cls(name, list(modules), a, b)


@dataclass
class _Slot:
    adapter: AdapterWeights
    pins: int = 0
    ready: torch.cuda.Event | None = None


@dataclass
class DeviceSlots:
    shape: ModelShape
    capacity: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0  # R: the largest rank resident
    a: dict[Key, torch.Tensor] = field(default_factory=dict)
    b: dict[Key, torch.Tensor] = field(default_factory=dict)
    slots: OrderedDict[str, int] = field(default_factory=OrderedDict)  # name -> index, least recent first
    state: dict[int, _Slot] = field(default_factory=dict)
    loads: int = 0
    evictions: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"need at least one adapter slot, not {self.capacity}")
        self.side_stream = (
            torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # type: ignore[no-untyped-call]
        )

    # -- residency ---------------------------------------------------------------------------------
    def ensure(self, adapter: AdapterWeights) -> int:
        """The slot holding `adapter`, loading it (evicting the least recently used unpinned one)."""
        slot = self.slots.get(adapter.name)
        if slot is not None and self.state[slot].adapter is adapter:
            self.slots.move_to_end(adapter.name)
            return slot
        if slot is not None:  # re-registered under the same name: reload
            self.evict(adapter.name)
        slot = self._free_slot()
        if adapter.rank > self.rank:
            self._repad(adapter.rank)
        self._load(slot, adapter)
        self.slots[adapter.name] = slot
        return slot

    def _free_slot(self) -> int:
        used = set(self.slots.values())
        for i in range(self.capacity):
            if i not in used:
                return i
        for name, i in self.slots.items():  # least recently used first
            if self.state[i].pins == 0:
                self.evict(name)
                return i
        raise NoFreeSlot(f"all {self.capacity} adapter slots are pinned by running sequences")

    def evict(self, name: str) -> None:
        slot = self.slots.pop(name, None)
        if slot is None:
            return
        entry = self.state.pop(slot)
        if entry.pins:
            raise RuntimeError(f"adapter {name!r} is pinned by {entry.pins} running sequences")
        for key in entry.adapter.a:
            self.a[key][slot].zero_()
            self.b[key][slot].zero_()
        self.evictions += 1
        largest = max((s.adapter.rank for s in self.state.values()), default=0)
        if largest < self.rank:
            self._repad(largest)

    def pin(self, name: str) -> None:
        self.state[self.slots[name]].pins += 1

    def unpin(self, name: str) -> None:
        slot = self.slots.get(name)
        if slot is not None and self.state[slot].pins > 0:
            self.state[slot].pins -= 1

    def prefetch(self, adapters: Iterable[AdapterWeights]) -> int:
        """Load what the waiting queue needs while slots are free or evictable; returns how many."""
        loaded = 0
        for adapter in adapters:
            if adapter.name in self.slots:
                continue
            try:
                self.ensure(adapter)
            except NoFreeSlot:
                break
            loaded += 1
        return loaded

    def wait_ready(self, names: Iterable[str]) -> None:
        """Make the compute stream wait for the slot copies of `names` (CUDA); nothing on CPU."""
        if self.side_stream is None:
            return
        for name in names:
            event = self.state[self.slots[name]].ready
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)

    # -- storage -----------------------------------------------------------------------------------
    def _stack(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """A^T [slots, in, R] and B^T [slots, R, out] of one projection."""
        if key not in self.a:
            fin, fout = self.shape.features(key[1])
            self.a[key] = torch.zeros(self.capacity, fin, self.rank, device=self.device)
            self.b[key] = torch.zeros(self.capacity, self.rank, fout, device=self.device)
        return self.a[key], self.b[key]

    def _repad(self, rank: int) -> None:
        """Re-stack every projection to rank `rank` (only ever the largest rank resident)."""
        keep = min(rank, self.rank)
        for key in list(self.a):
            a, b = self.a[key], self.b[key]
            self.a[key] = torch.zeros(self.capacity, a.shape[1], rank, device=self.device)
            self.b[key] = torch.zeros(self.capacity, rank, b.shape[2], device=self.device)
            self.a[key][:, :, :keep] = a[:, :, :keep]
            self.b[key][:, :keep] = b[:, :keep]
        self.rank = rank

    def _load(self, slot: int, adapter: AdapterWeights) -> None:
        entry = _Slot(adapter)
        if self.side_stream is not None:
            with torch.cuda.stream(self.side_stream):
                self._copy(slot, adapter, non_blocking=True)
                entry.ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
                entry.ready.record(self.side_stream)
        else:
            self._copy(slot, adapter, non_blocking=False)
        self.state[slot] = entry
        self.loads += 1

    def _copy(self, slot: int, adapter: AdapterWeights, non_blocking: bool) -> None:
        for key, a in adapter.a.items():
            stack_a, stack_b = self._stack(key)
            r = a.shape[0]
            src_a, src_b = a, adapter.b[key]
            if non_blocking:  # pageable memory would make the copy synchronous: stage it pinned
                src_a, src_b = src_a.pin_memory(), src_b.pin_memory()
            stack_a[slot, :, :r].copy_(src_a.T, non_blocking=non_blocking)
            stack_b[slot, :r].copy_(src_b.T, non_blocking=non_blocking)
            if r < self.rank:
                stack_a[slot, :, r:].zero_()
                stack_b[slot, r:].zero_()


class SegmentLora:
    """SGMV: `segments` are (start, end, slot or -1) over the packed tokens of a prefill; one pair
    of matmuls per run of tokens that share an adapter. (Padding the runs into two batched matmuls
    was measured slower here: the padding copies cost more than the Python loop saves.)"""

    def __init__(self, slots: DeviceSlots, segments: Sequence[tuple[int, int, int]]) -> None:
        self.slots = slots
        self.segments = [(s, e, k) for s, e, k in _merge_runs(segments) if k >= 0]

    def weight(self, layer: int, module: str) -> torch.Tensor | None:
        return None

    def delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
        a = self.slots.a.get((layer, module))
        if a is None or not self.segments:
            return None
        b = self.slots.b[(layer, module)]
        out = torch.zeros(x.shape[0], b.shape[2], dtype=torch.float32, device=x.device)
        for start, end, k in self.segments:
            out[start:end] = (x[start:end].float() @ a[k]) @ b[k]
        return out.to(x.dtype)


def _merge_runs(segments: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    for s, e, k in segments:
        if runs and runs[-1][2] == k and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], e, k)
        else:
            runs.append((s, e, k))
    return runs


class GatherLora:
    """BGMV: row i of the batch uses slot `rows[i]` (-1: no adapter)."""

    def __init__(self, slots: DeviceSlots, rows: Sequence[int]) -> None:
        self.slots = slots
        device = slots.device
        self.all_rows = all(k >= 0 for k in rows)
        self.rows = torch.tensor([i for i, k in enumerate(rows) if k >= 0], dtype=torch.long, device=device)
        self.index = torch.tensor([k for k in rows if k >= 0], dtype=torch.long, device=device)
        self.batch = len(rows)
        self.bags: dict[int, torch.Tensor] = {}  # row width -> [n, width] indices into a flattened stack

    def weight(self, layer: int, module: str) -> torch.Tensor | None:
        return None

    def _bag(self, width: int) -> torch.Tensor:
        """Row b of the result: the flattened-stack rows slot_b * width + (0 .. width-1)."""
        if width not in self.bags:
            span = torch.arange(width, device=self.index.device)
            self.bags[width] = self.index[:, None] * width + span[None, :]
        return self.bags[width]

    def delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
        a = self.slots.a.get((layer, module))
        if a is None or self.index.numel() == 0:
            return None
        b = self.slots.b[(layer, module)]
        slots, fin, rank = a.shape
        xs = (x if self.all_rows else x[self.rows]).float()
        if a.is_cuda:  # one gather + two batched matmuls per projection: what a GPU does well
            v = torch.bmm(xs[:, None, :], a[self.index])  # [n, 1, R]
            d = torch.bmm(v, b[self.index])[:, 0]  # [n, out]
        else:
            v = F.embedding_bag(self._bag(fin), a.view(slots * fin, rank), per_sample_weights=xs, mode="sum")
            d = F.embedding_bag(self._bag(rank), b.view(slots * rank, -1), per_sample_weights=v, mode="sum")
        if self.all_rows:
            return d.to(x.dtype)
        out = torch.zeros(self.batch, d.shape[1], dtype=torch.float32, device=x.device)
        out[self.rows] = d
        return out.to(x.dtype)


class MergedWeights:
    """W + B A for every projection `adapter` targets, in separate tensors (the base stays as it is)."""

    def __init__(self, adapter: AdapterWeights, base: Mapping[Key, torch.Tensor]) -> None:
        self.adapter = adapter
        self.merged: dict[Key, torch.Tensor] = {}
        for key, a in adapter.a.items():
            w = base[key]
            delta = adapter.b[key].to(w.device, torch.float32) @ a.to(w.device, torch.float32)
            self.merged[key] = (w.float() + delta).to(w.dtype)

    def weight(self, layer: int, module: str) -> torch.Tensor | None:
        return self.merged.get((layer, module))

    def delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.merged.values())


class ReferenceLora:
    """The plain-torch definition, one row at a time with each adapter's own (unpadded) weights:
    y = x A^T B^T (scaling already in B). The batched forms are tested against it."""

    def __init__(self, row_adapters: Sequence[AdapterWeights | None], row_of_token: Sequence[int]) -> None:
        self.row_adapters, self.row_of_token = row_adapters, row_of_token

    def weight(self, layer: int, module: str) -> torch.Tensor | None:
        return None

    def delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
        rows: list[torch.Tensor | None] = []
        for t in range(x.shape[0]):
            adapter = self.row_adapters[self.row_of_token[t]]
            key = (layer, module)
            if adapter is None or key not in adapter.a:
                rows.append(None)
                continue
            a, b = adapter.a[key].float(), adapter.b[key].float()
            rows.append(b @ (a @ x[t].float()))
        if all(r is None for r in rows):
            return None
        width = next(r for r in rows if r is not None).shape[0]
        return torch.stack([r if r is not None else torch.zeros(width) for r in rows]).to(x.dtype)

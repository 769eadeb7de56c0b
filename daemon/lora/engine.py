"""Continuous (iteration-level) batching over one base model and many adapters.

Every `step()`:
1. admit waiting requests, oldest first, while the batch has room and their adapters can be pinned
   in device slots (a request whose adapter cannot get a slot waits, and so does everyone after it);
2. prefetch the adapters of the next waiting requests into free or evictable slots;
3. prefill the admitted prompts together (SGMV), each sequence into the next free cache slot;
4. decode one token for every running sequence (BGMV), or with merged weights when one adapter has
   owned the whole batch for `merge_after` steps (dLoRA; any other adapter in the batch unmerges);
5. finish sequences (max_tokens, an end-of-sequence token), unpin their adapters and keep the
   running sequences in slots 0..B-1 by moving the last one into the hole.

Requests finish with their generated token ids; the worker turns them into text.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from daemon.lora.adapters import AdapterWeights, DeviceSlots, GatherLora, MergedWeights, NoFreeSlot, SegmentLora
from daemon.lora.model import KVCache, LlamaModel, LoraDelta, Segment


class RequestRejected(ValueError):
    """A request that can never run (unknown adapter, too long); the message says why."""


@dataclass
class Request:
    prompt: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    id: int = 0
    future: Future[Result] = field(default_factory=Future)


@dataclass
class Result:
    tokens: list[int]
    finish_reason: str  # "length" | "stop"
    prompt_tokens: int
    queued_s: float
    total_s: float


@dataclass
class _Running:
    request: Request
    generated: list[int]
    slot_adapter: int  # device slot index or -1
    generator: torch.Generator | None
    admitted: float
    submitted: float


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    merged_steps: int = 0
    merges: int = 0
    finished: int = 0


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        adapters: Mapping[str, AdapterWeights],
        slots: DeviceSlots,
        max_batch: int = 64,
        merge_after: int = 4,
        prefetch_depth: int = 8,
    ) -> None:
        self.model, self.adapters, self.slots = model, adapters, slots
        self.max_batch, self.merge_after, self.prefetch_depth = max_batch, merge_after, prefetch_depth
        self.cache = KVCache(model.shape, max_batch, model.dtype, model.device)
        self.waiting: deque[tuple[Request, float]] = deque()
        self.running: list[_Running] = []
        self.merged: MergedWeights | None = None
        self.owner: str | None = None  # the adapter that owned the last decode batch, if one did
        self.streak = 0  # consecutive decode steps it owned the batch
        self.stats = EngineStats()
        self.lock = threading.Condition()  # guards the queues; submit() takes only this
        self.step_lock = threading.Lock()
        self._next_id = 0

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, request: Request) -> Future[Result]:
        self._check(request)
        with self.lock:
            self._next_id += 1
            request.id = self._next_id
            self.waiting.append((request, time.monotonic()))
            self.lock.notify_all()
        return request.future

    def _check(self, request: Request) -> None:
        if request.adapter is not None and request.adapter not in self.adapters:
            raise RequestRejected(f"no adapter named {request.adapter!r} is registered with this worker")
        if not request.prompt:
            raise RequestRejected("the prompt is empty")
        if request.max_tokens < 1:
            raise RequestRejected(f"max_tokens must be at least 1, not {request.max_tokens}")
        limit = self.model.shape.max_positions
        if len(request.prompt) + request.max_tokens > limit:
            raise RequestRejected(
                f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) "
                f"exceeds the model's {limit} positions"
            )
        vocab = self.model.shape.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise RequestRejected(f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})")

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def fail_all(self, error: BaseException) -> None:
        with self.lock:
            pending = [r for r, _ in self.waiting] + [r.request for r in self.running]
            for seq in self.running:
                if seq.request.adapter is not None:
                    self.slots.unpin(seq.request.adapter)
            self.waiting.clear()
            self.running = []
            self.cache.lengths = [0] * self.cache.slots
        for request in pending:
            if not request.future.done():
                request.future.set_exception(error)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event, on_error: Callable[[BaseException], None] | None = None) -> None:
        """Step until `stop` is set, sleeping while there is nothing to do."""
        while not stop.is_set():
            with self.lock:
                while self.idle() and not stop.is_set():
                    self.lock.wait(0.5)
            if stop.is_set():
                break
            try:
                self.step()
            except Exception as e:  # a bug or OOM in a step: fail what is in flight, keep serving
                self.fail_all(e)
                if on_error:
                    on_error(e)

    def step(self) -> None:
        with self.step_lock:  # adapters are unregistered between steps, never inside one
            admitted = self._admit()
            self._prefetch()
            if admitted:
                self._prefill(admitted)
            if self.running:
                self._decode()
            self.stats.steps += 1

    def _admit(self) -> list[_Running]:
        admitted: list[_Running] = []
        now = time.monotonic()
        with self.lock:
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                request, submitted = self.waiting[0]
                slot = -1
                if request.adapter is not None:
                    adapter = self.adapters.get(request.adapter)
                    if adapter is None:  # unregistered while it waited
                        self.waiting.popleft()
                        request.future.set_exception(RequestRejected(f"adapter {request.adapter!r} was unregistered"))
                        continue
                    try:
                        slot = self.slots.ensure(adapter)
                    except NoFreeSlot:
                        break
                    self.slots.pin(adapter.name)
                self.waiting.popleft()
                generator = None
                if request.temperature > 0:
                    generator = torch.Generator(self.model.device)
                    generator.manual_seed(request.seed if request.seed is not None else request.id)
                admitted.append(_Running(request, [], slot, generator, now, submitted))
        return admitted

    def _prefetch(self) -> None:
        with self.lock:
            names = [r.adapter for r, _ in list(self.waiting)[: self.prefetch_depth] if r.adapter]
        wanted = [self.adapters[n] for n in dict.fromkeys(names) if n in self.adapters]
        self.slots.prefetch(wanted)

    def _prefill(self, admitted: list[_Running]) -> None:
        admitted.sort(key=lambda r: r.slot_adapter)  # one SGMV segment per adapter
        first = len(self.running)
        tokens: list[int] = []
        segments: list[Segment] = []
        lora_segments: list[tuple[int, int, int]] = []
        for i, seq in enumerate(admitted):
            start = len(tokens)
            tokens += seq.request.prompt
            segments.append(Segment(start, len(tokens), first + i))
            lora_segments.append((start, len(tokens), seq.slot_adapter))
        self.slots.wait_ready(a.request.adapter for a in admitted if a.request.adapter)
        lora = self._lora_for([a.request.adapter for a in admitted]) or SegmentLora(self.slots, lora_segments)
        logits = self.model.prefill(self._tensor(tokens), segments, self.cache, lora)
        self.stats.prefill_tokens += len(tokens)
        self.running += admitted
        for seq, row in zip(admitted, logits, strict=True):
            seq.generated.append(self._sample(seq, row))
        self._finish()

    def _decode(self) -> None:
        names = [r.request.adapter for r in self.running]
        owner = names[0] if names[0] is not None and all(n == names[0] for n in names) else None
        self.streak = self.streak + 1 if owner is not None and owner == self.owner else int(owner is not None)
        self.owner = owner
        lora = self._lora_for(names) or GatherLora(self.slots, [r.slot_adapter for r in self.running])
        tokens = self._tensor([r.generated[-1] for r in self.running])
        logits = self.model.decode(tokens, self.cache, lora)
        self.stats.decode_tokens += len(self.running)
        for seq, row in zip(self.running, logits, strict=True):
            seq.generated.append(self._sample(seq, row))
        self._finish()

    def _lora_for(self, names: list[str | None]) -> LoraDelta | None:
        """Merged weights when every row uses the merged adapter (merging once the streak is long enough)."""
        owner = names[0] if names and names[0] is not None and all(n == names[0] for n in names) else None
        if owner is None:
            return None
        adapter = self.adapters[owner]
        if self.merged is not None and self.merged.adapter is adapter:
            self.stats.merged_steps += 1
            return self.merged
        if self.streak >= self.merge_after:
            base = {key: self.model.base_weight(*key) for key in adapter.a}
            self.merged = MergedWeights(adapter, base)
            self.stats.merges += 1
            self.stats.merged_steps += 1
            return self.merged
        return None

    def drop_merged(self, name: str) -> None:
        if self.merged is not None and self.merged.adapter.name == name:
            self.merged = None

    def _sample(self, seq: _Running, logits: torch.Tensor) -> int:
        if seq.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / seq.request.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _finish(self) -> None:
        now = time.monotonic()
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            request = seq.request
            reason = None
            if seq.generated[-1] in request.stop_ids:
                reason = "stop"
            elif len(seq.generated) >= request.max_tokens:
                reason = "length"
            if reason is None:
                i += 1
                continue
            if request.adapter is not None:
                self.slots.unpin(request.adapter)
            last = len(self.running) - 1
            if i != last:
                self.cache.move(last, i)
                self.running[i] = self.running[last]
            else:
                self.cache.lengths[i] = 0
            self.running.pop()
            self.stats.finished += 1
            result = Result(
                seq.generated, reason, len(request.prompt), seq.admitted - seq.submitted, now - seq.submitted
            )
            request.future.set_result(result)

    def _tensor(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor(tokens, dtype=torch.long, device=self.model.device)

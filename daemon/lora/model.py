"""A Llama-family decoder in plain torch, reading Hugging Face tensor names, built for batching.

RMSNorm, rotary position embeddings, grouped-query attention over a slot-indexed KV cache, SwiGLU.
Two entry points share every weight:

- `prefill(tokens, segments, lora)`: the prompts of newly admitted sequences, packed one after
  another into one token axis. Projections (and their LoRA deltas, segment form) run over the whole
  pack; attention runs per sequence, causal, and fills each sequence's cache slot.
- `decode(tokens, lora)`: one new token for each of the first B slots (the running batch, kept
  compact by `KVCache.move`). Attention is one masked call over the slots' caches.

Numerics follow transformers' LlamaForCausalLM (fp32 RMSNorm, rotate-half RoPE with fp32
frequencies, SDPA), so logits agree with it to float rounding; tests hold that to 1e-4.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from daemon.lora.spec import PROJECTIONS, ModelShape


class LoraDelta(Protocol):
    """What the model asks of the LoRA layer: the delta for projection `module` of `layer`, or None."""

    def delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None: ...

    def weight(self, layer: int, module: str) -> torch.Tensor | None:
        """A merged weight to use instead of the base one (dLoRA), or None."""
        ...


@dataclass
class Segment:
    """One sequence inside a prefill pack: tokens [start, end) fill cache slot `slot`."""

    start: int
    end: int
    slot: int


class KVCache:
    """Keys and values per layer as [slots, kv_heads, capacity, head_dim]; capacity grows by doubling."""

    def __init__(self, shape: ModelShape, slots: int, dtype: torch.dtype, device: torch.device, capacity: int = 64):
        self.shape, self.slots, self.dtype, self.device = shape, slots, dtype, device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = [0] * slots
        self.reserve(capacity)

    def reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, 16)
        s = self.shape
        dims = (self.slots, s.num_kv_heads, capacity, s.head_dim)
        grown_k = [torch.zeros(dims, dtype=self.dtype, device=self.device) for _ in range(s.num_layers)]
        grown_v = [torch.zeros(dims, dtype=self.dtype, device=self.device) for _ in range(s.num_layers)]
        if self.capacity:
            for old, new in zip(self.keys + self.values, grown_k + grown_v, strict=True):
                new[:, :, : self.capacity] = old
        self.keys, self.values, self.capacity = grown_k, grown_v, capacity

    def move(self, src: int, dst: int) -> None:
        """Slot `src`'s sequence now lives in slot `dst` (compaction after a sequence ends)."""
        n = self.lengths[src]
        for cache in self.keys + self.values:
            cache[dst, :, :n] = cache[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaModel:
    """Weights by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`, ...), zero-copy views
    into the pool where the loader could make them so."""

    def __init__(self, shape: ModelShape, weights: Mapping[str, torch.Tensor]) -> None:
        self.shape = shape
        self.weights = dict(weights)
        missing = [n for n in shape.required_tensors() if n not in self.weights]
        if missing:
            raise ValueError(f"the model store lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
        self.embed = self.weights["model.embed_tokens.weight"]
        self.lm_head = (
            self.weights.get("lm_head.weight", self.embed)
            if shape.tie_word_embeddings
            else self.weights["lm_head.weight"]
        )
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        dim = shape.head_dim
        self.inv_freq = 1.0 / (
            shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=self.device) / dim)
        )

    # -- pieces ------------------------------------------------------------------------------------
    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        return self.weights[f"model.layers.{layer}.{PROJECTIONS[module]}.{module}.weight"]

    def _bias(self, layer: int, module: str) -> torch.Tensor | None:
        return self.weights.get(f"model.layers.{layer}.{PROJECTIONS[module]}.{module}.bias")

    def _project(self, layer: int, module: str, x: torch.Tensor, lora: LoraDelta | None) -> torch.Tensor:
        merged = lora.weight(layer, module) if lora is not None else None
        y = F.linear(x, merged if merged is not None else self.base_weight(layer, module), self._bias(layer, module))
        if lora is not None and merged is None:
            delta = lora.delta(layer, module, x)
            if delta is not None:
                y = y + delta
        return y

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] for every layer of one step."""
        freqs = positions[:, None].to(torch.float32) * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    def _qkv(
        self, layer: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lora: LoraDelta | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k and v [T, Hkv, D], rotary applied (`rope`: cos and sin [T, 1, D])."""
        s = self.shape
        q = self._project(layer, "q_proj", h, lora).view(-1, s.num_heads, s.head_dim)
        k = self._project(layer, "k_proj", h, lora).view(-1, s.num_kv_heads, s.head_dim)
        v = self._project(layer, "v_proj", h, lora).view(-1, s.num_kv_heads, s.head_dim)
        cos, sin = rope
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _mlp(self, layer: int, h: torch.Tensor, lora: LoraDelta | None) -> torch.Tensor:
        gate = self._project(layer, "gate_proj", h, lora)
        up = self._project(layer, "up_proj", h, lora)
        return self._project(layer, "down_proj", F.silu(gate) * up, lora)

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weights[name], self.shape.rms_norm_eps)

    def _block(
        self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend: Any, lora: LoraDelta | None
    ) -> torch.Tensor:
        h = self._norm(f"model.layers.{layer}.input_layernorm.weight", x)
        q, k, v = self._qkv(layer, h, rope, lora)
        attn = attend(layer, q, k, v)  # [T, H * D]
        x = x + self._project(layer, "o_proj", attn, lora)
        h = self._norm(f"model.layers.{layer}.post_attention_layernorm.weight", x)
        return x + self._mlp(layer, h, lora)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm("model.norm.weight", x), self.lm_head).float()

    # -- entry points ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self, tokens: torch.Tensor, segments: Sequence[Segment], cache: KVCache, lora: LoraDelta | None = None
    ) -> torch.Tensor:
        """Logits [len(segments), vocab] at each segment's last token; fills the segments' slots."""
        positions = torch.cat([torch.arange(seg.end - seg.start, device=self.device) for seg in segments])
        cache.reserve(max(seg.end - seg.start for seg in segments) + 1)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
            for seg in segments:
                n = seg.end - seg.start
                cache.keys[layer][seg.slot, :, :n] = k[seg.start : seg.end].transpose(0, 1)
                cache.values[layer][seg.slot, :, :n] = v[seg.start : seg.end].transpose(0, 1)
                o = F.scaled_dot_product_attention(
                    q[seg.start : seg.end].transpose(0, 1)[None],
                    k[seg.start : seg.end].transpose(0, 1)[None],
                    v[seg.start : seg.end].transpose(0, 1)[None],
                    is_causal=True,
                    enable_gqa=True,
                )
                out[seg.start : seg.end] = o[0].transpose(0, 1).reshape(n, -1)
            return out

        x = F.embedding(tokens, self.embed)
        rope = self._rope(positions)
        for layer in range(self.shape.num_layers):
            x = self._block(layer, x, rope, attend, lora)
        for seg in segments:
            cache.lengths[seg.slot] = seg.end - seg.start
        last = torch.tensor([seg.end - 1 for seg in segments], device=self.device)
        return self._logits(x[last])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: KVCache, lora: LoraDelta | None = None) -> torch.Tensor:
        """One step for slots 0..B-1 (B = len(tokens)): logits [B, vocab]."""
        batch = tokens.shape[0]
        lengths = cache.lengths[:batch]
        cache.reserve(max(lengths) + 1)
        span = max(lengths) + 1
        pos = torch.tensor(lengths, device=self.device)
        rows = torch.arange(batch, device=self.device)
        # True where a slot's key exists (its own past plus the token being added now).
        mask = (torch.arange(span, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.keys[layer], cache.values[layer]
            keys[rows, :, pos] = k
            values[rows, :, pos] = v
            o = F.scaled_dot_product_attention(
                q[:, :, None, :], keys[:batch, :, :span], values[:batch, :, :span], attn_mask=mask, enable_gqa=True
            )
            return o.reshape(batch, -1)

        x = F.embedding(tokens, self.embed)
        rope = self._rope(pos)
        for layer in range(self.shape.num_layers):
            x = self._block(layer, x, rope, attend, lora)
        for b in range(batch):
            cache.lengths[b] += 1
        return self._logits(x)

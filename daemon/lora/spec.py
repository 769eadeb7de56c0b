"""Shapes and adapter rules, without torch: the daemon checks an adapter against its base model here,
before any worker sees it, so a bad adapter is refused at registration with a clear error.

A model store's meta carries the Hugging Face `config` (config.json); an adapter store's meta
carries the PEFT `adapter_config` plus, per target module, its rank and scaling (alpha/r, or
alpha/sqrt(r) with rslora, after rank_pattern and alpha_pattern). Adapter tensors are stored as
`layers.{i}.{module}.A` [r, in] and `layers.{i}.{module}.B` [out, r] with the scaling already
folded into B (fp32).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The projections an adapter may target, and the submodule each sits in.
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# Non-tensor files a model store carries (tokenizer.json, ...), as U8 tensors named FILES_PREFIX + file.
FILES_PREFIX = "__files__/"
ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}


class AdapterMismatch(ValueError):
    """An adapter that cannot serve over this base model (targets, shapes, rank)."""


class UnsupportedModel(ValueError):
    """A model this worker's decoder does not implement."""


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    max_positions: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in ARCHITECTURES:
            raise UnsupportedModel(
                f"architecture {arch} is not a Llama-family decoder ({', '.join(sorted(ARCHITECTURES))})"
            )
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModel(f"RoPE scaling {rope_type!r} is not implemented (only the default)")
        if config.get("sliding_window") and arch == "MistralForCausalLM":
            raise UnsupportedModel("sliding-window attention is not implemented")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            max_positions=int(config.get("max_position_embeddings", 2048)),
        )

    def features(self, module: str) -> tuple[int, int]:
        """(in, out) of a projection."""
        q, kv, h, m = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.hidden_size,
            self.intermediate_size,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, m),
            "up_proj": (h, m),
            "down_proj": (m, h),
        }[module]

    def required_tensors(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(self.num_layers):
            names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
            names += [f"model.layers.{i}.{sub}.{m}.weight" for m, sub in PROJECTIONS.items()]
        return names


# -- PEFT adapters ------------------------------------------------------------------------------------
_PEFT_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
)


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name it ends (dot-separated)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def adapter_scaling(config: Mapping[str, Any], module_name: str, rank: int) -> float:
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module_name, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_adapter_config(config: Mapping[str, Any]) -> None:
    """Refuse the PEFT features this worker does not serve, naming them."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterMismatch(f"peft_type {config.get('peft_type')} is not LORA")
    if config.get("use_dora"):
        raise AdapterMismatch("DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterMismatch(f"adapters with bias={config['bias']!r} are not supported (only 'none')")
    if config.get("modules_to_save"):
        raise AdapterMismatch(f"modules_to_save {config['modules_to_save']} are not supported (LoRA weights only)")
    if config.get("fan_in_fan_out"):
        raise AdapterMismatch("fan_in_fan_out adapters (Conv1D bases) are not supported")


def parse_adapter_tensor(name: str) -> tuple[int, str, str]:
    """(layer, module, "A" | "B") of a PEFT tensor name, or AdapterMismatch naming what it targets."""
    m = _PEFT_TENSOR.match(name)
    if not m:
        raise AdapterMismatch(f"tensor {name!r} is not a LoRA weight of a decoder layer's projection")
    layer, sub, module, which = int(m[1]), m[2], m[3], m[4]
    if PROJECTIONS.get(module) != sub:
        raise AdapterMismatch(f"tensor {name!r} targets {sub}.{module}, which LoRA workers do not adapt")
    return layer, module, which


@dataclass(frozen=True)
class AdapterModule:
    layer: int
    module: str
    rank: int
    scaling: float


def check_adapter(
    shape: ModelShape, modules: Sequence[AdapterModule], tensor_shapes: Mapping[str, Sequence[int]], max_rank: int
) -> None:
    """Every module fits the base: layer exists, A is [r, in], B is [out, r], r <= max_rank."""
    if not modules:
        raise AdapterMismatch("the adapter has no LoRA weights")
    for m in modules:
        where = f"layers.{m.layer}.{m.module}"
        if m.layer >= shape.num_layers:
            raise AdapterMismatch(f"{where}: the base model has only {shape.num_layers} layers")
        if m.rank > max_rank:
            raise AdapterMismatch(f"{where}: rank {m.rank} is above the worker's maximum rank {max_rank}")
        fin, fout = shape.features(m.module)
        a, b = list(tensor_shapes[f"{where}.A"]), list(tensor_shapes[f"{where}.B"])
        if a != [m.rank, fin] or b != [fout, m.rank]:
            raise AdapterMismatch(
                f"{where}: lora_A {a} and lora_B {b} do not fit the base projection ({fin} -> {fout}): "
                f"expected [{m.rank}, {fin}] and [{fout}, {m.rank}]"
            )


def adapter_modules(meta: Mapping[str, Any]) -> list[AdapterModule]:
    return [AdapterModule(int(m["layer"]), m["module"], int(m["rank"]), float(m["scaling"])) for m in meta["modules"]]

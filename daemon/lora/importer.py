"""Import models and PEFT adapters into the pool's tensor store (`python -m daemon.lora.importer`).

    python -m daemon.lora.importer model  --pool /var/lib/thaw/pool --name smollm2 DIR_OR_GGUF
    python -m daemon.lora.importer adapter --pool /var/lib/thaw/pool --name sql DIR

A model comes from a Hugging Face directory (config.json + *.safetensors, read one tensor at a
time) or a GGUF file (read and dequantized by transformers, which also maps GGUF's tensor names
back to Hugging Face's). Its tokenizer files ride along as U8 tensors under `__files__/`, since a
worker in a sandbox sees only the store. An adapter comes from a PEFT directory
(adapter_config.json + adapter_model.safetensors): its A and B go in as fp32, B already multiplied
by the module's scaling, and the store's meta records rank and scaling per module.

The daemon runs this as a child process (torch never loads in the daemon itself); run directly, it
shows a progress bar. Output: one JSON line describing what was published.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open

from daemon.lora.loader import STORE_DTYPES
from daemon.lora.spec import (
    FILES_PREFIX,
    AdapterMismatch,
    ModelShape,
    adapter_scaling,
    check_adapter_config,
    parse_adapter_tensor,
)
from shmpool.errors import PoolError
from shmpool.pool import Pool
from shmpool.tensors import TensorIndex, TensorSource, write_store

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
MODEL_KIND, ADAPTER_KIND = "lora-model", "lora-adapter"


class ImportFailed(ValueError):
    """The source is not something this importer reads; the message says what is wrong with it."""


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes, row-major (numpy has no bfloat16, so go through a uint8 view)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data: bytes | memoryview = flat.view(torch.uint8).numpy().data
    return memoryview(data).cast("B")


def source_of(
    name: str, t: torch.Tensor | Callable[[], torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]
) -> TensorSource:
    if dtype not in STORE_DTYPES:
        raise ImportFailed(f"tensor {name!r} has dtype {dtype}, which the store does not hold")
    if callable(t):
        load = t
        return TensorSource(name, STORE_DTYPES[dtype], shape, lambda: tensor_bytes(load()))
    return TensorSource(name, STORE_DTYPES[dtype], shape, tensor_bytes(t))


def file_sources(directory: Path) -> list[TensorSource]:
    out = []
    for fname in TOKENIZER_FILES:
        path = directory / fname
        if path.is_file():
            data = path.read_bytes()
            out.append(TensorSource(FILES_PREFIX + fname, "U8", (len(data),), data))
    return out


# -- models ----------------------------------------------------------------------------------------
def hf_model_sources(directory: Path, dtype: torch.dtype | None) -> tuple[dict[str, Any], list[TensorSource]]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ImportFailed(f"{directory} has no config.json: not a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ImportFailed(f"{directory} has no *.safetensors weights (pytorch_model.bin is not read: convert it)")
    sources = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                stored = _dtype_of(sl.get_dtype())

                def load(path: Path = path, name: str = name) -> torch.Tensor:
                    with safe_open(str(path), framework="pt") as g:
                        t: torch.Tensor = g.get_tensor(name)
                    return t.to(dtype) if dtype is not None else t

                sources.append(source_of(name, load, dtype or stored, shape))
    return config, sources + file_sources(directory)


def _dtype_of(safetensors_name: str) -> torch.dtype:
    from daemon.lora.loader import TORCH_DTYPES

    if safetensors_name not in TORCH_DTYPES:
        raise ImportFailed(f"safetensors dtype {safetensors_name} is not supported")
    return TORCH_DTYPES[safetensors_name]


def gguf_model_sources(path: Path, dtype: torch.dtype | None) -> tuple[dict[str, Any], list[TensorSource]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many kinds; say which file and why
        raise ImportFailed(f"transformers could not read {path} as GGUF: {type(e).__name__}: {e}") from e
    config = model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(model).__name__]  # GGUF configs leave it out
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    sources = [source_of(name, t, t.dtype, tuple(t.shape)) for name, t in state.items()]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        sources += file_sources(Path(tmp))
    return config, sources


def import_model(
    pool: Pool, name: str, source: Path, dtype: torch.dtype | None = None, progress: bool = False
) -> TensorIndex:
    """Publish the model at `source` (HF directory or .gguf file) as store `name`."""
    if source.is_file() and source.suffix == ".gguf":
        config, sources = gguf_model_sources(source, dtype)
    elif source.is_dir():
        config, sources = hf_model_sources(source, dtype)
    else:
        raise ImportFailed(f"{source} is neither a Hugging Face model directory nor a .gguf file")
    shape = ModelShape.from_config(config)  # refuse what the worker cannot run before writing anything
    names = {s.name for s in sources}
    missing = [n for n in shape.required_tensors() if n not in names]
    if missing:
        raise ImportFailed(f"{source} lacks {len(missing)} tensors the decoder needs, e.g. {', '.join(missing[:3])}")
    meta = {"kind": MODEL_KIND, "config": config, "source": str(source)}
    return _write(pool, name, sources, meta, progress)


# -- adapters --------------------------------------------------------------------------------------
def import_adapter(pool: Pool, name: str, source: Path, progress: bool = False) -> TensorIndex:
    """Publish the PEFT adapter in directory `source` as store `name`."""
    config_file, weights = source / "adapter_config.json", source / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ImportFailed(f"{source} is not a PEFT adapter (needs adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_file.read_text())
    check_adapter_config(config)
    a: dict[tuple[int, str], torch.Tensor] = {}
    b: dict[tuple[int, str], torch.Tensor] = {}
    with safe_open(str(weights), framework="pt") as f:
        for tname in f.keys():  # noqa: SIM118
            layer, module, which = parse_adapter_tensor(tname)
            (a if which == "A" else b)[(layer, module)] = f.get_tensor(tname).float()
    if set(a) != set(b):
        raise AdapterMismatch(f"{source}: lora_A and lora_B do not pair up for {sorted(set(a) ^ set(b))}")
    modules: list[dict[str, Any]] = []
    sources: list[TensorSource] = []
    for (layer, module), lora_a in sorted(a.items()):
        rank = lora_a.shape[0]
        scaling = adapter_scaling(config, f"model.layers.{layer}.{module}", rank)
        modules.append({"layer": layer, "module": module, "rank": rank, "scaling": scaling})
        scaled_b = b[(layer, module)] * scaling
        sources.append(source_of(f"layers.{layer}.{module}.A", lora_a, torch.float32, tuple(lora_a.shape)))
        sources.append(source_of(f"layers.{layer}.{module}.B", scaled_b, torch.float32, tuple(scaled_b.shape)))
    meta = {
        "kind": ADAPTER_KIND,
        "adapter_config": config,
        "modules": modules,
        "rank": max((m["rank"] for m in modules), default=0),
        "source": str(source),
    }
    return _write(pool, name, sources, meta, progress)


def _write(pool: Pool, name: str, sources: list[TensorSource], meta: dict[str, Any], progress: bool) -> TensorIndex:
    total = sum(s.nbytes for s in sources)
    if not progress:
        return write_store(pool, name, sources, meta=meta)
    columns = (TextColumn(f"importing {name}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("import", total=total)
        return write_store(pool, name, sources, meta=meta, progress=lambda n: bar.advance(task, n))


def summary(name: str, index: TensorIndex) -> dict[str, Any]:
    return {
        "name": name,
        "kind": index.meta.get("kind"),
        "tensors": len(index.tensors),
        "bytes": index.data_bytes,
        "rank": index.meta.get("rank"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.lora.importer", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["model", "adapter"])
    parser.add_argument("source", type=Path, help="a Hugging Face directory, a .gguf file, or a PEFT adapter directory")
    parser.add_argument("--pool", required=True, help="the pool's root (e.g. /var/lib/thaw/pool)")
    parser.add_argument("--name", required=True, help="the store's name in the pool")
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="convert model weights (default: as stored)"
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        with Pool(args.pool) as pool:
            if args.what == "model":
                index = import_model(pool, args.name, args.source, dtype, args.progress)
            else:
                index = import_adapter(pool, args.name, args.source, args.progress)
    except (ImportFailed, AdapterMismatch, ValueError, OSError, PoolError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps(summary(args.name, index)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

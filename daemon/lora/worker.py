"""The LoRA worker: one process per base model, in a sandbox, serving completions for many adapters.

    python -m daemon.lora.worker        (fd 3: a SOCK_SEQPACKET control socket from the daemon)

The worker sees no pool: the daemon sends each store's segment fd (read-only) with SCM_RIGHTS in the
message that needs it. Messages are JSON, one per packet; every request has an `id` and gets one
reply `{"id", "ok": true, "result"}` or `{"id", "ok": false, "error": {"type", "message"}}`:

    load            {config: {device, max_batch, slots, max_rank, merge_after}} + [model fd]
    add_adapter     {name} + [adapter fd]
    remove_adapter  {name}
    generate        {prompt: str | [token ids], adapter, max_tokens, temperature, seed}
    stats           {}

`Worker` is the same thing in-process (tests and benchmarks drive it directly). The decoder runs on
the engine's thread; the control loop only parses, submits and replies.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any

import torch

from daemon.lora.adapters import AdapterWeights, DeviceSlots
from daemon.lora.engine import Engine, Request, RequestRejected, Result
from daemon.lora.loader import MappedStore, map_store, to_device
from daemon.lora.model import LlamaModel
from daemon.lora.spec import FILES_PREFIX, ModelShape, adapter_modules, check_adapter

CONTROL_FD = 3
MAX_PACKET = 1 << 20


@dataclass(frozen=True)
class WorkerConfig:
    device: str = "auto"  # auto: cuda when torch sees a GPU, else cpu
    max_batch: int = 64
    slots: int = 64  # adapters resident on the device at once
    max_rank: int = 64
    merge_after: int = 4  # decode steps one adapter must own the batch before it is merged

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class Worker:
    def __init__(self, model_fd: int, config: WorkerConfig | None = None) -> None:
        self.config = config or WorkerConfig()
        self.device = self.config.torch_device()
        started = time.perf_counter()
        self.store: MappedStore = map_store(model_fd)
        self.shape = ModelShape.from_config(self.store.index.meta["config"])
        self.model = LlamaModel(self.shape, to_device(self.store, self.device))
        self.load_s = time.perf_counter() - started
        self.adapter_stores: dict[str, MappedStore] = {}
        self.adapters: dict[str, AdapterWeights] = {}
        self.slots = DeviceSlots(self.shape, self.config.slots, self.device)
        self.engine = Engine(self.model, self.adapters, self.slots, self.config.max_batch, self.config.merge_after)
        self.tokenizer = self._tokenizer()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _tokenizer(self) -> Any:
        name = FILES_PREFIX + "tokenizer.json"
        if name not in self.store.index.tensors:
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.store.raw(name).decode())

    # -- adapters ----------------------------------------------------------------------------------
    def add_adapter(self, name: str, fd: int) -> dict[str, Any]:
        if name in self.adapters:
            raise RequestRejected(f"an adapter named {name!r} is registered already: remove it first")
        store = map_store(fd)
        modules = adapter_modules(store.index.meta)
        shapes = {n: e.shape for n, e in store.index.tensors.items()}
        check_adapter(self.shape, modules, shapes, self.config.max_rank)
        weights = AdapterWeights.from_tensors(name, modules, store.tensors)
        with self.engine.step_lock:
            self.adapters[name] = weights
            self.adapter_stores[name] = store
        return {"name": name, "rank": weights.rank, "modules": len(modules)}

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}")
        with self.engine.step_lock, self.engine.lock:
            busy = any(r.adapter == name for r, _ in self.engine.waiting) or any(
                r.request.adapter == name for r in self.engine.running
            )
            if busy:
                raise RequestRejected(f"adapter {name!r} has requests in flight")
            del self.adapters[name]
            self.engine.drop_merged(name)
            self.slots.evict(name)
            self.adapter_stores.pop(name, None)

    # -- generation --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise RequestRejected("this model was imported without a tokenizer: send the prompt as token ids")
        ids: list[int] = self.tokenizer.encode(prompt).ids
        return ids

    def decode_text(self, tokens: list[int]) -> str | None:
        return None if self.tokenizer is None else str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def submit(
        self,
        prompt: str | list[int],
        adapter: str | None = None,
        max_tokens: int = 16,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Future[Result]:
        request = Request(
            self.encode(prompt), adapter, max_tokens, temperature, seed, stop_ids=self.shape.eos_token_ids
        )
        return self.engine.submit(request)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.engine.run, args=(self._stop, _log_failure), name="engine", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.engine.lock:
            self.engine.lock.notify_all()
        if self._thread:
            self._thread.join()

    def stats(self) -> dict[str, Any]:
        return {
            **asdict(self.engine.stats),
            "adapters": len(self.adapters),
            "resident": len(self.slots.slots),
            "slot_loads": self.slots.loads,
            "slot_evictions": self.slots.evictions,
            "slot_rank": self.slots.rank,
            "merged": self.engine.merged.adapter.name if self.engine.merged else None,
            "merged_bytes": self.engine.merged.bytes() if self.engine.merged else 0,
            "kv_cache_bytes": self.engine.cache.bytes(),
            "device": str(self.device),
            "load_ms": round(self.load_s * 1000, 2),
        }


# -- the process -----------------------------------------------------------------------------------
class Control:
    """The worker's end of the control socket (fd 3)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        self.worker: Worker | None = None

    def reply(self, rid: int, result: Any = None, error: BaseException | None = None) -> None:
        msg: dict[str, Any] = {"id": rid, "ok": error is None}
        if error is None:
            msg["result"] = result
        else:
            msg["error"] = {"type": type(error).__name__, "message": str(error)}
        with self.send_lock:
            self.sock.send(json.dumps(msg).encode())

    def serve(self) -> None:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_PACKET, 4)
            if not data:
                return
            msg = json.loads(data)
            try:
                self.handle(msg, fds)
            except Exception as e:  # a bad request fails alone
                self.reply(msg.get("id", 0), error=e)
            finally:
                for fd in fds:  # what was mapped stays mapped; the fds themselves are done with
                    _close(fd)

    def handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op, rid = msg.get("op"), msg.get("id", 0)
        if op == "load":
            if self.worker is not None:
                raise RuntimeError("a model is loaded already")
            config = WorkerConfig(**msg.get("config", {}))
            self.worker = Worker(_one_fd(fds), config)
            self.worker.start()
            self.reply(rid, {"load_ms": round(self.worker.load_s * 1000, 2), "device": str(self.worker.device)})
            return
        worker = self.worker
        if worker is None:
            raise RuntimeError("no model is loaded")
        if op == "add_adapter":
            self.reply(rid, worker.add_adapter(msg["name"], _one_fd(fds)))
        elif op == "remove_adapter":
            worker.remove_adapter(msg["name"])
            self.reply(rid, {})
        elif op == "generate":
            future = worker.submit(
                msg["prompt"],
                msg.get("adapter"),
                int(msg.get("max_tokens", 16)),
                float(msg.get("temperature", 0.0)),
                msg.get("seed"),
            )
            future.add_done_callback(lambda f: self._generated(rid, worker, f))
        elif op == "stats":
            self.reply(rid, worker.stats())
        else:
            raise ValueError(f"unknown op {op!r}")

    def _generated(self, rid: int, worker: Worker, future: Future[Result]) -> None:
        error = future.exception()
        if error is not None:
            self.reply(rid, error=error)
            return
        r = future.result()
        self.reply(
            rid,
            {
                "tokens": r.tokens,
                "text": worker.decode_text(r.tokens),
                "finish_reason": r.finish_reason,
                "prompt_tokens": r.prompt_tokens,
                "queued_ms": round(r.queued_s * 1000, 3),
                "total_ms": round(r.total_s * 1000, 3),
            },
        )


def _log_failure(error: BaseException) -> None:
    """A step failed (its requests got the error): the traceback goes to the worker's log."""
    traceback.print_exception(error, file=sys.stderr)
    sys.stderr.flush()


def _one_fd(fds: list[int]) -> int:
    if len(fds) != 1:
        raise ValueError(f"expected one store fd with this message, got {len(fds)}")
    return fds[0]


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def main() -> int:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    sock = socket.socket(fileno=CONTROL_FD)
    control = Control(sock)
    try:
        control.serve()
    finally:
        if control.worker is not None:
            control.worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The daemon's side of LoRA serving: models and adapters in the pool, one worker per base model.

No torch here (this module runs in thawd). Importing a model or an adapter runs
`python -m daemon.lora.importer` as a child process; an adapter is then checked against its base
model from the two stores' indexes (targets, shapes, rank) before any worker sees it. A worker runs
`python -m daemon.lora.worker` in a sandbox of its own (no network; it sees thaw's code but not the
pool), and gets each store as a read-only fd over its SOCK_SEQPACKET control socket.

Pool names: `lora.model.<model>` and `lora.adapter.<model>.<adapter>`. Adapter names are unique
across models: an OpenAI request's `model` is an adapter name or a base model name, and that alone
picks the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import daemon
from daemon.errors import Conflict, Invalid, InvocationTimeout, NotFound, ThawError, Unavailable
from daemon.lora.spec import AdapterMismatch, ModelShape, UnsupportedModel, adapter_modules, check_adapter
from sandbox.cgroups import CgroupTree, Limits
from sandbox.sandbox import ProcessExit, Sandbox, SandboxConfig, SandboxProcess, SandboxSpec
from shmpool.catalog import ObjectRecord
from shmpool.pool import Pool
from shmpool.tensors import TensorIndex, open_store

log = logging.getLogger("thawd.lora")
MODEL_PREFIX, ADAPTER_PREFIX = "lora.model.", "lora.adapter."
MAX_PACKET = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class LoraSettings:
    device: str = "auto"
    max_batch: int = 64
    slots: int = 64
    max_rank: int = 64
    merge_after: int = 4
    memory: int = 0  # bytes; 0: no limit
    request_timeout: float = 600.0  # seconds a completion may take before it is answered 504
    runtime_dir: Path = Path("/run/thaw/lora")
    log_dir: Path = Path("/var/lib/thaw/lora")

    def worker_config(self, overrides: dict[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "device": self.device,
            "max_batch": self.max_batch,
            "slots": self.slots,
            "max_rank": self.max_rank,
            "merge_after": self.merge_after,
        }
        unknown = set(overrides) - set(config)
        if unknown:
            raise Invalid(f"unknown worker settings: {', '.join(sorted(unknown))} (known: {', '.join(config)})")
        config.update(overrides)
        for key in ("max_batch", "slots", "max_rank", "merge_after"):
            if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
                raise Invalid(f"{key} must be a positive integer, not {config[key]!r}")
        if config["device"] != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", str(config["device"])):
            raise Invalid(f"device must be auto, cpu or cuda[:N], not {config['device']!r}")
        return config


class WorkerFailed(ThawError):
    status, code = 500, "worker_error"


class WorkerGone(Unavailable):
    code = "worker_crashed"


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise Invalid(
            f"{kind} name {name!r} must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


# -- the control socket ------------------------------------------------------------------------------
class WorkerClient:
    """Requests to a worker, matched to replies by id, on the event loop."""

    def __init__(self, sock: socket.socket, label: str) -> None:
        self.sock, self.label = sock, label
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.closed: str | None = None
        self.loop.add_reader(sock.fileno(), self._readable)

    async def call(self, op: str, fds: tuple[int, ...] = (), **fields: Any) -> Any:
        if self.closed is not None:
            raise WorkerGone(self.closed)
        self.next_id += 1
        rid = self.next_id
        future: asyncio.Future[Any] = self.loop.create_future()
        self.pending[rid] = future
        data = json.dumps({"id": rid, "op": op, **fields}).encode()
        if len(data) > MAX_PACKET:
            del self.pending[rid]
            raise Invalid(f"the request is {len(data)} bytes, above the worker's {MAX_PACKET}-byte packet limit")
        while True:
            try:
                socket.send_fds(self.sock, [data], list(fds))
                break
            except BlockingIOError:
                await asyncio.sleep(0.001)
            except OSError as e:
                del self.pending[rid]
                raise WorkerGone(f"{self.label}: its control socket failed: {e.strerror}") from e
        try:
            return await future
        finally:
            self.pending.pop(rid, None)  # answered, or given up on (timeout, cancelled request)

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_PACKET)
            except BlockingIOError:
                return
            except OSError as e:
                self.close(f"{self.label}: its control socket failed: {e.strerror}")
                return
            if not data:
                self.close(f"{self.label} exited")
                return
            msg = json.loads(data)
            future = self.pending.pop(msg.get("id", -1), None)
            if future is None or future.done():
                continue
            if msg.get("ok"):
                future.set_result(msg.get("result"))
            else:
                future.set_exception(_worker_error(msg.get("error") or {}))

    def close(self, why: str) -> None:
        if self.closed is not None:
            return
        self.closed = why
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(WorkerGone(why))
        self.pending.clear()


def _worker_error(error: dict[str, Any]) -> ThawError:
    kind, message = error.get("type", "Error"), error.get("message", "")
    if kind in ("RequestRejected", "AdapterMismatch", "ValueError"):
        return Invalid(message)
    if kind == "KeyError":
        return NotFound(message.strip("'\""))
    return WorkerFailed(f"the worker failed: {kind}: {message}")


# -- workers -----------------------------------------------------------------------------------------
@dataclass
class LoraWorker:
    model: str
    config: dict[str, Any]
    sandbox: Sandbox | None = None
    process: SandboxProcess | None = None
    client: WorkerClient | None = None
    state: str = "starting"  # starting | ready | crashed | stopped
    exit: str | None = None
    started: float = field(default_factory=time.time)
    load_ms: float | None = None
    device: str | None = None
    adapters: set[str] = field(default_factory=set)
    watcher: asyncio.Task[None] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "state": self.state,
            "pid": self.process.pid if self.process else None,
            "sandbox": self.sandbox.id if self.sandbox else None,
            "device": self.device,
            "load_ms": self.load_ms,
            "adapters": sorted(self.adapters),
            "config": self.config,
            "exit": self.exit,
            "started": self.started,
        }


class LoraHost:
    def __init__(self, pool: Pool, tree: CgroupTree, settings: LoraSettings, sandbox_config: SandboxConfig) -> None:
        self.pool, self.tree, self.settings = pool, tree, settings
        package = Path(daemon.__file__).resolve().parent
        thaw = package.parent
        # The worker imports daemon.lora, shmpool.tensors (and so shmpool and native); nothing else of thaw.
        leaves = (str(package / "__init__.py"), str(package / "lora"), str(thaw / "shmpool"), str(thaw / "native"))
        self.sandbox_config = SandboxConfig(
            runtime_dir=settings.runtime_dir,
            uid=sandbox_config.uid,
            gid=sandbox_config.gid,
            tmp_options=sandbox_config.tmp_options,
            extra_leaves=sandbox_config.extra_leaves + leaves,
        )
        self.workers: dict[str, LoraWorker] = {}
        self.lock = asyncio.Lock()
        self._known: dict[str, str | None] | None = None

    # -- what the pool holds -------------------------------------------------------------------------
    def _records(self, prefix: str) -> list[ObjectRecord]:
        return [r for r in self.pool.list() if r.name.startswith(prefix)]

    def models(self) -> list[dict[str, Any]]:
        out = []
        for r in self._records(MODEL_PREFIX):
            name = r.name.removeprefix(MODEL_PREFIX)
            worker = self.workers.get(name)
            out.append(
                {
                    "name": name,
                    "bytes": r.meta.get("data_bytes"),
                    "tensors": r.meta.get("tensors"),
                    "source": r.meta.get("source"),
                    "architecture": (r.meta.get("config", {}).get("architectures") or ["?"])[0],
                    "worker": worker.state if worker else None,
                }
            )
        return out

    def adapters(self, model: str | None = None) -> list[dict[str, Any]]:
        out = []
        for r in self._records(ADAPTER_PREFIX):
            base, _, name = r.name.removeprefix(ADAPTER_PREFIX).partition(".")
            if model is None or base == model:
                out.append(
                    {
                        "name": name,
                        "model": base,
                        "rank": r.meta.get("rank"),
                        "bytes": r.meta.get("data_bytes"),
                        "source": r.meta.get("source"),
                    }
                )
        return out

    def _names(self) -> dict[str, str | None]:
        """Every name a completion may use: base model -> None, adapter -> its model. Only this
        host imports and deletes LoRA stores, so the map is read from the pool once and kept."""
        if self._known is None:
            known: dict[str, str | None] = {
                r.name.removeprefix(MODEL_PREFIX): None for r in self._records(MODEL_PREFIX)
            }
            for r in self._records(ADAPTER_PREFIX):
                model, _, adapter = r.name.removeprefix(ADAPTER_PREFIX).partition(".")
                known[adapter] = model
            self._known = known
        return self._known

    def _forget_names(self) -> None:
        self._known = None

    def _model_of_adapter(self, name: str) -> str | None:
        return self._names().get(name)

    def has_model(self, name: str) -> bool:
        names = self._names()
        return name in names and names[name] is None

    def _require_model(self, name: str) -> None:
        if not self.has_model(name):
            raise NotFound(f"no LoRA base model named {name!r} (import one: POST /lora/models)")

    # -- importing -----------------------------------------------------------------------------------
    async def _run_importer(self, *args: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon.lora.importer",
            *args,
            "--pool",
            str(self.pool.root),
            "--no-progress",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        lines = out.decode().strip().splitlines()
        try:
            result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        except ValueError:
            result = {}
        if proc.returncode != 0 or "error" in result:
            why = result.get("error") or err.decode().strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise Invalid(f"import failed: {why if isinstance(why, str) else why[0]}")
        return result

    async def import_model(self, name: Any, source: Any, dtype: Any = None) -> dict[str, Any]:
        name = _check_name("model", name)
        if not isinstance(source, str) or not os.path.isabs(source):
            raise Invalid(
                "'source' (an absolute path on the daemon's host: a Hugging Face directory or a .gguf file) is required"
            )
        if self.has_model(name):
            raise Conflict(f"a LoRA base model named {name!r} exists already")
        args = ["model", source, "--name", MODEL_PREFIX + name]
        if dtype is not None:
            if dtype not in ("float32", "float16", "bfloat16"):
                raise Invalid(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
            args += ["--dtype", dtype]
        try:
            result = await self._run_importer(*args)
        finally:
            self._forget_names()
        return {**result, "name": name}

    async def delete_model(self, name: str) -> None:
        self._require_model(name)
        if name in self.workers:
            raise Conflict(f"model {name!r} has a worker: stop it first (DELETE /lora/workers/{name})")
        for adapter in self.adapters(name):
            self.pool.delete(f"{ADAPTER_PREFIX}{name}.{adapter['name']}")
        self.pool.delete(MODEL_PREFIX + name)
        self._forget_names()

    async def import_adapter(self, name: Any, model: Any, source: Any) -> dict[str, Any]:
        name = _check_name("adapter", name)
        if not isinstance(model, str):
            raise Invalid("'model' (the base model the adapter serves over) is required")
        self._require_model(model)
        if not isinstance(source, str) or not os.path.isabs(source):
            raise Invalid("'source' (an absolute path to a PEFT adapter directory) is required")
        if self._model_of_adapter(name) is not None or self.has_model(name):
            raise Conflict(f"the name {name!r} is taken (adapter and model names share one namespace)")
        store = f"{ADAPTER_PREFIX}{model}.{name}"
        try:
            result = await self._run_importer("adapter", source, "--name", store)
            try:
                self._check_fits(model, store)
            except (AdapterMismatch, UnsupportedModel) as e:
                self.pool.delete(store)
                raise Invalid(f"adapter {name!r} does not fit model {model!r}: {e}") from e
        finally:
            self._forget_names()
        worker = self.workers.get(model)
        if worker is not None and worker.state == "ready":
            await self._register(worker, name)
        return {**result, "name": name, "model": model}

    def _check_fits(self, model: str, store: str) -> None:
        with (
            open_store(self.pool, MODEL_PREFIX + model, verify=False) as base,
            open_store(self.pool, store, verify=False) as adapter,
        ):
            shape = ModelShape.from_config(base.index.meta["config"])
            index: TensorIndex = adapter.index
            shapes = {n: e.shape for n, e in index.tensors.items()}
            check_adapter(shape, adapter_modules(index.meta), shapes, self.settings.max_rank)

    async def delete_adapter(self, name: str) -> None:
        model = self._model_of_adapter(name)
        if model is None:
            raise NotFound(f"no adapter named {name!r}")
        worker = self.workers.get(model)
        if worker is not None and name in worker.adapters and worker.client is not None and worker.state == "ready":
            await worker.client.call("remove_adapter", name=name)
            worker.adapters.discard(name)
        self.pool.delete(f"{ADAPTER_PREFIX}{model}.{name}")
        self._forget_names()

    # -- workers -------------------------------------------------------------------------------------
    async def start_worker(self, model: Any, overrides: dict[str, Any] | None = None) -> LoraWorker:
        if not isinstance(model, str):
            raise Invalid("'model' (an imported base model) is required")
        self._require_model(model)
        config = self.settings.worker_config(overrides or {})
        async with self.lock:
            existing = self.workers.get(model)
            if existing is not None and existing.state in ("starting", "ready"):
                raise Conflict(f"model {model!r} has a worker already ({existing.state})")
            if existing is not None:
                await self._teardown(existing)
            worker = LoraWorker(model, config)
            self.workers[model] = worker
        try:
            await self._launch(worker)
        except BaseException:
            await self._teardown(worker)
            self.workers.pop(model, None)
            raise
        return worker

    async def restart_worker(self, model: str) -> LoraWorker:
        worker = self.get_worker(model)
        await self._teardown(worker)
        self.workers.pop(model, None)
        return await self.start_worker(model, {k: v for k, v in worker.config.items()})

    def get_worker(self, model: str) -> LoraWorker:
        worker = self.workers.get(model)
        if worker is None:
            raise NotFound(f"model {model!r} has no worker (start one: POST /lora/workers)")
        return worker

    async def stop_worker(self, model: str) -> None:
        worker = self.get_worker(model)
        await self._teardown(worker)
        self.workers.pop(model, None)

    async def _launch(self, worker: LoraWorker) -> None:
        limits = Limits(memory=self.settings.memory or None)
        empty = self.settings.runtime_dir / "empty"
        empty.mkdir(parents=True, exist_ok=True)
        spec = SandboxSpec(
            function_dir=empty, limits=limits, hostname=f"lora-{worker.model}"[:63].replace(".", "-").replace("_", "-")
        )
        sandbox = await asyncio.to_thread(Sandbox.create, self.sandbox_config, self.tree, None)
        worker.sandbox = sandbox
        await asyncio.to_thread(sandbox.repurpose, spec)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(
            self.settings.log_dir / f"{worker.model}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
        )
        try:
            argv = [sys.executable, "-m", "daemon.lora.worker"]
            worker.process = await asyncio.to_thread(sandbox.spawn, argv, theirs.fileno(), log_fd)
        finally:
            theirs.close()
            os.close(log_fd)
        worker.client = WorkerClient(ours, f"the LoRA worker for {worker.model!r}")
        worker.watcher = asyncio.ensure_future(self._watch(worker))
        with open_store(self.pool, MODEL_PREFIX + worker.model, verify=False) as store:
            loaded = await worker.client.call("load", (store.fd,), config=worker.config)
        worker.load_ms, worker.device = loaded["load_ms"], loaded["device"]
        worker.state = "ready"
        for adapter in self.adapters(worker.model):
            await self._register(worker, adapter["name"])

    async def _register(self, worker: LoraWorker, name: str) -> None:
        assert worker.client is not None
        with open_store(self.pool, f"{ADAPTER_PREFIX}{worker.model}.{name}", verify=False) as store:
            await worker.client.call("add_adapter", (store.fd,), name=name)
        worker.adapters.add(name)

    async def _watch(self, worker: LoraWorker) -> None:
        process = worker.process
        assert process is not None
        # The pidfd turns readable when the worker exits: no thread waits for it meanwhile.
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(process.pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(process.pidfd)
        exit_: ProcessExit | None = None
        with contextlib.suppress(Exception):  # a sandbox torn down already cannot say how
            exit_ = await asyncio.to_thread(process.wait_exit, 5.0)
        if worker.state in ("starting", "ready"):
            worker.state = "crashed"
            worker.exit = exit_.describe() if exit_ else "exited"
            log.warning("the LoRA worker for %s %s", worker.model, worker.exit)
        if worker.client is not None:
            worker.client.close(f"the LoRA worker for {worker.model!r} {worker.exit or 'stopped'}")

    async def _teardown(self, worker: LoraWorker) -> None:
        was = worker.state
        worker.state = "stopped" if was != "crashed" else was
        if worker.client is not None:
            worker.client.close(f"the LoRA worker for {worker.model!r} was stopped")
        if worker.sandbox is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(worker.sandbox.destroy)
            worker.sandbox = None
        if worker.watcher is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(worker.watcher, 5.0)

    async def close(self) -> None:
        for worker in list(self.workers.values()):
            await self._teardown(worker)
        self.workers.clear()

    # -- serving -------------------------------------------------------------------------------------
    def route(self, name: Any) -> tuple[LoraWorker, str | None]:
        """The worker and adapter (None: the base) that an OpenAI `model` names."""
        if not isinstance(name, str) or not name:
            raise Invalid("'model' (an adapter name or a base model name) is required")
        if self.has_model(name):
            model, adapter = name, None
        else:
            found = self._model_of_adapter(name)
            if found is None:
                raise NotFound(f"no model or adapter named {name!r}")
            model, adapter = found, name
        worker = self.workers.get(model)
        if worker is None or worker.state == "stopped":
            raise Unavailable(f"model {model!r} has no worker running (start one: POST /lora/workers)")
        if worker.state == "crashed":
            raise WorkerGone(
                f"the LoRA worker for {model!r} {worker.exit}; restart it: POST /lora/workers/{model}/restart"
            )
        if worker.state != "ready":
            raise Unavailable(f"the LoRA worker for {model!r} is still starting")
        if adapter is not None and adapter not in worker.adapters:
            raise NotFound(f"adapter {adapter!r} is not registered with the worker for {model!r}")
        return worker, adapter

    async def generate(
        self, worker: LoraWorker, adapter: str | None, prompt: str | list[int], **params: Any
    ) -> dict[str, Any]:
        assert worker.client is not None
        try:
            result: dict[str, Any] = await asyncio.wait_for(
                worker.client.call("generate", prompt=prompt, adapter=adapter, **params), self.settings.request_timeout
            )
        except TimeoutError:
            raise InvocationTimeout(
                f"the LoRA worker for {worker.model!r} did not answer within {self.settings.request_timeout:g} s "
                "(lora.request_timeout); the request may still be running there"
            ) from None
        return result

    async def stats(self, model: str) -> dict[str, Any]:
        worker = self.get_worker(model)
        if worker.client is None or worker.state != "ready":
            raise Unavailable(f"the LoRA worker for {model!r} is {worker.state}")
        result: dict[str, Any] = await worker.client.call("stats")
        return result

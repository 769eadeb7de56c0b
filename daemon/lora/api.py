"""The LoRA routes of thawd's API: models, adapters, workers, and OpenAI-compatible completions.

GET/POST       /lora/models                 list, import {name, source, dtype?}
DELETE         /lora/models/{name}
GET/POST       /lora/adapters               list, import + register {name, model, source}
DELETE         /lora/adapters/{name}
GET/POST       /lora/workers                list, start {model, device?, max_batch?, slots?, max_rank?, merge_after?}
GET/DELETE     /lora/workers/{model}        describe (with engine stats), stop
POST           /lora/workers/{model}/restart
POST           /v1/completions              OpenAI: {model (adapter or base), prompt, max_tokens, temperature, seed}
GET            /v1/models                   OpenAI: base models with a worker, and their adapters
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from aiohttp import web

from daemon.bodies import json_body, json_response
from daemon.errors import Invalid, Unavailable
from daemon.lora.host import LoraHost

LORA: web.AppKey[LoraHost] = web.AppKey("lora", LoraHost)
# OpenAI parameters accepted only at the values that mean "off" (the first is OpenAI's default):
# anything else would change the result and is refused by name, never silently ignored.
_OFF: dict[str, tuple[Any, ...]] = {
    "stream": (False,),
    "echo": (False,),
    "n": (1,),
    "best_of": (1,),
    "logprobs": (None,),
    "stop": (None, [], ""),
    "suffix": (None, ""),
    "top_p": (1, 1.0),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": (None, {}),
}
_IGNORED = {"user"}  # OpenAI's end-user id: nothing to do with the result


def _host(request: web.Request) -> LoraHost:
    return request.app[LORA]


async def list_models(request: web.Request) -> web.Response:
    return json_response({"models": _host(request).models()})


async def import_model(request: web.Request) -> web.Response:
    d = await json_body(request)
    return json_response(await _host(request).import_model(d.get("name"), d.get("source"), d.get("dtype")), status=201)


async def delete_model(request: web.Request) -> web.Response:
    await _host(request).delete_model(request.match_info["name"])
    return web.Response(status=204)


async def list_adapters(request: web.Request) -> web.Response:
    return json_response({"adapters": _host(request).adapters(request.query.get("model") or None)})


async def import_adapter(request: web.Request) -> web.Response:
    d = await json_body(request)
    host = _host(request)
    return json_response(await host.import_adapter(d.get("name"), d.get("model"), d.get("source")), status=201)


async def delete_adapter(request: web.Request) -> web.Response:
    await _host(request).delete_adapter(request.match_info["name"])
    return web.Response(status=204)


async def list_workers(request: web.Request) -> web.Response:
    return json_response({"workers": [w.describe() for w in _host(request).workers.values()]})


async def start_worker(request: web.Request) -> web.Response:
    d = await json_body(request)
    model = d.pop("model", None)
    worker = await _host(request).start_worker(model, d)
    return json_response(worker.describe(), status=201)


async def get_worker(request: web.Request) -> web.Response:
    host = _host(request)
    worker = host.get_worker(request.match_info["model"])
    if worker.state == "ready":
        with contextlib.suppress(Unavailable):  # it died just now: describe it as it is
            stats = await host.stats(worker.model)
            return json_response({**worker.describe(), "stats": stats})
    return json_response(worker.describe())


async def stop_worker(request: web.Request) -> web.Response:
    await _host(request).stop_worker(request.match_info["model"])
    return web.Response(status=204)


async def restart_worker(request: web.Request) -> web.Response:
    worker = await _host(request).restart_worker(request.match_info["model"])
    return json_response(worker.describe())


# -- OpenAI ------------------------------------------------------------------------------------------
def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt: a string, a list of token ids, or a list of either (one choice each)."""
    if isinstance(prompt, str):
        if not prompt:
            raise Invalid("'prompt' is empty")
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or (isinstance(p, list) and p) for p in prompt):
        return [p if isinstance(p, str) else _token_list(p) for p in prompt]
    raise Invalid("'prompt' must be a string, a list of token ids, or a non-empty list of those")


def _token_list(p: list[Any]) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        raise Invalid("a token-id prompt must hold integers only")
    return list(p)


def _params(d: dict[str, Any]) -> dict[str, Any]:
    for key, off in _OFF.items():
        if key in d and (isinstance(d[key], bool) != isinstance(off[0], bool) or d[key] not in off):
            raise Invalid(f"'{key}' is not supported by thaw's LoRA workers (leave it at {off[0]!r})")
    known = {"model", "prompt", "max_tokens", "temperature", "seed", *_OFF, *_IGNORED}
    unknown = sorted(set(d) - known)
    if unknown:
        raise Invalid(f"unknown parameters: {', '.join(unknown)}")
    max_tokens = d.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise Invalid(f"'max_tokens' must be a positive integer, not {max_tokens!r}")
    temperature = d.get("temperature", 1.0)
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise Invalid(f"'temperature' must be a number from 0 to 2, not {temperature!r}")
    seed = d.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise Invalid(f"'seed' must be an integer, not {seed!r}")
    return {"max_tokens": max_tokens, "temperature": float(temperature), "seed": seed}


async def completions(request: web.Request) -> web.Response:
    d = await json_body(request)
    host = _host(request)
    prompts = _prompts(d.get("prompt"))
    params = _params(d)
    worker, adapter = host.route(d.get("model"))
    results = await asyncio.gather(*(host.generate(worker, adapter, p, **params) for p in prompts))
    choices = [
        {
            "index": i,
            "text": r["text"] if r["text"] is not None else "",
            "token_ids": r["tokens"],
            "logprobs": None,
            "finish_reason": r["finish_reason"],
        }
        for i, r in enumerate(results)
    ]
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    completion_tokens = sum(len(r["tokens"]) for r in results)
    return json_response(
        {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": d["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


async def openai_models(request: web.Request) -> web.Response:
    host = _host(request)
    data = []
    for model in host.models():
        worker = host.workers.get(model["name"])
        if worker is None or worker.state != "ready":
            continue
        created = int(worker.started)
        data.append(
            {
                "id": model["name"],
                "object": "model",
                "created": created,
                "owned_by": "thaw",
                "root": model["name"],
                "parent": None,
            }
        )
        for adapter in sorted(worker.adapters):
            data.append(
                {
                    "id": adapter,
                    "object": "model",
                    "created": created,
                    "owned_by": "thaw",
                    "root": model["name"],
                    "parent": model["name"],
                }
            )
    return json_response({"object": "list", "data": data})


def add_routes(app: web.Application, host: LoraHost) -> None:
    app[LORA] = host
    r = app.router
    r.add_get("/lora/models", list_models)
    r.add_post("/lora/models", import_model)
    r.add_delete("/lora/models/{name}", delete_model)
    r.add_get("/lora/adapters", list_adapters)
    r.add_post("/lora/adapters", import_adapter)
    r.add_delete("/lora/adapters/{name}", delete_adapter)
    r.add_get("/lora/workers", list_workers)
    r.add_post("/lora/workers", start_worker)
    r.add_get("/lora/workers/{model}", get_worker)
    r.add_delete("/lora/workers/{model}", stop_worker)
    r.add_post("/lora/workers/{model}/restart", restart_worker)
    r.add_post("/v1/completions", completions)
    r.add_get("/v1/models", openai_models)

"""The FaaS gateway: the OpenFaaS provider API on TCP, so an OpenFaaS gateway (and faas-cli through
it) drives thawd as it drives faasd.

Routes (faas-provider's): GET/POST/PUT/DELETE /system/functions, GET /system/function/{name},
POST /system/scale-function/{name}, GET /system/info, GET /system/logs (ndjson),
GET /system/namespaces, /function/{name}[/...] for invocations, and GET /healthz (the gateway's
health checks). /system/* wants Basic auth. A function may be named NAME or NAME.openfaas-fn
wherever a name goes (the gateway sends both forms; faasd accepts both): thaw has one namespace.

How a FunctionDeployment maps onto a thaw function:
- `service` is the function's name; `namespace` must be empty or "openfaas-fn" (thaw has one).
- `image` names the function's directory on thawd's host: an absolute path, optionally written
  `file:///path` or `dir:/path`. thaw runs no container images: the directory holds the handler
  module and an optional requirements.txt, installed once at deploy.
- `envProcess` is the handler, `module:callable` (empty: handler:handle, the python3-http one).
- `envVars` is the environment; `labels` and `annotations` are kept and shown back.
- `limits.memory` ("128Mi", "1G", ...) is the memory limit; `limits.cpu` ("500m", "1") the CPU
  limit; `requests` is accepted and shown back (thaw reserves nothing ahead).
- Annotations `com.thaw.timeout` (seconds) and `com.thaw.mode` (cow | copy | lazy) set those.
- Replicas: `scale-function` sets how many instances stay warm (stored with the function: a
  restarted thawd thaws up to it again); `availableReplicas` counts live instances. A deployed
  function with none reports 0 (the gateway's scale-from-zero asks for 1 and polls until it is
  there, a restore later), though an invocation works at any time. An update (PUT) answers once
  the new revision is thawed up to the target, so availableReplicas never drops to 0 under it.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hmac
import math
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon.bodies import json_body, json_response
from daemon.errors import Conflict, Invalid, NotFound, ThawError, describe, short_repr
from daemon.instances import Manager
from daemon.registry import FunctionSpec, InvalidFunction, check_cpu, check_memory
from daemon.server import INVOKE_METHODS, VERSION, invocation_of, parse_since, parse_tail, reply_response, stream_logs
from daemon.state import FunctionState

NAMESPACE = "openfaas-fn"
TIMEOUT_ANNOTATION = "com.thaw.timeout"
MODE_ANNOTATION = "com.thaw.mode"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MANAGER: web.AppKey[Manager] = web.AppKey("gateway-manager", Manager)
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)([KMGTE]i?|[kmgte]|m)?")
_UNITS = {"": 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "E": 1000**6}
_UNITS |= {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Ei": 1 << 60}


# -- errors and auth ---------------------------------------------------------------------------
def text_error(status: int, message: str) -> web.Response:
    """faas-provider answers errors as plain text."""
    return web.Response(status=status, text=message + "\n")


def basic_auth(user: str, password: str) -> Any:
    expected = f"{user}:{password}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/system/") and not _authorised(request.headers.get("Authorization", ""), expected):
            return web.Response(
                status=401, text="unauthorized\n", headers={"WWW-Authenticate": 'Basic realm="thaw gateway"'}
            )
        try:
            return await handler(request)
        except ThawError as e:
            return text_error(e.status, describe(e))

    return middleware


def _authorised(header: str, expected: bytes) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, expected)


# -- FunctionDeployment <-> thaw ---------------------------------------------------------------
def parse_quantity(text: Any, what: str) -> float:
    """A Kubernetes-style quantity: 128Mi, 1G, 500m (milli), 2."""
    match = _QUANTITY.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match:
        raise Invalid(f"{what} {short_repr(text)} is not a quantity like 128Mi, 1G or 500m")
    number, unit = float(match.group(1)), match.group(2) or ""
    quantity = number / 1000 if unit == "m" else number * _UNITS[unit]
    if not math.isfinite(quantity):  # 400 digits are a float's infinity
        raise Invalid(f"{what} {short_repr(text)} is out of any range")
    return quantity


def image_directory(image: str) -> Path:
    path = image.removeprefix("file://").removeprefix("dir:")
    if not path.startswith("/") or "\0" in path:
        raise Invalid(
            f"image {short_repr(image)}: thaw deploys a function from a directory on its host; give its absolute path "
            "(or file:///path)"
        )
    return Path(path)


def _check_namespace(namespace: Any) -> None:
    if namespace not in (None, "", NAMESPACE):
        raise Invalid(f"namespace not valid: {short_repr(namespace)} (thaw has one: {NAMESPACE})")


def function_name(given: str) -> str | None:
    """NAME or NAME.NAMESPACE (how the gateway names a function in a namespace) as thaw's name,
    or None for a namespace thaw does not have (no function of it exists). Names have no dots."""
    name, dot, namespace = given.partition(".")
    return name if not dot or namespace == NAMESPACE else None


def _resources(body: dict[str, Any], field: str, ranged: bool = True) -> tuple[int | None, float | None]:
    """`limits` or `requests`: {memory, cpu}, each a quantity string; with `ranged`, within thaw's limits."""
    resources = body.get(field)
    if resources is None:
        return None, None
    if not isinstance(resources, dict):
        raise Invalid(f"{field} must be an object {{memory, cpu}}, not {short_repr(resources)}")
    memory = round(parse_quantity(resources["memory"], f"{field}.memory")) if resources.get("memory") else None
    cpu = parse_quantity(resources["cpu"], f"{field}.cpu") if resources.get("cpu") else None
    try:
        if ranged:
            check_memory(memory, f"{field}.memory")
            check_cpu(cpu, f"{field}.cpu")
    except InvalidFunction as e:
        raise Invalid(str(e)) from e
    return memory, cpu


def _optional(body: dict[str, Any], field: str, kind: type, what: str) -> Any:
    value = body.get(field)
    if value is not None and not isinstance(value, kind):
        raise Invalid(f"{field} must be {what}, not {short_repr(value)}")
    return value


def _strings(body: dict[str, Any], field: str) -> dict[str, str]:
    value = _optional(body, field, dict, "an object of strings") or {}
    if not all(isinstance(v, str) for v in value.values()):
        raise Invalid(f"{field} must be an object of strings, not {short_repr(value)}")
    return dict(value)


def deployment_to_spec(body: dict[str, Any]) -> tuple[FunctionSpec, Path]:
    """A FunctionDeployment as a FunctionSpec, every field checked (a 400 names the first bad one);
    fields thaw has no use for (constraints, secrets, ...) are ignored, as faasd does."""
    service = body.get("service")
    if not isinstance(service, str) or not service:
        raise Invalid("service (the function's name) is required")
    if "." in service:
        service = function_name(service) or service  # another namespace: the name check refuses it
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise Invalid("image (the function's directory on thawd's host) is required")
    _check_namespace(body.get("namespace"))
    handler = _optional(body, "envProcess", str, "a string, module:callable") or "handler:handle"
    env = _strings(body, "envVars")
    labels, annotations = _strings(body, "labels"), _strings(body, "annotations")
    memory, cpu = _resources(body, "limits")
    _resources(body, "requests", ranged=False)  # thaw reserves nothing ahead, but a malformed one is still refused
    try:
        timeout = float(annotations[TIMEOUT_ANNOTATION]) if TIMEOUT_ANNOTATION in annotations else None
    except ValueError:
        raise Invalid(f"annotation {TIMEOUT_ANNOTATION} must be a number of seconds") from None
    try:
        spec = FunctionSpec(
            name=service,
            handler=handler,
            memory=memory,
            cpu=cpu,
            timeout=timeout,
            env=env,
            mode=annotations.get(MODE_ANNOTATION, "cow"),
            image=image,
            labels=labels,
            annotations=annotations,
        ).validate()
    except InvalidFunction as e:
        raise Invalid(f"function {short_repr(service)}: {e}") from e
    return spec, image_directory(image)


def _format_memory(n: int | None) -> str | None:
    if not n:
        return None
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _rfc3339(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat().replace("+00:00", "Z")


def function_status(fs: FunctionState) -> dict[str, Any]:
    """faas-provider's FunctionStatus, its `omitempty` fields left out when empty (as Go does)."""
    spec = fs.spec
    limits = {k: v for k, v in (("memory", _format_memory(spec.memory)), ("cpu", _cpu(spec.cpu))) if v}
    optional = {
        "envProcess": spec.handler,
        "envVars": spec.env,
        "limits": limits,
        "invocationCount": float(fs.invocations),
        "replicas": max(fs.min_warm, len(fs.instances)),
        "availableReplicas": len(fs.instances),
    }
    return {
        "name": spec.name,
        "image": spec.image,
        "namespace": NAMESPACE,
        "labels": spec.labels,
        "annotations": spec.annotations,
        "createdAt": _rfc3339(fs.deployed.created_at),
        **{k: v for k, v in optional.items() if v},
    }


def _cpu(cores: float | None) -> str | None:
    return f"{round(cores * 1000)}m" if cores else None


# -- routes ------------------------------------------------------------------------------------
def manager_of(request: web.Request) -> Manager:
    return request.app[MANAGER]


async def list_functions(request: web.Request) -> web.Response:
    _check_namespace(request.query.get("namespace"))
    return json_response([function_status(fs) for fs in manager_of(request).functions.values()])


async def get_function(request: web.Request) -> web.Response:
    _check_namespace(request.query.get("namespace"))
    fs = manager_of(request).functions.get(function_name(request.match_info["name"]) or "")
    if fs is None:
        return web.Response(status=404)  # faasd: an empty 404
    return json_response(function_status(fs))


async def deploy(request: web.Request) -> web.Response:
    spec, source = deployment_to_spec(await json_body(request))
    try:
        await manager_of(request).deploy(spec, source)
    except Conflict as e:  # faasd answers a deploy over an existing function with 400
        raise Invalid(str(e)) from e
    return web.Response(status=200)


async def update(request: web.Request) -> web.Response:
    """faas-cli PUTs first and POSTs on 404."""
    spec, source = deployment_to_spec(await json_body(request))
    m = manager_of(request)
    if spec.name not in m.functions:
        raise NotFound(f"service {spec.name} not found")
    await m.deploy(spec, source, update=True)
    return web.Response(status=200)


async def delete(request: web.Request) -> web.Response:
    _check_namespace(request.query.get("namespace"))
    given = (await json_body(request)).get("functionName")
    if not isinstance(given, str) or not given:
        raise Invalid("functionName is required")
    m = manager_of(request)
    name = function_name(given) or ""
    if name not in m.functions:
        raise NotFound(f"service {given} not found")
    await m.delete(name)
    return web.Response(status=200)


async def scale(request: web.Request) -> web.Response:
    """faasd scales the body's serviceName (the gateway sends the same name in the path)."""
    _check_namespace(request.query.get("namespace"))
    body = await json_body(request)
    given = body.get("serviceName") or request.match_info["name"]
    if not isinstance(given, str):
        raise Invalid(f"serviceName must be a string, not {short_repr(given)}")
    replicas = body.get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise Invalid("replicas (a non-negative integer) is required")
    m = manager_of(request)
    name = function_name(given) or ""
    if name not in m.functions:
        raise NotFound(f"service {given} not found")
    await m.scale(name, replicas)
    return web.Response(status=200)


async def info(request: web.Request) -> web.Response:
    return json_response(
        {"provider": "thaw", "orchestration": "thaw", "version": {"sha": "unknown", "release": VERSION}}
    )


async def namespaces(request: web.Request) -> web.Response:
    return json_response([NAMESPACE])


async def healthz(request: web.Request) -> web.Response:
    """faas-provider's health check (no auth): 200 while thawd serves, 503 once it is stopping."""
    if manager_of(request).closing:
        return text_error(503, "stopping")
    return web.Response(text="OK")


async def logs(request: web.Request) -> web.StreamResponse:
    """faas-provider's logs.Request in the query; logs.Message as ndjson lines."""
    name = function_name(request.query.get("name", "")) or ""
    _check_namespace(request.query.get("namespace"))
    try:
        parse_tail(request.query.get("tail"))
        parse_since(request.query.get("since"))
    except Invalid:
        return text_error(422, "could not parse the log request")
    only = request.query.get("instance") or None

    def shape(entry: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": NAMESPACE,
            "instance": entry["instance"],
            "timestamp": entry["timestamp"],
            "text": entry["text"],
        }

    follow = request.query.get("follow", "") in ("1", "t", "T", "TRUE", "true", "True")
    return await stream_logs(request, manager_of(request).get(name), shape, follow=follow, instance=only)


async def invoke(request: web.Request) -> web.Response:
    m = manager_of(request)
    given = request.match_info["name"]
    name = function_name(given) or ""
    if request.method not in INVOKE_METHODS:
        response = text_error(405, f"method {request.method} not allowed")
        response.headers["Allow"] = ", ".join(INVOKE_METHODS)  # RFC 9110: a 405 names them
        return response
    if name not in m.functions:
        return text_error(404, f"Cannot find service: {given}.")
    body = await request.read()
    path = "/" + request.match_info.get("tail", "")
    try:
        return reply_response(await m.invoke(name, invocation_of(request, body, path)))
    except ThawError as e:
        return text_error(e.status, describe(e))


def build_gateway(manager: Manager, user: str, password: str) -> web.Application:
    app = web.Application(middlewares=[basic_auth(user, password)], client_max_size=manager.config.max_frame + 1)
    app[MANAGER] = manager
    r = app.router
    r.add_get("/system/functions", list_functions)
    r.add_post("/system/functions", deploy)
    r.add_put("/system/functions", update)
    r.add_delete("/system/functions", delete)
    r.add_get("/system/function/{name}", get_function)
    r.add_post("/system/scale-function/{name}", scale)
    r.add_get("/system/info", info)
    r.add_get("/system/namespaces", namespaces)
    r.add_get("/system/logs", logs)
    r.add_get("/healthz", healthz)
    r.add_route("*", "/function/{name}", invoke)
    r.add_route("*", "/function/{name}/{tail:.*}", invoke)
    return app

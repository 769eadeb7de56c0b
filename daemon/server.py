"""thawd's REST API: HTTP/1.1 + JSON on a Unix socket (like Docker's and Firecracker's).

The routes are listed in `daemon/openapi.json`, served at GET /openapi.json (a test checks the two
agree). Errors are `{"error": {"code", "message"}}` with a status that says what went wrong; the
message carries the cause chain. An invocation answers with whatever the handler answered.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon.bodies import json_body, json_response
from daemon.containers import add_routes as add_container_routes
from daemon.errors import Invalid, ThawError, describe
from daemon.guestio import Invocation, Reply
from daemon.instances import Manager
from daemon.lora.api import add_routes as add_lora_routes
from daemon.lora.host import LoraHost
from daemon.registry import FunctionSpec, InvalidFunction
from daemon.state import FunctionState

log = logging.getLogger("thawd")
OPENAPI = Path(__file__).with_name("openapi.json")
VERSION = "0.1.0"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MANAGER: web.AppKey[Manager] = web.AppKey("manager", Manager)
INVOKE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")  # what an invocation may use (the OpenFaaS gateway's)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **details: Any
) -> web.Response:
    return json_response({"error": {"code": code, "message": message, **details}}, status, headers)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes the API's error body."""
    try:
        return await handler(request)
    except ThawError as e:
        return error_response(e.status, e.code, describe(e), **e.details)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MANAGER].config.max_frame
        return error_response(413, "too_large", f"the request body is larger than the {limit}-byte maximum frame")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "http_error")
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None  # RFC 9110: a 405 names them
        return error_response(e.status, code, f"{request.method} {request.path}: {e.reason}", allow)
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal", describe(e))


def manager_of(request: web.Request) -> Manager:
    return request.app[MANAGER]


def reply_response(reply: Reply) -> web.Response:
    headers = {k: v for k, v in reply.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
    return web.Response(status=reply.status, body=reply.body, headers=headers)


def invocation_of(request: web.Request, body: bytes, path: str) -> Invocation:
    return Invocation(
        method=request.method,
        path=path,
        query={k: v for k, v in request.query.items()},
        headers={k: v for k, v in request.headers.items()},
        body=body,
    )


# -- functions -----------------------------------------------------------------------------------
def spec_and_source(data: dict[str, Any], name: str | None = None) -> tuple[FunctionSpec, Path]:
    data = dict(data)
    source = data.pop("source", None)
    if not isinstance(source, str) or not source:
        raise Invalid("'source' (the function's directory on the daemon's host, an absolute path) is required")
    if name is not None and data.setdefault("name", name) != name:
        raise Invalid(f"the body names {data['name']!r} but the path names {name!r}")
    try:
        return FunctionSpec.from_json(data), Path(source)
    except InvalidFunction as e:
        raise Invalid(str(e)) from e


async def list_functions(request: web.Request) -> web.Response:
    m = manager_of(request)
    return json_response({"functions": [m.describe(fs) for fs in m.functions.values()]})


async def create_function(request: web.Request) -> web.Response:
    m = manager_of(request)
    spec, source = spec_and_source(await json_body(request))
    fs = await m.deploy(spec, source)
    return json_response(m.describe(fs), status=201)


async def get_function(request: web.Request) -> web.Response:
    m = manager_of(request)
    return json_response(m.describe(m.get(request.match_info["name"])))


async def update_function(request: web.Request) -> web.Response:
    m = manager_of(request)
    spec, source = spec_and_source(await json_body(request), request.match_info["name"])
    fs = await m.deploy(spec, source, update=True)
    return json_response(m.describe(fs))


async def delete_function(request: web.Request) -> web.Response:
    await manager_of(request).delete(request.match_info["name"])
    return web.Response(status=204)


async def snapshot_function(request: web.Request) -> web.Response:
    m = manager_of(request)
    fs = await m.snapshot(request.match_info["name"])
    return json_response(m.describe(fs))


async def scale_function(request: web.Request) -> web.Response:
    m = manager_of(request)
    replicas = (await json_body(request)).get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise Invalid("'replicas' (an integer) is required")
    await m.scale(request.match_info["name"], replicas)
    return json_response(m.describe(m.get(request.match_info["name"])))


async def set_template_form(request: web.Request) -> web.Response:
    m = manager_of(request)
    body = await json_body(request)
    form, codec = body.get("form"), body.get("codec")
    if not isinstance(form, str):
        raise Invalid("'form' (warm, compressed or evicted) is required")
    if codec is not None and not isinstance(codec, str):
        raise Invalid("'codec' must be a string (lz4, zstd, deflate or iaa)")
    fs = await m.set_template_form(request.match_info["name"], form, codec)
    return json_response(m.describe(fs))


async def invoke(request: web.Request) -> web.Response:
    m = manager_of(request)
    name = request.match_info["name"]
    m.get(name)  # 404 before reading a body
    body = await request.read()
    path = "/" + request.match_info.get("tail", "")
    return reply_response(await m.invoke(name, invocation_of(request, body, path)))


def parse_since(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        since = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Invalid(f"since must be an RFC 3339 time, not {text!r}") from None
    return since if since.tzinfo else since.replace(tzinfo=datetime.UTC)


def parse_tail(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise Invalid(f"tail must be an integer, not {text!r}") from None


async def stream_logs(
    request: web.Request,
    fs: FunctionState,
    shape: Callable[[dict[str, Any]], dict[str, Any]],
    follow: bool,
    instance: str | None = None,
) -> web.StreamResponse:
    """ndjson: the recent lines (tail/since), then, with `follow`, new lines as they come."""
    tail, since = parse_tail(request.query.get("tail")), parse_since(request.query.get("since"))
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for entry in fs.log.recent(tail, since):
        if instance is None or entry["instance"] == instance:
            await response.write((json.dumps(shape(entry)) + "\n").encode())
    if follow:
        # write() waits for the socket to drain once 64 KiB are pending, so a client that stops
        # reading stops this loop: its follower's bounded buffer then drops lines, counted in a
        # marker ("dropped": N) that is passed whatever instance is asked for. The stream ends
        # when the function's log closes (deleted, thawd stopping).
        follower = fs.log.follow()
        try:
            async for entry in follower:
                if instance is None or entry["instance"] == instance or "dropped" in entry:
                    await response.write((json.dumps(shape(entry)) + "\n").encode())
            await response.write_eof()
        except ConnectionResetError:  # the client went away: how following usually ends
            pass
        finally:
            await follower.aclose()  # its buffer goes now, not when the generator is collected
        return response
    await response.write_eof()
    return response


async def function_logs(request: web.Request) -> web.StreamResponse:
    follow = request.query.get("follow", "").lower() in ("1", "true", "yes")
    fs = manager_of(request).get(request.match_info["name"])
    return await stream_logs(request, fs, lambda e: e, follow)


# -- the rest ----------------------------------------------------------------------------------
async def list_instances(request: web.Request) -> web.Response:
    return json_response({"instances": manager_of(request).instances(request.query.get("function") or None)})


async def list_sandboxes(request: web.Request) -> web.Response:
    m = manager_of(request)
    pool = m.sandboxes
    owners = {i.sandbox.id: i.id for fs in m.functions.values() for i in fs.instances}
    rows = [
        {
            "id": s.id,
            "state": state,
            "function": s.spec.hostname if s.spec else None,
            "instance": owners.get(s.id),
            "address": str(s.lease.address) if s.lease else None,
            "agent_pid": s.agent.pid,
        }
        for state, boxes in (("busy", list(pool.busy)), ("idle", list(pool.idle)))
        for s in boxes
    ]
    return json_response({"sandboxes": rows, "max": pool.settings.max_size})


async def pool_status(request: web.Request) -> web.Response:
    m = manager_of(request)
    status = m.pool.status()
    templates = [
        {"name": fs.template.name, "function": fs.name, "bytes": fs.template.template.manifest.data_bytes}
        for fs in m.functions.values()
        if fs.template is not None
    ]
    return json_response(
        {
            "root": status.root,
            "backend": status.backend,
            "node": status.node,
            "capacity": status.capacity,
            "used": status.used,
            "segments": status.segments,
            "segment_bytes": status.segment_bytes,
            "page_size": status.page_size,
            "templates": templates,
        }
    )


async def health(request: web.Request) -> web.Response:
    m = manager_of(request)
    return json_response(
        {
            "status": "stopping" if m.closing else "ok",
            "version": VERSION,
            "functions": len(m.functions),
            "instances": m.total_instances(),
            "in_flight": m.in_flight(),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    m = manager_of(request)
    m.refresh_gauges()
    return web.Response(body=m.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


def build_app(manager: Manager, lora: LoraHost | None = None) -> web.Application:
    # The body limit sits a little above the frame maximum so that the frame check (which counts the
    # whole message) answers the 413 with the precise size; aiohttp answers for anything larger.
    app = web.Application(middlewares=[errors], client_max_size=manager.config.max_frame + 1)
    app[MANAGER] = manager
    r = app.router
    r.add_get("/health", health)
    r.add_get("/openapi.json", openapi)
    r.add_get("/metrics", metrics)
    r.add_get("/functions", list_functions)
    r.add_post("/functions", create_function)
    r.add_get("/functions/{name}", get_function)
    r.add_put("/functions/{name}", update_function)
    r.add_delete("/functions/{name}", delete_function)
    r.add_post("/functions/{name}/snapshot", snapshot_function)
    r.add_post("/functions/{name}/scale", scale_function)
    r.add_post("/functions/{name}/template", set_template_form)
    r.add_get("/functions/{name}/logs", function_logs)
    for method in INVOKE_METHODS:  # any other method is a 405 naming these (as on the gateway)
        r.add_route(method, "/functions/{name}/invoke", invoke)
        r.add_route(method, "/functions/{name}/invoke/{tail:.*}", invoke)
    r.add_get("/instances", list_instances)
    r.add_get("/sandboxes", list_sandboxes)
    r.add_get("/pool", pool_status)
    add_container_routes(app, manager)  # containerd-shim-thaw-v2's containers (daemon/containers.py)
    if lora is not None:
        add_lora_routes(app, lora)
    return app

"""The guest program: a function's process, from its init to its last request.

Started cold, it imports the function (its init), parks (READY, then SIGSTOP: the daemon
captures it) and serves. Started with `--runtime`, it imports only the `--preload` modules and
parks: the daemon captures that as a *runtime template* (snapshot/pages.py: layered templates).
Every instance thawed from it waits for what to become on fd 3:

    preload {modules}                  import these too and park again (a base layered on this one)
    load {function_dir, handler, site_dir, env}   import the function, run its init, park again

so a function's template is captured as a child of the runtime's and stores only what its init
wrote. The function's environment is set before its import (variables the interpreter reads
at start, PYTHON*, cannot be: the daemon captures such functions cold).

Handlers follow the OpenFaaS python3-http convention, so existing functions port as they are:
`handle(event, context)` where `event` has `body` (bytes), `headers`, `method`, `query`, `path`;
the return value is a dict with `statusCode`, `body`, `headers`, or any JSON value, which becomes
a 200 JSON body. Module-level code is the function's init; a module-level `init()` is called too.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.guest import hooks, protocol

CONTROL_FD = 3


@dataclass
class Event:
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "GET"
    query: dict[str, str] = field(default_factory=dict)
    path: str = "/"


@dataclass
class Context:
    hostname: str
    pid: int


Handler = Callable[[Event, Context], Any]


def load_handler(function_dir: str, spec: str, site_dir: str | None = None) -> Handler:
    """Import `module:callable` from `function_dir` (and its own site directory), running its init."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"guest: handler must be module:callable, not {spec!r}")
    if not Path(function_dir).is_dir():
        raise SystemExit(f"guest: function directory {function_dir} does not exist")
    for path in filter(None, [site_dir, function_dir]):
        sys.path.insert(0, path)
    module = importlib.import_module(module_name)
    handler = getattr(module, attr, None)
    if not callable(handler):
        raise SystemExit(f"guest: {module_name} has no callable {attr!r}")
    init = getattr(module, "init", None)
    if callable(init):
        init()
    hooks.register_module_hooks(module)
    return handler  # type: ignore[no-any-return]


def to_response(request_id: Any, result: Any) -> protocol.Message:
    """Map a handler's return value to a response message (python3-http semantics)."""
    if isinstance(result, dict) and "statusCode" in result:
        status = result["statusCode"]  # as the handler gave it: thawd refuses what is not 200-599 (502)
        if not isinstance(status, int | float | str | None):
            status = repr(status)  # still a JSON value, which thawd names in its 502
        headers = {str(k): str(v) for k, v in (result.get("headers") or {}).items()}
        body = result.get("body", b"")
    else:
        status, headers, body = 200, {}, result
        headers["Content-Type"] = "application/json"
        body = json.dumps(result)
    if isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, bytes | bytearray):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    return {"type": "response", "id": request_id, "statusCode": status, "headers": headers, "body": protocol.b64(body)}


def to_event(request: protocol.Message) -> Event:
    return Event(
        body=protocol.unb64(request.get("body", "")),
        headers=dict(request.get("headers") or {}),
        method=str(request.get("method", "GET")),
        query=dict(request.get("query") or {}),
        path=str(request.get("path", "/")),
    )


def serve(handler: Handler, fd: int, max_frame: int) -> None:
    """Answer requests until the daemon closes fd 3."""
    while (request := protocol.recv(fd, max_frame)) is not None:
        if request["type"] == "serve-http":  # a container's instance (sandbox/guest/httpmode.py)
            from sandbox.guest import httpmode

            httpmode.serve_after_thaw(handler, fd, int(request["port"]), max_frame)
        if request["type"] != "request":
            continue
        context = Context(hostname=socket.gethostname(), pid=os.getpid())
        try:
            reply = to_response(request.get("id"), handler(to_event(request), context))
        except Exception as e:
            reply = {
                "type": "error",
                "id": request.get("id"),
                "error": {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()},
            }
        try:
            protocol.send(fd, reply, max_frame)
        except protocol.FrameTooLarge as e:
            error = {"type": "FrameTooLarge", "message": f"response: {e}", "traceback": ""}
            protocol.send(fd, {"type": "error", "id": request.get("id"), "error": error})


def _prewarm() -> None:
    """Run the request path once (without the handler) and freeze the heap before capture.

    Every page an instance writes after a restore costs it a copy-on-write fault. Python 3.11
    specializes bytecode in place the first times it runs and the cyclic GC writes into every
    object header it scans: doing the first here, and moving every object into the permanent
    generation (gc.freeze, as for fork-based servers), keeps those writes out of the instances.
    """
    request = {"type": "request", "id": 0, "body": protocol.b64(b"{}"), "headers": {"a": "b"}, "query": {}}
    for _ in range(8):  # the adaptive interpreter specializes after a few runs
        event = to_event(protocol.decode(protocol.encode(request)[4:]))
        protocol.encode(to_response(0, {"statusCode": 200, "body": event.body}))
        protocol.encode(to_response(0, {"ok": True}))
        Context(hostname=socket.gethostname(), pid=os.getpid())
    gc.collect()
    gc.freeze()


def park(fd: int) -> None:
    """Report READY and stop: the daemon captures us now. We continue here in every instance."""
    hooks.run_before_capture()
    _prewarm()
    protocol.send(fd, {"type": "ready"})
    os.kill(os.getpid(), signal.SIGSTOP)
    # Every instance shares the template's state: give each its own randomness, and let the
    # function refresh what it derived from its identity (sandbox.guest.hooks).
    try:
        hooks.run_after_thaw()
    except Exception as e:
        error = {"type": type(e).__name__, "message": f"an after-thaw hook failed: {e}"}
        protocol.send(fd, {"type": "error", "error": {**error, "traceback": traceback.format_exc()}})
        raise SystemExit(1) from e
    protocol.send(fd, {"type": "restored", "pid": os.getpid()})


def preload(modules: list[str]) -> None:
    """Import what functions commonly import, so the runtime template holds it."""
    for name in modules:
        importlib.import_module(name)


def await_function(fd: int, max_frame: int) -> Handler:
    """In an instance of a runtime template: become what the daemon says (the module's docstring)."""
    while (message := protocol.recv(fd, max_frame)) is not None:
        if message["type"] == "preload":
            preload([str(m) for m in message.get("modules") or []])
            park(fd)
        elif message["type"] == "load":
            os.environ.update({str(k): str(v) for k, v in (message.get("env") or {}).items()})
            return load_handler(str(message["function_dir"]), str(message["handler"]), message.get("site_dir"))
    raise SystemExit(0)  # the daemon closed fd 3: nothing to become


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.guest", description=__doc__.splitlines()[0])
    parser.add_argument("function_dir", nargs="?", help="directory holding the function's module")
    parser.add_argument("--handler", default="handler:handle", help="module:callable (default handler:handle)")
    parser.add_argument("--site-dir", help="the function's own site directory (its requirements)")
    parser.add_argument("--max-frame", type=int, default=protocol.DEFAULT_MAX_FRAME, help="largest frame in bytes")
    parser.add_argument("--runtime", action="store_true", help="park as a runtime template, then wait for a function")
    parser.add_argument("--preload", default="", help="comma-separated modules a runtime imports before it parks")
    args = parser.parse_args(argv)
    if args.runtime == bool(args.function_dir):
        parser.error("give a function directory, or --runtime")
    try:
        os.fstat(CONTROL_FD)
    except OSError:
        print("guest: fd 3 (the control channel) is not open", file=sys.stderr)
        return 2
    hooks.track_random()  # before the function's init creates any generator
    if args.runtime:
        preload([m for m in args.preload.split(",") if m])
        park(CONTROL_FD)  # captured as the runtime template: every instance of it continues here
        handler = await_function(CONTROL_FD, args.max_frame)
    else:
        handler = load_handler(args.function_dir, args.handler, args.site_dir)
    park(CONTROL_FD)
    serve(handler, CONTROL_FD, args.max_frame)
    return 0

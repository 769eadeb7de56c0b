"""HTTP mode: an instance that serves its function over HTTP itself, the OpenFaaS watchdog way.

A container thawed by containerd-shim-thaw-v2 is routed to like any function pod: faas-netes and
Knative send HTTP to the pod's address on port 8080. So after its thaw, when thawd says
`serve-http {port}` on fd 3, the instance listens on that port in its network namespace (the
pod's) and answers every path with its handler (the python3-http convention, like `of-watchdog`),
and `/_/health` with 200 while it can take requests. It listens only now: a listening socket
cannot be captured into a template, and every instance needs its own.

The same server runs a function cold (`python -m sandbox.guest.httpmode DIR`): the container
image that runc runs in the benchmark (scripts/bench_shim.py), init and all, on every start.

The HTTP/1.1 here is the small part a watchdog needs (request line, headers, Content-Length or
chunked bodies, keep-alive), on raw sockets: http.server and its imports would cost every thawed
instance several milliseconds before its first answer. One connection per thread; the handler
runs one request at a time, as thaw's instances do.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import traceback
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sandbox.guest import protocol

HEALTH_PATH = "/_/health"
MAX_HEADER = 64 << 10
REASONS = {200: "OK", 400: "Bad Request", 413: "Payload Too Large", 500: "Internal Server Error"}


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def listen(port: int, host: str = "0.0.0.0") -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(128)
    return server


def serve(handler: Any, server: socket.socket, max_body: int) -> None:
    """Accept connections for ever; each is served by its own thread."""
    from sandbox.guest import runtime  # the event and reply mapping of the guest protocol

    calls = threading.Lock()

    def call(method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(target)
        if url.path == HEALTH_PATH:
            return 200, {"Content-Type": "text/plain"}, b"OK"
        event = runtime.Event(body, headers, method, dict(parse_qsl(url.query)), url.path or "/")
        context = runtime.Context(hostname=socket.gethostname(), pid=os.getpid())
        with calls:
            try:
                reply = runtime.to_response(0, handler(event, context))
            except Exception as e:
                message = {"error": {"type": type(e).__name__, "message": str(e)}}
                traceback.print_exc()  # fds 1-2: the function's log
                return 500, {"Content-Type": "application/json"}, json.dumps(message).encode()
        status = reply["statusCode"] if isinstance(reply["statusCode"], int) else 500
        return status, dict(reply["headers"]), protocol.unb64(reply["body"])

    while True:
        conn, _ = server.accept()
        threading.Thread(target=_connection, args=(conn, call, max_body), daemon=True).start()


def _connection(conn: socket.socket, call: Any, max_body: int) -> None:
    reader = conn.makefile("rb")
    try:
        while True:
            try:
                request = _read_request(reader, max_body)
            except BadRequest as e:
                _write(conn, e.status, {"Content-Type": "text/plain", "Connection": "close"}, str(e).encode(), "")
                return
            if request is None:
                return
            method, target, version, headers, body = request
            status, reply_headers, reply_body = call(method, target, headers, body)
            keep = _keep_alive(version, headers)
            reply_headers["Connection"] = "keep-alive" if keep else "close"
            _write(conn, status, reply_headers, reply_body, method)
            if not keep:
                return
    except (OSError, ValueError):
        return
    finally:
        reader.close()
        conn.close()


def _read_request(reader: Any, max_body: int) -> tuple[str, str, str, dict[str, str], bytes] | None:
    line = reader.readline(MAX_HEADER)
    while line in (b"\r\n", b"\n"):  # RFC 9112: a server ignores empty lines before a request
        line = reader.readline(MAX_HEADER)
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, f"bad request line {line[:80]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    size = len(line)
    while (line := reader.readline(MAX_HEADER)) not in (b"\r\n", b"\n", b""):
        size += len(line)
        if size > MAX_HEADER:
            raise BadRequest(400, f"the request's headers exceed {MAX_HEADER} bytes")
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise BadRequest(400, f"bad header line {line[:80]!r}")
        headers[name.strip().title()] = value.strip()
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = _read_chunked(reader, max_body)
    else:
        length = int(headers.get("Content-Length", "0") or 0)
        if length > max_body:
            raise BadRequest(413, f"the body of {length} bytes exceeds the {max_body}-byte maximum")
        body = reader.read(length) if length else b""
    return method, target, version, headers, body


def _read_chunked(reader: Any, max_body: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        size = int(reader.readline(MAX_HEADER).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while reader.readline(MAX_HEADER) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        total += size
        if total > max_body:
            raise BadRequest(413, f"the body exceeds the {max_body}-byte maximum")
        chunks.append(reader.read(size))
        reader.readline(MAX_HEADER)


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("Connection", "").lower()
    return connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"


def _write(conn: socket.socket, status: int, headers: dict[str, str], body: bytes, method: str) -> None:
    headers = {k.title(): v for k, v in headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
    headers["Content-Length"] = str(len(body))
    head = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    conn.sendall(head.encode("latin-1") + (b"" if method == "HEAD" else body))


def serve_after_thaw(handler: Any, fd: int, port: int, max_frame: int) -> None:
    """thawd's `serve-http`: listen now (in the pod's namespace), say so on fd 3, serve for ever."""
    try:
        server = listen(port)
    except OSError as e:
        protocol.send(fd, {"type": "error", "error": {"type": "OSError", "message": f"listen on :{port}: {e}"}})
        raise SystemExit(1) from e
    protocol.send(fd, {"type": "serving", "port": port, "pid": os.getpid()})
    serve(handler, server, max_frame)


def main(argv: list[str] | None = None) -> int:
    """Run a function cold over HTTP (no thaw): import it, run its init, listen, serve."""
    from sandbox.guest import runtime

    parser = argparse.ArgumentParser(prog="python -m sandbox.guest.httpmode", description=main.__doc__)
    parser.add_argument("function_dir", help="directory holding the function's module")
    parser.add_argument("--handler", default="handler:handle", help="module:callable (default handler:handle)")
    parser.add_argument("--site-dir", help="the function's own site directory (its requirements)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default 8080, the watchdog's)")
    parser.add_argument("--max-body", type=int, default=protocol.DEFAULT_MAX_FRAME, help="largest body in bytes")
    args = parser.parse_args(argv)
    handler = runtime.load_handler(args.function_dir, args.handler, args.site_dir)
    server = listen(args.port)
    print(f"httpmode: serving {args.handler} on :{args.port}", file=sys.stderr, flush=True)
    serve(handler, server, args.max_body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

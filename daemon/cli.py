"""thaw: the command line of thawd. It talks only to the API on the Unix socket.

Tables for people, `--json` for scripts, a spinner while a capture runs. Exit codes:
0 done; 1 the daemon answered with an error (for `invoke`: the function failed); 2 bad usage;
3 no such function; 4 timed out; 69 thawd cannot be reached.

A command should answer in a few tens of milliseconds, most of it the interpreter's own start:
this module imports only the standard library's light modules at start. HTTP goes over
http.client on an AF_UNIX socket (imported when a command talks to thawd, not for `--help`), and
rich only for the spinner of a long command on a terminal. tests/test_cli.py keeps aiohttp, rich
and asyncio out of the start; `scripts/bench_cli` times the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshot.vocabulary import ColdCodec, RestoreMode, choices

if TYPE_CHECKING:
    import http.client

DEFAULT_SOCKET = os.environ.get("THAW_SOCKET", "/run/thaw/thaw.sock")
EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_TIMEOUT, EXIT_UNREACHABLE = 1, 2, 3, 4, 69
CAPTURE_TIMEOUT = 900.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code

    @property
    def exit_code(self) -> int:
        return {404: EXIT_NOT_FOUND, 504: EXIT_TIMEOUT}.get(self.status, EXIT_ERROR)


class Unreachable(Exception):
    pass


class Client:
    """One HTTP/1.1 request per connection to thawd's Unix socket (a command makes one or two)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        import http.client
        import socket

        connection = http.client.HTTPConnection("thawd", timeout=timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            raise Unreachable(f"cannot reach thawd at {self.socket_path}: {e} (is thawd running?)") from e
        connection.sock = sock
        return connection

    @contextmanager
    def _exchange(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float | None
    ) -> Iterator[http.client.HTTPResponse]:
        """The response with its headers read; the body is the caller's to read, within `timeout`
        seconds of silence (None: wait for ever, for a followed log)."""
        import http.client

        connection = self._connect(timeout)
        try:
            connection.request(method, path, body=body, headers=headers)
            yield connection.getresponse()
        except TimeoutError:
            raise ApiError(504, "timeout", f"thawd did not answer {method} {path} within {timeout:g} s") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise Unreachable(f"lost thawd at {self.socket_path} during {method} {path}: {e!r}") from e
        finally:
            connection.close()

    def request(
        self, method: str, path: str, body: Any = None, data: bytes | None = None, timeout: float = 60.0
    ) -> tuple[int, dict[str, str], bytes]:
        """`body` goes as JSON, `data` as raw bytes (application/octet-stream)."""
        if body is not None:
            data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        else:
            headers = {"Content-Type": "application/octet-stream"} if data is not None else {}
        with self._exchange(method, path, data, headers, timeout) as response:
            return response.status, dict(response.getheaders()), response.read()

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        status, _, payload = self.request(method, path, body, timeout=timeout)
        if status >= 400:
            raise _api_error(status, payload)
        return json.loads(payload) if payload else None

    def lines(self, path: str) -> Iterator[Any]:
        """An ndjson stream, one object per line as it comes (the connection stays open)."""
        with self._exchange("GET", path, None, {}, None) as response:
            if response.status >= 400:
                raise _api_error(response.status, response.read())
            for line in response:
                if line.strip():
                    yield json.loads(line)


def _api_error(status: int, payload: bytes) -> ApiError:
    try:
        error = json.loads(payload)["error"]
        return ApiError(status, error.get("code", ""), error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return ApiError(status, "http", payload.decode(errors="replace") or f"HTTP {status}")


@contextmanager
def progress(what: str, quiet: bool) -> Iterator[None]:
    """A spinner with the elapsed time on stderr, for people watching a long capture. The request
    blocks this thread, so a second one ticks the clock."""
    if quiet or not sys.stderr.isatty():
        yield
        return
    import threading

    from rich.console import Console  # ~60 ms of imports: only a long command on a terminal pays them

    t0, done = time.monotonic(), threading.Event()
    with Console(stderr=True).status(what) as status:

        def tick() -> None:
            while not done.wait(0.2):
                status.update(f"{what} ({time.monotonic() - t0:.1f} s)")

        ticker = threading.Thread(target=tick, name="thaw-progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


# -- output --------------------------------------------------------------------------------------
def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Plain aligned columns under a title, whatever the terminal's width: a cell is never cut or
    wrapped, so a name can be copied from it (and grep and awk see one row per line)."""
    cells = [columns, *(["-" if v is None else str(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    print(title)
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _show(data: Any, as_json: bool, render: Any) -> None:
    if as_json:
        print(json.dumps(data, indent=1))
    else:
        render(data)


def _function_rows(functions: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            f["name"],
            f["status"],
            f["handler"],
            f["revision"],
            f["mode"],
            _size(f.get("memory")),
            f"{f['timeout']:g} s" if f.get("timeout") else None,
            f["instances"],
            f["invocations"],
            _size(f.get("template_bytes")),
            _captured(f),
        ]
        for f in functions
    ]


FUNCTION_COLUMNS = ["name", "status", "handler", "rev", "mode", "memory", "timeout", "instances", "invocations"]
FUNCTION_COLUMNS += ["template", "captured"]
INSTANCE_KEYS = ("id", "function", "revision", "pid", "sandbox", "address", "state", "mode", "invocations")


# -- commands ----------------------------------------------------------------------------------
def cmd_deploy(client: Client, args: argparse.Namespace) -> int:
    source = Path(args.dir).resolve()
    name = args.name or source.name.lower().replace("_", "-")
    body: dict[str, Any] = {"name": name, "source": str(source), "handler": args.handler, "mode": args.mode}
    for key in ("memory", "cpu", "timeout", "max_instances", "idle_timeout"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.env:
        body["env"] = dict(_key_value(e) for e in args.env)
    if args.cold:
        body["layered"] = False
    status, _, _ = client.request("GET", f"/functions/{name}")
    method, path = ("PUT", f"/functions/{name}") if status == 200 else ("POST", "/functions")
    verb = "updating" if method == "PUT" else "deploying"
    with progress(f"{verb} {name}: installing, initialising and capturing", args.json):
        function = client.call(method, path, body, timeout=CAPTURE_TIMEOUT)
    _show(function, args.json, lambda f: print(_deployed_line(f)))
    return 0


def _deployed_line(f: dict[str, Any]) -> str:
    template = f"template {f['template']} ({_size(f['template_bytes'])}, {_captured(f)})"
    return f"{f['name']}: revision {f['revision']} ready, {template}"


def _captured(f: dict[str, Any]) -> str | None:
    """How the template was captured: from a cold start, or as a child of `parent` (daemon/layering.py)."""
    return f"from {f['parent']}" if f.get("parent") else f.get("captured")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"thaw: --env takes NAME=VALUE, not {text!r}")
    return key, value


def cmd_invoke(client: Client, args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.data == "-" else (args.data or "").encode()
    path = f"/functions/{args.name}/invoke{'/' + args.path.lstrip('/') if args.path else ''}"
    status, headers, payload = client.request(args.method, path, data=data, timeout=args.timeout)
    if status >= 400 and headers.get("Content-Type", "").startswith("application/json"):
        with _ignore_non_errors():
            raise _api_error(status, payload)
    if args.json:
        print(json.dumps({"status": status, "headers": headers, "body": payload.decode(errors="replace")}))
    else:
        sys.stdout.buffer.write(payload + (b"" if payload.endswith(b"\n") else b"\n"))
    return 0 if status < 400 else EXIT_ERROR


@contextmanager
def _ignore_non_errors() -> Iterator[None]:
    """A handler may answer 4xx/5xx JSON of its own: only thawd's error body is an ApiError."""
    try:
        yield
    except ApiError as e:
        if e.code != "http":
            raise


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    data = client.call("GET", "/functions")
    _show(data, args.json, lambda d: _table("functions", FUNCTION_COLUMNS, _function_rows(d["functions"])))
    return 0


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    for name in args.names:
        client.call("DELETE", f"/functions/{name}")
        if not args.json:
            print(f"{name}: removed")
    return 0


def cmd_snapshot(client: Client, args: argparse.Namespace) -> int:
    with progress(f"capturing {args.name} again", args.json):
        function = client.call("POST", f"/functions/{args.name}/snapshot", timeout=CAPTURE_TIMEOUT)
    _show(function, args.json, lambda f: print(_deployed_line(f)))
    return 0


def cmd_template(client: Client, args: argparse.Namespace) -> int:
    body = {"form": args.form, **({"codec": args.codec} if args.codec else {})}
    with progress(f"making {args.name}'s template {args.form}", args.json):
        function = client.call("POST", f"/functions/{args.name}/template", body, timeout=CAPTURE_TIMEOUT)
    _show(function, args.json, lambda f: print(f"{f['name']}: template {f['template']} ({f['template_form']})"))
    return 0


def cmd_instances(client: Client, args: argparse.Namespace) -> int:
    query = f"?function={args.name}" if args.name else ""
    data = client.call("GET", f"/instances{query}")
    columns = ["id", "function", "rev", "pid", "sandbox", "address", "state", "mode", "invocations", "restore"]
    rows = [[*(i[k] for k in INSTANCE_KEYS), f"{i['restore_ms']:.2f} ms"] for i in data["instances"]]
    _show(data, args.json, lambda d: _table("instances", columns, rows))
    return 0


def cmd_pool(client: Client, args: argparse.Namespace) -> int:
    data = client.call("GET", "/pool")

    def render(p: dict[str, Any]) -> None:
        print(
            f"pool {p['root']}: {p['backend']} on node {p['node']}, {_size(p['used'])} used of "
            f"{_size(p['capacity'])}, {p['segments']} segments"
        )
        rows = [[t["name"], t["function"], _size(t["bytes"])] for t in p["templates"]]
        _table("templates", ["template", "function", "pages"], rows)

    _show(data, args.json, render)
    return 0


def cmd_sandboxes(client: Client, args: argparse.Namespace) -> int:
    data = client.call("GET", "/sandboxes")
    keys = ("id", "state", "function", "instance", "address", "agent_pid")
    rows = [[s[k] for k in keys] for s in data["sandboxes"]]
    title = f"sandboxes ({len(rows)} of at most {data['max']})"
    _show(data, args.json, lambda d: _table(title, ["id", "state", "function", "instance", "address", "agent"], rows))
    return 0


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    query = f"?tail={args.tail}" + ("&follow=true" if args.follow else "")
    for entry in client.lines(f"/functions/{args.name}/logs{query}"):
        if args.json:
            print(json.dumps(entry), flush=True)
        else:
            print(f"{entry['timestamp']} {entry['instance']}: {entry['text']}", flush=True)
    return 0


# -- LoRA ------------------------------------------------------------------------------------------
IMPORT_TIMEOUT = 1800.0


def cmd_lora_models(client: Client, args: argparse.Namespace) -> int:
    data = client.call("GET", "/lora/models")
    keys = ("name", "architecture", "tensors", "worker", "source")
    rows = [[*(m[k] for k in keys[:3]), _size(m["bytes"]), m["worker"], m["source"]] for m in data["models"]]
    columns = ["model", "architecture", "tensors", "weights", "worker", "imported from"]
    _show(data, args.json, lambda d: _table("LoRA base models", columns, rows))
    return 0


def cmd_lora_import(client: Client, args: argparse.Namespace) -> int:
    body = {"name": args.name, "source": str(Path(args.source).resolve()), "dtype": args.dtype}
    with progress(f"importing {args.name} into the pool", args.json):
        result = client.call("POST", "/lora/models", body, timeout=IMPORT_TIMEOUT)
    _show(result, args.json, lambda r: print(f"{r['name']}: {r['tensors']} tensors, {_size(r['bytes'])}"))
    return 0


def cmd_lora_adapters(client: Client, args: argparse.Namespace) -> int:
    data = client.call("GET", "/lora/adapters" + (f"?model={args.model}" if args.model else ""))
    rows = [[a["name"], a["model"], a["rank"], _size(a["bytes"]), a["source"]] for a in data["adapters"]]
    _show(data, args.json, lambda d: _table("adapters", ["adapter", "model", "rank", "size", "imported from"], rows))
    return 0


def cmd_lora_add(client: Client, args: argparse.Namespace) -> int:
    body = {"name": args.name, "model": args.model, "source": str(Path(args.dir).resolve())}
    with progress(f"importing adapter {args.name}", args.json):
        result = client.call("POST", "/lora/adapters", body, timeout=IMPORT_TIMEOUT)
    _show(result, args.json, lambda r: print(f"{r['name']}: rank {r['rank']} over {r['model']}"))
    return 0


def cmd_lora_rm(client: Client, args: argparse.Namespace) -> int:
    kind = "models" if args.model else "adapters"
    for name in args.names:
        client.call("DELETE", f"/lora/{kind}/{name}")
        if not args.json:
            print(f"{name}: removed")
    return 0


def _worker_line(w: dict[str, Any]) -> str:
    return f"{w['model']}: {w['state']} on {w['device']}, pid {w['pid']}, {len(w['adapters'])} adapters"


def cmd_lora_start(client: Client, args: argparse.Namespace) -> int:
    settings = {k: v for k in ("device", "max_batch", "slots", "max_rank") if (v := getattr(args, k)) is not None}
    with progress(f"starting a worker for {args.model}", args.json):
        worker = client.call("POST", "/lora/workers", {"model": args.model, **settings}, timeout=IMPORT_TIMEOUT)
    _show(worker, args.json, lambda w: print(_worker_line(w)))
    return 0


def cmd_lora_stop(client: Client, args: argparse.Namespace) -> int:
    client.call("DELETE", f"/lora/workers/{args.model}")
    if not args.json:
        print(f"{args.model}: worker stopped")
    return 0


def cmd_lora_restart(client: Client, args: argparse.Namespace) -> int:
    with progress(f"restarting the worker for {args.model}", args.json):
        worker = client.call("POST", f"/lora/workers/{args.model}/restart", timeout=IMPORT_TIMEOUT)
    _show(worker, args.json, lambda w: print(_worker_line(w)))
    return 0


def cmd_lora_workers(client: Client, args: argparse.Namespace) -> int:
    data = client.call("GET", "/lora/workers")
    rows = [
        [w["model"], w["state"], w["device"], w["pid"], len(w["adapters"]), w["load_ms"], w["exit"]]
        for w in data["workers"]
    ]
    columns = ["model", "state", "device", "pid", "adapters", "load ms", "exit"]
    _show(data, args.json, lambda d: _table("LoRA workers", columns, rows))
    return 0


def cmd_lora_complete(client: Client, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature}
    result = client.call("POST", "/v1/completions", body, timeout=args.timeout)
    _show(result, args.json, lambda r: print(r["choices"][0]["text"]))
    return 0


def add_lora_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    lora = sub.add_parser("lora", parents=[common], help="LoRA serving: base models, adapters, workers, completions")
    cmds = lora.add_subparsers(dest="lora_command", required=True, metavar="LORA_COMMAND")
    p = cmds.add_parser("models", parents=[common], help="list base models in the pool")
    p.set_defaults(run=cmd_lora_models)
    p = cmds.add_parser("import", parents=[common], help="import a base model (HF directory or .gguf) into the pool")
    p.add_argument("source", help="a Hugging Face model directory (safetensors) or a .gguf file")
    p.add_argument("--name", required=True, help="the model's name")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="convert weights (default: as stored)")
    p.set_defaults(run=cmd_lora_import)
    p = cmds.add_parser("adapters", parents=[common], help="list adapters")
    p.add_argument("--model", help="only this base model's")
    p.set_defaults(run=cmd_lora_adapters)
    p = cmds.add_parser("add", parents=[common], help="import a PEFT adapter and register it with its model's worker")
    p.add_argument("dir", help="a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--name", required=True, help="the adapter's name (what `model` names in a completion)")
    p.add_argument("--model", required=True, help="the base model it adapts")
    p.set_defaults(run=cmd_lora_add)
    p = cmds.add_parser("rm", parents=[common], help="remove adapters (or, with --model, base models)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--model", action="store_true", help="the names are base models (their adapters go too)")
    p.set_defaults(run=cmd_lora_rm)
    p = cmds.add_parser("start", parents=[common], help="start a worker for a base model")
    p.add_argument("model")
    p.add_argument("--device", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--max-batch", type=int, help="sequences decoded together at most")
    p.add_argument("--slots", type=int, help="adapters resident on the device at once")
    p.add_argument("--max-rank", type=int, help="largest adapter rank accepted")
    p.set_defaults(run=cmd_lora_start)
    p = cmds.add_parser("stop", parents=[common], help="stop a model's worker")
    p.add_argument("model")
    p.set_defaults(run=cmd_lora_stop)
    p = cmds.add_parser("restart", parents=[common], help="restart a model's worker (after a crash)")
    p.add_argument("model")
    p.set_defaults(run=cmd_lora_restart)
    p = cmds.add_parser("workers", parents=[common], help="list workers")
    p.set_defaults(run=cmd_lora_workers)
    p = cmds.add_parser("complete", parents=[common], help="a completion from a base model or an adapter")
    p.add_argument("model", help="an adapter name, or a base model name")
    p.add_argument("prompt", help="the prompt, or - to read it from stdin")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    p.set_defaults(run=cmd_lora_complete)


# -- parsing ---------------------------------------------------------------------------------------
def _size_argument(text: str) -> int:
    from shmpool.cli import parse_size  # the pool's library comes with it: only `deploy --memory` needs it

    return parse_size(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thaw",
        description="Deploy and invoke functions on thawd (instances thawed from templates in a memory pool).",
        epilog="exit codes: 0 done, 1 error answered (invoke: the function failed), 2 bad usage, "
        "3 no such function, 4 timed out, 69 thawd unreachable",
    )
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help=f"thawd's API socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)  # --json also after the command
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts")

    p = sub.add_parser(
        "deploy", parents=[common], help="deploy (or update) a function from a directory; returns once it is captured"
    )
    p.add_argument("dir", help="the function's directory (its module, an optional requirements.txt)")
    p.add_argument("--name", help="function name (default: the directory's name)")
    p.add_argument("--handler", default="handler:handle", help="module:callable (default handler:handle)")
    p.add_argument("--memory", type=_size_argument, help="memory limit, e.g. 256M")
    p.add_argument("--cpu", type=float, help="CPU limit in cores, e.g. 0.5")
    p.add_argument("--timeout", type=float, help="seconds per invocation (default: thawd's)")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment variable (repeatable)")
    p.add_argument("--mode", default="cow", choices=choices(RestoreMode), help="restore mode (default cow)")
    p.add_argument("--max-instances", type=int, help="instances of this function at most")
    p.add_argument("--idle-timeout", type=float, help="seconds an idle instance stays warm (0: release at once)")
    p.add_argument(
        "--cold", action="store_true", help="capture from a cold start, not as a child of the runtime template"
    )
    p.set_defaults(run=cmd_deploy)

    p = sub.add_parser("invoke", parents=[common], help="invoke a function; prints its reply body")
    p.add_argument("name")
    p.add_argument("--data", help="request body (JSON or any text), or - to read it from stdin")
    p.add_argument("--path", default="", help="path after the function, seen by the handler as event.path")
    p.add_argument("--method", default="POST", help="HTTP method seen by the handler (default POST)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the reply (default 300)")
    p.set_defaults(run=cmd_invoke)

    p = sub.add_parser("ls", parents=[common], help="list functions")
    p.set_defaults(run=cmd_ls)
    p = sub.add_parser("rm", parents=[common], help="delete functions (their instances and templates go too)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(run=cmd_rm)
    p = sub.add_parser("snapshot", parents=[common], help="capture a function again from its deployed code")
    p.add_argument("name")
    p.set_defaults(run=cmd_snapshot)
    p = sub.add_parser(
        "template",
        parents=[common],
        help="hold a function's template warm (as captured), compressed (cold pages compressed) or evicted",
    )
    p.add_argument("name")
    p.add_argument("form", choices=["warm", "compressed", "evicted"])
    p.add_argument("--codec", choices=choices(ColdCodec), help="for compressed (default: thawd's)")
    p.set_defaults(run=cmd_template)
    p = sub.add_parser("instances", parents=[common], help="list live instances")
    p.add_argument("name", nargs="?", help="only this function's")
    p.set_defaults(run=cmd_instances)
    p = sub.add_parser("pool", parents=[common], help="the memory pool and its templates")
    p.set_defaults(run=cmd_pool)
    p = sub.add_parser("sandboxes", parents=[common], help="list sandboxes")
    p.set_defaults(run=cmd_sandboxes)
    p = sub.add_parser("logs", parents=[common], help="a function's log (its instances' stdout and stderr)")
    p.add_argument("name")
    p.add_argument("--tail", type=int, default=100, help="lines from the end (default 100)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(run=cmd_logs)
    add_lora_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = Client(args.socket)
    try:
        return int(args.run(client, args))
    except ApiError as e:
        print(f"thaw {args.command}: {e} [{e.code}]", file=sys.stderr)
        return e.exit_code
    except Unreachable as e:
        print(f"thaw: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

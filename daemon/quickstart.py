"""`python -m daemon.quickstart`: thaw's main job, end to end, on the built-in defaults.

Starts thawd (a tmpfs pool bound to NUMA node 0 at /var/lib/thaw/pool, the API on
/run/thaw/thaw.sock) unless one is serving already, deploys the two bundled example functions
(daemon/examples: `tiny`, and `heavy`, whose init imports a stack of modules and builds 256 MiB of
state) as children of the runtime template (daemon/layering.py), invokes each thawed from its
template and warm, then compresses each template (zstd: its cold pages in a compressed image the
pager inflates on fault) and does the same again. Each is also deployed once from a cold start
(`NAME-cold`, `layered: false`, removed after), for what a start without thaw costs. It prints a
table: the cold start (a guest's exec, imports and init), the layered deploy's init (from the
runtime template), restore + first reply, a warm reply, the memory of an instance with how much of
it is its own, and what the template holds of the pool against the cold one's. Then it puts the
templates back as captured and stops the thawd it started (`--keep` leaves it running).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

from daemon.cli import ApiError, Client, Unreachable

EXAMPLES = Path(__file__).with_name("examples")
FUNCTIONS = ("tiny", "heavy")
COMPRESSED = ("tiny", "heavy")
SOCKET = "/run/thaw/thaw.sock"
WARM_RUNS = 50
RESTORE_RUNS = 7
INSTANCES = 4
console = Console(width=None if sys.stdout.isatty() else 110)


async def _healthy(client: Client) -> bool:
    try:
        status, _, _ = client.request("GET", "/health", timeout=2)
    except (Unreachable, ApiError):
        return False
    return status == 200


async def start_thawd(client: Client, log_path: Path) -> subprocess.Popen[bytes] | None:
    """A thawd on the defaults, unless one is serving already (then None)."""
    if await _healthy(client):
        console.print(f"using the thawd serving on {client.socket_path}")
        return None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "daemon.main", "--socket", client.socket_path], stderr=log)
    deadline = time.monotonic() + 60
    while not await _healthy(client):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"thawd did not start; its log ({log_path}):\n{log_path.read_text()[-3000:]}")
        await asyncio.sleep(0.1)
    console.print(f"started thawd (pid {process.pid}, log {log_path}) on {client.socket_path}")
    return process


async def deploy(client: Client, name: str, layered: bool = True) -> dict[str, Any]:
    body = {"name": name if layered else f"{name}-cold", "source": str(EXAMPLES / name), "layered": layered}
    name = str(body["name"])
    status, _, _ = client.request("GET", f"/functions/{name}")
    method, path = ("PUT", f"/functions/{name}") if status == 200 else ("POST", "/functions")
    t0 = time.perf_counter()
    with console.status(f"deploying {name}: starting its guest, running its init, capturing it"):
        function: dict[str, Any] = client.call(method, path, body, timeout=600)
    console.print(
        f"  {name}: init {function['init_ms']:.0f} ms ({function['captured']}), captured into {function['template']} "
        f"({function['template_bytes'] / (1 << 20):.1f} MiB of pages); deploy took {time.perf_counter() - t0:.1f} s"
    )
    return function


async def measure(client: Client, name: str) -> dict[str, Any]:
    """Restore + first reply (no instance warm), then warm replies, then memory of INSTANCES instances."""
    connector = aiohttp.UnixConnector(path=client.socket_path)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"http://thawd/functions/{name}/invoke"
        await (await session.get("http://thawd/health")).read()  # the connection, opened outside the timing
        restores = []
        for _ in range(RESTORE_RUNS):
            client.call("POST", f"/functions/{name}/scale", {"replicas": 0})  # no instance left warm
            t0 = time.perf_counter()
            async with session.post(url, data=b"{}") as r:
                assert r.status == 200, await r.text()
                await r.read()
            restores.append((time.perf_counter() - t0) * 1e3)
        restore_ms = statistics.median(restores)
        warm = []
        for _ in range(WARM_RUNS):
            t0 = time.perf_counter()
            async with session.post(url, data=b"{}") as r:
                await r.read()
            warm.append((time.perf_counter() - t0) * 1e3)
    client.call("POST", f"/functions/{name}/scale", {"replicas": INSTANCES})
    instances = client.call("GET", f"/instances?function={name}")["instances"]
    memory = [i["memory"] for i in instances if i["memory"]]
    client.call("POST", f"/functions/{name}/scale", {"replicas": 0})
    return {
        "restore_ms": restore_ms,
        "warm_ms": statistics.median(warm),
        "rss": statistics.median(m["rss"] for m in memory),
        "uss": statistics.median(m["uss"] for m in memory),
        "instances": len(memory),
    }


async def cold_start(client: Client, name: str) -> dict[str, Any]:
    """The function deployed once from a cold start (its init_ms, its template's size), then removed."""
    function = await deploy(client, name, layered=False)
    client.call("DELETE", f"/functions/{function['name']}")
    return function


async def measure_compressed(client: Client, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same measures on the function's template compressed with zstd; then back as captured."""
    with console.status(f"compressing {name}'s template (zstd)"):
        function: dict[str, Any] = client.call(
            "POST", f"/functions/{name}/template", {"form": "compressed", "codec": "zstd"}, timeout=600
        )
    console.print(
        f"  {name}: compressed into {function['template']}, "
        f"{function['template_stored_bytes'] / (1 << 20):.1f} MiB of the pool"
    )
    try:
        measured = await measure(client, name)
        function = client.call("GET", f"/functions/{name}")  # with the pages decompressed so far
    finally:
        client.call("POST", f"/functions/{name}/template", {"form": "warm"}, timeout=600)
    return {**function, "name": f"{name} (compressed)"}, measured


def table(rows: list[tuple[dict[str, Any], dict[str, Any]]], cold: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="cold start vs thaw restore vs warm (medians; memory of one of 4 live instances)")
    columns = ["function", "cold start", "layered init", "thaw: restore + reply", "warm reply", "speed-up"]
    columns += ["RSS", "own (USS)", "template (cold)"]
    for column in columns:
        t.add_column(column, justify="left" if column == "function" else "right")
    for function, m in rows:
        base = cold[function["name"].split()[0]]
        t.add_row(
            function["name"],
            f"{base['init_ms']:.1f} ms",
            f"{function['init_ms']:.1f} ms",
            f"{m['restore_ms']:.2f} ms",
            f"{m['warm_ms']:.2f} ms",
            f"{base['init_ms'] / m['restore_ms']:.0f}x",
            f"{m['rss'] / (1 << 20):.1f} MiB",
            f"{m['uss'] / (1 << 20):.1f} MiB",
            f"{_mib(function['template_stored_bytes'])} ({_mib(base['template_stored_bytes'])})",
        )
    return t


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


async def run(socket_path: str, keep: bool, log_path: Path) -> None:
    client = Client(socket_path)
    process = await start_thawd(client, log_path)
    try:
        rows, cold = [], {}
        for name in FUNCTIONS:
            cold[name] = await cold_start(client, name)
            function = await deploy(client, name)
            rows.append((function, await measure(client, name)))
        rows += [await measure_compressed(client, name) for name in COMPRESSED]
        console.print(table(rows, cold))
        console.print(
            "cold start: the guest's exec, imports and init, deployed with layered: false; layered init: the "
            "deploy's init in a thaw of the runtime template; thaw: an instance restored from the template into "
            "a pooled sandbox, to its first reply through the API; speed-up: cold start over thaw; own (USS): "
            "pages the instance does not share with the template; template: what the layered one holds of the "
            "pool (compressed: its hot pages, the compressed image, and the cold pages decompressed so far; "
            "heavy's state is random bytes, which no codec shrinks), the cold one's in brackets."
        )
    finally:
        if process is not None and not keep:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            console.print("stopped thawd (the functions and templates stay; `--keep` leaves thawd running)")
        elif process is not None:
            console.print(f"thawd keeps running (pid {process.pid}); try: .venv/bin/thaw ls")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=SOCKET, help=f"thawd's API socket (default {SOCKET})")
    parser.add_argument("--keep", action="store_true", help="leave the thawd this started running")
    parser.add_argument("--log", type=Path, default=Path("/var/lib/thaw/quickstart-thawd.log"), help="thawd's log")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m daemon.quickstart: needs root (thawd makes namespaces, cgroups, mounts)", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(args.socket, args.keep, args.log))
    except ApiError as e:
        print(f"quickstart: thawd answered: {e} [{e.code}]", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Invocation benchmark (run it as `scripts/bench_invoke`): latency and throughput through thawd's API.

Starts its own thawd (a fresh tmpfs pool, state directory, API socket and sandbox runtime directory
under a temporary directory; bridge thawb0 on 10.234.0.0/24, cgroup tree thaw-bench), deploys two
functions with the same tiny handler (returns {"ok": true, "n": len(event.body)}) and measures, for
each concurrency in --concurrency (default 1, 8, 32):

- warm     bench-warm (default keep-alive): after the warm-up, every request is served by a live
           instance, so this is the API (HTTP over the Unix socket) + the guest exchange
- restore  bench-restore ("idle_timeout": 0): every instance is released right after its
           invocation, so every request thaws a new instance from the template into a repurposed
           sandbox, then invokes it (from-template start + invoke)

The load comes from a separate process (this file with --worker): an aiohttp.ClientSession over an
aiohttp.UnixConnector (limit = concurrency) keeps exactly `concurrency` POST /functions/NAME/invoke
requests (a small JSON body) in flight until --requests (warm) or --restore-requests (restore)
have been answered, after a warm-up of max(--warmup, 2 x concurrency) requests that are not counted.
Each request's latency is taken with time.perf_counter; rps is requests / wall time of the cell.
Before each warm cell bench-warm is scaled (POST /functions/bench-warm/scale) to `concurrency`
instances, so no request of the cell waits for a thaw; before the restore cells it is scaled to 0,
so they do not evict its idle instances. Per cell, how many instances thawd thawed, their mean
thaw time and the mean of each step of its thaws and invocations (from /metrics), and the CPU each
request cost (thawd, the sandboxes' agents, the instances, the load generator, the machine, and
steal) go to stderr.

- burst    bench-burst (default keep-alive), for each N in --burst (default 1, 8, 32): scaled to 0
           (POST /functions/bench-burst/scale, which returns once its instances are gone and their
           sandboxes back, a stub waiting in each), then N requests released at one instant (N
           clients waiting on one event), as the gateway forwards the requests it
           queued during a scale from zero; --burst-rounds rounds (default 5). Every request's
           latency counts from the release; makespan is the release to the last answer; restores
           the instances thawd thawed for the burst (from /metrics); each round's makespan goes
           to stderr. Rows: daemon/bench.py's BurstRow, table `burst`.
- direct   concurrency 1 only, --requests requests: the same body exchanged straight with a guest's
           control socket in this process (sandbox/guest/launch.py: start_parked, SIGCONT,
           RESTORED, then invoke in a loop), without the API or a sandbox: the API's overhead is
           warm minus direct

Prints a table (path, concurrency, p50_ms, p99_ms, rps, requests, errors), the burst table
(concurrency, p50_ms, p99_ms, makespan_ms, restores, errors) and the targets (warm p50 <= 1 ms at
concurrency 1, restore p50 <= 2.5 ms at concurrency 1, restore rps at 32 >= 1.6 x at 1, >= 1000
warm rps at concurrency 32, burst of 32: p99 <= 40 ms and no error); `--json PATH`
(default bench-results/bench_invoke.json) writes the rows (daemon/bench.py's InvokeRow: `path`,
`concurrency`, `p50_ms`, `p99_ms`, `rps`, `requests`, `errors` (non-200 answers, counted in the
latencies too) and `cdf_ms`, the latency at every percentile; and the BurstRows). `--quick`: 200
warm and 40 restore requests per cell, concurrency 1 and 8, bursts of 1 and 8, 2 rounds each.
thawd's stderr goes to the temporary directory; its warnings are summarised at the end and its
tail printed on failure. At exit (also on failure, Ctrl-C or SIGTERM) thawd is
stopped with SIGTERM, the pool destroyed (`python -m shmpool --root POOL destroy --force`) and the
temporary directory removed. Root, after scripts/setup; refuses to run while a thawb0 bridge or a
thaw-bench cgroup exists (another benchmark is using them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from daemon import bench
from daemon.bench import BurstRow, InvokeRow
from sandbox.cgroups import CgroupTree
from sandbox.guest.launch import decode_body, invoke, recv, start_parked

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
BRIDGE, SUBNET, CGROUP = "thawb0", "10.234.0.0/24", "thaw-bench"
HANDLER = "def handle(event, context):\n    return {'ok': True, 'n': len(event.body)}\n"
BODY = json.dumps({"bench": "invoke", "payload": "x" * 64}).encode()
EXPECTED = {"ok": True, "n": len(BODY)}
HEALTH_TIMEOUT = 120.0
DEPLOY_TIMEOUT = 300.0
STOP_TIMEOUT = 60.0
TARGETS = (
    "targets: warm p50 <= 1 ms at concurrency 1; restore p50 <= 2.5 ms at concurrency 1; restore rps at "
    "concurrency 32 >= 1.6 x at 1; >= 1000 warm rps at concurrency 32; burst of 32: p99 <= 40 ms, no error"
)


class BenchError(Exception):
    pass


# -- the load generator (a separate process: this file with --worker) -------------------------------
@dataclass
class Load:
    socket: str
    function: str
    concurrency: int
    requests: int
    warmup: int
    burst: bool = False  # `concurrency` requests released at one instant, once


async def _burst(session: aiohttp.ClientSession, url: str, size: int) -> dict[str, Any]:
    """`size` requests released at one instant (each client waits on one event)."""
    release = asyncio.Event()
    waiting = 0
    latencies: list[float] = []
    errors: list[str] = []
    released = 0.0
    headers = {"Content-Type": "application/json"}

    async def client() -> None:
        nonlocal waiting
        waiting += 1
        await release.wait()
        async with session.post(url, data=BODY, headers=headers) as response:
            body = await response.read()
            status = response.status
        latencies.append((time.perf_counter() - released) * 1e3)
        if status != 200 or json.loads(body) != EXPECTED:
            errors.append(f"{status} {body[:300].decode(errors='replace')}")

    clients = [asyncio.ensure_future(client()) for _ in range(size)]
    while waiting < size:
        await asyncio.sleep(0)
    released = time.perf_counter()
    release.set()
    await asyncio.gather(*clients)
    return {"latencies_ms": latencies, "wall_s": time.perf_counter() - released, "errors": errors}


async def _phase(session: aiohttp.ClientSession, url: str, concurrency: int, total: int) -> dict[str, Any]:
    """`total` requests with exactly `concurrency` in flight; their latencies, wall time and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    tickets: Iterator[int] = iter(range(total))
    headers = {"Content-Type": "application/json"}

    async def client() -> None:
        for _ in tickets:  # shared: each ticket is one request, whichever client takes it
            t0 = time.perf_counter()
            async with session.post(url, data=BODY, headers=headers) as response:
                body = await response.read()
                status = response.status
            latencies.append((time.perf_counter() - t0) * 1e3)
            if status != 200 or json.loads(body) != EXPECTED:
                errors.append(f"{status} {body[:300].decode(errors='replace')}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"latencies_ms": latencies, "wall_s": time.perf_counter() - t0, "errors": errors}


async def _load(load: Load) -> dict[str, Any]:
    connector = aiohttp.UnixConnector(path=load.socket, limit=load.concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    url = f"http://thawd/functions/{load.function}/invoke"
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if load.burst:
            return await _burst(session, url, load.concurrency)
        await _phase(session, url, load.concurrency, load.warmup)
        return await _phase(session, url, load.concurrency, load.requests)


def worker_main(spec: str) -> int:
    result = asyncio.run(_load(Load(**json.loads(spec))))
    sys.stdout.write(json.dumps(result))
    return 0


def run_load(load: Load) -> dict[str, Any]:
    """One cell: the worker process's latencies, wall time and errors."""
    spec = json.dumps(load.__dict__)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", spec], stdout=subprocess.PIPE, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"the load generator for {load.function} at concurrency {load.concurrency} failed")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- statistics --------------------------------------------------------------------------------------
def row(path: str, concurrency: int, latencies: list[float], wall: float, errors: int) -> InvokeRow:
    return InvokeRow(
        path=path,
        concurrency=concurrency,
        p50_ms=round(bench.median(latencies), 3),
        p99_ms=round(bench.percentile(latencies, 99), 3),
        rps=round(len(latencies) / wall, 1),
        requests=len(latencies),
        errors=errors,
        cdf_ms=bench.cdf(latencies),
    )


# -- thawd --------------------------------------------------------------------------------------------
class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("thawd", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class Thawd:
    """Our own thawd, everything it keeps under `tmp`."""

    def __init__(self, tmp: Path, pool_size: str) -> None:
        self.tmp = tmp
        self.socket = str(tmp / "thawd.sock")
        self.pool = tmp / "pool"
        self.stderr_path = tmp / "thawd.stderr"
        argv = [str(PYTHON), "-m", "daemon.main", "--state-dir", str(tmp / "state"), "--socket", self.socket]
        argv += ["--pool-root", str(self.pool), "--pool-backend", "tmpfs", "--pool-size", pool_size]
        argv += ["--sandboxes-bridge", BRIDGE, "--sandboxes-subnet", SUBNET, "--sandboxes-cgroup", CGROUP]
        argv += ["--sandboxes-runtime-dir", str(tmp / "run"), "--sandboxes-prewarm", "8", "--sandboxes-max", "48"]
        argv += ["--instances-max", "40", "--drain-timeout", "5"]
        with self.stderr_path.open("wb") as stderr:
            # Its own session: Ctrl-C reaches only us, and we stop thawd in order.
            self.popen = subprocess.Popen(
                argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True
            )

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        conn = UnixHTTPConnection(self.socket, timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(raw) if raw and "json" in kind else raw.decode(errors="replace")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise BenchError(f"thawd exited with status {self.popen.returncode} while starting")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, health = self.api("GET", "/health", timeout=2.0)
                if status == 200 and health.get("status") == "ok":
                    return
            time.sleep(0.05)
        raise BenchError(f"thawd did not answer /health within {HEALTH_TIMEOUT:g} s")

    def deploy(self, name: str, source: Path, idle_timeout: float | None) -> None:
        body: dict[str, Any] = {"name": name, "source": str(source)}
        if idle_timeout is not None:
            body["idle_timeout"] = idle_timeout
        t0 = time.perf_counter()
        status, answer = self.api("POST", "/functions", body, timeout=DEPLOY_TIMEOUT)
        if status != 201:
            raise BenchError(f"deploying {name}: {status} {answer}")
        print(f"deployed {name} in {(time.perf_counter() - t0) * 1e3:.0f} ms", file=sys.stderr)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples, `name{labels}` -> value."""
        _, text = self.api("GET", "/metrics")
        samples = {}
        for line in str(text).splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    samples[key] = float(value)
        return samples

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL after STOP_TIMEOUT."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"bench_invoke: thawd did not stop within {STOP_TIMEOUT:g} s; killing it", file=sys.stderr)
                self.popen.kill()
                self.popen.wait()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


# -- the direct row ----------------------------------------------------------------------------------
def measure_direct(function_dir: Path, requests: int, warmup: int) -> InvokeRow:
    """`requests` invocations exchanged straight with a guest's control socket, one at a time."""
    guest = start_parked(function_dir, cwd=REPO)
    try:
        os.kill(guest.pid, signal.SIGCONT)
        hello = recv(guest.control, 30)
        if hello is None or hello.get("type") != "restored":
            raise BenchError(f"the guest said {hello} instead of RESTORED")
        for _ in range(warmup):
            invoke(guest.control, "/", BODY)
        latencies, errors = [], 0
        t0 = time.perf_counter()
        for _ in range(requests):
            t1 = time.perf_counter()
            reply = invoke(guest.control, "/", BODY)
            latencies.append((time.perf_counter() - t1) * 1e3)
            if reply.get("type") != "response" or json.loads(decode_body(reply)) != EXPECTED:
                errors += 1
        return row("direct", 1, latencies, time.perf_counter() - t0, errors)
    finally:
        guest.kill()


# -- the machine as we found it ----------------------------------------------------------------------
def bridge_exists() -> bool:
    return Path("/sys/class/net", BRIDGE).exists()


def cgroup_dirs() -> list[Path]:
    found = []
    for top in Path("/sys/fs/cgroup").iterdir():
        with contextlib.suppress(OSError):
            for dirpath, dirnames, _ in os.walk(top):
                if CGROUP in dirnames:
                    found.append(Path(dirpath, CGROUP))
                    dirnames.remove(CGROUP)
    return found


def mounts_under(directory: Path) -> list[str]:
    prefix = str(directory.resolve()) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix) or point == prefix[:-1]:
            points.append(point)
    return points


def clean_up(thawd: Thawd | None, tmp: Path) -> tuple[list[str], str]:
    """Stop thawd, remove what a thawd that had to be killed left, destroy the pool, remove `tmp`.
    Returns what could not be cleaned and thawd's stderr."""
    problems: list[str] = []
    log = ""
    if thawd is not None:
        thawd.stop()
        log = thawd.stderr_text()
        if thawd.popen.returncode != 0:
            problems.append(f"thawd exited with status {thawd.popen.returncode}")
        if cgroup_dirs():  # thawd was killed: its sandboxes' agents and instances are still in there
            try:
                tree = CgroupTree(CGROUP)
                tree.reap_orphans()
                tree.remove()
            except Exception as e:
                problems.append(f"removing the {CGROUP} cgroups: {e}")
        if bridge_exists():
            subprocess.run(["ip", "link", "del", BRIDGE], check=False)
        if thawd.pool.exists():
            destroy = [str(PYTHON), "-m", "shmpool", "--root", str(thawd.pool), "destroy", "--force"]
            done = subprocess.run(destroy, cwd=REPO, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                problems.append(f"destroying the pool: {done.stderr.strip() or done.stdout.strip()}")
    left = mounts_under(tmp)
    if left:  # never rmtree through a mount
        problems.append(f"mounts left under {tmp} (not removed): {', '.join(left)}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if cgroup_dirs():
        problems.append(f"cgroups left: {', '.join(map(str, cgroup_dirs()))}")
    if bridge_exists():
        problems.append(f"bridge {BRIDGE} left")
    return problems, log


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- the run ----------------------------------------------------------------------------------------
def write_function(tmp: Path, name: str) -> Path:
    directory = tmp / "functions" / name
    directory.mkdir(parents=True)
    (directory / "handler.py").write_text(HANDLER)
    return directory


def thaw_counts(thawd: Thawd, function: str) -> tuple[float, float, float]:
    """(instances of `function` thawed so far, thaws in all, seconds they took in all) from /metrics."""
    samples = thawd.metrics()
    return (
        samples.get(f'thaw_starts_total{{function="{function}",kind="restored"}}', 0.0),
        samples.get("thaw_restore_seconds_count", 0.0),
        samples.get("thaw_restore_seconds_sum", 0.0),
    )


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds used so far: thawd (every thread), the sandboxes' agents and instances (stubs
    included: the tree's cgroup v2 cpu.stat), the load generators (children of ours, their start
    included), the whole machine, and the time the host gave to other VMs instead (steal: noise)."""

    thawd: float
    agents: float
    instances: float
    load: float
    machine: float
    steal: float

    @classmethod
    def now(cls, thawd: Thawd) -> CpuTimes:
        stat = Path(f"/proc/{thawd.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        usage = {"agent": 0.0, "sbx": 0.0}
        for directory in cgroup_dirs():
            for cgroup in directory.iterdir() if directory.is_dir() else ():
                kind = cgroup.name.split("-", 1)[0]
                with contextlib.suppress(OSError):
                    fields = dict(line.split() for line in (cgroup / "cpu.stat").read_text().splitlines())
                    usage[kind] = usage.get(kind, 0.0) + int(fields.get("usage_usec", 0)) / 1e6  # v2's only
        children = os.times()
        # user nice system idle iowait irq softirq steal: steal is time the host gave another VM
        cpu = [int(x) / ticks for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        machine, steal = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6], cpu[7]
        thawd_s = (int(stat[11]) + int(stat[12])) / ticks
        load = children.children_user + children.children_system
        return cls(thawd_s, usage["agent"], usage["sbx"], load, machine, steal)

    def per_request(self, before: CpuTimes, requests: int) -> str:
        """Each kind's CPU per request between two readings, in ms."""
        parts = [(name, (getattr(self, name) - getattr(before, name)) / requests * 1e3) for name in vars(self)]
        return "CPU per request (ms): " + ", ".join(f"{name} {ms:.2f}" for name, ms in parts)


STEP_SAMPLE = re.compile(r'thaw_(thaw|invocation)_step_seconds_(sum|count)\{step="(\w+)"\}')


def thaw_steps(thawd: Thawd) -> dict[str, tuple[float, float]]:
    """Each step of thawd's thaws (daemon/thawing.py's Steps) and invocations: (how many, seconds
    in all) so far."""
    steps: dict[str, list[float]] = {}
    for key, value in thawd.metrics().items():
        if match := STEP_SAMPLE.fullmatch(key):
            name = match[3] if match[1] == "thaw" else f"invocation:{match[3]}"
            steps.setdefault(name, [0.0, 0.0])[match[2] == "sum"] = value
    return {step: (count, seconds) for step, (count, seconds) in steps.items()}


def describe_steps(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> str:
    """The mean of each thaw step between two readings, in ms."""
    means = []
    for step, (count, seconds) in after.items():
        count0, seconds0 = before.get(step, (0.0, 0.0))
        if count > count0:
            means.append(f"{step} {(seconds - seconds0) / (count - count0) * 1e3:.2f}")
    return "mean steps (ms): " + ", ".join(means) if means else ""


def scale(thawd: Thawd, function: str, replicas: int) -> None:
    status, answer = thawd.api("POST", f"/functions/{function}/scale", {"replicas": replicas}, timeout=120)
    if status != 200:
        raise BenchError(f"scaling {function} to {replicas}: {status} {answer}")


def measure(thawd: Thawd, tmp: Path, args: argparse.Namespace) -> list[InvokeRow]:
    warm_dir, restore_dir = write_function(tmp, "bench-warm"), write_function(tmp, "bench-restore")
    thawd.deploy("bench-warm", warm_dir, None)
    thawd.deploy("bench-restore", restore_dir, 0)
    rows = []
    for path, function in (("warm", "bench-warm"), ("restore", "bench-restore")):
        requests = args.requests if path == "warm" else args.restore_requests
        for concurrency in args.concurrency:
            if path == "warm":  # exactly `concurrency` live instances: no thaw inside the cell
                scale(thawd, function, concurrency)
            warmup = max(args.warmup, 2 * concurrency)
            before, steps_before = thaw_counts(thawd, function), thaw_steps(thawd)
            cpu_before = CpuTimes.now(thawd)
            result = run_load(Load(thawd.socket, function, concurrency, requests, warmup))
            cpu = CpuTimes.now(thawd).per_request(cpu_before, warmup + requests)
            after, steps_after = thaw_counts(thawd, function), thaw_steps(thawd)
            r = row(path, concurrency, result["latencies_ms"], result["wall_s"], len(result["errors"]))
            rows.append(r)
            thaws, count, seconds = (a - b for a, b in zip(after, before, strict=True))
            print(
                f"{path:>8} c={concurrency:<3} p50 {r.p50_ms:.3f} ms  rps {r.rps:.0f}; thawd thawed {thaws:.0f}"
                f" instances for {warmup}+{requests} requests"
                + (f", mean thaw (free sandbox to RESTORED) {seconds / count * 1e3:.2f} ms" if count else ""),
                file=sys.stderr,
            )
            if steps := describe_steps(steps_before, steps_after):
                print(f"    {steps}", file=sys.stderr)
            print(f"    {cpu}", file=sys.stderr)
            for error in result["errors"][:3]:
                print(f"    error: {error}", file=sys.stderr)
        if path == "warm":
            scale(thawd, function, 0)  # its idle instances go: the restore cells do not evict them
    rows.append(measure_direct(warm_dir, args.requests, args.warmup))
    return rows


def measure_bursts(thawd: Thawd, tmp: Path, args: argparse.Namespace) -> list[BurstRow]:
    burst_dir = write_function(tmp, "bench-burst")
    thawd.deploy("bench-burst", burst_dir, None)
    rows = []
    for size in args.burst:
        latencies: list[float] = []
        makespans: list[float] = []
        restores: list[float] = []
        errors: list[str] = []
        steps_before = thaw_steps(thawd)
        cpu = [0.0] * 6
        for _ in range(args.burst_rounds):
            scale(thawd, "bench-burst", 0)  # no instance live: the burst starts from zero
            before = thaw_counts(thawd, "bench-burst")[0]
            cpu_before = CpuTimes.now(thawd)
            result = run_load(Load(thawd.socket, "bench-burst", size, size, 0, burst=True))
            cpu_after = CpuTimes.now(thawd)
            cpu = [
                c + getattr(cpu_after, k) - getattr(cpu_before, k) for c, k in zip(cpu, vars(cpu_after), strict=True)
            ]
            restores.append(thaw_counts(thawd, "bench-burst")[0] - before)
            latencies += result["latencies_ms"]
            makespans.append(result["wall_s"] * 1e3)
            errors += result["errors"]
        r = BurstRow(
            path="burst",
            concurrency=size,
            p50_ms=round(bench.median(latencies), 3),
            p99_ms=round(bench.percentile(latencies, 99), 3),
            makespan_ms=round(bench.median(makespans), 3),
            restores=round(bench.median(restores)),
            errors=len(errors),
        )
        rows.append(r)
        print(
            f"   burst n={size:<3} p50 {r.p50_ms:.3f} ms  p99 {r.p99_ms:.3f} ms  makespan {r.makespan_ms:.1f} ms; "
            f"{r.restores} restores per burst ({args.burst_rounds} rounds)",
            file=sys.stderr,
        )
        rounds = ", ".join(f"{m:.1f}" for m in makespans)
        print(f"    makespan per round (ms): {rounds}", file=sys.stderr)
        print(
            f"    {CpuTimes(*cpu).per_request(CpuTimes(0, 0, 0, 0, 0, 0), size * args.burst_rounds)}", file=sys.stderr
        )
        if steps := describe_steps(steps_before, thaw_steps(thawd)):
            print(f"    {steps}", file=sys.stderr)
        for error in errors[:3]:
            print(f"    error: {error}", file=sys.stderr)
    scale(thawd, "bench-burst", 0)
    return rows


def print_table(rows: list[InvokeRow], bursts: list[BurstRow]) -> None:
    headers = ("path", "concurrency", "p50_ms", "p99_ms", "rps", "requests", "errors")
    print(
        bench.table(headers, ((r.path, r.concurrency, r.p50_ms, r.p99_ms, r.rps, r.requests, r.errors) for r in rows))
    )
    if bursts:
        headers = ("path", "concurrency", "p50_ms", "p99_ms", "makespan_ms", "restores", "errors")
        cells = ((b.path, b.concurrency, b.p50_ms, b.p99_ms, b.makespan_ms, b.restores, b.errors) for b in bursts)
        print(bench.table(headers, cells))
    print(TARGETS)
    cell = {(r.path, r.concurrency): r for r in rows}
    verdicts = []
    if ("warm", 1) in cell:
        p50 = cell["warm", 1].p50_ms
        verdicts.append(f"warm p50 c=1 {p50:.3f} ms {'ok' if p50 <= 1 else 'MISSED'}")
    if ("restore", 1) in cell:
        p50 = cell["restore", 1].p50_ms
        verdicts.append(f"restore p50 c=1 {p50:.3f} ms {'ok' if p50 <= 2.5 else 'MISSED'}")
    if ("restore", 1) in cell and ("restore", 32) in cell:
        ratio = cell["restore", 32].rps / cell["restore", 1].rps
        verdicts.append(f"restore rps c=32 / c=1 {ratio:.2f} {'ok' if ratio >= 1.6 else 'MISSED'}")
    for b in bursts:
        if b.concurrency == 32:
            ok = b.p99_ms <= 40 and b.errors == 0
            verdicts.append(f"burst of 32 p99 {b.p99_ms:.3f} ms, {b.errors} errors {'ok' if ok else 'MISSED'}")
    if ("warm", 32) in cell:
        rps = cell["warm", 32].rps
        verdicts.append(f"warm rps c=32 {rps:.0f} {'ok' if rps >= 1000 else 'MISSED'}")
    if ("warm", 1) in cell and ("direct", 1) in cell:
        overhead = cell["warm", 1].p50_ms - cell["direct", 1].p50_ms
        verdicts.append(f"API overhead (warm - direct p50, c=1) {overhead:.3f} ms")
    for verdict in verdicts:
        print(f"  {verdict}")


def thawd_warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"WARNING|ERROR|CRITICAL|Traceback", line)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_invoke",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, help="requests per warm cell and for direct [2000]")
    parser.add_argument("--restore-requests", type=int, help="requests per restore cell [300]")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",")],
        metavar="C,C,...",
        help="requests in flight, one cell per value [1,8,32] (at most 32: instances per function)",
    )
    parser.add_argument(
        "--warmup", type=int, default=20, help="uncounted requests before each cell, at least 2 x concurrency [20]"
    )
    parser.add_argument(
        "--burst",
        type=lambda text: [int(c) for c in text.split(",")],
        metavar="N,N,...",
        help="requests per burst from zero, one row per value [1,8,32] (at most 32)",
    )
    parser.add_argument("--burst-rounds", type=int, help="bursts per row [5]")
    parser.add_argument("--pool-size", default="2G", help="size of the benchmark's tmpfs pool [2G]")
    bench.arguments(
        parser, "bench_invoke", "200 warm and 40 restore requests per cell, concurrency 1 and 8, bursts of 1 and 8"
    )
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)  # the load generator's process
    args = parser.parse_args(argv)
    args.requests = args.requests or (200 if args.quick else 2000)
    args.restore_requests = args.restore_requests or (40 if args.quick else 300)
    args.concurrency = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    args.burst = args.burst or ([1, 8] if args.quick else [1, 8, 32])
    args.burst_rounds = args.burst_rounds or (2 if args.quick else 5)
    if args.burst_rounds < 1 or not all(1 <= n <= 32 for n in args.burst):
        parser.error("--burst: values from 1 to 32; --burst-rounds: positive")
    if args.requests < 1 or args.restore_requests < 1 or args.warmup < 0:
        parser.error("--requests and --restore-requests must be positive, --warmup not negative")
    if not args.concurrency or not all(1 <= c <= 32 for c in args.concurrency):
        parser.error("--concurrency: values from 1 to 32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if os.geteuid() != 0:
        print("bench_invoke: needs root (thawd: namespaces, cgroups, ptrace, the pool's mount)", file=sys.stderr)
        return 2
    if bridge_exists() or cgroup_dirs():
        print(f"bench_invoke: {BRIDGE} or a {CGROUP} cgroup exists: is another benchmark running?", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="thaw-bench-invoke-"))
    signal.signal(signal.SIGTERM, _interrupted)
    thawd: Thawd | None = None
    rows: list[InvokeRow] = []
    bursts: list[BurstRow] = []
    failure = ""
    try:
        thawd = Thawd(tmp, args.pool_size)
        thawd.wait_healthy()
        rows = measure(thawd, tmp, args)
        bursts = measure_bursts(thawd, tmp, args)
    except BenchError as e:
        failure = str(e)
    except Exception as e:
        traceback.print_exc()
        failure = f"{type(e).__name__}: {e}"
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # cleaning up is not interrupted (it is bounded)
            signal.signal(signum, signal.SIG_IGN)
        problems, log = clean_up(thawd, tmp)  # log: thawd's stderr, read before tmp goes
    if failure:
        print(f"bench_invoke: {failure}", file=sys.stderr)
        if log:
            print("thawd's stderr (last 40 lines):", file=sys.stderr)
            print("\n".join(log.splitlines()[-40:]), file=sys.stderr)
    else:
        warnings = thawd_warnings(log)
        if warnings:
            print(f"thawd logged {len(warnings)} warnings/errors, e.g.:", file=sys.stderr)
            print("\n".join(f"    {w}" for w in warnings[:10]), file=sys.stderr)
    for problem in problems:
        print(f"bench_invoke: cleanup: {problem}", file=sys.stderr)
    if failure:
        return 1
    print_table(rows, bursts)
    conditions = {"requests": args.requests, "restore_requests": args.restore_requests, "warmup": args.warmup,
                  "concurrency": args.concurrency, "pool": f"tmpfs {args.pool_size}", "quick": args.quick,
                  "burst": args.burst, "burst_rounds": args.burst_rounds}  # fmt: skip
    tables: dict[str, list[Any]] = {"invoke": rows, "burst": bursts}
    bench.write(args.json, bench.Document("bench_invoke", tables, conditions, [TARGETS]))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

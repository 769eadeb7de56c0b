"""Container start to first HTTP answer: `ctr run` with runc running a function cold vs thaw's shim
thawing it (containerd-shim-thaw-v2), median and p90 of --runs each, side by side in one run.

Both run the same OCI image (written here, imported with `ctr image import` into a private
containerd) and the same HTTP server (sandbox/guest/httpmode.py) in a network namespace made as
CRI makes a pod's. The function's init builds 96 MiB of varied data and hashes it (a few hundred
ms here): runc runs it on every start (python started, the init, then listening), thaw once, at
the first container of the image (not counted: its figure is a note), and thaws every later one.
A start is timed from just before `ctr run -d` to the first 200 from `GET /` on :8080, seen by a
poller inside the namespace (one connection attempt every millisecond). Each container is
removed (kill, delete, rm) outside the timing. Every answer carries the init's duration as its
process measured it (X-Init-Ms): runc's containers ran it on their start, thaw's carry the one
the template captured; the table's notes give both, with the versions of runc and containerd.

The runc container sees the host's /usr, /lib*, /bin, the Python prefix and this repository
read-only, at the same paths (the image holds only /function). Root, after scripts/setup
(Debian's containerd and runc). `--json PATH` writes rows (daemon/bench.py's ShimRow: `runtime`
thaw or runc, `median_ms`, `p90_ms`, `runs`); `--quick`: 3 runs each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/: the private containerd, the OCI archive, a thawd of our own

from daemon import bench  # noqa: E402
from daemon.bench import ShimRow  # noqa: E402
from tests.oci_image import Containerd, containerd, netns, remove_netns, write_image  # noqa: E402
from tests.thawd import Thawd  # noqa: E402

IMAGE = "docker.io/thaw-bench/init:1"
HANDLER = """
import hashlib, os, random, time
t0 = time.perf_counter()
rng = random.Random(7)
STATE = bytearray(rng.randbytes(96 << 20))        # every page written, varied content
DIGEST = hashlib.sha256(STATE).hexdigest()         # a pass over what the init built
INIT_MS = (time.perf_counter() - t0) * 1e3
def handle(event, context):
    return {"statusCode": 200, "body": DIGEST[:16], "headers": {"X-Init-Ms": f"{INIT_MS:.0f}"}}
"""
POLLER = """
import socket, sys, time
sys.stdin.readline()
while True:
    try:
        with socket.create_connection(("127.0.0.1", 8080), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            answer = s.recv(4096)
            if answer.startswith(b"HTTP/1.1 200"):
                init = [h for h in answer.split(b"\\r\\n") if h.lower().startswith(b"x-init-ms:")]
                print(time.time(), init[0].split(b":")[1].strip().decode() if init else "nan", flush=True)
                break
    except OSError:
        time.sleep(0.001)
"""


def start_ms(ctd: Containerd, ns: str, run_args: list[str]) -> tuple[float, float]:
    """One container's start to its first 200, in ms, and the init's duration its answer gives."""
    poller = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", POLLER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert poller.stdin is not None and poller.stdout is not None
        time.sleep(0.1)  # the poller's interpreter is up before the clock starts
        poller.stdin.write("go\n")
        poller.stdin.flush()
        t0 = time.time()
        ctd.ctr("run", "-d", *run_args)
        line = poller.stdout.readline()
        if not line:
            raise RuntimeError("the poller ended without an answer")
        at, init_ms = line.split()
        return (float(at) - t0) * 1e3, float(init_ms)
    finally:
        poller.kill()
        poller.wait()


def remove(ctd: Containerd, container_id: str) -> None:
    ctd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=False)
    deadline = time.monotonic() + 10
    while "RUNNING" in ctd.ctr("task", "ls").stdout and time.monotonic() < deadline:
        time.sleep(0.02)
    ctd.ctr("task", "delete", container_id, check=False)
    ctd.ctr("container", "rm", container_id, check=False)


def runc_args(ns: str, container_id: str) -> list[str]:
    prefix = Path(os.path.realpath(sys.executable)).parent.parent  # the interpreter's installation
    binds = ["/usr", "/lib", "/lib64", "/bin", str(prefix), str(REPO)]
    args = ["--runtime", "io.containerd.runc.v2", "--with-ns", f"network:/run/netns/{ns}"]
    for path in binds:
        if Path(path).exists():
            args += ["--mount", f"type=bind,src={path},dst={path},options=rbind:ro"]
    args += ["--env", f"PYTHONPATH={REPO}", IMAGE, container_id]
    return [*args, sys.executable, "-m", "sandbox.guest.httpmode", "/function", "--port", "8080"]


def thaw_args(ns: str, container_id: str) -> list[str]:
    return ["--runtime", "io.containerd.thaw.v2", "--with-ns", f"network:/run/netns/{ns}", IMAGE, container_id]


def row(runtime: str, times: list[float]) -> ShimRow:
    stats = bench.summarize(times)
    return ShimRow(runtime=runtime, median_ms=round(stats.median, 2), p90_ms=round(stats.p90, 2), runs=stats.runs)


def measure(ctd: Containerd, thawd: Thawd, ns: str, runs: int) -> tuple[list[ShimRow], list[str]]:
    notes = []
    first, _ = start_ms(ctd, ns, thaw_args(ns, "thaw-first"))
    _, info = thawd.api("GET", "/containers/default/thaw-first")
    notes.append(
        f"thaw's first container of the image (deploy: the init {info['init_ms']:.0f} ms, captured, then "
        f"thawed; not in the thaw row): {first:.0f} ms"
    )
    remove(ctd, "thaw-first")
    thaw, runc, runc_inits = [], [], []
    for i in range(runs):  # interleaved, so that both see the same machine
        ms, template_init = start_ms(ctd, ns, thaw_args(ns, f"thaw-{i}"))
        thaw.append(ms)
        _, info = thawd.api("GET", f"/containers/default/thaw-{i}")
        if info["start"] != "thawed":
            raise RuntimeError(f"thaw-{i} was not thawed: {info['start']}")
        remove(ctd, f"thaw-{i}")
        ms, init = start_ms(ctd, ns, runc_args(ns, f"runc-{i}"))
        runc.append(ms)
        runc_inits.append(init)
        remove(ctd, f"runc-{i}")
    notes.append(
        f"the init, as the function measured it: {bench.summarize(runc_inits).median:.0f} ms median in runc's "
        f"containers (each ran it); {template_init:.0f} ms in the template's deploy (thaw's containers skip it)"
    )
    return [row("thaw", thaw), row("runc", runc)], notes


def versions() -> dict[str, str]:
    """The runtimes compared, as installed (Debian's, by scripts/setup)."""
    out = {}
    for name, argv in (("runc", ["runc", "--version"]), ("containerd", ["containerd", "--version"])):
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        out[name] = result.stdout.splitlines()[0] if result.returncode == 0 and result.stdout else "unknown"
    return out


def unmount_under(base: Path) -> None:
    targets = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for target in sorted((t for t in targets if t.startswith(f"{base}/")), reverse=True):
        subprocess.run(["umount", target], check=False, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_shim", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="starts per runtime (default 10)")
    bench.arguments(parser, "bench_shim", "3 starts per runtime")
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 10)
    if os.geteuid() != 0:
        print("bench_shim: needs root (containerd, namespaces, cgroups)", file=sys.stderr)
        return 2
    ns = f"thawbench{os.getpid()}"
    parents_before = set(Path("/sys/fs/cgroup").glob("*/default"))
    with tempfile.TemporaryDirectory(prefix="thaw-bench-shim-") as tmp:
        base = Path(tmp)
        thawd = Thawd(base, "thawbs0", "10.237.0.0/24", sandboxes_prewarm=0)
        thawd.start()
        netns(ns)
        try:
            with containerd(thawd.socket) as ctd:
                write_image(base / "image.tar", IMAGE, {"function/handler.py": HANDLER})
                ctd.ctr("image", "import", str(base / "image.tar"))
                rows, notes = measure(ctd, thawd, ns, runs)
        finally:
            remove_netns(ns)
            thawd.stop()
            thawd.destroy_pool()
            unmount_under(base)  # thawd leaves its pool mounted (it outlives restarts): not ours to keep
            for parent in set(Path("/sys/fs/cgroup").glob("*/default")) - parents_before:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # runc leaves the namespace's cgroup (/default) behind, empty
    print(
        bench.table(
            ("runtime", "median ms", "p90 ms", "runs"), ((r.runtime, r.median_ms, r.p90_ms, r.runs) for r in rows)
        )
    )
    ratio = rows[1].median_ms / rows[0].median_ms
    print(f"runc / thaw: {ratio:.1f}x (target >= 20x)")
    for note in notes:
        print(note)
    conditions = {"runs": runs, "quick": args.quick, "image_init": "96 MiB of varied bytes, hashed", **versions()}
    bench.write(
        args.json, bench.Document("bench_shim", {"shim": rows}, conditions, [*notes, f"runc/thaw {ratio:.1f}x"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Restore benchmark (run it as `scripts/bench_restore`): how long until a function answers.

For guests holding 64 MiB, 256 MiB and 1 GiB of initialized state (every page written with varied
content; 4 GiB too with --large, one run only), on a tmpfs pool bound to node 0:

- cold     spawn the guest, import, init (fill the state), first reply
- copy     restore with anonymous memory filled from the template (what CRIU does), to first reply
- lazy     restore with pages served on fault through userfaultfd, to first reply (the first
           run records the working set; later runs find those pages in the shared cache segment)
- cow      restore with the template's pages mapped copy-on-write, to first reply

With --compressed it measures compressed templates instead (snapshot/compress.py), on a
Python-heavy guest (daemon/examples/records: stdlib imports and 150,000 records; --records to
change): the template's working set is recorded by one lazy restore answering the request, then
the template is compressed with each codec (hot pages = the working set). Each row is a restore
to first reply (`restore_ms`), then the first invocation's own time (`first_invoke_ms`: a request
that reads 20,000 records), for the uncompressed template in cow, copy and lazy mode and for each
compressed one in cow mode, with the cache segment emptied (cold chunks punched) before every run:
the state after an idle spell, when a compressed template earns its keep. `pool_mib` is what the
template holds in the pool at rest (its stored pages, compressed image included). Rows: `mode`,
`codec` (null when uncompressed), `restore_ms`, `first_invoke_ms`, `pool_mib`, `ratio_vs_cow`
(first invocation).

Restores start from a stub that is already stopped (a sandbox keeps them ready), so the time is
restore() + RESTORED + one request and its reply. Rss/Pss are per instance after the first reply;
cow at 256 MiB (or the size nearest it) is also measured with 1, 2, 4 and 8 instances alive
(--instances), each having read all its state (`state_read`). `--threads 1,4,16` adds cow rows at
that size for guests with that many threads (the others parked in a futex wait; `threads` field;
`ratio_vs_cow` there is against the one-thread row). Each figure is the median (and p90)
of --reps runs. Prints a table with the ratios cold/cow and copy/cow; `--json PATH` writes the rows
(daemon/bench.py's RestoreRow, CompressedRow with --compressed) to bench-results/bench_restore.json
(bench_restore_compressed.json with --compressed) by default. `--quick`: 16 and 64 MiB, 3 runs,
1, 2 and 4 instances (--compressed: 20,000 records, 2 runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from daemon import bench
from daemon.bench import CompressedRow, RestoreRow
from native.constants import CloneFlag
from sandbox.guest import protocol
from sandbox.guest.launch import ParkedGuest, recv, start_parked
from shmpool import Pool
from shmpool.codecs import available_codecs, get_codec
from snapshot import procfs
from snapshot.capture import capture
from snapshot.compress import compress
from snapshot.restore import Instance, restore
from snapshot.stub import LaunchedStub, launch_stub
from snapshot.template import Template
from snapshot.vocabulary import RestoreMode

REPO = Path(__file__).resolve().parents[1]
GUEST = """
import os, random, threading
WAITING = threading.Semaphore(0)
def _idle(gate=threading.Event()):
    WAITING.release()
    gate.wait()
THREADS = int(os.environ.get("BENCH_THREADS", "1")) - 1
for _ in range(THREADS):   # parked in a futex wait
    threading.Thread(target=_idle, daemon=True).start()
for _ in range(THREADS):   # each has run to its wait (start() returns before the target runs)
    WAITING.acquire()
RNG = random.Random(int(os.environ["BENCH_SEED"]))
STATE = bytearray(b"".join(RNG.randbytes(1 << 20) for _ in range(int(os.environ["BENCH_MIB"]))))
def handle(event, context):
    return {"ok": True, "pid": context.pid}
"""


def _first_reply(sock: socket.socket) -> None:
    """Send the request at once, as the daemon does (it waits in the socket while the guest
    says RESTORED), then read RESTORED and the reply."""
    protocol.send(sock.fileno(), {"type": "request", "id": 1, "path": "/", "method": "POST", "body": ""})
    restored, reply = recv(sock, 600), recv(sock, 600)
    if restored is None or restored.get("type") != "restored" or reply is None or reply.get("type") != "response":
        raise RuntimeError(f"the guest answered {restored} and {reply}")


def _start(function_dir: Path, mib: int, threads: int = 1) -> ParkedGuest:
    env = {"BENCH_MIB": str(mib), "BENCH_SEED": "1", "BENCH_THREADS": str(threads)}
    return start_parked(function_dir, env, cwd=REPO, timeout=600)


def cold_start(function_dir: Path, mib: int) -> float:
    t0 = time.perf_counter()
    guest = _start(function_dir, mib)
    try:
        os.kill(guest.pid, signal.SIGCONT)  # a cold start does not stop: resume at once
        _first_reply(guest.control)  # RESTORED (the guest says it after any stop), then the reply
        return (time.perf_counter() - t0) * 1e3
    finally:
        guest.kill()


def _memory(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 1024
    return fields["Rss"], fields["Pss"]


def thaw(template: Template, mode: str, namespaces: int = 0) -> tuple[float, Instance, LaunchedStub]:
    stub = launch_stub(template.restore_fds(mode), namespaces=namespaces)
    assert stub.control is not None
    t0 = time.perf_counter()
    instance = restore(template, stub, mode)
    _first_reply(stub.control)
    return (time.perf_counter() - t0) * 1e3, instance, stub


def _close(instance: Instance, stub: LaunchedStub) -> None:
    instance.close()
    if stub.control is not None:
        stub.control.close()


def _row(
    mib: int,
    mode: str,
    times: list[float],
    mem: tuple[float, float],
    instances: int = 1,
    state_read: bool = False,
    threads: int = 1,
) -> RestoreRow:
    stats = bench.summarize(times)
    return RestoreRow(
        size_mib=mib,
        mode=mode,
        threads=threads,
        instances=instances,
        state_read=state_read,
        median_ms=round(stats.median, 3),
        p90_ms=round(stats.p90, 3),
        rss_mib=round(mem[0], 1),
        pss_mib=round(mem[1], 1),
        runs=stats.runs,
        ratio_vs_cow=None,
    )


def measure_restores(template: Template, mib: int, mode: str, reps: int) -> RestoreRow:
    times, mem = [], (0.0, 0.0)
    for _ in range(reps):
        elapsed, instance, stub = thaw(template, mode)
        times.append(elapsed)
        mem = _memory(instance.pid)
        _close(instance, stub)
    return _row(mib, mode, times, mem)


def measure_shared(template: Template, mib: int, count: int) -> RestoreRow:
    """`count` cow instances alive at once, each having read all of its state."""
    alive, times = [], []
    try:
        for _ in range(count):
            elapsed, instance, stub = thaw(template, "cow")
            times.append(elapsed)
            alive.append((instance, stub))
        for instance, _ in alive:  # read every page: Rss is the whole state, Pss its share
            with open(f"/proc/{instance.pid}/mem", "rb") as mem:
                for vma in procfs.read_maps(instance.pid):
                    if vma.size >= mib << 20:
                        mem.seek(vma.start)
                        mem.read(vma.size)
        usage = [_memory(instance.pid) for instance, _ in alive]
        mean = (sum(u[0] for u in usage) / count, sum(u[1] for u in usage) / count)
        return _row(mib, "cow", times, mean, count, state_read=True)
    finally:
        for instance, stub in alive:
            _close(instance, stub)


def bench_size(pool: Pool, function_dir: Path, mib: int, reps: int, shared: list[int]) -> list[RestoreRow]:
    rows = [_row(mib, "cold", [cold_start(function_dir, mib) for _ in range(reps)], (0.0, 0.0))]
    guest = _start(function_dir, mib)
    try:
        rss, pss = _rounded(_memory(guest.pid))
        rows[0] = dataclasses.replace(rows[0], rss_mib=rss, pss_mib=pss)
        template = capture(guest.pid, pool, f"bench-{mib}")
    finally:
        guest.kill()
    try:
        for mode in ("copy", "lazy", "cow"):
            rows.append(measure_restores(template, mib, mode, reps))
            print(f"  {mib} MiB {mode}: {rows[-1].median_ms} ms", file=sys.stderr)
        rows += [measure_shared(template, mib, count) for count in shared]
    finally:
        template.close()
        Template.delete(pool, f"bench-{mib}")
    cow = rows[3].median_ms
    rows[:4] = [dataclasses.replace(r, ratio_vs_cow=round(r.median_ms / cow, 1)) for r in rows[:4]]
    return rows


def bench_threads(pool: Pool, function_dir: Path, mib: int, counts: list[int], reps: int) -> list[RestoreRow]:
    """cow restore to first reply of the guest with `n` threads (n - 1 parked in a futex wait),
    each instance in a pid namespace of its own (where the threads get their TIDs back)."""
    rows = []
    for n in counts:
        guest = _start(function_dir, mib, n)
        try:
            template = capture(guest.pid, pool, f"bench-threads-{n}")
        finally:
            guest.kill()
        try:
            times = []
            for _ in range(reps):
                elapsed, instance, stub = thaw(template, "cow", namespaces=CloneFlag.NEWPID)
                times.append(elapsed)
                mem = _memory(instance.pid)
                _close(instance, stub)
            rows.append(_row(mib, "cow", times, mem, threads=n))
            print(f"  {mib} MiB cow, {n} threads: {rows[-1].median_ms} ms", file=sys.stderr)
        finally:
            template.close()
            Template.delete(pool, f"bench-threads-{n}")
    one = next((r.median_ms for r in rows if r.threads == 1), rows[0].median_ms)
    return [dataclasses.replace(r, ratio_vs_cow=round(r.median_ms / one, 2)) for r in rows]


def _rounded(mem: tuple[float, float]) -> tuple[float, float]:
    return round(mem[0], 1), round(mem[1], 1)


def table(rows: list[RestoreRow]) -> str:
    headers = ("size MiB", "mode", "threads", "instances", "median ms", "p90 ms", "x cow", "Rss MiB", "Pss MiB")
    return bench.table(
        headers,
        (
            (r.size_mib, r.mode, r.threads, r.instances, r.median_ms, r.p90_ms,
             r.ratio_vs_cow if r.mode != "lazy" else None, r.rss_mib, r.pss_mib)
            for r in rows
        ),
    )  # fmt: skip


RECORDS_FUNCTION = REPO / "daemon" / "examples" / "records"


def _request(sock: socket.socket, path: str) -> float:
    """One invocation's round trip in ms."""
    t0 = time.perf_counter()
    protocol.send(sock.fileno(), {"type": "request", "id": 2, "path": path, "method": "POST", "body": ""})
    reply = recv(sock, 600)
    if reply is None or reply.get("type") != "response":
        raise RuntimeError(f"the guest answered {reply}")
    return (time.perf_counter() - t0) * 1e3


def _stored_mib(template: Template) -> float:
    return os.fstat(template.segment.fd).st_blocks * 512 / (1 << 20)


def measure_first_invocations(template: Template, mode: str, codec: str | None, reps: int) -> CompressedRow:
    restores, firsts = [], []
    for _ in range(reps):
        template.punch_cold()  # an empty cache: the template after an idle spell
        elapsed, instance, stub = thaw(template, mode)
        assert stub.control is not None
        restores.append(elapsed)
        firsts.append(_request(stub.control, "/work"))
        _close(instance, stub)
    return CompressedRow(
        mode=mode,
        codec=codec,
        restore_ms=round(bench.median(restores), 3),
        first_invoke_ms=round(bench.median(firsts), 3),
        pool_mib=round(_stored_mib(template), 1),
        runs=reps,
        ratio_vs_cow=1.0,  # set once the uncompressed cow row is measured
    )


def bench_compressed(pool: Pool, function_dir: Path, records: int, reps: int) -> list[CompressedRow]:
    guest = start_parked(function_dir, {"RECORDS": str(records)}, cwd=REPO, timeout=600)
    try:
        template = capture(guest.pid, pool, "heavy")
    finally:
        guest.kill()
    rows = []
    try:
        _, instance, stub = thaw(template, "lazy")  # records the working set: the hot pages
        assert stub.control is not None
        _request(stub.control, "/work")
        _close(instance, stub)
        for mode in RestoreMode:
            rows.append(measure_first_invocations(template, mode, None, reps))
        for codec in available_codecs():
            with compress(pool, "heavy", get_codec(codec)) as z:
                rows.append(measure_first_invocations(z, "cow", codec, reps))
                print(f"  {codec}: {rows[-1]}", file=sys.stderr)
            Template.delete(pool, z.name)
    finally:
        template.close()
        Template.delete(pool, "heavy")
    cow = rows[0].first_invoke_ms
    return [dataclasses.replace(r, ratio_vs_cow=round(r.first_invoke_ms / cow, 2)) for r in rows]


def compressed_table(rows: list[CompressedRow]) -> str:
    headers = ("mode", "codec", "restore ms", "first invoke ms", "x cow", "pool MiB")
    return bench.table(
        headers, ((r.mode, r.codec, r.restore_ms, r.first_invoke_ms, r.ratio_vs_cow, r.pool_mib) for r in rows)
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_restore", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_ints, help="state sizes in MiB (default 64,256,1024)")
    parser.add_argument("--reps", type=int, help="runs per figure (default 10)")
    parser.add_argument("--instances", type=_ints, help="cow instances alive at once at 256 MiB (default 1,2,4,8)")
    parser.add_argument("--large", action="store_true", help="also 4 GiB, one run per mode")
    parser.add_argument(
        "--threads", type=_ints, help="also cow rows for guests of these thread counts at 256 MiB (e.g. 1,4,16)"
    )
    parser.add_argument("--compressed", action="store_true", help="compressed templates vs uncompressed instead")
    parser.add_argument("--records", type=int, help="records in the --compressed guest (default 150000)")
    bench.arguments(parser, "bench_restore", "16 and 64 MiB, 3 runs, 1, 2, 4 instances (--compressed: 20,000 "
                    "records, 2 runs)")  # fmt: skip
    args = parser.parse_args(argv)
    quick = args.quick
    reps = args.reps or (3 if quick else 10)
    if os.geteuid() != 0:
        print("bench_restore: needs root (it mounts a pool and restores with ptrace)", file=sys.stderr)
        return 2
    if args.compressed:
        default = args.json == bench.RESULTS / "bench_restore.json"
        path = bench.RESULTS / "bench_restore_compressed.json" if default else args.json
        records = args.records or (20000 if quick else 150000)
        return main_compressed(records, args.reps or (2 if quick else 10), path)
    chosen = args.sizes or ([16, 64] if quick else [64, 256, 1024])
    sizes = [(mib, reps) for mib in chosen] + ([(4096, 1)] if args.large else [])
    shared_at = min(chosen, key=lambda mib: abs(mib - 256))
    shared = args.instances or ([1, 2, 4] if quick else [1, 2, 4, 8])
    rows: list[RestoreRow] = []
    with tempfile.TemporaryDirectory(prefix="thaw-bench-") as tmp:
        function_dir = Path(tmp) / "fn"
        function_dir.mkdir()
        (function_dir / "handler.py").write_text(GUEST)
        capacity = max(mib for mib, _ in sizes) * 3 << 20
        pool = Pool.create(Path(tmp) / "pool", backend="tmpfs", node=0, size=capacity + (256 << 20))
        try:
            for mib, n in sizes:
                rows.extend(bench_size(pool, function_dir, mib, n, shared if mib == shared_at else []))
            if args.threads:  # x cow of these rows: against the same guest with one thread
                rows.extend(bench_threads(pool, function_dir, shared_at, args.threads, reps))
        finally:
            pool.destroy()
    print(table(rows))
    conditions = {"pool": "tmpfs on node 0", "reps": reps, "sizes_mib": [mib for mib, _ in sizes],
                  "shared_at_mib": shared_at, "quick": quick}  # fmt: skip
    bench.write(args.json, bench.Document("bench_restore", {"restore": rows}, conditions))
    return 0


def main_compressed(records: int, reps: int, json_path: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="thaw-bench-") as tmp:
        pool = Pool.create(Path(tmp) / "pool", backend="tmpfs", node=0, size=4 << 30)
        try:
            rows = bench_compressed(pool, RECORDS_FUNCTION, records, reps)
        finally:
            pool.destroy()
    print(compressed_table(rows))
    conditions = {"pool": "tmpfs on node 0", "reps": reps, "records": records}
    bench.write(json_path, bench.Document("bench_restore_compressed", {"compressed": rows}, conditions))
    return 0


if __name__ == "__main__":
    sys.exit(main())

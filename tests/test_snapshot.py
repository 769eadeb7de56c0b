"""The snapshot engine end to end: real guests captured into a tmpfs pool and restored in every
mode (CRIU-style workloads that set up state, park, and verify themselves after the restore)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from native import ptrace
from native.constants import CloneFlag, Syscall
from native.restorer import STUB_SCRATCH, STUB_SCRATCH_SIZE
from sandbox.guest import protocol
from shmpool import Pool, SegmentCorrupt
from snapshot import procfs
from snapshot.capture import capture
from snapshot.errors import FileChanged, NotCapturable, RestoreError
from snapshot.inject import SyscallInjector, seize_stopped
from snapshot.restore import restore
from snapshot.stub import launch_stub
from snapshot.template import Template
from tests.guests import captured, recv, request, start_guest, thawed

pytestmark = pytest.mark.privileged
MODES = ["cow", "copy", "lazy"]

WORKLOAD = """
import ctypes, decimal, fractions, hashlib, json, os, random, signal, threading, time
import email.parser, xml.dom.minidom                      # imported modules must survive
BIG = bytearray(random.Random(7).randbytes(24 << 20))      # a large buffer, varied content
DIGEST = hashlib.sha256(BIG).hexdigest()
GRAPH = {i: {"id": i, "next": None, "tags": [str(i)] * 3} for i in range(20000)}   # an object graph
for i in range(20000):
    GRAPH[i]["next"] = GRAPH[(i * 7 + 1) % 20000]
GRAPH_SUM = sum(node["next"]["id"] for node in GRAPH.values())
FD = os.open(os.environ["THAW_TEST_FILE"], os.O_RDONLY)   # an open file, half read
HEAD = os.read(FD, 5)
SIGNALS = []
signal.signal(signal.SIGUSR1, lambda signum, frame: SIGNALS.append(signum))
for i in range(int(os.environ.get("THAW_EXTRA_VMAS", "0"))):   # many VMAs: alternate protections
    if i == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        count = int(os.environ["THAW_EXTRA_VMAS"])
        base = libc.mmap(None, 2 * count * 4096, 3, 0x22, -1, 0)
        ctypes.memset(base, 1, 2 * count * 4096)
    libc.mprotect(ctypes.c_void_p(base + 2 * i * 4096), 4096, 1)

def heap_end():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            return int(line.split("-")[1].split()[0], 16)
    return 0

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].split()
    return []

def handle(event, context):
    what = event.path
    if what == "/verify":
        return {
            "big": hashlib.sha256(BIG).hexdigest() == DIGEST,
            "graph": sum(node["next"]["id"] for node in GRAPH.values()) == GRAPH_SUM,
            "modules": str(decimal.Decimal("1.10") + fractions.Fraction(1, 4).numerator)
                       + xml.dom.minidom.parseString("<a>ok</a>").documentElement.firstChild.data,
            "file": [HEAD.decode(), os.lseek(FD, 0, os.SEEK_CUR), os.read(FD, 100).decode()],
            "pid": os.getpid(), "random": random.random(), "uid": os.getuid(),
            "cap_eff": status("CapEff")[0], "no_new_privs": status("NoNewPrivs")[0],
        }
    if what == "/signal":
        os.kill(os.getpid(), signal.SIGUSR1)
        return {"signals": SIGNALS}
    if what == "/thread":
        out = []
        worker = threading.Thread(target=lambda: out.append(sum(range(100000))))
        worker.start(); worker.join()
        return {"result": out, "threads_seen": len(os.listdir("/proc/self/task"))}
    if what == "/brk":
        before = heap_end()
        keep = [bytearray(2000) for _ in range(20000)]   # malloc-sized: grows the brk heap
        return {"grew": heap_end() > before, "kept": len(keep)}
    if what == "/gc":
        import gc
        gc.collect()
        return {"frozen": gc.get_freeze_count()}
    if what == "/time":
        return {"now": time.time(), "monotonic": time.monotonic()}
    if what == "/write":
        BIG[0:4] = b"XXXX"
        return {"head": BIG[0:4].decode()}
    if what == "/read":
        return {"head": BIG[0:4].hex()}
    if what == "/exit":
        os._exit(int(event.body or b"0"))
    return {"unknown": what}
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    root = tmp_path_factory.mktemp("snapshot-pool")
    pool = Pool.create(root / "pool", backend="tmpfs", node=0, size=2 << 30)
    yield pool
    pool.destroy()


@pytest.fixture(scope="module")
def workload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("workload")
    (d / "handler.py").write_text(WORKLOAD)
    (d / "data.txt").write_text("HELLO, restored world")
    return d


@pytest.fixture(scope="module")
def workload(pool: Pool, workload_dir: Path) -> Iterator[Template]:
    template = captured(pool, workload_dir, "workload", {"THAW_TEST_FILE": str(workload_dir / "data.txt")})
    yield template
    template.close()


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("mode", MODES)
def test_workload_state_survives_restore(workload: Template, mode: str) -> None:
    with thawed(workload, mode) as (instance, stub):
        assert stub.control is not None
        state = request(stub.control, "/verify")
        assert state["big"] and state["graph"]
        assert state["modules"] == "2.10ok"
        assert state["file"] == ["HELLO", 5, ", restored world"]
        assert state["pid"] == instance.pid
        assert state["cap_eff"] == "0000000000000000" and state["no_new_privs"] == "1"
        assert state["uid"] == workload.manifest.credentials.uid[0]


@pytest.mark.parametrize("mode", MODES)
def test_signals_threads_brk_time_after_restore(workload: Template, mode: str) -> None:
    with thawed(workload, mode) as (_, stub):
        assert stub.control is not None
        assert request(stub.control, "/signal") == {"signals": [signal.SIGUSR1]}
        threaded = request(stub.control, "/thread")
        assert threaded["result"] == [sum(range(100000))] and threaded["threads_seen"] >= 1
        assert request(stub.control, "/brk") == {"grew": True, "kept": 20000}
        clock = request(stub.control, "/time")
        assert abs(clock["now"] - time.time()) < 5  # the vdso moved with the template works
        assert abs(clock["monotonic"] - time.monotonic()) < 5


@pytest.mark.parametrize("mode", MODES)
def test_exit_status_reaches_the_stub_owner(workload: Template, mode: str) -> None:
    with thawed(workload, mode) as (instance, stub):
        assert stub.control is not None
        protocol.send(stub.control.fileno(), {"type": "request", "id": 1, "path": "/exit", "body": protocol.b64(b"7")})
        assert instance.wait(30) == 7


@pytest.mark.parametrize("mode", MODES)
def test_instances_are_isolated_and_template_untouched(workload: Template, mode: str) -> None:
    with thawed(workload, mode) as (_, a), thawed(workload, mode) as (_, b):
        assert a.control is not None and b.control is not None
        original = request(b.control, "/read")["head"]
        assert request(a.control, "/write") == {"head": "XXXX"}
        assert request(b.control, "/read")["head"] == original
    workload.segment.verify()  # every chunk still matches its checksum
    with thawed(workload, mode) as (_, c):
        assert c.control is not None
        assert request(c.control, "/read")["head"] == original


def _anonymous_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise AssertionError("no Anonymous line in smaps_rollup")


def test_full_gc_in_an_instance_keeps_sharing_the_heap(workload: Template) -> None:
    """The guest freezes its heap before capture: a full collection in an instance does not
    write into (and so copy) every object of the template's ~20 MB object graph."""
    with thawed(workload, "cow") as (instance, stub):
        assert stub.control is not None
        request(stub.control, "/time")
        before = _anonymous_kib(instance.pid)
        assert request(stub.control, "/gc")["frozen"] > 20000
        assert _anonymous_kib(instance.pid) - before < 2048


def test_instances_draw_different_random_numbers(workload: Template) -> None:
    with thawed(workload, "cow") as (_, a), thawed(workload, "cow") as (_, b):
        assert a.control is not None and b.control is not None
        assert request(a.control, "/verify")["random"] != request(b.control, "/verify")["random"]


def test_restore_into_new_namespaces_is_not_pid_1(workload: Template) -> None:
    spaces = CloneFlag.NEWPID | CloneFlag.NEWNS | CloneFlag.NEWUTS | CloneFlag.NEWIPC | CloneFlag.NEWNET
    with thawed(workload, "cow", namespaces=spaces) as (instance, stub):
        assert stub.control is not None
        state = request(stub.control, "/verify")
        assert state["big"] and state["pid"] == 2 and instance.pid != 2
        assert os.readlink(f"/proc/{instance.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")


@pytest.mark.parametrize("mode", MODES)
def test_sixteen_concurrent_restores(workload: Template, mode: str) -> None:
    stubs = [launch_stub(workload.restore_fds(mode)) for _ in range(16)]
    # each restore runs wholly on one thread (ptrace's rule), sixteen threads at once
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        instances = list(pool.map(lambda s: restore(workload, s, mode), stubs))
    try:
        randoms = set()
        for stub in stubs:
            assert stub.control is not None
            hello = recv(stub.control)
            assert hello is not None and hello["type"] == "restored"
            state = request(stub.control, "/verify")
            assert state["big"] and state["graph"]
            randoms.add(state["random"])
        assert len(randoms) == 16
    finally:
        for instance, stub in zip(instances, stubs, strict=True):
            instance.close()
            assert stub.control is not None
            stub.control.close()


def test_lazy_records_working_set_and_later_restores_prefetch(pool: Pool, workload_dir: Path) -> None:
    env = {"THAW_TEST_FILE": str(workload_dir / "data.txt")}
    with captured(pool, workload_dir, "lazy-ws", env) as template:
        with thawed(template, "lazy") as (instance, stub):
            assert stub.control is not None
            assert request(stub.control, "/verify")["big"]
            first = instance.pager_stats()
            assert first is not None and first.faults > 0 and first.pages_served > first.faults  # blocks > 4 KiB
        recorded = template.working_set()
        assert len(recorded) == len(set(recorded)) > 0
        with thawed(template, "lazy") as (instance, stub):
            assert stub.control is not None
            assert request(stub.control, "/verify")["big"]
            later = instance.pager_stats()
            # the shared cache segment already holds every page the first instance used
            assert later is not None and later.faults < first.faults
        Template.delete(pool, "lazy-ws")


def test_restore_round_trips_do_not_grow_with_vmas(pool: Pool, workload_dir: Path) -> None:
    env = {"THAW_TEST_FILE": str(workload_dir / "data.txt")}
    trips = {}
    for extra in (0, 1000):
        with captured(pool, workload_dir, f"vmas-{extra}", {**env, "THAW_EXTRA_VMAS": str(extra)}) as template:
            with thawed(template, "cow") as (instance, stub):
                assert stub.control is not None
                assert request(stub.control, "/verify")["big"]
                trips[extra] = (instance.round_trips, len(template.manifest.vmas))
            Template.delete(pool, f"vmas-{extra}")
    assert trips[1000][1] >= trips[0][1] + 1000
    assert trips[1000][0] == trips[0][0]


def _unmap_premapped_scratch(pid: int) -> None:
    """Make a stub like one that did not map the scratch area itself; leave it stopped."""
    seize_stopped(pid)
    with SyscallInjector(pid) as inj:
        inj.call_ok(Syscall.MUNMAP, STUB_SCRATCH, STUB_SCRATCH_SIZE, what="munmap")
    ptrace.detach(pid, signal.SIGSTOP)
    while procfs.state(pid) != "T":
        time.sleep(0.001)


def test_restore_maps_the_scratch_area_when_the_stub_did_not(workload: Template) -> None:
    trips = {}
    for premapped in (True, False):
        stub = launch_stub(workload.restore_fds("cow"))
        assert stub.control is not None
        assert any(v.start == STUB_SCRATCH for v in procfs.read_maps(stub.pid))
        if not premapped:
            _unmap_premapped_scratch(stub.pid)
        instance = restore(workload, stub, "cow")
        try:
            hello = recv(stub.control)
            assert hello is not None and hello["type"] == "restored"
            assert request(stub.control, "/verify")["big"]
            assert not any(v.start == STUB_SCRATCH for v in procfs.read_maps(instance.pid))
            trips[premapped] = instance.round_trips
        finally:
            instance.close()
            stub.control.close()
    assert trips[False] == trips[True] + 1  # the injected mmap is the one round trip saved


# -- bad inputs ---------------------------------------------------------------------------------
def test_corrupt_segment_is_refused_and_nothing_runs(pool: Pool, workload_dir: Path) -> None:
    env = {"THAW_TEST_FILE": str(workload_dir / "data.txt")}
    captured(pool, workload_dir, "corrupt", env).close()
    key = pool.catalog.lookup("corrupt").storage_key
    path = Path(pool.root) / "segments" / key
    with open(path, "r+b") as f:
        f.seek(5 << 20)
        byte = f.read(1)
        f.seek(5 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = _children()
    with pytest.raises(SegmentCorrupt, match="does not match its checksum"):
        Template.open(pool, "corrupt")
    assert _children() == before
    Template.delete(pool, "corrupt")


def test_changed_library_is_refused_and_stub_killed(pool: Pool, workload_dir: Path, tmp_path: Path) -> None:
    lib = tmp_path / "libcopy.so"
    lib.write_bytes(Path("/lib/x86_64-linux-gnu/libz.so.1").read_bytes())
    fn = tmp_path / "fn"
    fn.mkdir()
    (fn / "handler.py").write_text(
        f"import ctypes\nLIB = ctypes.CDLL({str(lib)!r})\n"
        "def handle(event, context):\n    return LIB.zlibVersion() != 0\n"
    )
    with captured(pool, fn, "libchange") as template:
        with open(lib, "ab") as f:
            f.write(b"\0")  # the library changes under the template
        stub = launch_stub(template.restore_fds("cow"))
        with pytest.raises(FileChanged, match=r"libcopy\.so was modified"):
            restore(template, stub, "cow")
        assert stub.wait(10) is not None  # the stub was killed and reaped
        assert stub.pid not in _children()
    Template.delete(pool, "libchange")


def _function(tmp_path: Path, body: str) -> Path:
    fn = tmp_path / "fn"
    fn.mkdir(exist_ok=True)
    (fn / "handler.py").write_text(body + "\ndef handle(event, context):\n    return 1\n")
    return fn


@pytest.mark.parametrize(
    ("init", "message"),
    [
        (
            "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), name='sleeper').start()",
            r"has 2 threads: \d+ \(python[\d.]*\), \d+ \(python[\d.]*\); a template holds one thread",
        ),
        ("import os\nPIPE = os.pipe()", r"fds a restore cannot recreate: fd \d+ -> pipe:\[\d+\]"),
        ("import mmap\nSHARED = mmap.mmap(-1, 4096)", r"writable shared mapping"),
    ],
    ids=["threads", "pipe-fd", "shared-writable"],
)
def test_uncapturable_guests_are_refused(pool: Pool, tmp_path: Path, init: str, message: str) -> None:
    guest = start_guest(_function(tmp_path, init))
    try:
        with pytest.raises(NotCapturable, match=message):
            capture(guest.pid, pool, "refused")
        assert procfs.state(guest.pid) == "T"  # left parked, as found
    finally:
        guest.kill()
    assert not [r for r in pool.list(include_all=True) if r.name == "refused" and r.state != "deleted"]


def test_running_process_is_refused(pool: Pool) -> None:
    with pytest.raises(NotCapturable, match="is not stopped"):
        capture(os.getpid(), pool, "self")


def test_failed_restore_kills_the_stub(workload: Template) -> None:
    stub = launch_stub(workload.restore_fds("cow")[:1])  # the library fds are missing
    with pytest.raises(RestoreError, match=r"mmap of .* Bad file descriptor"):
        restore(workload, stub, "cow")
    assert stub.wait(10) is not None


BIG_GUEST = """
import random
RNG = random.Random(1)
BIG = bytearray(b"".join(RNG.randbytes(1 << 20) for _ in range(256)))
def handle(event, context):
    return {"sum": sum(BIG[::4096]), "pid": context.pid}
"""


def _memory(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in bytes from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields["Rss"], fields["Pss"]


@pytest.mark.slow
def test_eight_cow_instances_share_the_template(pool: Pool, tmp_path: Path) -> None:
    fn = tmp_path / "big"
    fn.mkdir()
    (fn / "handler.py").write_text(BIG_GUEST)
    with captured(pool, fn, "big") as template:
        instances = []
        try:
            for _ in range(8):
                instances.append(thawed(template, "cow"))
            sums, pids = set(), []
            for ctx in instances:
                instance, stub = ctx.__enter__()
                assert stub.control is not None
                sums.add(request(stub.control)["sum"])  # touches every page of the 256 MiB
                pids.append(instance.pid)
            assert len(sums) == 1
            rss, pss = zip(*(_memory(pid) for pid in pids), strict=True)
            assert min(rss) > 256 << 20
            assert sum(pss) < 2 * rss[0], f"Pss {[p >> 20 for p in pss]} MiB vs Rss {rss[0] >> 20} MiB"
        finally:
            for ctx in instances:
                ctx.__exit__(None, None, None)
    Template.delete(pool, "big")


MODEL_GUEST = """
import torch
torch.manual_seed(0)
MODEL = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
INPUT = torch.randn(4, 64)
with torch.no_grad():
    EXPECTED = MODEL(INPUT).tolist()
def handle(event, context):
    torch.set_num_threads(2)   # thread pools may start after the restore
    with torch.no_grad():
        return {"out": MODEL(INPUT).tolist(), "expected": EXPECTED}
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_torch_model_guest_computes_the_same_outputs(pool: Pool, tmp_path: Path, mode: str) -> None:
    pytest.importorskip("torch", reason="torch is installed by scripts/test (extra 'lora')")
    fn = tmp_path / "model"
    fn.mkdir()
    (fn / "handler.py").write_text(MODEL_GUEST)
    with captured(pool, fn, f"model-{mode}") as template, thawed(template, mode) as (_, stub):
        assert stub.control is not None
        result = request(stub.control)
        assert result["out"] == result["expected"]
    Template.delete(pool, f"model-{mode}")


def test_memfd_pool_restores_in_every_mode(pool_root: Path, workload_dir: Path) -> None:
    env = {"THAW_TEST_FILE": str(workload_dir / "data.txt")}
    memfd_pool = Pool.create(pool_root, backend="memfd", node=0, size=256 << 20)
    try:
        with captured(memfd_pool, workload_dir, "memfd-workload", env) as template:
            for mode in MODES:  # lazy here copies pages privately: a sealed memfd has no cache
                with thawed(template, mode) as (_, stub):
                    assert stub.control is not None
                    assert request(stub.control, "/verify")["big"]
    finally:
        memfd_pool.destroy()


def test_hugetlbfs_pool_refuses_templates(hugetlbfs_pool: Pool, tmp_path: Path) -> None:
    from shmpool import UnsupportedMapping

    guest = start_guest(_function(tmp_path, "X = 1"))
    try:
        with pytest.raises(UnsupportedMapping, match="templates need a pool with 4 KiB pages"):
            capture(guest.pid, hugetlbfs_pool, "huge")
    finally:
        guest.kill()

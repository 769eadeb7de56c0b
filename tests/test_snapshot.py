"""The snapshot engine end to end: real guests captured into a tmpfs pool and restored in every
mode (CRIU-style workloads that set up state, park, and verify themselves after the restore)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from native.constants import CloneFlag
from native.restorer import STUB_SCRATCH
from sandbox.guest import protocol
from shmpool import Pool, PoolFull, SegmentCorrupt
from shmpool.codecs import Codec, IaaCodec, get_codec
from snapshot import procfs
from snapshot.capture import capture
from snapshot.compress import CompressError, compress, expand
from snapshot.errors import FileChanged, NotCapturable, RestoreError, TemplateCorrupt
from snapshot.restore import Instance, restore
from snapshot.stub import LaunchedStub, launch_stub
from snapshot.template import Template
from snapshot.vocabulary import RestoreMode
from tests.damage import flip_byte, segment_path, write_behind
from tests.guests import captured, prepared_stub_facts, recv, request, rss_pss, start_guest, thawed

pytestmark = pytest.mark.privileged
MODES = list(RestoreMode)

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

def heap_end():   # the heap may be several VMAs (registered with userfaultfd in parts)
    heaps = [line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
    ends = [int(line.split("-")[1].split()[0], 16) for line in heaps]
    return max(ends, default=0)

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
            "cap_eff": status("CapEff")[0], "cap_bnd": status("CapBnd")[0],
            "no_new_privs": status("NoNewPrivs")[0],
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


# The workload tests run on the template as captured and on its compressed forms (every codec;
# iaa through the stand-in libqpl). The hot pages are those a lazy restore answering one small
# request touched, so nearly all state is cold and served by decompression on fault.
VARIANTS = ["plain", "lz4", "zstd", "zstd-dict", "deflate", "iaa"]
SOFT = ["lz4", "zstd", "deflate"]


def _codec(variant: str, standin: Path) -> tuple[Codec, int]:
    if variant == "iaa":
        return IaaCodec(library=str(standin)), 0
    if variant == "zstd-dict":
        return get_codec("zstd"), 16 << 10
    return get_codec(variant), 0


@pytest.fixture(scope="module")
def hot_pages(workload: Template) -> list[int]:
    """The pages a lazy restore answering /time faulted (not the template's recorded working set:
    whichever lazy test ran first recorded that)."""
    with thawed(workload, "lazy") as (instance, stub):
        assert request_json(stub, "/time")["now"] > 0
        assert instance.pager is not None
        return instance.pager.working_set()


@pytest.fixture(scope="module")
def compressed(pool: Pool) -> Iterator[dict[str, Template]]:
    made: dict[str, Template] = {}
    yield made
    for template in made.values():
        template.close()
        Template.delete(pool, template.name)


@pytest.fixture(params=VARIANTS)
def any_workload(
    request: pytest.FixtureRequest,
    pool: Pool,
    workload: Template,
    compressed: dict[str, Template],
    hot_pages: list[int],
) -> Template:
    variant = request.param
    if variant == "plain":
        return workload
    if variant not in compressed:
        standin = request.getfixturevalue("standin") if variant == "iaa" else Path()
        codec, dictionary = _codec(variant, standin)
        made = compress(pool, workload.name, codec, f"workload.{variant}", hot=hot_pages, dictionary_size=dictionary)
        compressed[variant] = made
        assert made.manifest.cold is not None and made.manifest.cold.cold_pages > 5 * len(hot_pages)
    return compressed[variant]


def request_json(stub: LaunchedStub, path: str) -> Any:
    assert stub.control is not None
    return request(stub.control, path)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def verified_state(stub: LaunchedStub, instance: Instance) -> dict[str, Any]:
    """The workload's /verify after a restore, its memory, modules, file offset and pid checked."""
    assert stub.control is not None
    state: dict[str, Any] = request(stub.control, "/verify")
    assert state["big"] and state["graph"]
    assert state["modules"] == "2.10ok"
    assert state["file"] == ["HELLO", 5, ", restored world"]
    assert state["pid"] == instance.pid
    return state


@pytest.mark.parametrize("mode", MODES)
def test_any_workload_state_survives_restore(any_workload: Template, mode: str) -> None:
    with thawed(any_workload, mode) as (instance, stub):
        state = verified_state(stub, instance)
        assert state["cap_eff"] == state["cap_bnd"] == "0000000000000000" and state["no_new_privs"] == "1"
        assert state["uid"] == any_workload.manifest.credentials.uid[0]


@pytest.mark.parametrize("mode", MODES)
def test_signals_threads_brk_time_after_restore(any_workload: Template, mode: str) -> None:
    with thawed(any_workload, mode) as (_, stub):
        assert stub.control is not None
        assert request(stub.control, "/signal") == {"signals": [signal.SIGUSR1]}
        threaded = request(stub.control, "/thread")
        assert threaded["result"] == [sum(range(100000))] and threaded["threads_seen"] >= 1
        assert request(stub.control, "/brk") == {"grew": True, "kept": 20000}
        clock = request(stub.control, "/time")
        assert abs(clock["now"] - time.time()) < 5  # the vdso moved with the template works
        assert abs(clock["monotonic"] - time.monotonic()) < 5


@pytest.mark.parametrize("mode", MODES)
def test_exit_status_reaches_the_stub_owner(any_workload: Template, mode: str) -> None:
    with thawed(any_workload, mode) as (instance, stub):
        assert stub.control is not None
        protocol.send(stub.control.fileno(), {"type": "request", "id": 1, "path": "/exit", "body": protocol.b64(b"7")})
        assert instance.wait(30) == 7


@pytest.mark.parametrize("mode", MODES)
def test_instances_are_isolated_and_template_untouched(any_workload: Template, mode: str) -> None:
    with thawed(any_workload, mode) as (_, a), thawed(any_workload, mode) as (_, b):
        assert a.control is not None and b.control is not None
        original = request(b.control, "/read")["head"]
        assert request(a.control, "/write") == {"head": "XXXX"}
        assert request(b.control, "/read")["head"] == original
    any_workload.segment.verify()  # every chunk still matches its checksum
    with thawed(any_workload, mode) as (_, c):
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


def test_a_cow_instance_leaves_its_mapped_pages_as_the_working_set(pool: Pool, workload_dir: Path) -> None:
    """No pager, no faults to record: the template pages a cow instance has mapped are what it used.
    Compressed with that working set, a template restores with its used pages hot."""
    env = {"THAW_TEST_FILE": str(workload_dir / "data.txt")}
    with captured(pool, workload_dir, "cow-ws", env) as template:
        with thawed(template, "cow") as (_, stub):
            assert request_json(stub, "/time")["now"] > 0
        recorded = template.working_set()
        dumped = {r.offset // 4096 + i for _, r in template.manifest.memory.own_runs() for i in range(r.length // 4096)}
        assert recorded and set(recorded) <= dumped and len(recorded) < len(dumped) // 4
        with compress(pool, "cow-ws", get_codec("lz4")) as z:
            assert z.manifest.cold is not None and z.manifest.cold.hot_pages >= len(recorded)
            with thawed(z, "cow") as (instance, stub):
                assert request_json(stub, "/time")["now"] > 0  # the same work: its pages are hot
                stats = instance.pager_stats()
                assert stats is not None and stats.cold_faults < len(z.manifest.cold.chunks) // 20
        Template.delete(pool, "cow-ws.z")
    Template.delete(pool, "cow-ws")


def test_restore_round_trips_do_not_grow_with_vmas(pool: Pool, workload_dir: Path) -> None:
    env = {"THAW_TEST_FILE": str(workload_dir / "data.txt")}
    trips = {}
    for extra in (0, 1000):
        with captured(pool, workload_dir, f"vmas-{extra}", {**env, "THAW_EXTRA_VMAS": str(extra)}) as template:
            with thawed(template, "cow") as (instance, stub):
                assert stub.control is not None
                assert request(stub.control, "/verify")["big"]
                trips[extra] = (instance.round_trips, len(template.manifest.memory.vmas))
            Template.delete(pool, f"vmas-{extra}")
    assert trips[1000][1] >= trips[0][1] + 1000
    assert trips[1000][0] == trips[0][0]


def _cap_bnd(pid: int) -> str:
    return next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("CapBnd:"))


def test_a_stub_reports_its_special_mappings_and_empties_its_bounding_set(workload: Template) -> None:
    stub = launch_stub(workload.restore_fds("cow"))
    try:
        reported, mapped, bounding = prepared_stub_facts(stub.pid)
        assert reported == mapped and set(mapped) == set(workload.manifest.memory.specials)
        assert bounding == "0000000000000000"
    finally:
        stub.kill()
        stub.wait(10)
        assert stub.control is not None
        stub.control.close()


def test_a_bare_stub_is_restored_like_a_prepared_one(workload: Template) -> None:
    """A bare stub maps no scratch area, leaves no report of its special mappings and keeps its
    bounding set, like any program that stops itself: the restore maps the area with an injected
    mmap (the one round trip more), the restorer reads the specials from /proc/self/maps and
    empties the bounding set itself."""
    trips = {}
    for bare in (False, True):
        stub = launch_stub(workload.restore_fds("cow"), bare=bare)
        assert stub.control is not None
        assert any(v.start == STUB_SCRATCH for v in procfs.read_maps(stub.pid)) is not bare
        assert (_cap_bnd(stub.pid) == "0000000000000000") is not bare
        instance = restore(workload, stub, "cow")
        try:
            hello = recv(stub.control)
            assert hello is not None and hello["type"] == "restored"
            state = request(stub.control, "/verify")
            assert state["big"] and state["cap_bnd"] == "0000000000000000"
            assert not any(v.start == STUB_SCRATCH for v in procfs.read_maps(instance.pid))
            trips[bare] = instance.round_trips
        finally:
            instance.close()
            stub.control.close()
    assert trips[True] == trips[False] + 1


@pytest.mark.parametrize("bare", [False, True], ids=["from-report", "from-maps"])
def test_special_mappings_of_another_kernel_are_refused(pool: Pool, workload: Template, bare: bool) -> None:
    other = Template.open(pool, workload.name)  # its own restore plans: the altered manifest's
    try:
        start, end = other.manifest.memory.specials["[vdso]"]
        specials = {**other.manifest.memory.specials, "[vdso]": (start, end + 4096)}
        memory = dataclasses.replace(other.manifest.memory, specials=specials)
        other.manifest = dataclasses.replace(other.manifest, memory=memory)
        stub = launch_stub(other.restore_fds("cow"), bare=bare)
        assert stub.control is not None
        before = _children()
        with pytest.raises(RestoreError, match=r"special mappings in pid \d+ differ .* another kernel"):
            restore(other, stub, "cow")
        assert stub.wait(10) is not None
        assert _children() <= before - {stub.pid}
        stub.control.close()
    finally:
        other.close()


def test_the_stack_below_the_red_zone_is_not_stored(workload: Template) -> None:
    """Init ran deeper than the guest's stack is when it parks: those pages are dead."""
    stack = next(v for v in workload.manifest.memory.vmas if v.stack)
    floor = (workload.manifest.threads.main.registers["rsp"] - 128) & ~(procfs.PAGE - 1)
    assert stack.runs and stack.runs[0].start == floor
    assert sum(run.length for run in stack.runs) <= stack.end - floor


def test_the_affinity_of_stub_and_caller_is_theirs_after_a_restore(workload: Template) -> None:
    """The tracer pins itself and the stub to one CPU both may use for the restore (another than
    its own, when the stub may not use that); both get their own CPUs back."""
    ours = os.sched_getaffinity(0)
    for cpus in (ours, {max(ours)}):
        stub = launch_stub(workload.restore_fds("cow"))
        assert stub.control is not None
        os.sched_setaffinity(stub.pid, cpus)
        instance = restore(workload, stub, "cow")
        try:
            assert os.sched_getaffinity(instance.pid) == cpus
            assert os.sched_getaffinity(0) == ours
            hello = recv(stub.control)
            assert hello is not None and hello["type"] == "restored"
            assert request(stub.control, "/verify")["big"]
        finally:
            instance.close()
            stub.control.close()


# -- compressed templates -----------------------------------------------------------------------
def _blocks(template: Template) -> int:
    return os.fstat(template.segment.fd).st_blocks * 512


def test_cold_pages_are_holes_and_hot_pages_stay(pool: Pool, workload: Template, hot_pages: list[int]) -> None:
    with compress(pool, workload.name, get_codec("zstd"), "holes.z", hot=hot_pages) as z:
        cold = z.manifest.cold
        assert cold is not None and cold.source == workload.name and cold.hot_pages >= len(hot_pages)
        stored = {off // 4096 + i for off, length in z.segment.data_ranges() for i in range(length // 4096)}
        for seg_off, _, length, _ in cold.chunks:
            assert not stored & set(range(seg_off // 4096, (seg_off + length) // 4096))
        assert set(hot_pages) <= stored
        # the object graph and modules compress; the 24 MiB of random bytes do not
        assert _blocks(z) < _blocks(workload)
    Template.delete(pool, "holes.z")


def test_second_instance_shares_what_the_first_decompressed(pool: Pool, workload: Template) -> None:
    with compress(pool, workload.name, get_codec("lz4"), "shared.z", hot=[]) as z:
        with thawed(z, "cow") as (first, a):
            assert request_json(a, "/verify")["graph"]
            first_stats = first.pager_stats()
        with thawed(z, "cow") as (second, b):
            assert request_json(b, "/verify")["graph"]
            second_stats = second.pager_stats()
        assert first_stats is not None and second_stats is not None
        assert first_stats.cold_faults > 100
        # the cache segment holds what the first decompressed, and the second prefetched the rest
        assert second_stats.cold_faults < first_stats.cold_faults // 10
        assert z.cold_image().stats().refills == 0
    Template.delete(pool, "shared.z")


def _wait_idle(pid: int, timeout: float = 10.0) -> None:
    """Until the instance blocks reading its next request (read(2) on fd 3)."""
    deadline = time.monotonic() + timeout
    while not Path(f"/proc/{pid}/syscall").read_text().startswith("0 0x3 "):
        assert time.monotonic() < deadline, f"pid {pid} did not go back to waiting for a request"
        time.sleep(0.001)


def test_punched_pages_refault_and_are_refilled(pool: Pool, workload: Template) -> None:
    with compress(pool, workload.name, get_codec("lz4"), "punch.z", hot=[]) as z, thawed(z, "cow") as (inst, stub):
        assert request_json(stub, "/verify")["big"]
        _wait_idle(inst.pid)  # done with the request: nothing of it touches a page after the punch
        image = z.cold_image()
        resident = image.stats().resident
        assert resident > 0
        cache_before = os.fstat(z.cache().fd).st_blocks
        assert z.punch_cold(older_than=3600) == 0  # nothing is that old
        assert z.punch_cold() >= resident * 4096
        assert image.stats().resident == 0 and os.fstat(z.cache().fd).st_blocks < cache_before
        faults_before = inst.pager_stats()
        state = request_json(stub, "/verify")  # the instance still uses them: it faults again
        assert state["big"] and state["graph"]
        after = inst.pager_stats()
        assert faults_before is not None and after is not None and after.cold_faults > faults_before.cold_faults
        assert image.stats().refills > 0 and after.errors == 0
    Template.delete(pool, "punch.z")


def _pages(template: Template) -> bytes:
    runs = sorted((r.offset, r.length) for _, r in template.manifest.memory.own_runs())
    return b"".join(os.pread(template.segment.fd, n, template.segment.base + off) for off, n in runs)


def test_expand_gives_back_the_captured_pages(pool: Pool, workload: Template, hot_pages: list[int]) -> None:
    compress(pool, workload.name, get_codec("deflate"), "round.z", hot=hot_pages).close()
    with expand(pool, "round.z", "round") as again:
        assert again.manifest.cold is None
        assert _pages(again) == _pages(workload)
        with thawed(again, "cow") as (_, stub):
            assert request_json(stub, "/verify")["graph"]
    with pytest.raises(CompressError, match="not compressed"):
        expand(pool, "round", "round.again")
    Template.delete(pool, "round.z")
    Template.delete(pool, "round")


def _zero_cold_image(pool: Pool, template: Template) -> None:
    """Overwrite every compressed chunk in the pool's file (after the checksums were verified)."""
    assert template.manifest.cold is not None
    chunks = template.manifest.cold.chunks
    start, end = chunks[0][1], chunks[-1][1] + chunks[-1][3]
    write_behind(Path(pool.root) / "segments" / template.segment.record.storage_key, start, bytes(end - start))


def test_a_chunk_that_does_not_decompress_kills_the_instance(pool: Pool, workload: Template) -> None:
    z = compress(pool, workload.name, get_codec("zstd"), "broken.z", hot=[])
    try:
        with thawed(z, "cow") as (instance, stub):
            _zero_cold_image(pool, z)  # the 24 MiB buffer's chunks have not been touched yet
            with contextlib.suppress(OSError, RuntimeError, ValueError, TypeError):
                request_json(stub, "/verify")
            assert instance.wait(30) == -signal.SIGKILL  # never runs on with wrong memory
            stats = instance.pager_stats()
            assert stats is not None and stats.errors >= 1
        with pytest.raises(SegmentCorrupt, match="does not match its checksum"):
            Template.open(pool, "broken.z")  # opened again, it is refused outright
    finally:
        z.close()
        Template.delete(pool, "broken.z")


def test_a_restore_the_pager_cannot_serve_fails_and_leaves_nothing(pool: Pool, workload: Template) -> None:
    with compress(pool, workload.name, get_codec("lz4"), "unservable.z", hot=[]) as z:
        _zero_cold_image(pool, z)  # the restorer itself touches cold pages (the tid, rseq)
        stub = launch_stub(z.restore_fds("cow"))
        with pytest.raises(RestoreError, match="pager could not serve"):
            restore(z, stub, "cow")
        assert stub.wait(5) is not None
        assert stub.control is not None
        stub.control.close()
    Template.delete(pool, "unservable.z")


def test_compress_refuses_bad_requests(pool: Pool, workload: Template) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        compress(pool, workload.name, get_codec("lz4"), "bad.z", chunk_size=5000)
    with pytest.raises(CompressError, match="larger than the pager"):
        compress(pool, workload.name, get_codec("lz4"), "bad.z", chunk_size=2 << 20)
    with pytest.raises(CompressError, match="dictionary is a zstd feature"):
        compress(pool, workload.name, get_codec("lz4"), "bad.z", dictionary_size=4096)
    once = compress(pool, workload.name, get_codec("lz4"), "once.z", hot=[])
    once.close()
    with pytest.raises(CompressError, match="compressed already"):
        compress(pool, "once.z", get_codec("lz4"))
    Template.delete(pool, "once.z")
    assert not [r.name for r in pool.list(include_all=True) if r.name.startswith("bad")]


def test_a_full_pool_says_so_and_keeps_nothing(pool_root: Path, workload_dir: Path) -> None:
    env = {"THAW_TEST_FILE": str(workload_dir / "data.txt")}
    small = Pool.create(pool_root, backend="tmpfs", node=0, size=128 << 20)
    try:
        with captured(small, workload_dir, "full", env) as template:
            status = small.status()
            room = status.capacity - status.used - (2 << 20)
            filler = small.create_segment("filler", room)
            for at in range(0, room - (1 << 20), 1 << 20):
                filler.write(at, random.randbytes(1 << 20))
            with pytest.raises(PoolFull):
                compress(small, template.name, get_codec("lz4"), hot=[])
            filler.abort()
            assert [r.name for r in small.list(include_all=True)] == ["full"]
    finally:
        small.destroy()


def test_an_inconsistent_chunk_table_is_refused(pool: Pool, workload: Template) -> None:
    with compress(pool, workload.name, get_codec("lz4"), "table.z", hot=[]) as z:
        assert z.manifest.cold is not None
        chunks = z.manifest.cold.chunks
        overlapping = dataclasses.replace(z.manifest.cold, chunks=(chunks[1], chunks[0], *chunks[2:]))
        with pytest.raises(TemplateCorrupt, match="overlaps, is out of order"):
            overlapping.check(image_end=z.segment.size)
        outside = dataclasses.replace(z.manifest.cold, chunks=((0, z.segment.size, 4096, 10),))
        with pytest.raises(TemplateCorrupt, match="outside the cold image"):
            outside.check(image_end=z.segment.size)
    Template.delete(pool, "table.z")


# -- bad inputs ---------------------------------------------------------------------------------
def test_corrupt_segment_is_refused_and_nothing_runs(pool: Pool, workload_dir: Path) -> None:
    env = {"THAW_TEST_FILE": str(workload_dir / "data.txt")}
    captured(pool, workload_dir, "corrupt", env).close()
    flip_byte(segment_path(pool, "corrupt"), 5 << 20)
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
        replacement = tmp_path / "libnew.so"
        replacement.write_bytes(lib.read_bytes())
        os.replace(replacement, lib)  # another file under the name, as a package upgrade does
        stub = launch_stub(template.restore_fds("cow"))
        with pytest.raises(FileChanged, match=r"libcopy\.so is another file now"):
            restore(template, stub, "cow")
        assert stub.wait(10) is not None
    Template.delete(pool, "libchange")


def _function(tmp_path: Path, body: str) -> Path:
    fn = tmp_path / "fn"
    fn.mkdir(exist_ok=True)
    (fn / "handler.py").write_text(body + "\ndef handle(event, context):\n    return 1\n")
    return fn


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ("import os\nR, W = os.pipe()\nos.write(W, b'unread')", r"pipe:\[\d+\] \(fd \d+, \d+\) holds 6 unread bytes"),
        ("import os\nR, W = os.pipe()\nos.close(W)", r"holds only one end of pipe:\[\d+\] \(fd \d+\)"),
        ("import socket\nS = socket.socket()", r"fds a restore cannot recreate: fd \d+ -> socket:\[\d+\]"),
        ("import mmap\nSHARED = mmap.mmap(-1, 4096)", r"writable shared mapping"),
    ],
    ids=["unread-pipe", "half-a-pipe", "socket", "shared-writable"],
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
            rss, pss = zip(*(rss_pss(pid) for pid in pids), strict=True)
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
    with captured(pool, fn, f"model-{mode}") as template:
        variants = [template] + [compress(pool, template.name, get_codec(c), f"model-{mode}.{c}", hot=[]) for c in SOFT]
        for variant in variants:  # as captured, then with every page cold under each codec
            with thawed(variant, mode) as (_, stub):
                assert stub.control is not None
                result = request(stub.control)
                assert result["out"] == result["expected"], variant.name
            variant.close()
            Template.delete(pool, variant.name)


def test_memfd_pool_restores_in_every_mode(pool_root: Path, workload_dir: Path) -> None:
    env = {"THAW_TEST_FILE": str(workload_dir / "data.txt")}
    memfd_pool = Pool.create(pool_root, backend="memfd", node=0, size=256 << 20)
    try:
        template = captured(memfd_pool, workload_dir, "memfd-workload", env)
        cold = compress(memfd_pool, template.name, get_codec("lz4"), hot=[])
        for variant, mode in itertools.product((template, cold), MODES):
            # lazy (and every cold page) here is copied privately: a sealed memfd has no cache
            with thawed(variant, mode) as (_, stub):
                assert stub.control is not None
                assert request(stub.control, "/verify")["big"]
        cold.close()
        template.close()
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

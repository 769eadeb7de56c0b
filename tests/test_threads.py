"""Multi-threaded guests, captured with every thread and thawed in every mode (snapshot/threads.py).

Workload guests in the CRIU style: each sets up threads parked in the states real functions park
them in, is captured, thawed, and checks itself after the thaw.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from native.constants import Syscall
from native.ptrace import Registers
from shmpool import Pool
from shmpool.codecs import get_codec
from snapshot import threads
from snapshot.capture import capture
from snapshot.compress import compress
from snapshot.errors import NotCapturable, RestoreError
from snapshot.restore import restore
from snapshot.stub import launch_stub
from snapshot.template import Template
from snapshot.vocabulary import RestoreMode
from tests.guests import captured, request, rss_pss, start_guest, thawed

pytestmark = pytest.mark.privileged
NEWPID = 0x20000000  # a pid namespace per instance: the captured TIDs are free there

PARKED = """
import os, queue, select, signal, threading, time
from concurrent.futures import ThreadPoolExecutor
from sandbox.guest.hooks import register_after_thaw

cond = threading.Condition()
jobs = queue.Queue()
events = {}
read_end, write_end = os.pipe()
held = threading.Lock()
thawed_at = []

@register_after_thaw
def _note_the_thaw():
    thawed_at.append(time.monotonic())

def on_condition():
    with cond:
        cond.wait()
    events["condition"] = True

def on_queue():
    events["queue"] = jobs.get()

finish = threading.Event()

def on_sleep():
    time.sleep(2)
    events["slept_until"] = time.monotonic()
    finish.wait()  # alive until the handler has listed the threads

def on_select():
    select.select([read_end], [], [])
    events["select"] = os.read(read_end, 16).decode()

def holder():
    with held:
        jobs_for_holder.get()

def on_lock():
    with held:
        events["lock"] = True

def on_signal():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    events["signal_to"] = (signal.sigwait({signal.SIGUSR1}), threading.get_native_id())

jobs_for_holder = queue.Queue()
parked = [threading.Thread(target=f, name=f.__name__) for f in (on_condition, on_queue, on_sleep, on_select, holder)]
for t in parked:
    t.start()
time.sleep(0.05)  # holder has the lock before on_lock waits for it
waiting = threading.Thread(target=on_lock, name="on_lock")
waiting.start()
signalled = threading.Thread(target=on_signal, name="on_signal")
signalled.start()
pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pool")
assert sum(pool.map(lambda x: x * x, range(16))) == 1240  # the 4 workers are up
spinner_stop = False
def spinner():  # running user code when the guest parks
    n = 0
    while not spinner_stop:
        n += 1
spinning = threading.Thread(target=spinner, name="spinner", daemon=True)
spinning.start()
time.sleep(0.2)
CAPTURED_TIDS = sorted(t.native_id for t in threading.enumerate())
NAMES = sorted(t.name for t in threading.enumerate())

def handle(event, context):
    names_after_thaw = sorted(t.name for t in threading.enumerate())
    finish.set()
    signal.pthread_kill(signalled.ident, signal.SIGUSR1)
    with cond:
        cond.notify_all()
    jobs.put("job")
    os.write(write_end, b"ping")
    jobs_for_holder.put("release")
    for t in parked + [waiting, signalled]:
        t.join(10)
    fresh = threading.Thread(target=lambda: events.setdefault("fresh_tid", threading.get_native_id()))
    fresh.start()
    fresh.join()
    squares = sum(pool.map(lambda x: x * x, range(100)))
    return {
        "events": events, "names": NAMES, "names_after_thaw": names_after_thaw,
        "captured_tids": CAPTURED_TIDS, "signalled_tid": signalled.native_id,
        "alive": [t.name for t in parked + [waiting, signalled] if t.is_alive()],
        "thawed_at": thawed_at[-1], "squares": squares, "spinner_alive": spinning.is_alive(),
    }
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    pool = Pool.create(tmp_path_factory.mktemp("threads") / "pool", backend="tmpfs", node=0, size=1 << 30)
    yield pool
    pool.destroy()


def _function(base: Path, name: str, source: str) -> Path:
    fn = base / name
    fn.mkdir(exist_ok=True)
    (fn / "handler.py").write_text(source)
    return fn


@pytest.fixture(scope="module")
def parked(pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    template = captured(pool, _function(tmp_path_factory.mktemp("fn"), "parked", PARKED), "parked")
    yield template
    template.close()


def _check_parked_reply(reply: dict[str, Any]) -> None:
    events = reply["events"]
    assert reply["alive"] == [], reply
    assert events["condition"] and events["queue"] == "job" and events["select"] == "ping" and events["lock"]
    # a 2 s sleep begun before the capture ends no later than 2 s after the thaw
    assert events["slept_until"] - reply["thawed_at"] <= 2.5, events
    assert reply["names_after_thaw"] == reply["names"]
    signo, tid = events["signal_to"]
    assert signo == 10 and tid == reply["signalled_tid"]  # pthread_kill reached that very thread
    assert events["fresh_tid"] not in reply["captured_tids"]  # a thread started after the thaw
    assert reply["squares"] == 328350  # the pool's 4 workers serve after the thaw
    assert reply["spinner_alive"]


@pytest.mark.parametrize("variant", ["cow", "copy", "lazy", "zstd"])
def test_every_thread_resumes_from_where_it_was_parked(pool: Pool, parked: Template, variant: str) -> None:
    template, mode = parked, variant
    if variant == "zstd":  # every page cold: the pager serves faults of several threads at once
        template, mode = compress(pool, parked.name, get_codec("zstd"), "parked.zstd", hot=[]), "cow"
    try:
        assert len(template.manifest.threads.others) == 12  # 5 parked, on_lock, on_signal, 4 pool workers, spinner
        with thawed(template, mode, namespaces=NEWPID) as (instance, stub):
            assert stub.control is not None
            _check_parked_reply(request(stub.control))
            stub.control.shutdown(2)  # the guest ends with threads still running (the pool, the spinner)
            assert instance.wait(10) == 0
    finally:
        if template is not parked:
            template.close()
            Template.delete(pool, template.name)


THREADS_N = """
import threading, time
def idle():
    time.sleep(3600)
for i in range({n}):
    threading.Thread(target=idle, daemon=True).start()
def handle(event, context):
    return threading.active_count()
"""


def test_round_trips_of_a_restore_do_not_grow_with_the_thread_count(pool: Pool, tmp_path: Path) -> None:
    trips = {}
    for n in (0, 16):
        with captured(pool, _function(tmp_path, f"t{n}", THREADS_N.format(n=n)), f"threads-{n}") as template:
            assert len(template.manifest.threads.others) == n
            with thawed(template, "cow", namespaces=NEWPID) as (instance, stub):
                assert request(stub.control) == n + 1
                trips[n] = instance.round_trips
        Template.delete(pool, f"threads-{n}")
    assert trips[16] == trips[0], trips


def test_a_taken_tid_fails_the_restore_naming_the_thread(pool: Pool, tmp_path: Path) -> None:
    """Without a pid namespace of its own, the instance needs the TIDs the guest still holds."""
    guest = start_guest(_function(tmp_path, "taken", THREADS_N.format(n=1)))
    try:
        with capture(guest.pid, pool, "taken") as template:
            tid = template.manifest.threads.others[0].tid
            stub = launch_stub(template.restore_fds("cow"))
            with pytest.raises(
                RestoreError, match=rf"creating thread {tid} \(python[\d.]*\) with its TID \(its TID is taken"
            ):
                restore(template, stub, "cow")
            assert stub.wait(5) is not None  # nothing of the failed restore is left running
            if stub.control is not None:
                stub.control.close()
    finally:
        guest.kill()
    Template.delete(pool, "taken")


def test_a_thread_inside_vfork_is_refused() -> None:
    """Re-running vfork after a thaw would start the child again: the capture names the thread."""
    inside = Registers(rax=(-512) & (2**64 - 1), orig_rax=int(Syscall.VFORK))
    with pytest.raises(NotCapturable, match="thread 7 of pid 5 is inside vfork"):
        threads.refuse_forking(5, 7, inside)
    threads.refuse_forking(5, 7, Registers(rax=0, orig_rax=int(Syscall.VFORK)))  # returned: fine


TORCH_GUEST = """
import os, time, torch
torch.manual_seed(0)
torch.set_num_threads(2)
MODEL = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 8))
INPUT = torch.randn(64, 256)
with torch.no_grad():
    EXPECTED = MODEL(INPUT).tolist()   # the warm-up forward starts the intra-op pool
BIG = torch.randn(1500, 1500)

def cpu_times():
    times = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        times[int(tid)] = int(fields[11]) + int(fields[12])  # utime + stime, in ticks
    return times

def handle(event, context):
    before = cpu_times()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        BIG @ BIG
    after = cpu_times()
    busy = sorted(t for t in after if after[t] - before.get(t, 0) > 0)
    with torch.no_grad():
        out = MODEL(INPUT).tolist()
    return {"out": out, "expected": EXPECTED, "threads": torch.get_num_threads(), "busy": len(busy),
            "tids": len(after)}
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(RestoreMode))
def test_a_torch_model_thaws_with_its_intra_op_pool(pool: Pool, tmp_path: Path, mode: str) -> None:
    pytest.importorskip("torch", reason="torch is installed by scripts/test (extra 'lora')")
    with captured(pool, _function(tmp_path, "torch", TORCH_GUEST), f"torch-{mode}") as template:
        assert template.manifest.threads.others, "the warm-up forward started no thread"
        with thawed(template, mode, namespaces=NEWPID) as (_, stub):
            result = request(stub.control)
    Template.delete(pool, f"torch-{mode}")
    assert result["out"] == result["expected"]
    assert result["threads"] == 2
    assert result["busy"] >= 2, result  # the main thread and the pool's thread both computed


BIG_THREADED = """
import os, threading, time
STATE = [os.urandom(1 << 20) for _ in range(256)]   # 256 MiB, every page varied
def idle():
    time.sleep(3600)
for _ in range(4):
    threading.Thread(target=idle, daemon=True).start()
def handle(event, context):
    return sum(sum(s[::4096]) for s in STATE)   # a byte of every page
"""


@pytest.mark.slow
def test_eight_instances_of_a_threaded_guest_share_its_pages(pool: Pool, tmp_path: Path) -> None:
    with captured(pool, _function(tmp_path, "big", BIG_THREADED), "big-threaded") as template:
        assert len(template.manifest.threads.others) == 4
        with contextlib.ExitStack() as stack:
            pids = []
            for _ in range(8):
                instance, stub = stack.enter_context(thawed(template, "cow", namespaces=NEWPID))
                assert isinstance(request(stub.control), int)
                pids.append(instance.pid)
            rss, pss = zip(*(rss_pss(pid) for pid in pids), strict=True)
            assert rss[0] > 256 << 20
            assert sum(pss) < 2 * rss[0], f"Pss {[p >> 20 for p in pss]} MiB vs Rss {rss[0] >> 20} MiB"
    Template.delete(pool, "big-threaded")


def test_manifest_keeps_every_thread(parked: Template) -> None:
    """What the restore reads back is what the capture saw (the manifest round-trips threads)."""
    again = type(parked.manifest).from_json(parked.manifest.to_json())
    assert again.threads == parked.manifest.threads
    first = parked.manifest.threads.others[0]
    assert first.registers["fs_base"] and first.tid_address and first.robust_list[0]
    assert struct.unpack_from("<Q", first.xstate, 464)[0]  # XCR0, from ptrace
    assert json.loads(parked.manifest.to_json())["manifest"]["threads"]["others"][0]["tid"] == first.tid


THREADED_FUNCTION = """
import ctypes, os, threading, time
gate = threading.Event()
def worker():
    gate.wait()
workers = [threading.Thread(target=worker, name=f"w{i}", daemon=True) for i in range(3)]
for w in workers:
    w.start()
TIDS = [w.native_id for w in workers]
CREDENTIALS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "NoNewPrivs")
def handle(event, context):
    time.sleep(0.5)   # held, so concurrent requests thaw instances of their own
    seccomp, credentials = [], []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            status = {key: value.strip() for key, value in (line.split(":", 1) for line in f if ":" in line)}
        seccomp.append(status["Seccomp"])
        credentials.append({key: status[key] for key in CREDENTIALS})
    keepcaps = ctypes.CDLL(None, use_errno=True).prctl(7, 0, 0, 0, 0)  # PR_GET_KEEPCAPS
    return {"tids": [w.native_id for w in workers], "captured": TIDS, "seccomp": seccomp,
            "credentials": credentials, "keepcaps": keepcaps,
            "alive": [w.is_alive() for w in workers], "threads": threading.active_count()}
"""


def test_thawd_thaws_threaded_functions_in_their_sandboxes(tmp_path: Path) -> None:
    """Through thawd: the guest is captured in a sandbox's pid namespace, and concurrent instances
    in other sandboxes get the threads back with the TIDs the guest had there."""
    import asyncio

    from tests.thawd import Thawd, write_function

    daemon = Thawd(tmp_path, "thawh0", "10.243.0.0/24", sandboxes_prewarm=1)
    with daemon.serving():
        daemon.deploy("threaded", write_function(tmp_path / "threaded", THREADED_FUNCTION))

        async def burst() -> list[tuple[int, dict[str, str], bytes]]:
            return await asyncio.gather(*(daemon.request("POST", "/functions/threaded/invoke") for _ in range(4)))

        replies = asyncio.run(burst())
        assert [status for status, _, _ in replies] == [200] * 4, [body[:300] for _, _, body in replies]
        for _, _, body in replies:
            reply = json.loads(body)
            assert reply["tids"] == reply["captured"] and all(reply["alive"]) and reply["threads"] == 4, reply
            assert reply["seccomp"] == ["2"] * 4, reply  # every thread filtered, not only the main one
            # every thread dropped everything, the threads made while the main thread held one
            # capability for clone3 included
            first, *others = reply["credentials"]
            assert first["Uid"].split()[0] != "0" and first["NoNewPrivs"] == "1", first
            assert {first[key] for key in ("CapInh", "CapPrm", "CapEff", "CapBnd")} == {"0000000000000000"}, first
            assert others == [first] * 3 and reply["keepcaps"] == 0, reply
        assert len({i["pid"] for i in daemon.api("GET", "/instances")[1]["instances"]}) > 1


def test_the_model_example_thaws_with_its_thread_pool(tmp_path: Path) -> None:
    """daemon/examples/model, deployed through thawd: captured with torch's pool, thawed with it."""
    pytest.importorskip("torch", reason="torch is installed by scripts/test (extra 'lora')")
    from tests.guests import REPO
    from tests.thawd import Thawd

    daemon = Thawd(tmp_path, "thawm0", "10.244.0.0/24", sandboxes_prewarm=1)
    with daemon.serving():
        daemon.deploy("model", REPO / "daemon" / "examples" / "model")
        status, reply = daemon.invoke("model", [[1.0] * 512, [-1.0] * 512])
        assert status == 200, reply
        assert reply["intra_op_threads"] == 2 and reply["os_threads"] >= 2, reply
        assert len(reply["argmax"]) == 2

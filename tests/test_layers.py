"""Layered templates (snapshot/pages.py): a runtime template, children that store only what their
init wrote, children of children, duplicates and zero pages stored once, and a parent the pool
keeps while a child needs it. Real guests, captured into a tmpfs pool, restored in every mode."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.guest.launch import become, start_parked, wait_stopped
from shmpool import Pool, SegmentInUse
from shmpool.codecs import get_codec
from snapshot.capture import capture
from snapshot.compress import compress
from snapshot.errors import ParentUnusable
from snapshot.restore import restore
from snapshot.stub import launch_stub
from snapshot.template import Template
from snapshot.vocabulary import RestoreMode
from tests.damage import flip_byte, segment_path
from tests.guests import REPO, captured, recv, request, rss_pss, thawed
from tests.test_snapshot import WORKLOAD, verified_state

pytestmark = pytest.mark.privileged
MODES = list(RestoreMode)
PRELOAD = ["decimal", "email.parser", "fractions", "hashlib", "json", "xml.dom.minidom"]
SMALL = """
import json
STATE = {"name": NAME, "items": [i * i for i in range(2000)]}
def handle(event, context):
    return {"name": STATE["name"], "sum": sum(STATE["items"]), "json": json.dumps([1])}
"""
# Two equal 4 MiB page-aligned buffers (the second a copy of the first, as equal weights loaded
# twice would be) and 4 MiB written, then zeroed.
DUPLICATES = """
import hashlib, mmap, os
PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
A = mmap.mmap(-1, 4 << 20, flags=PRIVATE)
A.write(os.urandom(4 << 20))
B = mmap.mmap(-1, 4 << 20, flags=PRIVATE)
B.write(A[:])
Z = mmap.mmap(-1, 4 << 20, flags=PRIVATE)
Z.write(os.urandom(4 << 20))
Z.seek(0)
Z.write(bytes(4 << 20))
def handle(event, context):
    return {"equal": A[:] == B[:], "digest": hashlib.sha256(B).hexdigest() == hashlib.sha256(A).hexdigest(),
            "zeros": not any(Z[:]), "length": len(Z)}
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    root = tmp_path_factory.mktemp("layers-pool")
    pool = Pool.create(root / "pool", backend="tmpfs", node=0, size=2 << 30)
    yield pool
    pool.destroy()


def function_dir(root: Path, source: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "handler.py").write_text(source)
    (root / "data.txt").write_text("HELLO, restored world")
    return root


@pytest.fixture(scope="module")
def workload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return function_dir(tmp_path_factory.mktemp("layered-workload"), WORKLOAD)


@pytest.fixture(scope="module")
def runtime(pool: Pool) -> Iterator[Template]:
    guest = start_parked(None, cwd=REPO, preload=PRELOAD)
    try:
        template = capture(guest.pid, pool, "runtime", dense=True)
    finally:
        guest.kill()
    yield template
    template.close()


def layered(pool: Pool, parent: Template, name: str, message: dict[str, object], env: dict[str, str]) -> Template:
    """Thaw `parent` (a runtime, or a base), tell its instance what to become, capture the child."""
    stub = launch_stub(parent.restore_fds("cow"))
    assert stub.control is not None
    instance = restore(parent, stub, "cow")
    try:
        assert recv(stub.control) == {"type": "restored", "pid": instance.pid}
        become(stub.control, {**message, "env": env})
        wait_stopped(instance.pid)
        return capture(instance.pid, pool, name, parent=parent, dense=True)
    finally:
        instance.close()
        stub.control.close()


def load(function: Path) -> dict[str, object]:
    return {"type": "load", "function_dir": str(function), "handler": "handler:handle"}


def workload_env(workload_dir: Path) -> dict[str, str]:
    return {"THAW_TEST_FILE": str(workload_dir / "data.txt")}


@pytest.fixture(scope="module")
def child(pool: Pool, runtime: Template, workload_dir: Path) -> Iterator[Template]:
    template = layered(pool, runtime, "child", load(workload_dir), workload_env(workload_dir))
    yield template
    template.close()


@pytest.fixture(scope="module")
def base(pool: Pool, runtime: Template) -> Iterator[Template]:
    """A child of the runtime that imported more (a team's common stack), parked for its own children."""
    template = layered(pool, runtime, "base", {"type": "preload", "modules": ["sqlite3", "statistics"]}, {})
    yield template
    template.close()


@pytest.fixture(scope="module")
def grandchild(pool: Pool, base: Template, workload_dir: Path) -> Iterator[Template]:
    template = layered(pool, base, "grandchild", load(workload_dir), workload_env(workload_dir))
    yield template
    template.close()


@pytest.fixture(scope="module")
def compressed_child(pool: Pool, child: Template) -> Iterator[Template]:
    template = compress(pool, child.name, get_codec("zstd"), "child.z", hot=[])
    yield template
    template.close()


@pytest.fixture(params=["child", "grandchild", "compressed_child"])
def any_child(request: pytest.FixtureRequest, pool: Pool) -> Template:  # the pool (a mount) first
    template: Template = request.getfixturevalue(request.param)
    return template


@pytest.mark.parametrize("mode", MODES)
def test_a_child_restores_in_every_mode(any_child: Template, mode: str) -> None:
    with thawed(any_child, mode) as (instance, stub):
        verified_state(stub, instance)
        assert stub.control is not None
        assert request(stub.control, "/brk") == {"grew": True, "kept": 20000}
        assert request(stub.control, "/thread")["result"] == [sum(range(100000))]


def test_a_child_stores_only_what_its_init_wrote(
    pool: Pool, runtime: Template, child: Template, grandchild: Template, workload_dir: Path
) -> None:
    assert [layer.name for layer in child.manifest.memory.layers] == ["runtime"]
    assert child.parent == "runtime" and grandchild.parent == "base"
    assert {layer.name for layer in grandchild.manifest.memory.layers} <= {"base", "runtime"}
    from_parent = sum(r.length for v in child.manifest.memory.vmas for r in v.runs if r.layer)
    assert from_parent > runtime.manifest.data_bytes // 2  # most of the runtime is the child's too
    with captured(pool, workload_dir, "cold", workload_env(workload_dir)) as cold:
        stored = {t.name: _stored_bytes(pool, t.name) for t in (cold, child)}
    Template.delete(pool, "cold")
    assert stored["child"] < stored["cold"] - _stored_bytes(pool, "runtime") // 4, stored


def test_two_functions_share_their_parents_pages(pool: Pool, runtime: Template, tmp_path: Path) -> None:
    one = layered(pool, runtime, "one", load(function_dir(tmp_path / "one", "NAME = 'one'\n" + SMALL)), {})
    two = layered(pool, runtime, "two", load(function_dir(tmp_path / "two", "NAME = 'two'\n" + SMALL)), {})
    try:
        with thawed(one, "cow") as (a, sa), thawed(two, "cow") as (b, sb):
            assert sa.control is not None and sb.control is not None
            assert request(sa.control)["name"] == "one" and request(sb.control)["name"] == "two"
            rss_a, pss_a = rss_pss(a.pid)
            rss_b, pss_b = rss_pss(b.pid)
            # pages of the runtime that both map count half in each one's Pss
            assert pss_a + pss_b < (rss_a + rss_b) * 0.8, (rss_a, pss_a, rss_b, pss_b)
            shared = _parent_pages_mapped(a.pid, runtime) & _parent_pages_mapped(b.pid, runtime)
            assert len(shared) > 100
    finally:
        for t in (one, two):
            t.close()
            Template.delete(pool, t.name)


def test_a_parent_with_a_live_child_cannot_be_deleted(pool: Pool, runtime: Template, tmp_path: Path) -> None:
    parent = layered(pool, runtime, "parent", {"type": "preload", "modules": ["csv"]}, {})
    kid = layered(pool, parent, "kid", load(function_dir(tmp_path, "NAME = 'kid'\n" + SMALL)), {})
    kid.close()
    parent.close()
    with pytest.raises(SegmentInUse, match="'parent' is needed by kid"):
        Template.delete(pool, "parent")
    assert pool.needed_by("parent") == ["kid"]
    Template.delete(pool, "kid")
    Template.delete(pool, "parent")  # nothing needs it any more
    assert "parent" not in {r.name for r in pool.list()}


def test_a_child_whose_parent_is_damaged_is_refused(pool: Pool, runtime: Template, tmp_path: Path) -> None:
    parent = layered(pool, runtime, "fragile", {"type": "preload", "modules": ["csv"]}, {})
    kid = layered(pool, parent, "orphan", load(function_dir(tmp_path, "NAME = 'orphan'\n" + SMALL)), {})
    kid.close()
    offset = next(r.offset for _, r in parent.manifest.memory.own_runs())
    parent.close()
    flip_byte(segment_path(pool, "fragile"), offset + 100)
    with pytest.raises(ParentUnusable, match=r"layered on 'fragile', which cannot be used: .*checksum"):
        Template.open(pool, "orphan")
    Template.delete(pool, "orphan")
    Template.delete(pool, "fragile")


def test_duplicates_and_zero_pages_are_stored_once(pool: Pool, tmp_path: Path) -> None:
    unlike = DUPLICATES.replace("B.write(A[:])", "B.write(os.urandom(4 << 20))").replace("Z.write(bytes(4 << 20))", "")
    with captured(pool, function_dir(tmp_path / "unlike", unlike), "unlike") as different:
        all_stored = different.manifest.data_bytes
    Template.delete(pool, "unlike")
    with captured(pool, function_dir(tmp_path / "dups", DUPLICATES), "dups") as template:
        # A is stored, B refers to A's pages, Z's zeros are stored nowhere: 8 of the 12 MiB saved
        assert all_stored - template.manifest.data_bytes > 7.5 * (1 << 20), (all_stored, template.manifest.data_bytes)
        assert _stored_bytes(pool, "dups") <= template.manifest.data_bytes + (64 << 10)
        for mode in MODES:
            with thawed(template, mode) as (_, stub):
                assert stub.control is not None
                assert request(stub.control) == {"equal": True, "digest": True, "zeros": True, "length": 4 << 20}
    Template.delete(pool, "dups")


def _stored_bytes(pool: Pool, name: str) -> int:
    """What the segment holds in the pool's memory (a sparse file's holes hold nothing)."""
    return os.stat(segment_path(pool, name)).st_blocks * 512


def _parent_pages_mapped(pid: int, parent: Template) -> set[int]:
    """Physical frames of the parent's segment that `pid` maps (pagemap, by root)."""
    st = os.fstat(parent.segment.fd)
    frames: set[int] = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) < 6 or int(fields[4]) != st.st_ino:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        with open(f"/proc/{pid}/pagemap", "rb") as f:
            f.seek(start // 4096 * 8)
            raw = f.read((end - start) // 4096 * 8)
        for i in range(0, len(raw), 8):
            entry = int.from_bytes(raw[i : i + 8], "little")
            if entry >> 63 and entry >> 61 & 1:  # present, and the file's page
                frames.add(entry & ((1 << 55) - 1))
    return frames


def test_a_child_whose_parent_was_replaced_or_removed_is_refused(pool: Pool, runtime: Template, tmp_path: Path) -> None:
    parent = layered(pool, runtime, "replaced", {"type": "preload", "modules": ["csv"]}, {})
    kid = layered(pool, parent, "stranded", load(function_dir(tmp_path, "NAME = 'stranded'\n" + SMALL)), {})
    kid.close()
    parent.close()
    pool.delete("replaced", force=True)  # a quarantine's delete: out of the namespace, needed or not
    with pytest.raises(ParentUnusable, match="layered on 'replaced', which is not in the pool"):
        Template.open(pool, "stranded")
    layered(pool, runtime, "replaced", {"type": "preload", "modules": ["json"]}, {}).close()
    with pytest.raises(ParentUnusable, match="on another image of 'replaced' than the pool holds"):
        Template.open(pool, "stranded")
    Template.delete(pool, "stranded")
    Template.delete(pool, "replaced")


def test_a_restore_from_a_process_holding_a_thousand_fds(pool: Pool, child: Template) -> None:
    """The stub is handed fds whose numbers overlap the 1000+ slots they move to, and the control
    socket lands past 1023 (where select() gives up)."""
    fillers = []
    try:
        while (fd := os.open("/dev/null", os.O_RDONLY)) < 990:
            fillers.append(fd)
        fillers.append(fd)
        with Template.open(pool, child.name, verify=False) as again:
            assert min(again.restore_fds("cow")) < 1000 < max(again.restore_fds("cow"))
            with thawed(again, "cow") as (instance, stub):
                verified_state(stub, instance)
    finally:
        for fd in fillers:
            os.close(fd)

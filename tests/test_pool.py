"""The pool as users meet it: real tmpfs and hugetlbfs mounts, real processes crashing and racing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

from native.kerndat import kerndat
from shmpool.catalog import Holder
from shmpool.errors import (
    HugepagesUnavailable,
    InvalidName,
    PoolError,
    PoolExists,
    PoolFull,
    PoolNotFound,
    SegmentCorrupt,
    SegmentExists,
    SegmentNotFound,
    UnknownNode,
    UnsupportedMapping,
)
from shmpool.pool import Pool
from tests.conftest import run_python, spawn_python
from tests.damage import write_behind

pytestmark = pytest.mark.privileged
MiB = 1 << 20


def varied(n: int, seed: int = 0) -> bytes:
    """n bytes that differ page to page (an all-zero buffer would hide placement and sparseness bugs)."""
    block = os.urandom(64 << 10) if seed == 0 else bytes((seed * 31 + i) % 251 for i in range(64 << 10))
    return (block * (n // len(block) + 1))[:n]


def publish(pool: Pool, name: str, data: bytes, **kw: object) -> None:
    with pool.create_segment(name, len(data)) as w:
        w.write(0, data)
        w.publish(**kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# lifetime and placement


def test_tmpfs_pool_create_use_destroy(pool_root: Path) -> None:
    pool = Pool.create(pool_root, backend="tmpfs", node=0, size=32 * MiB)
    assert os.path.ismount(pool_root)
    assert "mpol=bind:0" in Path("/proc/self/mounts").read_text().split(str(pool_root))[1].splitlines()[0]
    st = pool.status()
    assert (st.backend, st.node, st.capacity) == ("tmpfs", 0, 32 * MiB)
    assert st.capabilities.private_cow and st.capabilities.sparse
    with pytest.raises(PoolExists):
        Pool.create(pool_root, size=MiB)
    data = varied(3 * MiB)
    publish(pool, "one", data)
    again = Pool(pool_root)  # a second attachment sees the same catalog
    with again.open_segment("one") as seg:
        assert seg.read_chunk(0) == data[: seg.record.chunk_size]
    again.close()
    pool.destroy()
    assert not pool_root.exists()
    with pytest.raises(PoolNotFound):
        Pool(pool_root)


def test_tmpfs_pages_are_on_the_pool_node_and_segments_stay_sparse(tmpfs_pool: Pool) -> None:
    with tmpfs_pool.create_segment("sparse", 16 * MiB) as w:
        w.write(0, varied(MiB))
        w.write(8 * MiB, varied(64 << 10))
        w.publish()
    with tmpfs_pool.open_segment("sparse") as seg:
        assert seg.data_ranges() == [(0, MiB), (8 * MiB, 64 << 10)]  # the holes were never filled in
        assert seg.placement() == {0: (MiB + (64 << 10)) // 4096}
    assert tmpfs_pool.status().used < 4 * MiB


def test_copy_on_write_mapping_leaves_the_pool_unchanged(tmpfs_pool: Pool) -> None:
    data = varied(MiB)
    publish(tmpfs_pool, "cow", data)
    with tmpfs_pool.open_segment("cow") as seg:
        with seg.map(private=True) as view:
            view[:4] = b"MINE"
            assert view[:4] == b"MINE"
        with seg.map(private=True, writable=False) as other:
            assert other[:4] == data[:4]
        seg.verify()


def test_hugetlbfs_pool_reserves_and_returns_hugepages(hugetlbfs_pool: Pool) -> None:
    nr = Path("/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages")
    assert hugetlbfs_pool.config.hugepages_reserved == 8 and int(nr.read_text()) >= 8
    st = hugetlbfs_pool.status()
    assert st.capacity == 16 * MiB and st.page_size == 2 * MiB and not st.capabilities.sparse
    data = varied(3 * MiB, seed=3)
    publish(hugetlbfs_pool, "huge", data)
    with hugetlbfs_pool.open_segment("huge") as seg:
        assert seg.placement() == {0: 2}  # two 2 MiB pages, both on node 0
        with seg.map(private=True) as view:
            assert view[: 3 * MiB] == data
    # The fixture's destroy gives the 8 pages back; the no_leaks fixture checks it.


def test_unavailable_hugepage_size_is_a_clear_error(pool_root: Path) -> None:
    with pytest.raises(HugepagesUnavailable, match="this kernel has no 4096 KiB hugepages"):
        Pool.create(pool_root, backend="hugetlbfs", size=8 * MiB, page_size=4 * MiB)
    assert not pool_root.exists()


def test_published_segments_cannot_be_mapped_shared_writable(tmpfs_pool: Pool) -> None:
    publish(tmpfs_pool, "frozen", b"f" * 4096)
    with tmpfs_pool.open_segment("frozen") as seg, pytest.raises(PoolError, match="immutable"):
        seg.map(private=False, writable=True)


def test_published_segment_files_refuse_writes_even_from_root(tmpfs_pool: Pool) -> None:
    """Nothing thaw runs, root included, can change a published segment; deleting still frees it."""
    publish(tmpfs_pool, "sealed", varied(MiB))
    path = tmpfs_pool.backend.data_dir / tmpfs_pool.catalog.lookup("sealed").storage_key  # type: ignore[attr-defined]
    assert os.geteuid() == 0
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
        with pytest.raises(PermissionError):
            os.open(path, flags)
    with pytest.raises(PermissionError):
        path.unlink()
    with pytest.raises(PermissionError):
        os.truncate(path, 0)
    cache = tmpfs_pool.open_cache("sealed.cache", MiB)  # a cache is mutable by design
    os.close(os.open(tmpfs_pool.backend.data_dir / cache.record.storage_key, os.O_RDWR))  # type: ignore[attr-defined]
    cache.close()
    tmpfs_pool.delete("sealed")
    tmpfs_pool.delete("sealed.cache")
    assert not path.exists()
    assert tmpfs_pool.list(include_all=True) == []


def test_unknown_node_is_refused_before_anything_is_mounted(pool_root: Path) -> None:
    with pytest.raises(UnknownNode, match=r"NUMA node 99 is not an online node with memory"):
        Pool.create(pool_root, node=99, size=MiB)
    assert not pool_root.exists()


def test_second_numa_node_placement(pool_root: Path) -> None:
    nodes = kerndat().node_ids
    if len(nodes) < 2:
        pytest.skip(f"needs a second NUMA node with memory (kerndat: nodes {nodes})")
    far = nodes[-1]
    pool = Pool.create(pool_root, node=far, size=16 * MiB)
    try:
        publish(pool, "far", varied(MiB))
        assert pool.placement("far") == {far: MiB // 4096}
    finally:
        pool.destroy()


def test_devdax_pool_maps_shared_only(pool_root: Path) -> None:
    devices = kerndat().devdax
    if not devices:
        pytest.skip("needs a devdax device (kerndat: no /sys/bus/dax/devices/dax*)")
    pool = Pool.create(pool_root, backend="devdax", node=0, size=0, device=devices[0].path)
    try:
        data = varied(pool.config.page_size)
        publish(pool, "dax", data)
        with pool.open_segment("dax") as seg:
            with seg.map(private=False, writable=False) as view:
                assert view[: len(data)] == data
            with pytest.raises(UnsupportedMapping):
                seg.map(private=True)
        pool.delete("dax")
    finally:
        pool.destroy()


# ---------------------------------------------------------------------------------------------
# atomic publish, crashes, garbage collection

WRITER = """
    import sys, time
    from shmpool.pool import Pool
    pool = Pool(sys.argv[1])
    w = pool.create_segment("victim", 32 << 20)
    w.write(0, b"v" * (8 << 20))
    print("written", flush=True)
    time.sleep(120)
"""


def test_writer_killed_mid_write_leaves_nothing_visible_and_gc_reclaims(tmpfs_pool: Pool) -> None:
    baseline = tmpfs_pool.status().used
    writer = spawn_python(WRITER, str(tmpfs_pool.root))
    assert writer.stdout is not None and writer.stdout.readline().strip() == "written"
    assert tmpfs_pool.status().used >= baseline + 8 * MiB
    with pytest.raises(SegmentNotFound):
        tmpfs_pool.open_segment("victim")
    assert [o.state for o in tmpfs_pool.list(include_all=True)] == ["writing"]

    writer.send_signal(signal.SIGKILL)
    writer.wait()
    report = tmpfs_pool.gc()
    assert report.abandoned_writes == 1 and report.holders_expired == 1
    assert tmpfs_pool.list(include_all=True) == []
    assert list(tmpfs_pool.backend.data_dir.iterdir()) == []  # type: ignore[attr-defined]
    assert tmpfs_pool.status().used <= baseline
    publish(tmpfs_pool, "victim", b"reused name")  # the name is free again


def test_gc_removes_orphan_storage(tmpfs_pool: Pool) -> None:
    # What a crash between the rename and the catalog commit would leave (the transaction
    # prevents it; GC still cleans up anything no row points at).
    orphan = tmpfs_pool.backend.data_dir / "stray-0123456789ab"  # type: ignore[attr-defined]
    orphan.write_bytes(b"x" * 4096)
    publish(tmpfs_pool, "kept", b"k" * 4096)
    report = tmpfs_pool.gc()
    assert report.orphans_removed == 1 and not orphan.exists()
    assert [o.name for o in tmpfs_pool.list()] == ["kept"]


def test_unpinned_segment_dies_with_its_holder(tmpfs_pool: Pool) -> None:
    run_python(
        """
        import sys
        from shmpool.pool import Pool
        pool = Pool(sys.argv[1])
        with pool.create_segment("leased", 4096) as w:
            w.write(0, b"l" * 4096)
            w.publish(pin=False)
        with pool.create_segment("pinned", 4096) as w:
            w.write(0, b"p" * 4096)
            w.publish()
        """,
        str(tmpfs_pool.root),
    )
    assert {o.name for o in tmpfs_pool.list()} == {"leased", "pinned"}
    report = tmpfs_pool.gc()
    assert report.holders_expired == 1 and report.objects_freed == 1
    assert [o.name for o in tmpfs_pool.list()] == ["pinned"]


def test_lease_of_a_remote_holder_expires(tmpfs_pool: Pool) -> None:
    publish(tmpfs_pool, "shared", b"s" * 4096)
    remote = Holder("another-host", 4242, 1.0)  # cannot be checked locally: only its lease counts
    tmpfs_pool.catalog.renew(remote, ttl=30)
    tmpfs_pool.catalog.acquire("shared", remote, pin=False)
    assert tmpfs_pool.gc().holders_expired == 0
    assert tmpfs_pool.list()[0].refs == 2
    tmpfs_pool.catalog.renew(remote, ttl=-1)  # it stopped renewing
    assert tmpfs_pool.gc().holders_expired == 1
    assert tmpfs_pool.list()[0].refs == 1


def test_delete_while_open_keeps_bytes_until_release(tmpfs_pool: Pool) -> None:
    data = varied(MiB)
    publish(tmpfs_pool, "busy", data)
    seg = tmpfs_pool.open_segment("busy")
    tmpfs_pool.delete("busy")
    with pytest.raises(SegmentNotFound):
        tmpfs_pool.open_segment("busy")
    assert [o.state for o in tmpfs_pool.list(include_all=True)] == ["deleted"]
    assert seg.read_chunk(3) == data[3 * seg.record.chunk_size : 4 * seg.record.chunk_size]
    seg.close()
    assert tmpfs_pool.gc().objects_freed == 1
    assert tmpfs_pool.list(include_all=True) == []


CHURN = """
    import os, sys
    from shmpool.pool import Pool
    pool = Pool(sys.argv[1])
    me = sys.argv[2]
    for i in range(12):
        name = f"{me}-{i}"
        data = os.urandom(4096) * (1 + i % 5) * 16
        with pool.create_segment(name, len(data)) as w:
            w.write(0, data)
            w.publish()
        with pool.open_segment(name) as seg:
            assert seg.read_chunk(0) == data[: seg.record.chunk_size]
        pool.delete(name)
    pool.gc()
    print("done", flush=True)
"""


@pytest.mark.slow
def test_concurrent_processes_allocating_and_freeing_leave_nothing(tmpfs_pool: Pool) -> None:
    baseline = tmpfs_pool.status().used
    workers = [spawn_python(CHURN, str(tmpfs_pool.root), f"w{n}") for n in range(6)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * 6, outputs
    tmpfs_pool.gc()
    assert tmpfs_pool.list(include_all=True) == []
    assert list(tmpfs_pool.backend.data_dir.iterdir()) == []  # type: ignore[attr-defined]
    assert tmpfs_pool.status().used <= baseline
    refs = tmpfs_pool.catalog.db.execute("SELECT COUNT(*) FROM refs").fetchone()[0]
    assert refs == 0


# ---------------------------------------------------------------------------------------------
# bad input


def test_flipped_byte_is_caught_by_its_chunk_checksum(tmpfs_pool: Pool) -> None:
    data = varied(2 * MiB)
    publish(tmpfs_pool, "flip", data)
    record = tmpfs_pool.list()[0]
    path = tmpfs_pool.backend.data_dir / record.storage_key  # type: ignore[attr-defined]
    offset = 3 * record.chunk_size + 1234
    write_behind(path, offset, bytes([data[offset] ^ 0x01]))
    with pytest.raises(SegmentCorrupt, match=r"segment 'flip' chunk 3 .* does not match its checksum"):
        tmpfs_pool.open_segment("flip")
    with tmpfs_pool.open_segment("flip", verify=False) as seg:
        assert seg.read_chunk(2) == data[2 * record.chunk_size : 3 * record.chunk_size]  # others still fine
        with pytest.raises(SegmentCorrupt):
            seg.read_chunk(3)
    assert tmpfs_pool.list()[0].refs == 1  # the failed open released its lease


def test_full_tmpfs_pool_says_so_and_keeps_nothing_half_written(pool_root: Path) -> None:
    pool = Pool.create(pool_root, size=16 * MiB)
    try:
        with pytest.raises(PoolFull, match="is full"):
            pool.create_segment("huge", 32 * MiB)
        # Two writers that each fit alone: the second runs out of room mid-write.
        first = pool.create_segment("first", 10 * MiB)
        second = pool.create_segment("second", 10 * MiB)
        first.write(0, varied(10 * MiB))
        first.publish()
        with pytest.raises(PoolFull, match=r"segment 'second' .* does not fit"):
            second.write(0, varied(10 * MiB))
        assert [o.name for o in pool.list(include_all=True)] == ["first"]
        assert len(list(pool.backend.data_dir.iterdir())) == 1  # type: ignore[attr-defined]
        with pool.open_segment("first"):
            pass
        pool.delete("first")  # a full data mount never blocks the catalog
        assert pool.list(include_all=True) == [] and pool.status().used < MiB
    finally:
        pool.destroy()


def test_full_hugetlbfs_pool(hugetlbfs_pool: Pool) -> None:
    with pytest.raises(PoolFull, match=r"hugetlbfs pool .* is full"):
        hugetlbfs_pool.create_segment("too-big", 20 * MiB)
    assert hugetlbfs_pool.list(include_all=True) == []


@pytest.mark.parametrize("backend", ["tmpfs", "memfd"])
def test_segment_of_an_odd_size_maps_and_reads(pool_root: Path, backend: str) -> None:
    data = varied(5000)
    pool = Pool.create(pool_root, backend=backend, size=16 * MiB)
    try:
        publish(pool, "odd", data)
        with pool.open_segment("odd") as seg, seg.map(private=True) as view:
            assert view[:5000] == data and view[5000:] == bytes(len(view) - 5000)
            assert seg.placement() == {0: 2}
    finally:
        pool.destroy()


def test_memfd_segments_are_sealed_once_published(memfd_pool: Pool) -> None:
    publish(memfd_pool, "sealed", b"s" * 4096)
    with memfd_pool.open_segment("sealed") as seg:
        with pytest.raises(PermissionError):
            os.pwrite(seg.fd, b"tamper", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 8192)


def test_hugetlbfs_private_mapping_of_a_full_pool(hugetlbfs_pool: Pool) -> None:
    data = varied(16 * MiB, seed=7)
    publish(hugetlbfs_pool, "all", data)  # every page of the pool
    with hugetlbfs_pool.open_segment("all") as seg, seg.map(private=True) as view:
        assert view[: 2 * MiB] == data[: 2 * MiB]  # reading needs no copy: no reservation, no ENOMEM


def test_a_live_local_holder_outlives_its_lease(pool_root: Path, tmpfs_pool: Pool) -> None:
    lazy = Pool(pool_root, lease_ttl=0.0)  # never renewed in time, but its process is alive
    with lazy.create_segment("slow", 4096) as w:
        w.write(0, b"w" * 4096)
        assert tmpfs_pool.gc().abandoned_writes == 0
        w.publish(pin=False)
    assert tmpfs_pool.gc().objects_freed == 0 and [o.name for o in tmpfs_pool.list()] == ["slow"]
    lazy.close()


def test_one_pool_shared_by_threads(tmpfs_pool: Pool) -> None:
    errors: list[BaseException] = []

    def churn(me: int) -> None:
        try:
            for i in range(15):
                publish(tmpfs_pool, f"t{me}-{i}", varied(8192, seed=me + 1))
                with tmpfs_pool.open_segment(f"t{me}-{i}"):
                    pass
                tmpfs_pool.delete(f"t{me}-{i}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert tmpfs_pool.list(include_all=True) == []


def test_names_are_checked(tmpfs_pool: Pool) -> None:
    for bad in ["", "../escape", "a/b", ".hidden", "x" * 201]:
        with pytest.raises(InvalidName):
            tmpfs_pool.create_segment(bad, 4096)
    publish(tmpfs_pool, "taken", b"t")
    with pytest.raises(SegmentExists, match="'taken' already exists"):
        tmpfs_pool.create_segment("taken", 4096)
    with pytest.raises(SegmentNotFound, match="no published segment named 'nope'"):
        tmpfs_pool.open_segment("nope")


# ---------------------------------------------------------------------------------------------
# memfd: segments shared by fd passing


def test_memfd_segment_opened_from_another_process(memfd_pool: Pool) -> None:
    data = varied(MiB, seed=5)
    publish(memfd_pool, "passed", data)
    assert memfd_pool.placement("passed") == {0: MiB // 4096}  # the writer thread was bound to node 0
    out = run_python(
        """
        import sys, zlib
        from shmpool.pool import Pool
        with Pool(sys.argv[1]) as pool, pool.open_segment("passed") as seg:  # verifies every chunk
            with seg.map(private=True) as view:
                print(zlib.crc32(view[: seg.size]))
        """,
        str(memfd_pool.root),
    )
    assert int(out.stdout) == zlib.crc32(data)


def test_memfd_segments_die_with_their_owner(memfd_pool: Pool) -> None:
    run_python(
        """
        import sys
        from shmpool.pool import Pool
        pool = Pool(sys.argv[1])
        with pool.create_segment("mortal", 4096) as w:
            w.write(0, b"m" * 4096)
            w.publish()
        """,
        str(memfd_pool.root),
    )
    assert memfd_pool.gc().objects_freed == 1
    assert memfd_pool.list(include_all=True) == [] and memfd_pool.status().used == 0


# ---------------------------------------------------------------------------------------------
# the CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmpool", *args], capture_output=True, text=True, timeout=60)


def test_cli_create_status_list_verify_destroy(pool_root: Path) -> None:
    root = str(pool_root)
    assert _cli("--root", root, "create", "--size", "16M").returncode == 0
    try:
        status = json.loads(_cli("--root", root, "--json", "status").stdout)
        assert status["capacity"] == 16 * MiB and status["backend"] == "tmpfs"
        with Pool(root) as pool:
            publish(pool, "cli", varied(MiB))
        assert "cli" in _cli("--root", root, "list").stdout
        assert "4 chunks match" in _cli("--root", root, "verify", "cli").stdout
        refused = _cli("--root", root, "destroy")
        assert refused.returncode == 1 and "still holds 1 segments" in refused.stderr
        bad = _cli("--root", root, "create", "--size", "lots")
        assert bad.returncode == 2 and "'lots' is not a size" in bad.stderr
    finally:
        assert _cli("--root", root, "destroy", "--force").returncode == 0
    assert not pool_root.exists()
    missing = _cli("--root", root, "status")
    assert missing.returncode == 1 and "no pool at" in missing.stderr


def test_demo_runs_end_to_end(pool_root: Path) -> None:
    out = _cli("--root", str(pool_root), "demo", "--size", "256M")
    try:
        assert out.returncode == 0, out.stderr
        assert "pages by NUMA node (move_pages): node 0: 16384" in out.stdout
        assert "the pool's bytes unchanged: True" in out.stdout
    finally:
        _cli("--root", str(pool_root), "destroy", "--force")


def test_kerndat_cli_table_and_json() -> None:
    table = subprocess.run([sys.executable, "-m", "native.kerndat"], capture_output=True, text=True, check=True)
    assert "cgroup_mode" in table.stdout and "node 0" in table.stdout
    data = json.loads(
        subprocess.run(
            [sys.executable, "-m", "native.kerndat", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert data["cgroup_mode"] in {"v1", "v2", "hybrid"}
    assert 0 in [n["node"] for n in data["nodes"]]
    assert data["uffd"] and data["pidfd_getfd"] and data["ptrace_rseq_config"]


@pytest.mark.slow
def test_bench_numa_writes_rows_for_every_backend(tmp_path: Path) -> None:
    out_file = tmp_path / "bench.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_numa.py"
    run = subprocess.run(
        [sys.executable, str(script), "--size", "8M", "--reps", "1", "--chase-steps", "10000", "--json", str(out_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out_file.read_text())  # a bench document (daemon/bench.py): rows in its `pool` table
    rows = result["tables"]["pool"]
    got = {(r["node"], r["backend"], r["metric"]) for r in rows}
    skipped = " ".join(result["notes"])
    for backend in ("tmpfs", "hugetlbfs", "memfd"):
        if f"{backend}: skipped" in skipped:
            continue
        for metric in ("seq_read", "copy", "latency", "map_read", "map_cow"):
            assert (0, backend, metric) in got
    assert all(r["value"] > 0 and r["unit"] for r in rows)
    assert "seq_read" in run.stdout

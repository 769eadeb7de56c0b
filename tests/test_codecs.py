"""Codecs for cold pages (shmpool.codecs) and the Intel QPL binding (native.qpl).

No mounts, no pools, no root. QPL and IAA are absent here, so the binding runs against
`tests/qpl_standin.c`: the same entry points over zlib, built with the `qpl_job` offsets written
below from QPL's header (never taken from the binding), so a wrong offset in the binding breaks the
round trips through it.
"""

from __future__ import annotations

import array
import math
import os
import pickle
import random
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from native import kerndat
from native.qpl import QPL_JOB_OFFSETS, QPL_JOB_SIZE, Qpl, QplError, QplLevel, QplUnavailable
from shmpool.codecs import (
    DEFAULT_CHUNK,
    Codec,
    CodecError,
    ZstdCodec,
    available_codecs,
    compress_chunks,
    decompress_chunks,
    get_codec,
    measure,
    train_zstd_dictionary,
)
from shmpool.errors import PoolError
from tests.qpl_standin import HEADER_JOB_SIZE, HEADER_OFFSETS, build_standin

REPO = Path(__file__).resolve().parents[1]
SOFTWARE = ["lz4", "zstd", "deflate"]

# ---------------------------------------------------------------------------------------------
# Data: what cold pages of a Python process look like, and the extremes


def heap_like(seed: int, count: int = 4000) -> bytes:
    """Pickled records: repeated keys and short strings among varied numbers, as a Python heap."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "request", "session", "user", "token", "cache", "tensor"]
    records = [
        {
            "id": i,
            "name": f"{rng.choice(words)}-{rng.randrange(10**6)}",
            "tags": [rng.choice(words) for _ in range(rng.randrange(1, 5))],
            "score": rng.random(),
            "counts": [rng.randrange(100) for _ in range(8)],
        }
        for i in range(count)
    ]
    return pickle.dumps(records)


def float_array() -> memoryview:
    return memoryview(array.array("d", (math.sin(i / 500) for i in range(40_000))))


HEAP = heap_like(0) * 2
SAMPLES: dict[str, bytes | memoryview] = {
    "random": random.Random(1).randbytes(200_000),
    "zeros": bytes(256 << 10),
    "heap": HEAP,
    "floats": float_array(),
}


def as_bytes(data: bytes | memoryview) -> bytes:
    return bytes(memoryview(data).cast("B"))


# ---------------------------------------------------------------------------------------------
# Software codecs


@pytest.mark.parametrize("sample", sorted(SAMPLES))
@pytest.mark.parametrize("name", SOFTWARE)
def test_round_trip(name: str, sample: str) -> None:
    codec = get_codec(name)
    data = SAMPLES[sample]
    whole = as_bytes(data)
    assert codec.decompress(codec.compress(data), len(whole)) == whole
    chunks = compress_chunks(codec, data)
    assert [c.offset for c in chunks] == list(range(0, len(whole), DEFAULT_CHUNK))
    assert decompress_chunks(codec, chunks) == whole


@pytest.mark.parametrize("name", SOFTWARE)
def test_every_level_round_trips_an_empty_and_a_small_input(name: str) -> None:
    for level in type(get_codec(name)).levels:
        codec = get_codec(name, level)
        for data in (b"", b"x", HEAP[:5000]):
            assert codec.decompress(codec.compress(data), len(data)) == data, (codec, len(data))


@pytest.mark.parametrize("chunk_size", [4096, 8192, 12288, 64 << 10, 1 << 20])
def test_chunk_sizes_of_whole_pages(chunk_size: int) -> None:
    codec = get_codec("lz4")
    data = HEAP
    chunks = compress_chunks(codec, data, chunk_size)
    assert all(c.length == chunk_size for c in chunks[:-1]) and 0 < chunks[-1].length <= chunk_size
    assert decompress_chunks(codec, chunks) == data


@pytest.mark.parametrize("chunk_size", [0, -4096, 1000, 4097, 6144, 4096.0, True])
def test_chunk_sizes_that_are_not_whole_pages_are_refused(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk size must be a positive multiple of 4096"):
        compress_chunks(get_codec("lz4"), b"x" * 10000, chunk_size)


def test_a_chunk_table_with_a_gap_is_refused() -> None:
    codec = get_codec("deflate")
    chunks = compress_chunks(codec, HEAP, 4096)
    del chunks[1]
    with pytest.raises(CodecError, match=r"^deflate: chunk table has a chunk at 8192, expected one at 4096"):
        decompress_chunks(codec, chunks)


@pytest.mark.parametrize("name", SOFTWARE)
def test_corrupt_data_raises_naming_the_codec(name: str) -> None:
    codec = get_codec(name)
    data = HEAP[:DEFAULT_CHUNK]
    packed = codec.compress(data)
    garbage = bytes(b ^ 0xA5 for b in packed)
    for bad in (garbage, packed[: len(packed) // 2], b"", b"\xff" * 64):
        with pytest.raises(CodecError, match=f"^{name}: ") as caught:
            codec.decompress(bad, len(data))
        assert isinstance(caught.value, PoolError)


@pytest.mark.parametrize("name", SOFTWARE)
def test_the_wrong_size_raises(name: str) -> None:
    codec = get_codec(name)
    data = HEAP[:DEFAULT_CHUNK]
    packed = codec.compress(data)
    for size in (len(data) - 1, len(data) + 1, 0):
        with pytest.raises(CodecError, match=f"^{name}: "):
            codec.decompress(packed, size)
    with pytest.raises(ValueError, match="size must be non-negative"):
        codec.decompress(packed, -1)


def test_unknown_codecs_and_levels_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown codec 'lzma': thaw has lz4, zstd, deflate, iaa"):
        get_codec("lzma")
    with pytest.raises(ValueError, match=r"zstd level must be 1\.\.22, not 23"):
        get_codec("zstd", 23)
    with pytest.raises(ValueError, match=r"lz4 level must be 1\.\.12, not 0"):
        get_codec("lz4", 0)
    with pytest.raises(ValueError, match=r"deflate level must be 1\.\.9, not True"):
        get_codec("deflate", True)
    # Checked before the library is looked for, so this holds with or without QPL.
    with pytest.raises(ValueError, match="iaa level must be 1 or 3, not 2"):
        get_codec("iaa", 2)


@pytest.mark.parametrize("name", SOFTWARE)
def test_measure_reports_ratio_and_speed(name: str) -> None:
    codec = get_codec(name)
    heap = measure(codec, HEAP)
    assert (heap.codec, heap.level, heap.size) == (name, codec.level, len(HEAP))
    assert heap.ratio == heap.size / heap.compressed > 1.5
    assert heap.compress_mb_s > 0 and heap.decompress_mb_s > 0
    assert measure(codec, SAMPLES["zeros"]).ratio > 50
    assert measure(codec, SAMPLES["random"]).ratio < 1.01


# ---------------------------------------------------------------------------------------------
# zstd dictionaries


def pages(data: bytes, size: int = 4096) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data) - size + 1, size)]


def test_a_trained_zstd_dictionary_round_trips_and_shrinks_small_chunks() -> None:
    dictionary = train_zstd_dictionary(pages(heap_like(1, 12_000)), 16 << 10)
    assert 0 < len(dictionary) <= 16 << 10
    plain, trained = ZstdCodec(3), ZstdCodec(3, dictionary=dictionary)
    held_out = pages(heap_like(2))  # not what it was trained on
    with_dict = [trained.compress(p) for p in held_out]
    assert [trained.decompress(c, len(p)) for c, p in zip(with_dict, held_out, strict=True)] == held_out
    without = sum(len(plain.compress(p)) for p in held_out)
    # ~4.5% smaller here: the random floats and numbers of this sample no dictionary can predict;
    # the gain is in the repeated keys and words, which a lone 4 KiB chunk cannot amortize.
    assert sum(map(len, with_dict)) < 0.97 * without
    with pytest.raises(CodecError, match=r"^zstd: corrupt data"):
        plain.decompress(with_dict[0], len(held_out[0]))  # the frame names a dictionary we lack


def test_training_on_too_little_raises() -> None:
    with pytest.raises(CodecError, match=r"^zstd: training a 16384-byte dictionary on 2 samples failed"):
        train_zstd_dictionary([b"abc", b"abd"], 16 << 10)


# ---------------------------------------------------------------------------------------------
# deflate: the stream shape IAA writes and reads (4 KiB window)


def far_repeats() -> bytes:
    """Data whose best matches lie 8 KiB back: past a 4 KiB window, inside zlib's default 32 KiB."""
    block = random.Random(3).randbytes(8192)
    return block * 4


def raw_deflate(data: bytes, wbits: int, level: int = 6, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
    deflater = zlib.compressobj(level, zlib.DEFLATED, wbits, 8, strategy)
    return deflater.compress(data) + deflater.flush()


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_deflate_streams_are_zlib_raw_with_a_4k_window_both_ways(sample: str) -> None:
    codec = get_codec("deflate")
    data = as_bytes(SAMPLES[sample])
    assert zlib.decompress(codec.compress(data), wbits=-12) == data
    assert codec.decompress(raw_deflate(data, -12), len(data)) == data


def inflate_within_4k(stream: bytes) -> bytes:
    """Inflate refusing any distance past 4 KiB, as IAA's 4 KiB history does.

    zlib checks distances against its window only for history outside the current call's output,
    so `zlib.decompress(x, wbits=-12)` with a large output buffer reads 32 KiB-window streams too.
    One output byte per call puts all history in the window, where the check applies.
    """
    inflater, out, tail = zlib.decompressobj(-12), bytearray(), stream
    while not inflater.eof:
        piece = inflater.decompress(tail, 1)
        tail = inflater.unconsumed_tail
        if not piece and not tail:
            raise ValueError("stream ends early")
        out += piece
    return bytes(out)


@pytest.mark.parametrize("name", ["deflate", "iaa"])
def test_deflate_streams_refer_no_further_back_than_4k(name: str, request: pytest.FixtureRequest) -> None:
    if name == "iaa":
        request.getfixturevalue("standin_env")  # defined below; only iaa needs the library
    data = far_repeats()
    for level in type(get_codec(name)).levels:
        assert inflate_within_4k(get_codec(name, level).compress(data)) == data
    with pytest.raises(zlib.error, match="invalid distance too far back"):
        inflate_within_4k(raw_deflate(data, -15))  # the check bites: zlib's default window reaches 8 KiB back


# ---------------------------------------------------------------------------------------------
# The QPL binding, against the stand-in library


@pytest.fixture
def qpl(standin: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Qpl]:
    monkeypatch.delenv("QPL_STANDIN_BUSY_EVERY", raising=False)
    with Qpl.load(str(standin)) as q:
        yield q


@pytest.fixture
def standin_env(standin: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$THAW_QPL_LIBRARY names the stand-in, so get_codec("iaa") finds it."""
    monkeypatch.setenv("THAW_QPL_LIBRARY", str(standin))
    monkeypatch.delenv("QPL_STANDIN_BUSY_EVERY", raising=False)
    return standin


def test_the_binding_pins_the_headers_offsets() -> None:
    assert QPL_JOB_OFFSETS == HEADER_OFFSETS
    assert QPL_JOB_SIZE == HEADER_JOB_SIZE


def test_the_standin_refuses_offsets_that_are_not_the_headers(standin: Path, tmp_path: Path) -> None:
    """The stand-in checks the literals against its transcription of the header's struct."""
    with pytest.raises(subprocess.CalledProcessError) as caught:
        build_standin(tmp_path / "libqpl.so", {**HEADER_OFFSETS, "level": 48}, HEADER_JOB_SIZE)
    assert "level is not at" in caught.value.stderr


def test_loads_the_standin(qpl: Qpl, standin: Path) -> None:
    assert qpl.library == str(standin)
    assert "stand-in" in qpl.version


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_qpl_output_is_zlib_raw_4k_and_reads_zlib_raw_4k(qpl: Qpl, sample: str) -> None:
    data = as_bytes(SAMPLES[sample])
    for dynamic in (True, False):
        assert zlib.decompress(qpl.compress(data, "software", dynamic=dynamic), wbits=-12) == data
    assert qpl.decompress(raw_deflate(data, -12), len(data), "software") == data
    assert qpl.decompress(qpl.compress(data), len(data)) == data  # path auto: software here


def test_the_standin_sees_the_level_and_flags_the_binding_sets(qpl: Qpl) -> None:
    """The stand-in maps qpl_level_1 to zlib level 1, qpl_high_level to 6, no DYNAMIC_HUFFMAN to
    Z_FIXED: byte-exact output shows it read `level` and `flags` where the binding wrote them."""
    data = HEAP
    assert qpl.compress(data, level=QplLevel.DEFAULT) == raw_deflate(data, -12, 1)
    assert qpl.compress(data, level=QplLevel.HIGH) == raw_deflate(data, -12, 6)
    assert qpl.compress(data, dynamic=False) == raw_deflate(data, -12, 1, zlib.Z_FIXED)


def test_qpl_batches_submit_then_wait(qpl: Qpl) -> None:
    items = pages(HEAP, 16384)
    for depth in (1, 4, 64):
        packed = qpl.compress_many(items, depth=depth)
        assert packed == [qpl.compress(item) for item in items]
        assert qpl.decompress_many([(p, len(i)) for p, i in zip(packed, items, strict=True)], depth=depth) == items


def test_qpl_batches_ride_out_busy_queues(qpl: Qpl, monkeypatch: pytest.MonkeyPatch) -> None:
    items = pages(HEAP, 16384)
    want = [qpl.compress(item) for item in items]
    monkeypatch.setenv("QPL_STANDIN_BUSY_EVERY", "3")
    # depth 4: busy with jobs of ours in flight, so the oldest is waited for; depth 1: none in
    # flight, so the job runs through qpl_execute_job instead.
    for depth in (4, 1):
        assert qpl.compress_many(items, depth=depth) == want


def test_qpl_errors_carry_the_status_number_and_name(qpl: Qpl) -> None:
    with pytest.raises(QplError, match=r"QPL_STS_INVALID_BLOCK_TYPE \(213\) from qpl_execute_job") as caught:
        qpl.decompress(b"\xff" * 64, 4096)  # BFINAL=1, BTYPE=11: a block type deflate does not have
    assert (caught.value.status, caught.value.status_name) == (213, "QPL_STS_INVALID_BLOCK_TYPE")
    packed = qpl.compress(HEAP[:8192])
    with pytest.raises(QplError, match=r"QPL_STS_MORE_OUTPUT_NEEDED \(2\)"):
        qpl.decompress(packed, 8191)
    with pytest.raises(QplError, match=r"8192 bytes out, expected 8193 \(qpl_execute_job returned QPL_STS_OK\)"):
        qpl.decompress(packed, 8193)


def test_a_failed_job_in_a_batch_raises_after_all_are_waited_for(qpl: Qpl) -> None:
    items = pages(HEAP, 8192)[:6]
    packed = [(qpl.compress(item), len(item)) for item in items]
    packed[2] = (b"\xff" * 64, 8192)
    with pytest.raises(QplError, match=r"QPL_STS_INVALID_BLOCK_TYPE .* from qpl_wait_job"):
        qpl.decompress_many(packed, depth=4)
    assert qpl.decompress_many(packed[3:]) == items[3:]  # the pool still works


def test_the_hardware_path_says_iaa_is_absent(qpl: Qpl) -> None:
    with pytest.raises(QplError, match=r"QPL_INIT_HW_NOT_SUPPORTED \(500\) from qpl_init_job \(no usable Intel IAA"):
        qpl.compress(b"x" * 4096, "hardware")
    with pytest.raises(ValueError, match="QPL path must be auto, hardware or software, not 'gpu'"):
        qpl.compress(b"x", "gpu")  # type: ignore[arg-type]


PROBE = """
import zlib
import native.qpl as qpl
qpl.QPL_JOB_OFFSETS.update({mutation!r})
q = qpl.Qpl.load({library!r})
data = bytes(range(256)) * 64 + b"thaw" * 4000
deflater = zlib.compressobj(6, zlib.DEFLATED, -12)
packed = q.compress(data, "software", qpl.QplLevel.HIGH)
assert packed == deflater.compress(data) + deflater.flush(), "not zlib level 6 (the stand-in's high level)"
assert q.decompress(packed, len(data), "software") == data
print("ROUND TRIP OK")
"""


@pytest.mark.parametrize(
    "mutation",
    [
        {},  # the control: the probe passes with the binding's own offsets
        {"available_in": 12, "total_in": 8},
        {"op": 36, "flags": 32},
        {"level": 48},
        {"next_out_ptr": 40},
    ],
    ids=["as-pinned", "sizes-swapped", "op-flags-swapped", "level-off-by-4", "out-pointer-moved"],
)
def test_a_wrong_offset_in_the_binding_breaks_the_round_trip(standin: Path, mutation: dict[str, int]) -> None:
    """Run in a child: a pointer written to the wrong place may crash it, which is a failure too."""
    env = {k: v for k, v in os.environ.items() if k != "QPL_STANDIN_BUSY_EVERY"}
    code = textwrap.dedent(PROBE).format(mutation=mutation, library=str(standin))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    passed = child.returncode == 0 and "ROUND TRIP OK" in child.stdout
    assert passed == (not mutation), child.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The iaa codec


def test_iaa_without_libqpl_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("THAW_QPL_LIBRARY", str(tmp_path / "no-such-libqpl.so"))
    with pytest.raises(QplUnavailable, match=r"^Intel QPL \(libqpl\) is not installed: .*no-such-libqpl\.so"):
        get_codec("iaa")
    assert available_codecs() == SOFTWARE


def test_iaa_refuses_a_library_that_is_not_qpl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_QPL_LIBRARY", "libz.so.1")
    with pytest.raises(QplUnavailable, match=r"libz\.so\.1 is not Intel QPL: it does not export qpl_get_job_size"):
        get_codec("iaa")


@pytest.mark.usefixtures("standin_env")
def test_iaa_is_available_with_the_standin() -> None:
    assert available_codecs() == [*SOFTWARE, "iaa"]


@pytest.mark.usefixtures("standin_env")
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_iaa_and_deflate_read_each_others_chunks(sample: str) -> None:
    iaa, deflate = get_codec("iaa"), get_codec("deflate")
    data = as_bytes(SAMPLES[sample])
    assert decompress_chunks(iaa, compress_chunks(iaa, data)) == data
    assert decompress_chunks(deflate, compress_chunks(iaa, data)) == data
    assert decompress_chunks(iaa, compress_chunks(deflate, data)) == data


@pytest.mark.usefixtures("standin_env")
def test_iaa_corruption_and_sizes_raise_codec_errors() -> None:
    codec: Codec = get_codec("iaa", 3)
    data = HEAP[:DEFAULT_CHUNK]
    packed = codec.compress(data)
    with pytest.raises(CodecError, match=r"^iaa: corrupt data .*QPL_STS_INVALID_BLOCK_TYPE \(213\)"):
        codec.decompress(b"\xff" * 64, len(data))
    with pytest.raises(CodecError, match=r"^iaa: corrupt data .*QPL_STS_MORE_OUTPUT_NEEDED"):
        codec.decompress(packed, len(data) - 1)
    with pytest.raises(CodecError, match=r"^iaa: corrupt data in a batch of 2 chunks"):
        codec.decompress_many([(packed, len(data)), (packed[:10], len(data))])


@pytest.mark.usefixtures("standin_env")
def test_iaa_reports_ratio_and_speed() -> None:
    report = measure(get_codec("iaa"), HEAP)
    assert report.codec == "iaa" and report.ratio > 1.5 and report.compress_mb_s > 0


def test_the_feature_probe_finds_the_library_the_codecs_use(standin_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert kerndat.probe_qpl() == str(standin_env)
    monkeypatch.setenv("THAW_QPL_LIBRARY", "/nonexistent/libqpl.so")
    assert kerndat.probe_qpl() is None

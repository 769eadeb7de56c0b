"""The bench harness (daemon/bench.py) and the report (scripts/report.py): the report renders from
the JSON of `--quick` runs of every benchmark, with every plot present and naming its rows; a file
with a missing or unknown field is refused with the field named; `--from` on an empty folder says
which benchmarks are missing."""

from __future__ import annotations

import base64
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import bench
from daemon.bench import BenchDataError, RestoreRow, SandboxRow
from scripts import report

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


# -- the harness ---------------------------------------------------------------------------------


def test_one_percentile_formula_whose_50th_is_the_median() -> None:
    values = [5.0, 1.0, 4.0, 2.0]
    assert bench.median(values) == statistics.median(values) == 3.0
    assert bench.percentile(values, 0) == 1.0 and bench.percentile(values, 100) == 5.0
    assert bench.percentile(values, 90) == pytest.approx(4.7)  # between the closest ranks, 4 and 5
    assert bench.percentile_of_counts({1.0: 1, 2.0: 1, 4.0: 1, 5.0: 1}, 90) == pytest.approx(4.7)
    assert bench.cdf(values, 3) == [1.0, 3.0, 5.0]


def _restore_row(**changes: object) -> dict[str, object]:
    row = RestoreRow(64, "cow", 1, 1, False, 1.5, 2.0, 9.0, 4.0, 5, 1.0).__dict__.copy()
    row.update(changes)
    return row


def _document(rows: list[dict[str, object]]) -> dict[str, object]:
    doc = {"benchmark": "bench_restore", "version": 1, "machine": {}, "conditions": {}, "notes": []}
    return {**doc, "tables": {"restore": rows}}


def test_a_row_with_a_missing_or_unknown_field_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "bench_restore.json"
    row = _restore_row()
    del row["median_ms"]
    path.write_text(json.dumps(_document([_restore_row(), row])))
    with pytest.raises(BenchDataError, match=rf"{path}: restore row 1: missing field 'median_ms'"):
        bench.read(path)
    path.write_text(json.dumps(_document([_restore_row(colour="blue")])))
    with pytest.raises(BenchDataError, match=r"restore row 0: unknown field 'colour' \(RestoreRow has size_mib"):
        bench.read(path)
    path.write_text(json.dumps(_document([_restore_row(median_ms="fast")])))
    with pytest.raises(BenchDataError, match=r"field 'median_ms' is 'fast', expected float"):
        bench.read(path)
    doc = _document([_restore_row()])
    del doc["machine"]
    path.write_text(json.dumps({**doc, "extra": 1}))
    with pytest.raises(BenchDataError, match=rf"{path}: missing field 'machine'"):
        bench.read(path)


def test_what_is_written_reads_back_as_the_same_rows(tmp_path: Path) -> None:
    rows = [SandboxRow("create", 50.0, 60.0, 5), SandboxRow("repurpose", 0.5, 0.7, 5)]
    bench.write(tmp_path / "s.json", bench.Document("bench_sandbox", {"sandbox": rows}, {"reps": 5}))
    doc = bench.read(tmp_path / "s.json", "bench_sandbox")
    assert doc.rows("sandbox", SandboxRow) == rows and doc.conditions == {"reps": 5}
    assert doc.machine["cpus"] >= 1 and "uffd" in doc.machine["kerndat"]
    with pytest.raises(BenchDataError, match="written by bench_sandbox, expected bench_restore"):
        bench.read(tmp_path / "s.json", "bench_restore")


# -- the report ----------------------------------------------------------------------------------


def test_from_an_empty_folder_names_every_missing_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--from", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"no benchmark JSON in {tmp_path}: missing" in err
    for name in bench.BENCHMARKS:
        assert name in err
    assert not (tmp_path / "out" / "report.html").exists()


def test_the_report_refuses_a_file_with_an_unknown_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bench_restore.json").write_text(json.dumps(_document([_restore_row(threads_total=2)])))
    assert report.main(["--from", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "unknown field 'threads_total'" in capsys.readouterr().err


def test_a_partial_folder_renders_and_says_what_is_absent(tmp_path: Path) -> None:
    (tmp_path / "bench_restore.json").write_text(json.dumps(_document([_restore_row()])))
    assert report.main(["--from", str(tmp_path), "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    invoke = _figure(page, "invoke")
    assert "bench_invoke was not run" in invoke and "issue 17" in invoke
    assert "issue 16" in _figure(page, "restore")
    assert "bench_restore.restore: 1 row" in _figure(page, "restore")


def _figure(page: str, key: str) -> str:
    found = re.search(rf"<figure id='plot-{key}'.*?</figure>", page, re.S)
    assert found, f"no plot {key}"
    return found.group(0)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`scripts/report --quick`: every benchmark's --quick run, then the page (a couple of minutes)."""
    out = tmp_path_factory.mktemp("report")
    done = subprocess.run(
        [sys.executable, "scripts/report.py", "--quick", "--out", str(out)], cwd=REPO, capture_output=True, text=True
    )
    logs = {p.name: p.read_text()[-2000:] for p in (out / "logs").glob("*.log")}
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{logs}"
    yield out


@pytest.mark.privileged
@pytest.mark.slow
def test_the_report_of_quick_runs_has_every_plot_with_its_rows(quick_results: Path) -> None:
    for name in bench.BENCHMARKS:
        bench.read(quick_results / f"{name}.json", name)  # each written, each as its benchmark writes it
    page = (quick_results / "report.html").read_text()
    assert page.index("id='machine'") < page.index("<figure")
    for label in ("kernel", "CPUs", "memory", "NUMA nodes", "kerndat", "pool backends", "date"):
        assert f"<th>{label}</th>" in page
    assert "Not in this report" not in page
    for key, sources in report.SOURCES.items():
        figure = _figure(page, key)
        image = re.search(r"src='data:image/png;base64,([^']+)'", figure)
        assert image and base64.b64decode(image.group(1)).startswith(PNG)
        assert (quick_results / f"{key}.png").read_bytes().startswith(PNG)
        rows = re.search(r"data-rows='([^']*)'", figure)
        assert rows is not None
        for name in sources:  # names its rows, and has some from each benchmark it reads
            assert re.search(rf"{name}\.\w+: [1-9]\d* rows?", rows.group(1)), (key, rows.group(1))
        assert "was not run" not in figure


@pytest.mark.privileged
@pytest.mark.slow
def test_from_re_renders_saved_json_without_running_anything(quick_results: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    assert report.main(["--from", str(quick_results), "--out", str(tmp_path), "--docs", str(docs)]) == 0
    assert not (tmp_path / "logs").exists()  # nothing ran
    assert sorted(p.stem for p in docs.glob("*.png")) == sorted(report.SOURCES)
    first = re.sub(r"src='[^']*'", "", (quick_results / "report.html").read_text())
    again = re.sub(r"src='[^']*'", "", (tmp_path / "report.html").read_text())
    assert first == again  # the same page from the same JSON (images aside: PNG metadata)

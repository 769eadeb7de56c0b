"""Microbenchmarks (run it as `scripts/bench_micro`): tests/test_micro.py under pytest-benchmark.

Runs `pytest tests/test_micro.py --benchmark-enable --benchmark-json RAW` (a ptrace round trip, an
injected syscall, a restorer run without a guest, the pager's fault service per codec, a sandbox
repurpose, publishing a segment; see that file), keeps pytest-benchmark's own JSON beside ours
(NAME.pytest-benchmark.json, for `pytest-benchmark compare`), and writes the rows (daemon/bench.py's
MicroRow: median, min and max per operation in microseconds; a benchmark that does several
operations per round, as the pager's reads of every page, says how many in its extra_info) to
`--json PATH` (default bench-results/bench_micro.json). `--quick`: at most 0.05 s per benchmark.
Extra arguments go to pytest (e.g. `-k pager`). Root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon import bench
from daemon.bench import MicroRow

REPO = Path(__file__).resolve().parents[1]


def rows(raw: dict[str, Any]) -> list[MicroRow]:
    found = []
    for b in raw["benchmarks"]:
        per = int(b.get("extra_info", {}).get("operations", 1))
        stats = b["stats"]
        found.append(
            MicroRow(
                name=b["name"].removeprefix("test_"),
                group=b.get("group"),
                median_us=round(stats["median"] * 1e6 / per, 3),
                min_us=round(stats["min"] * 1e6 / per, 3),
                max_us=round(stats["max"] * 1e6 / per, 3),
                rounds=int(stats["rounds"]),
            )
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_micro", description=__doc__.splitlines()[0])
    bench.arguments(parser, "bench_micro", "at most 0.05 s per benchmark")
    args, pytest_args = parser.parse_known_args(argv)
    path: Path = args.json
    raw_path = path.with_suffix(".pytest-benchmark.json")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    argv_ = [sys.executable, "-m", "pytest", "tests/test_micro.py", "-q", "-p", "no:cacheprovider"]
    argv_ += ["--benchmark-enable", f"--benchmark-json={raw_path}", "--benchmark-columns=min,median,max,rounds"]
    argv_ += ["--benchmark-max-time=0.05", "--benchmark-min-rounds=3"] if args.quick else []
    env = {**os.environ, "THAW_BENCH_MICRO": "1"}  # tests/test_micro.py: no leak check while timing
    done = subprocess.run([*argv_, *pytest_args], cwd=REPO, env=env, check=False)
    if done.returncode != 0:
        print(f"bench_micro: pytest exited with {done.returncode}", file=sys.stderr)
        return 1
    found = rows(json.loads(raw_path.read_text()))
    print(bench.table(("name", "group", "median us", "min us", "max us", "rounds"),
                      ((r.name, r.group, r.median_us, r.min_us, r.max_us, r.rounds) for r in found)))  # fmt: skip
    conditions = {"quick": args.quick, "pytest_benchmark_json": str(raw_path), "pytest_args": pytest_args}
    bench.write(path, bench.Document("bench_micro", {"micro": found}, conditions))
    return 0


if __name__ == "__main__":
    sys.exit(main())

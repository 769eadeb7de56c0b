"""CLI benchmark (run it as `scripts/bench_cli`): how long `thaw` commands take as whole processes.

Times, as a person or a script meets them, each command from its start to its exit (interpreter
start, imports, argument parsing, the request to thawd, the output), --runs times each (default
20) after --warmup uncounted runs (default 3), the commands taken in turn so that a drift of the
machine's speed spreads over all of them:

- python     `python -c pass` with the same interpreter: the floor no Python CLI goes under
- help       `thaw --help`: start-up and argument parsing only
- ls         `thaw ls`: one GET /functions, a table
- invoke     `thaw invoke bench-cli --data '{"n": 1}'`: one POST to a warm instance of a tiny
             handler, its reply printed

`thaw` is the console script `.venv/bin/thaw` (`--thaw CMD` times another command line, e.g.
`--thaw "python -m daemon.cli"`). By default a private thawd is started for the run (as the tests
start theirs: tests/thawd.py, on a temporary directory, bridge thawc0 on 10.240.0.0/24), the
function deployed and invoked once (so `invoke` meets a warm instance), and thawd stopped and its
pool destroyed at the end; root. `--socket PATH` uses a running thawd instead, and
`--function NAME` names the function `invoke` calls there (its reply should be small).

Prints a table (command, min_ms, median_ms, max_ms, runs) and the target (every thaw command's
median well under 150 ms); `--json PATH` (default bench-results/bench_cli.json) writes the rows
(daemon/bench.py's CliRow: `command`, `argv`, `min_ms`, `median_ms`, `max_ms` and `runs`).
`--quick`: 3 runs after 1 warm-up. Quote medians,
and only from a quiet machine: the figures are a few tens of milliseconds, a busy core doubles them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon import bench  # noqa: E402
from daemon.bench import CliRow  # noqa: E402
from tests.thawd import Thawd, write_function  # noqa: E402

THAW = REPO / ".venv" / "bin" / "thaw"
BRIDGE, SUBNET = "thawc0", "10.240.0.0/24"
FUNCTION = "bench-cli"
HANDLER = "def handle(event, context):\n    return {'ok': True, 'n': len(event.body)}\n"
BODY = '{"n": 1}'
TARGET = "target: every thaw command's median well under 150 ms"


class BenchError(Exception):
    pass


def commands(thaw: list[str], socket: str, function: str) -> dict[str, list[str]]:
    at = [*thaw, "--socket", socket]
    return {
        "python": [sys.executable, "-c", "pass"],
        "help": [*thaw, "--help"],
        "ls": [*at, "ls"],
        "invoke": [*at, "invoke", function, "--data", BODY],
    }


def run_once(argv: list[str]) -> float:
    """One whole process, in milliseconds; its output read and thrown away."""
    done: list[subprocess.CompletedProcess[bytes]] = []
    elapsed = bench.time_ms(
        lambda: done.append(subprocess.run(argv, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, check=False))
    )
    if done[0].returncode != 0:
        stderr = done[0].stderr.decode(errors="replace").strip()
        raise BenchError(f"{shlex.join(argv)} exited with {done[0].returncode}: {stderr[-1000:]}")
    return elapsed


def measure(argvs: dict[str, list[str]], runs: int, warmup: int) -> list[CliRow]:
    times: dict[str, list[float]] = {name: [] for name in argvs}
    for n in range(warmup + runs):
        for name, argv in argvs.items():  # in turn: a drift of the machine's speed falls on all of them
            elapsed = run_once(argv)
            if n >= warmup:
                times[name].append(elapsed)
    return [
        CliRow(
            command=name,
            argv=shlex.join(argvs[name]),
            min_ms=round(min(ms), 1),
            median_ms=round(bench.median(ms), 1),
            max_ms=round(max(ms), 1),
            runs=len(ms),
        )
        for name, ms in times.items()
    ]


@contextlib.contextmanager
def private_thawd() -> Iterator[Thawd]:
    """A thawd of our own with FUNCTION deployed and warm; stopped, its pool destroyed, at exit."""
    tmp = Path(tempfile.mkdtemp(prefix="thaw-bench-cli-"))
    try:
        with Thawd(tmp, BRIDGE, SUBNET, sandboxes_prewarm=1).serving() as thawd:
            thawd.deploy(FUNCTION, write_function(tmp / FUNCTION, HANDLER))
            status, reply = thawd.invoke(FUNCTION, {"n": 1})  # the instance `invoke` finds warm
            if status != 200:
                raise BenchError(f"invoking {FUNCTION}: {status} {reply!r}")
            yield thawd
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(rows: list[CliRow]) -> None:
    headers = ("command", "min_ms", "median_ms", "max_ms", "runs")
    print(bench.table(headers, ((r.command, r.min_ms, r.median_ms, r.max_ms, r.runs) for r in rows)))
    print(TARGET)
    for r in rows:
        if r.command != "python":
            print(f"  {r.command}: median {r.median_ms:.1f} ms {'ok' if r.median_ms < 150 else 'MISSED'}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before the table: {load}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_cli",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, help="counted runs of each command [20]")
    parser.add_argument("--warmup", type=int, help="uncounted runs of each command first [3]")
    parser.add_argument("--thaw", default=str(THAW), help=f"the command line timed as `thaw` [{THAW}]")
    parser.add_argument("--socket", help="a running thawd's API socket (default: start a private thawd)")
    parser.add_argument("--function", help="with --socket: the deployed function `thaw invoke` calls")
    bench.arguments(parser, "bench_cli", "3 runs after 1 warm-up")
    args = parser.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be positive, --warmup not negative")
    if (args.socket is None) != (args.function is None):
        parser.error("--socket and --function go together (without them a private thawd is started)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    thaw = shlex.split(args.thaw)
    try:
        if args.socket:
            rows = measure(commands(thaw, args.socket, args.function), args.runs, args.warmup)
        elif os.geteuid() != 0:
            print("bench_cli: starting a thawd needs root (or give --socket and --function)", file=sys.stderr)
            return 2
        else:
            with private_thawd() as thawd:
                rows = measure(commands(thaw, str(thawd.socket), FUNCTION), args.runs, args.warmup)
    except BenchError as e:
        print(f"bench_cli: {e}", file=sys.stderr)
        return 1
    print_table(rows)
    conditions = {"runs": args.runs, "warmup": args.warmup, "thaw": args.thaw, "quick": args.quick,
                  "thawd": args.socket or "private"}  # fmt: skip
    bench.write(args.json, bench.Document("bench_cli", {"commands": rows}, conditions, [TARGET]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

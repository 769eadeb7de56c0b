"""`python -m snapshot`: look at templates, and the end-to-end demo (scripts/quickstart's main job).

python -m snapshot [--root POOL] demo [--node N] [--size SIZE] [--runs N]
python -m snapshot [--root POOL] show NAME [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from shmpool import Pool, PoolError
from shmpool.cli import human
from shmpool.pool import DEFAULT_ROOT
from snapshot.errors import SnapshotError
from snapshot.template import Template


def show(root: str, name: str, as_json: bool) -> None:
    with Template.open(Pool(root), name) as template:
        m = template.manifest
        kinds: dict[str, int] = {}
        for v in m.memory.vmas:
            kinds[v.kind] = kinds.get(v.kind, 0) + 1
        summary = {
            "name": name,
            "comm": m.comm,
            "source_pid": m.source_pid,
            "segment_bytes": template.segment.size,
            "page_bytes": m.data_bytes,
            "vmas": kinds,
            "files": [f.path for f in m.files.identities],
            "fds": [{"fd": f.fd, "path": f.path} for f in m.fds.paths],
            "pipes": len(m.fds.pipes),
            "threads": 1 + len(m.threads.others),
            "uid": m.credentials.uid[0],
            "working_set_pages": len(template.working_set()),
        }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"template {name}: {m.comm} (captured from pid {m.source_pid}), {human(template.segment.size)} segment, "
        f"{human(m.data_bytes)} of pages"
    )
    print("  VMAs: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    print(
        f"  threads: {summary['threads']}; files re-mapped: {len(m.files.identities)}; "
        f"fds reopened: {len(m.fds.paths)}, pipes: {len(m.fds.pipes)}; uid {m.credentials.uid[0]}; "
        f"working set: {summary['working_set_pages']} pages"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapshot", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"pool directory (default {DEFAULT_ROOT})")
    sub = parser.add_subparsers(dest="command", required=True)
    shower = sub.add_parser("show", help="what a template holds")
    shower.add_argument("name")
    shower.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m snapshot: needs root (the pool's catalog and segments)", file=sys.stderr)
        return 2
    try:
        show(args.root, args.name, args.json)
    except (SnapshotError, PoolError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

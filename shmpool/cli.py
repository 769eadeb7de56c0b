"""`python -m shmpool` (also `thaw-pool`): create, inspect and destroy pools by hand.

The daemon uses the library directly; this CLI is for operators and for the quickstart demo.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
from dataclasses import asdict
from typing import Any

from shmpool.errors import PoolError
from shmpool.pool import DEFAULT_ROOT, Pool

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M' -> 536870912; '4096' -> 4096 (binary units, optional trailing 'iB' or 'B')."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4096, 64M, 2G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def cmd_create(args: argparse.Namespace) -> None:
    pool = Pool.create(
        args.root, backend=args.backend, node=args.node, size=args.size, page_size=args.page_size, device=args.device
    )
    st = pool.status()
    _emit(args, asdict(st), f"created {st.backend} pool at {st.root} on node {st.node}: {human(st.capacity)}")


def cmd_status(args: argparse.Namespace) -> None:
    with Pool(args.root) as pool:
        st = pool.status()
        text = "\n".join(
            [
                f"pool        {st.root}",
                f"backend     {st.backend} (page {human(st.page_size)})",
                f"node        {st.node}",
                f"capacity    {human(st.capacity)}",
                f"used        {human(st.used)}",
                f"segments    {st.segments} ({human(st.segment_bytes)})",
                f"can         {', '.join(k for k, v in asdict(st.capabilities).items() if v is True) or '-'}",
            ]
        )
        _emit(args, asdict(st), text)


def cmd_list(args: argparse.Namespace) -> None:
    with Pool(args.root) as pool:
        objs = pool.list(include_all=args.all)
        rows = [f"{'NAME':<32} {'KIND':<10} {'STATE':<10} {'SIZE':>10} {'CHUNKS':>7} {'REFS':>5} {'PINS':>5}"]
        rows += [
            f"{o.name:<32} {o.kind:<10} {o.state:<10} {human(o.size):>10} {len(o.sums):>7} {o.refs:>5} {o.pins:>5}"
            for o in objs
        ]
        _emit(args, [asdict(o) for o in objs], "\n".join(rows))


def cmd_verify(args: argparse.Namespace) -> None:
    with Pool(args.root) as pool, pool.open_segment(args.name) as seg:
        _emit(
            args,
            {"name": seg.name, "chunks": seg.chunk_count, "ok": True},
            f"{seg.name}: {seg.chunk_count} chunks match their checksums",
        )


def cmd_gc(args: argparse.Namespace) -> None:
    with Pool(args.root) as pool:
        report = pool.gc()
        _emit(args, asdict(report), " ".join(f"{k}={v}" for k, v in asdict(report).items()))


def cmd_destroy(args: argparse.Namespace) -> None:
    pool = Pool(args.root)
    live = pool.list()
    if live and not args.force:
        pool.close()
        raise PoolError(f"pool {args.root} still holds {len(live)} segments; pass --force to destroy it anyway")
    pool.destroy()
    _emit(args, {"destroyed": args.root}, f"destroyed pool {args.root}")


def cmd_demo(args: argparse.Namespace) -> None:
    from shmpool.demo import run_demo

    run_demo(args.root, args.node, args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shmpool", description="Manage thaw memory pools.")
    parser.add_argument(
        "--root",
        default=os.environ.get("THAW_POOL", DEFAULT_ROOT),
        help=f"pool directory (default $THAW_POOL or {DEFAULT_ROOT})",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", help="mount a new pool bound to a NUMA node")
    p.add_argument("--backend", choices=["tmpfs", "hugetlbfs", "devdax", "memfd"], default="tmpfs")
    p.add_argument("--node", type=int, default=0, help="NUMA node the pool's memory is bound to")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"), help="capacity, e.g. 8G")
    p.add_argument("--page-size", type=parse_size, default=None, help="hugetlbfs page size (2M or 1G)")
    p.add_argument("--device", help="devdax device, e.g. /dev/dax0.0")
    p.set_defaults(func=cmd_create)

    sub.add_parser("status", help="capacity, usage and capabilities").set_defaults(func=cmd_status)
    p = sub.add_parser("list", help="segments in the pool")
    p.add_argument("--all", action="store_true", help="include segments being written or deleted")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("verify", help="check every chunk of a segment against its checksum")
    p.add_argument("name")
    p.set_defaults(func=cmd_verify)
    sub.add_parser("gc", help="free what nothing references").set_defaults(func=cmd_gc)
    p = sub.add_parser("destroy", help="unmount the pool and give back its memory")
    p.add_argument("--force", action="store_true", help="destroy even if segments remain")
    p.set_defaults(func=cmd_destroy)
    p = sub.add_parser("demo", help="create (or attach) a pool and show a segment's life")
    p.add_argument("--node", type=int, default=0)
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (PoolError, OSError, sqlite3.Error) as e:
        print(f"thaw-pool: error: {e}", file=sys.stderr)
        return 1
    return 0

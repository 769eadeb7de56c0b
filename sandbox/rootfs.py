"""What a sandbox's root filesystem shows of the host: the leaves bind-mounted read-only.

The agent builds the rest (native/src/agent.c): a tmpfs skeleton, /function, /tmp, /proc, a minimal
/dev and /etc. Leaves keep their host paths, so an interpreter finds its stdlib where it was built
to look and file identities (st_dev, st_ino) match what a template recorded. Only leaves are
mounted: the host's Python may live under a 0700 home, whose skeleton copy is 0755 and holds
nothing else.
"""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import sandbox

SYSTEM_LEAVES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime")


def guest_leaves() -> list[str]:
    """thaw's guest package: `sandbox/__init__.py` and `sandbox/guest/`, nothing else of thaw."""
    package = Path(sandbox.__file__).resolve().parent
    return [str(package / "__init__.py"), str(package / "guest")]


def python_leaves() -> list[str]:
    """The interpreter running the daemon: its installation prefix and, for a venv, the venv."""
    leaves = {sys.base_prefix, sys.prefix, str(Path(sysconfig.get_paths()["stdlib"]).resolve())}
    executable = Path(sys.executable)
    leaves.add(str(executable.resolve().parent))
    return sorted(leaves)


def default_leaves(extra: Iterable[str] = ()) -> list[str]:
    return normalize([*SYSTEM_LEAVES, *python_leaves(), *guest_leaves(), *extra])


def normalize(paths: Iterable[str]) -> list[str]:
    """Existing absolute paths, without any that sits inside another (its parent's mount covers it)."""
    out: list[str] = []
    for path in sorted({str(Path(p)) for p in paths if Path(p).is_absolute() and Path(p).exists()}):
        if not any(
            path == kept or path.startswith(kept.rstrip("/") + "/") for kept in out if not Path(kept).is_symlink()
        ):
            out.append(path)
    return out

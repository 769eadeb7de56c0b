"""The seams of DESIGN.md: imports flow daemon -> snapshot | sandbox -> shmpool -> native, snapshot
and sandbox never import each other, nothing imports daemon, and only native touches cffi/ctypes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "native": {"shmpool", "snapshot", "sandbox", "daemon"},
    "shmpool": {"snapshot", "sandbox", "daemon", "cffi", "ctypes"},
    "snapshot": {"sandbox", "daemon", "cffi", "ctypes"},
    "sandbox": {"snapshot", "daemon", "cffi", "ctypes"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_seams(package: str) -> None:
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        if path.name != "build.py"  # native/build.py is the cffi builder itself
        for name in _imports(path) & FORBIDDEN[package]
    }
    assert not wrong, sorted(wrong)


def test_the_seam_check_sees_imports() -> None:
    assert {"sandbox", "os"} <= _imports(REPO / "daemon" / "demo.py")

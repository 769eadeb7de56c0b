"""The seams of DESIGN.md: imports flow daemon -> snapshot | sandbox -> shmpool -> native, snapshot
and sandbox never import each other, nothing imports daemon, only native touches cffi/ctypes, and
only the LoRA worker's side of daemon/lora imports torch (never the root daemon)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "native": {"shmpool", "snapshot", "sandbox", "daemon"},
    "shmpool": {"snapshot", "sandbox", "daemon", "cffi", "ctypes"},
    "snapshot": {"sandbox", "daemon", "cffi", "ctypes"},
    "sandbox": {"snapshot", "daemon", "cffi", "ctypes"},
}
ML = {"torch", "transformers", "peft", "safetensors", "gguf", "numpy"}
# What thawd itself loads of daemon/lora: no machine-learning library may come in through them.
LORA_DAEMON_SIDE = ("host.py", "api.py", "spec.py", "__init__.py")


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


def test_only_the_lora_worker_side_imports_torch() -> None:
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for package in ("native", "shmpool", "snapshot", "sandbox", "daemon")
        for path in sorted((REPO / package).rglob("*.py"))
        if not (path.parent.name == "lora" and path.name not in LORA_DAEMON_SIDE)
        if "examples" not in path.relative_to(REPO).parts  # functions: they run in guests, not in thawd
        for name in _imports(path) & ML
    }
    assert not wrong, sorted(wrong)


def test_thawd_loads_no_torch() -> None:
    code = f"import sys, daemon.main, daemon.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in {ML!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"

"""daemon/openapi.json and the API's route table agree, both ways; the document is well formed."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Any, cast

from daemon.config import DaemonConfig
from daemon.instances import Manager
from daemon.lora.host import LoraHost, LoraSettings
from daemon.server import OPENAPI, build_app
from sandbox.cgroups import CgroupTree
from sandbox.sandbox import SandboxConfig
from shmpool.pool import Pool

METHODS = ("get", "post", "put", "patch", "delete")
ANY_METHOD = METHODS  # what a `*` route (invoke) is documented with


def _document() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(Path(OPENAPI).read_text()))


def _routes() -> set[tuple[str, str]]:
    manager = cast(Manager, types.SimpleNamespace(config=DaemonConfig()))
    lora = LoraHost(cast(Pool, None), cast(CgroupTree, None), LoraSettings(), SandboxConfig())
    app = build_app(manager, lora)
    found: set[tuple[str, str]] = set()
    for route in app.router.routes():
        info = route.get_info()
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", info.get("formatter") or info.get("path") or "")
        method = route.method.lower()
        if method == "head":
            continue  # aiohttp adds HEAD for every GET
        for m in ANY_METHOD if method == "*" else (method,):
            found.add((m, path))
    return found


def _documented() -> set[tuple[str, str]]:
    return {(m, path) for path, item in _document()["paths"].items() for m in item if m in METHODS}


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    routes, documented = _routes(), _documented()
    assert routes - documented == set(), f"routes missing from openapi.json: {sorted(routes - documented)}"
    extra = sorted(documented - routes)
    assert not extra, f"openapi.json documents routes that do not exist: {extra}"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_document_is_well_formed() -> None:
    doc = _document()
    assert doc["openapi"].startswith("3.1.")
    for ref in _refs(doc):
        target: Any = doc
        assert ref.startswith("#/"), ref
        for part in ref[2:].split("/"):
            assert part in target, f"$ref {ref} does not resolve"
            target = target[part]
    operations = [op for item in doc["paths"].values() for m, op in item.items() if m in METHODS]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    assert all(op["responses"] for op in operations)
    for path, item in doc["paths"].items():
        declared = {p["name"] for p in item.get("parameters", [])}
        for m, op in item.items():
            if m in METHODS:
                names = declared | {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
                assert set(re.findall(r"\{(\w+)\}", path)) <= names, f"{m} {path}: path parameters undeclared"

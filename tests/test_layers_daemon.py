"""Layered deploys under a real thawd (daemon/layering.py): functions captured as children of one
runtime template, the pool holding it once, cold captures where a function cannot be layered,
and a damaged runtime template never run again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmpool import Pool, SegmentInUse
from tests.damage import flip_byte, segment_path
from tests.thawd import Thawd, write_function

pytestmark = pytest.mark.privileged
NAME = "thawy0"
SMALL = """
import json, os
STATE = {"name": NAME, "squares": [i * i for i in range(3000)]}
def handle(event, context):
    env = {"GREETING": os.environ.get("GREETING"), "HOSTNAME": os.environ.get("HOSTNAME")}
    return {"name": STATE["name"], "sum": sum(STATE["squares"]), "env": env["GREETING"], "host": env["HOSTNAME"]}
"""


@pytest.fixture(scope="module")
def thawd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thawd]:
    daemon = Thawd(tmp_path_factory.mktemp("layers-thawd"), NAME, "10.247.0.0/24", integrity_scrub_interval="0.3")
    with daemon.serving():
        yield daemon


def deploy(thawd: Thawd, root: Path, name: str, **spec: object) -> dict[str, object]:
    return thawd.deploy(name, write_function(root / name, f"NAME = {name!r}\n" + SMALL), **spec)


def runtimes(thawd: Thawd) -> list[str]:
    with Pool(thawd.pool_root) as pool:
        return [r.name for r in pool.list() if r.kind == "template" and r.name.startswith("runtime-")]


def test_twenty_functions_are_children_of_one_runtime_template(thawd: Thawd, tmp_path: Path) -> None:
    names = [f"layered-{i}" for i in range(20)]
    try:
        for name in names:
            deployed = deploy(thawd, tmp_path, name)
            assert deployed["captured"] == "layered", deployed
        parents = {thawd.api("GET", f"/functions/{name}")[1]["parent"] for name in names}
        assert parents == set(runtimes(thawd)) and len(parents) == 1  # the pool holds the parent once
        for name in names:
            expected = {"name": name, "sum": sum(i * i for i in range(3000)), "env": None, "host": name}
            assert thawd.invoke(name) == (200, expected)  # the environment a cold guest would have
        listing = thawd.cli("ls").stdout
        assert f"from {parents.pop()}" in listing
    finally:
        for name in names:
            thawd.remove(name)


def test_the_runtime_template_is_kept_while_a_child_needs_it(thawd: Thawd, tmp_path: Path) -> None:
    deploy(thawd, tmp_path, "child")
    try:
        (runtime,) = runtimes(thawd)
        with Pool(thawd.pool_root) as pool, pytest.raises(SegmentInUse, match=f"'{runtime}' is needed by fn.child.1"):
            pool.delete(runtime)
    finally:
        thawd.remove("child")
    with Pool(thawd.pool_root) as pool:
        assert pool.needed_by(runtime) == []


def test_a_layered_function_gets_its_environment_and_updates_stay_layered(thawd: Thawd, tmp_path: Path) -> None:
    deploy(thawd, tmp_path, "greeter", env={"GREETING": "hello"})
    try:
        assert thawd.invoke("greeter")[1]["env"] == "hello"
        status, updated = thawd.api(
            "PUT",
            "/functions/greeter",
            {"name": "greeter", "source": str(tmp_path / "greeter"), "env": {"GREETING": "hi"}},
        )
        assert status == 200, updated
        assert updated["captured"] == "layered" and updated["revision"] == 2
        assert thawd.invoke("greeter")[1]["env"] == "hi"
    finally:
        thawd.remove("greeter")


def test_a_function_setting_what_the_interpreter_reads_at_start_is_captured_cold(thawd: Thawd, tmp_path: Path) -> None:
    deployed = deploy(thawd, tmp_path, "seeded", env={"PYTHONHASHSEED": "7", "GREETING": "cold"})
    try:
        assert deployed["captured"] == "cold" and deployed["parent"] is None
        assert thawd.invoke("seeded")[1]["env"] == "cold"
        assert "captured cold: its environment sets PYTHONHASHSEED" in thawd.log()
    finally:
        thawd.remove("seeded")


def test_a_function_can_ask_to_be_captured_cold(thawd: Thawd, tmp_path: Path) -> None:
    write_function(tmp_path / "lean", "NAME = 'lean'\n" + SMALL)
    done = thawd.cli("deploy", str(tmp_path / "lean"), "--cold")
    try:
        assert done.returncode == 0, done.stderr
        assert "lean: revision 1 ready" in done.stdout and ", cold)" in done.stdout
        function = thawd.api("GET", "/functions/lean")[1]
        assert function["layered"] is False and function["captured"] == "cold" and function["parent"] is None
        assert thawd.invoke("lean")[1]["name"] == "lean"
        status, refused = thawd.api("POST", "/functions", {"name": "odd", "source": str(tmp_path), "layered": "no"})
        assert status == 400 and "layered must be true or false" in refused["error"]["message"]
    finally:
        thawd.remove("lean")


def test_a_damaged_runtime_template_takes_its_children_out_of_use(thawd: Thawd, tmp_path: Path) -> None:
    deploy(thawd, tmp_path, "victim")
    try:
        status, good = thawd.invoke("victim")
        assert status == 200
        (runtime,) = runtimes(thawd)
        with Pool(thawd.pool_root) as pool:
            flip_byte(segment_path(pool, runtime), 4096 + 123)  # in the runtime's pages, past the header
        deadline = time.monotonic() + 60
        while thawd.api("GET", "/functions/victim")[1]["template_form"] != "evicted":
            assert time.monotonic() < deadline, "the scrubber did not quarantine the runtime\n" + thawd.log()
            time.sleep(0.1)
        thawd.api("POST", "/functions/victim/scale", {"replicas": 0})
        assert thawd.invoke("victim") == (200, good)  # captured again, on a runtime template built anew
        function = thawd.api("GET", "/functions/victim")[1]
        assert function["captured"] == "layered" and function["parent"] == runtime
        assert f"(layered on {runtime}) quarantined" in thawd.cli("logs", "victim").stdout
    finally:
        thawd.remove("victim")

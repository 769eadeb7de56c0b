"""Each instance its own: randomness re-seeded after every thaw, and the function's hooks
(sandbox/guest/hooks.py), checked on real captures and restores in every mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.guest.launch import recv
from shmpool import Pool
from snapshot.restore import restore
from snapshot.stub import launch_stub
from snapshot.template import MODES, Template
from tests.guests import captured, request, thawed

pytestmark = pytest.mark.privileged

FUNCTION = """
import os, random
from sandbox.guest.hooks import register_after_thaw, register_before_capture

PRIVATE = random.Random()            # seeded from entropy during init: re-seeded in every instance
FIXED = random.Random(42)            # seeded with a value: the same numbers in any process
RESEEDED = random.Random(7)
RESEEDED.seed()                      # seeded from entropy again: re-seeded too
EVENTS = []

@register_before_capture
def _closing():
    EVENTS.append("before_capture")

@register_after_thaw
def _reconnect():
    EVENTS.append("after_thaw")

def after_thaw():                    # the module-level convention, like init()
    EVENTS.append("module_after_thaw")
    if os.environ.get("THAW_TEST_FAIL_HOOK") and os.path.exists(os.environ["THAW_TEST_FAIL_HOOK"]):
        raise RuntimeError("cannot reconnect")

def handle(event, context):
    return {
        "global": random.random(), "private": PRIVATE.random(), "fixed": FIXED.random(),
        "reseeded": RESEEDED.random(), "events": EVENTS,
    }
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    pool = Pool.create(tmp_path_factory.mktemp("hooks") / "pool", backend="tmpfs", node=0, size=256 << 20)
    yield pool
    pool.destroy()


@pytest.fixture(scope="module")
def function_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hooked")
    (d / "handler.py").write_text(FUNCTION)
    return d


@pytest.fixture(scope="module")
def template(pool: Pool, function_dir: Path) -> Iterator[Template]:
    template = captured(pool, function_dir, "hooked", {"THAW_TEST_FAIL_HOOK": str(function_dir / "fail")})
    yield template
    template.close()


@pytest.mark.parametrize("mode", MODES)
def test_every_instance_draws_its_own_numbers_and_runs_the_hooks(template: Template, mode: str) -> None:
    replies = []
    for _ in range(3):
        with thawed(template, mode) as (_, stub):
            replies.append(request(stub.control))
    for key in ("global", "private", "reseeded"):
        assert len({r[key] for r in replies}) == 3, (key, replies)
    assert len({r["fixed"] for r in replies}) == 1  # Random(42) stays what the function asked for
    # before_capture ran once, before READY; the after-thaw hooks once per instance, in order
    assert replies[0]["events"] == ["before_capture", "after_thaw", "module_after_thaw"]


def test_a_failing_after_thaw_hook_fails_the_thaw_with_its_error(template: Template, function_dir: Path) -> None:
    (function_dir / "fail").write_text("")
    try:
        stub = launch_stub(template.restore_fds("cow"))
        assert stub.control is not None
        instance = restore(template, stub, "cow")
        try:
            said = recv(stub.control)
        finally:
            instance.close()
            stub.control.close()
    finally:
        (function_dir / "fail").unlink()
    assert said is not None and said["type"] == "error", said
    assert said["error"]["message"] == "an after-thaw hook failed: cannot reconnect"
    assert "RuntimeError: cannot reconnect" in said["error"]["traceback"]

"""Integrity of the pool under a real thawd: a damaged template is never run again, and what a
killed capture leaves behind never blocks a deploy."""

from __future__ import annotations

import mmap
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmpool import Pool
from tests.damage import flip_byte, segment_path
from tests.guests import REPO
from tests.thawd import Thawd, write_function

pytestmark = pytest.mark.privileged
NAME = "thawq0"
MARK = b"integrity-mark:"

# The digest depends on every byte of a 1.2 MiB table built at init: a flipped byte in the template's
# copy of it changes the answer of every instance thawed from the damaged template.
DIGEST = f"""
import hashlib
TABLE = bytearray(b"".join({MARK!r} + i.to_bytes(4, "little") for i in range(1 << 16)))
def handle(event, context):
    return hashlib.sha256(TABLE).hexdigest()
"""


@pytest.fixture
def thawd(tmp_path: Path) -> Iterator[Thawd]:
    daemon = Thawd(tmp_path, NAME, "10.241.0.0/24", integrity_scrub_interval="0.3", sandboxes_prewarm=1)
    with daemon.serving():
        yield daemon


def _damage_table(thawd: Thawd, template: str) -> None:
    """Flip one byte of the table inside the template's segment (found by its marks)."""
    with Pool(thawd.pool_root) as pool:
        path = segment_path(pool, template)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        at = view.find(MARK + (1000).to_bytes(4, "little"))
    assert at > 0, "the table is not in the template"
    flip_byte(path, at + 2)


def _metric(thawd: Thawd, name: str) -> float:
    _, text = thawd.api("GET", "/metrics")
    lines = [line for line in text.decode().splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[1]) if lines else 0.0


def _logs(thawd: Thawd, function: str) -> str:
    return thawd.cli("logs", function).stdout


def test_the_scrubber_quarantines_a_damaged_template_and_the_function_is_captured_again(
    thawd: Thawd, tmp_path: Path
) -> None:
    deployed = thawd.deploy("digest", write_function(tmp_path / "digest", DIGEST))
    status, good = thawd.invoke("digest")
    assert status == 200
    _damage_table(thawd, deployed["template"])
    deadline = time.monotonic() + 60
    while _metric(thawd, "thaw_quarantined_segments_total") < 1:
        assert time.monotonic() < deadline, "the scrubber did not find the damaged chunk\n" + thawd.log()
        time.sleep(0.1)
    function = thawd.api("GET", "/functions/digest")[1]
    assert function["template_form"] == "evicted", function  # out of use until captured again
    logged = _logs(thawd, "digest")
    assert f"template {deployed['template']} quarantined" in logged
    assert "chunk" in logged and "does not match its checksum" in logged
    for _ in range(3):  # fresh restores: from a new capture, never from the damaged pages
        thawd.api("POST", "/functions/digest/scale", {"replicas": 0})
        assert thawd.invoke("digest") == (200, good)
    assert thawd.api("GET", "/functions/digest")[1]["template_form"] == "warm"


def test_a_template_damaged_while_thawd_was_down_is_captured_again(thawd: Thawd, tmp_path: Path) -> None:
    deployed = thawd.deploy("digest", write_function(tmp_path / "digest", DIGEST))
    good = thawd.invoke("digest")
    assert thawd.stop() == 0
    _damage_table(thawd, deployed["template"])
    thawd.start()
    assert thawd.api("GET", "/functions/digest")[1]["template_form"] == "evicted"
    assert thawd.invoke("digest") == good
    assert f"template {deployed['template']} quarantined" in _logs(thawd, "digest")


def _abandon_a_write(pool_root: Path, name: str) -> None:
    """A process starts writing segment `name` and is killed -9 in the middle (a capture cut short)."""
    code = (
        "import os, signal, sys\n"
        "from shmpool import Pool\n"
        "pool = Pool(sys.argv[1])\n"
        "writer = pool.create_segment(sys.argv[2], 1 << 20, kind='template')\n"
        "writer.write(0, b'half' * 1024)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(pool_root), name], cwd=REPO)
    assert result.returncode == -signal.SIGKILL


def _writing(pool_root: Path) -> list[str]:
    with Pool(pool_root) as pool:
        return [r.name for r in pool.list(include_all=True) if r.state == "writing"]


def test_an_abandoned_write_never_blocks_a_redeploy(thawd: Thawd, tmp_path: Path) -> None:
    source = write_function(tmp_path / "again", "def handle(event, context):\n    return 'again'\n")
    first = thawd.deploy("again", source)
    _abandon_a_write(thawd.pool_root, f"fn.again.{first['revision'] + 1}")  # the next revision's template
    assert _writing(thawd.pool_root) == [f"fn.again.{first['revision'] + 1}"]
    status, reply = thawd.api("POST", "/functions/again/snapshot")
    assert status == 200, reply
    assert reply["revision"] == first["revision"] + 1
    assert thawd.invoke("again") == (200, "again")
    assert _writing(thawd.pool_root) == []


def test_abandoned_writes_are_collected_when_thawd_starts(thawd: Thawd) -> None:
    assert thawd.stop() == 0
    _abandon_a_write(thawd.pool_root, "fn.gone.1")
    assert _writing(thawd.pool_root) == ["fn.gone.1"]
    thawd.start()
    assert _writing(thawd.pool_root) == []

"""thawd's keep-alive under a memory budget, end to end: idle functions' templates are compressed or
evicted as the cost model says, and invoking them still works (a restore of the compressed
template; a fresh capture of an evicted one).

The cost model reads the benchmarks' JSON; here the test writes that JSON itself, with a ratio
chosen so that the outcome does not depend on how large the function's template happens to be:
ratio 1000 makes any compressed template fit a 1 MiB budget that the template itself does not;
ratio 1.01 makes it fit no better than uncompressed, so the template is evicted."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import bench
from daemon.bench import CodecRow, RestoreRow
from tests.thawd import Thawd, write_function

pytestmark = pytest.mark.privileged

FUNCTION = """
import json, random
STATE = [random.Random(i).random() for i in range(50000)]
def handle(event, context):
    return {"sum": round(sum(STATE), 6), "echo": json.loads(event.body or b"null")}
"""


def _costs(base: Path, ratio: float) -> dict[str, str]:
    """Cost files as scripts/bench_restore and scripts/bench_codecs write them (daemon/bench.py)."""
    restore = base / "restore.json"
    rows = [
        RestoreRow(64, mode, 1, 1, False, ms, ms, 9.0, 4.0, 5, None) for mode, ms in (("cold", 300.0), ("cow", 3.0))
    ]
    bench.write(restore, bench.Document("bench_restore", {"restore": rows}))
    codecs = base / "codecs.json"
    codec = CodecRow("lz4", 1, "python-heap", ratio, 900.0, 600.0, 5.0, 5)
    bench.write(codecs, bench.Document("bench_codecs", {"codecs": [codec]}))
    return {"keepalive_restore_costs": str(restore), "keepalive_codec_costs": str(codecs)}


@contextlib.contextmanager
def running(base: Path, **settings: Any) -> Iterator[Thawd]:
    daemon = Thawd(base, "thawk0", "10.238.0.0/24", sandboxes_prewarm=1, **settings)
    daemon.start()
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.log()
        daemon.destroy_pool()


@pytest.fixture
def daemon_with_budget(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Thawd]:
    budget = {"keepalive_policy": "hybrid", "keepalive_budget": "1M", "keepalive_codec": "lz4"}
    timers = {"keepalive_plan_interval": 1, "keepalive_cache_ttl": 1}
    with running(tmp_path, **budget, **timers, **_costs(tmp_path, request.param)) as daemon:
        yield daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Thawd]:
    with running(tmp_path) as daemon:
        yield daemon


def _form_becomes(thawd: Thawd, name: str, wanted: str, timeout: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        status, info = thawd.api("GET", f"/functions/{name}")
        assert status == 200, info
        if info["template_form"] == wanted:
            return dict(info)
        assert time.monotonic() < deadline, f"{name} stayed {info['template_form']}, not {wanted}:\n{thawd.log()}"
        time.sleep(0.2)


def _deploy_and_invoke(thawd: Thawd, tmp_path: Path, name: str) -> float:
    source = write_function(tmp_path / name, FUNCTION)
    result = thawd.cli("deploy", str(source), "--name", name, "--idle-timeout", "0", "--json")
    assert result.returncode == 0, result.stderr + thawd.log()
    status, reply = thawd.invoke(name, {"n": 1})
    assert status == 200, reply
    return float(reply["sum"])


@pytest.mark.parametrize("daemon_with_budget", [1000.0], indirect=True)
def test_an_idle_template_over_budget_is_compressed_and_still_restores(
    daemon_with_budget: Thawd, tmp_path: Path
) -> None:
    thawd = daemon_with_budget
    expected = _deploy_and_invoke(thawd, tmp_path, "squeezed")
    info = _form_becomes(thawd, "squeezed", "compressed")
    assert str(info["template"]).endswith(".z")
    status, reply = thawd.invoke("squeezed", {"n": 2})  # restored from the compressed template, in a sandbox
    assert status == 200 and reply == {"sum": expected, "echo": {"n": 2}}
    assert _form_becomes(thawd, "squeezed", "compressed")["invocations"] == 2


@pytest.mark.parametrize("daemon_with_budget", [1.01], indirect=True)
def test_an_idle_template_that_fits_in_no_form_is_evicted_and_captured_again(
    daemon_with_budget: Thawd, tmp_path: Path
) -> None:
    thawd = daemon_with_budget
    expected = _deploy_and_invoke(thawd, tmp_path, "evicted")
    info = _form_becomes(thawd, "evicted", "evicted")
    assert info["template"] is None
    status, reply = thawd.invoke("evicted", {"n": 3})  # a cold start: captured again, then restored
    assert status == 200 and reply == {"sum": expected, "echo": {"n": 3}}
    _, text = thawd.api("GET", "/metrics")
    assert 'thaw_starts_total{function="evicted",kind="cold"} 2.0' in text.decode()


def test_a_template_is_compressed_expanded_and_evicted_by_hand(daemon: Thawd, tmp_path: Path) -> None:
    expected = _deploy_and_invoke(daemon, tmp_path, "forms")
    for form, codec, template_end in (
        ("compressed", "zstd", ".z"),
        ("compressed", "lz4", ".z"),  # recompressed with another codec
        ("warm", None, "fn.forms.1"),
        ("evicted", None, ""),
    ):
        result = daemon.cli("template", "forms", form, *(["--codec", codec] if codec else []), "--json")
        assert result.returncode == 0, result.stderr + daemon.log()
        info = json.loads(result.stdout)
        assert info["template_form"] == form and str(info["template"] or "").endswith(template_end)
        assert info["template_codec"] == codec
        status, reply = daemon.invoke("forms", {"form": form})
        assert status == 200 and reply == {"sum": expected, "echo": {"form": form}}
    status, error = daemon.api("POST", "/functions/forms/template", {"form": "frozen"})
    assert status == 400 and "form must be one of warm, compressed, evicted" in error["error"]["message"]
    status, error = daemon.api("POST", "/functions/forms/template", {"form": "compressed", "codec": "rar"})
    assert status == 400 and "codec must be" in error["error"]["message"]
    assert daemon.api("POST", "/functions/nothing/template", {"form": "warm"})[0] == 404


def test_with_user_namespaces_paged_templates_are_refused_at_deploy_and_compress(tmp_path: Path) -> None:
    """A lazy or compressed template could not be restored into sandboxes with a user namespace
    (vm.unprivileged_userfaultfd is 0): it is refused when asked for, with the reason, and never
    made (no 503 on every invocation)."""
    if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "1":
        pytest.skip("vm.unprivileged_userfaultfd is 1: paged restores work in user namespaces here")
    with running(tmp_path, sandboxes_userns="true") as daemon:
        source = write_function(tmp_path / "ns", FUNCTION)
        status, reply = daemon.api("POST", "/functions", {"name": "nslazy", "source": str(source), "mode": "lazy"})
        assert status == 400, reply
        assert "cannot be restored lazily here: sandboxes have a user namespace" in reply["error"]["message"]
        assert daemon.api("GET", "/functions/nslazy")[0] == 404
        expected = _deploy_and_invoke(daemon, tmp_path, "nscow")
        status, reply = daemon.api("POST", "/functions/nscow/template", {"form": "compressed"})
        assert status == 400, reply
        assert "cannot be compressed here: sandboxes have a user namespace" in reply["error"]["message"]
        info = daemon.api("GET", "/functions/nscow")[1]
        assert info["template_form"] == "warm"
        status, reply = daemon.invoke("nscow", {"n": 1})
        assert status == 200 and reply["sum"] == expected

"""thawd under systemd: the unit file as systemd itself reads it, and the notify protocol
(daemon/sdnotify.py) against real AF_UNIX datagram sockets standing in for systemd's."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import config
from daemon.sdnotify import notify, watchdog_interval

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "thawd.service"
INSTALL = REPO / "scripts" / "install"
# What scripts/install rewrites to the checkout's path.
PREFIX = "/opt/thaw"
EXEC_START = f"{PREFIX}/.venv/bin/thawd --config /etc/thaw/thawd.toml"
# DESIGN.md: each breaks something thawd needs (cgroups, hugepage sysctls, /dev/userfaultfd, mounts).
FORBIDDEN = (
    "ProtectControlGroups",
    "ProtectKernelTunables",
    "PrivateDevices",
    "RestrictNamespaces",
    "ProtectSystem",
    "PrivateTmp",
    "PrivateMounts",
)


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value the key is given, in order (systemd allows repeats)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not parsed here"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {number}: setting outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: not a KEY=value setting: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return unit_settings(UNIT.read_text())


# --- the unit --------------------------------------------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart's binary exists: point it at this interpreter, and the rest of the
    # paths at this checkout, as scripts/install does.
    text = UNIT.read_text().replace(f"{PREFIX}/.venv/bin/thawd", sys.executable).replace(PREFIX, str(REPO))
    copy = tmp_path / "thawd.service"
    copy.write_text(text)
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # systemd words most complaints without "warning" ("Unknown key ..., ignoring."): any line about
    # the unit is one. Lines about the machine's own units are not ours to judge.
    complaints = [line for line in output.splitlines() if "thawd.service" in line]
    assert complaints == [], output


def test_unit_is_a_notify_service_with_delegation(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Delegate": "yes",
        "RuntimeDirectory": "thaw",
        "StateDirectory": "thaw",
        "Restart": "always",
        "KillMode": "control-group",
        "ExecStart": EXEC_START,
    }
    for key, value in expected.items():
        assert service.get(key) == [value], f"[Service] {key}= should be {value!r}, is {service.get(key)}"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert {"Description", "Documentation"} <= unit["Unit"].keys()


def test_unit_stops_later_than_the_drain_timeout(unit: dict[str, dict[str, list[str]]]) -> None:
    # thawd drains in-flight invocations for 20 s by default; systemd must not SIGKILL it sooner.
    (timeout,) = unit["Service"]["TimeoutStopSec"]
    assert float(timeout) > 20


def test_unit_has_no_sandboxing_that_breaks_thawd(unit: dict[str, dict[str, list[str]]]) -> None:
    present = {key for settings in unit.values() for key in settings}
    assert present.isdisjoint(FORBIDDEN), sorted(present.intersection(FORBIDDEN))


def test_install_script_is_valid_bash() -> None:
    assert os.access(INSTALL, os.X_OK), f"{INSTALL} is not executable"
    result = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    # The install script substitutes the checkout path for PREFIX in the unit: it must be there.
    assert PREFIX in INSTALL.read_text()


# --- the notify protocol ---------------------------------------------------------------------------------------------


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def _datagrams(sock: socket.socket) -> list[bytes]:
    """Every datagram queued on `sock`: the first waits (up to its timeout), the rest must be there."""
    received = [sock.recv(65536)]
    sock.setblocking(False)
    try:
        while True:
            received.append(sock.recv(65536))
    except BlockingIOError:
        pass
    return received


@pytest.fixture
def systemd_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path, named by $NOTIFY_SOCKET as systemd names its own."""
    path = tmp_path / "notify"
    with _receiver(str(path)) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_sends_ready_as_one_datagram(systemd_socket: socket.socket) -> None:
    assert notify("READY=1") is True
    assert _datagrams(systemd_socket) == [b"READY=1"]


def test_notify_joins_states_with_newlines(systemd_socket: socket.socket) -> None:
    assert notify("READY=1", "STATUS=serving 3 functions") is True
    assert _datagrams(systemd_socket) == [b"READY=1\nSTATUS=serving 3 functions"]


def test_notify_sends_one_datagram_per_call(systemd_socket: socket.socket) -> None:
    assert notify("STATUS=opening the pool")
    assert notify("STOPPING=1")
    assert _datagrams(systemd_socket) == [b"STATUS=opening the pool", b"STOPPING=1"]


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"thaw-test-notify-{uuid.uuid4().hex}"
    with _receiver(b"\0" + name.encode()) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        assert notify("READY=1") is True
        assert _datagrams(sock) == [b"READY=1"]


@pytest.mark.parametrize("value", [None, ""])
def test_notify_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify("READY=1") is False


def test_notify_to_a_missing_socket_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "gone")
    monkeypatch.setenv("NOTIFY_SOCKET", missing)
    with pytest.raises(OSError, match=re.escape(missing)) as info:
        notify("READY=1")
    assert info.value.errno == errno.ENOENT


def test_notify_rejects_a_relative_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "run/notify")
    with pytest.raises(OSError, match="run/notify") as info:
        notify("READY=1")
    assert info.value.errno == errno.EAFNOSUPPORT


# --- the watchdog ----------------------------------------------------------------------------------------------------


@pytest.fixture
def no_watchdog(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean slate, in case the tests themselves run under a unit with WatchdogSec=."""
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return monkeypatch


def test_watchdog_interval_in_seconds(no_watchdog: pytest.MonkeyPatch) -> None:
    no_watchdog.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 30.0
    no_watchdog.setenv("WATCHDOG_USEC", "1500")
    assert watchdog_interval() == pytest.approx(0.0015)


def test_watchdog_interval_for_this_pid_only(no_watchdog: pytest.MonkeyPatch) -> None:
    no_watchdog.setenv("WATCHDOG_USEC", "5000000")
    no_watchdog.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 5.0
    # Meant for the process that started this one, and inherited by mistake.
    no_watchdog.setenv("WATCHDOG_PID", str(os.getppid()))
    assert watchdog_interval() is None
    no_watchdog.setenv("WATCHDOG_PID", "not-a-pid")
    assert watchdog_interval() is None


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "ten"])
def test_no_watchdog(no_watchdog: pytest.MonkeyPatch, usec: str | None) -> None:
    if usec is not None:
        no_watchdog.setenv("WATCHDOG_USEC", usec)
    assert watchdog_interval() is None


def test_the_example_config_lists_every_setting_at_its_default() -> None:
    """daemon/thawd.example.toml is what scripts/install copies: it must be what config.example() makes."""
    assert (REPO / "daemon" / "thawd.example.toml").read_text() == config.example()
    assert config.load(REPO / "daemon" / "thawd.example.toml") == config.DaemonConfig()

"""A real thawd for tests: started as its own process on a private socket, pool, bridge, subnet and
cgroup tree, talked to through the API (aiohttp over the Unix socket) and the `thaw` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.guests import REPO

START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Thawd:
    def __init__(self, base: Path, name: str, subnet: str, **settings: Any) -> None:
        self.base = base
        self.socket = base / "thaw.sock"
        self.pool_root = base / "pool"
        self.stderr_path = base / "thawd.stderr"
        self.password = "s3cret-test"
        (base / "password").write_text(self.password + "\n")
        self.gateway_port = free_port()
        self.flags = {
            "state-dir": base / "state",
            "socket": self.socket,
            "pool-root": self.pool_root,
            "pool-size": "512M",
            "sandboxes-prewarm": 2,
            "sandboxes-max": 40,
            "sandboxes-bridge": name,
            "sandboxes-subnet": subnet,
            "sandboxes-cgroup": name,
            "sandboxes-runtime-dir": base / "sandboxes",
            "instances-max": 36,
            "instances-idle-timeout": 300,
            "gateway-listen": f"127.0.0.1:{self.gateway_port}",
            "gateway-password-file": base / "password",
            "drain-timeout": 10,
            **{k.replace("_", "-"): v for k, v in settings.items()},
        }
        self.process: subprocess.Popen[bytes] | None = None

    # -- life -----------------------------------------------------------------------------------------
    def start(self) -> None:
        argv = [sys.executable, "-m", "daemon.main"]
        for key, value in self.flags.items():
            argv += [f"--{key}", str(value)]
        self.stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(argv, cwd=REPO, stderr=self.stderr, stdout=self.stderr)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"thawd exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"thawd did not serve within {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            status, _ = self.api("GET", "/health")
        except (OSError, aiohttp.ClientError):
            return False
        return status == 200

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.stderr.close()
        return code

    @contextlib.contextmanager
    def serving(self) -> Iterator[Thawd]:
        """Started for the block; then stopped with SIGTERM (which must exit 0) and its pool destroyed."""
        self.start()
        try:
            yield self
        finally:
            if self.process and self.process.poll() is None:
                assert self.stop() == 0, self.log()
            self.destroy_pool()

    def destroy_pool(self) -> None:
        if (self.pool_root / "pool.json").exists():
            subprocess.run(
                [sys.executable, "-m", "shmpool", "--root", str(self.pool_root), "destroy", "--force"],
                cwd=REPO,
                check=True,
            )

    # -- talking ----------------------------------------------------------------------------------------
    def api(
        self, method: str, path: str, body: Any = None, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """One request to the API; the reply as JSON when it is JSON, else bytes."""
        status, headers, payload = asyncio.run(self.request(method, path, body, data, headers))
        if headers.get("Content-Type", "").startswith("application/json") and payload:
            return status, json.loads(payload)
        return status, payload

    async def request(
        self, method: str, path: str, body: Any = None, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connector = aiohttp.UnixConnector(path=str(self.socket))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(method, f"http://thawd{path}", json=body, data=data, headers=headers) as r,
        ):
            return r.status, dict(r.headers), await r.read()

    def cli(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", "--socket", str(self.socket), *args],
            cwd=REPO,
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "COLUMNS": "200"},
        )

    def deploy(self, name: str, source: Path, **spec: Any) -> dict[str, Any]:
        status, reply = self.api("POST", "/functions", {"name": name, "source": str(source), **spec})
        assert status == 201, reply
        assert isinstance(reply, dict)
        return reply

    def invoke(self, name: str, body: Any = None, path: str = "") -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        return self.api("POST", f"/functions/{name}/invoke{path}", data=data)

    def remove(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.api("DELETE", f"/functions/{name}")


def write_function(directory: Path, source: str, requirements: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "handler.py").write_text(source)
    if requirements is not None:
        (directory / "requirements.txt").write_text(requirements)
    return directory

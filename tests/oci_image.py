"""Function images as OCI archives, written here (no registry, no docker daemon), and a private
containerd to import and run them: for tests/test_shim.py and scripts/bench_shim.py.

An image is one layer holding `/function` (the handler module; requirements would be installed
beside it). The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) in a
tar, what `ctr image import` reads; the index names the image with containerd's
`io.containerd.image.name` annotation.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.guests import REPO

CONTAINERD_START_TIMEOUT = 30.0
SHIM_DIR = REPO / "daemon" / "shim" / "bin"  # containerd-shim-thaw-v2, found on containerd's PATH


def _blob(blobs: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


def _tar(files: dict[str, str]) -> bytes:
    """A layer: directories and files, fixed mtimes and owners (the same input, the same digest)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(p).parent) for p in files if str(Path(p).parent) != "."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for path, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_image(
    archive: Path,
    name: str,
    files: dict[str, str],
    env: list[str] | None = None,
    cmd: list[str] | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    """Write an OCI archive of one layer holding `files` (paths relative to /); returns the
    manifest's digest."""
    blobs: dict[str, bytes] = {}
    layer = _tar(files)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    compressed = gzip.compress(layer, mtime=0)
    layer_digest = _blob(blobs, compressed)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env or ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": cmd or ["/bin/false"],
                   "Labels": labels or {}, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }  # fmt: skip
    config_data = json.dumps(config, sort_keys=True).encode()
    config_digest = _blob(blobs, config_data)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config_data)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": len(compressed)}],
    }  # fmt: skip
    manifest_data = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = _blob(blobs, manifest_data)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
            "size": len(manifest_data), "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
        }],
    }  # fmt: skip
    with tarfile.open(archive, "w") as tar:

        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(f"blobs/sha256/{digest.removeprefix('sha256:')}", data)
    return manifest_digest


@dataclass
class Containerd:
    """A containerd of the test's own: root, state, sockets in a temporary directory, the CRI
    plugin off, containerd-shim-thaw-v2 on its PATH and thawd's socket in its environment."""

    base: Path
    thawd_socket: Path
    process: subprocess.Popen[bytes] | None = None
    made_run_containerd: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> Path:
        return self.base / "c.sock"

    def start(self) -> None:
        self.made_run_containerd = not Path("/run/containerd").exists()
        (self.base / "s").mkdir(parents=True, exist_ok=True)
        config = self.base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.base}/root"\nstate = "{self.base}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '[debug]\n  level = "info"\n'
        )
        self.env = {
            **os.environ,
            "PATH": f"{SHIM_DIR}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "THAW_SOCKET": str(self.thawd_socket),
            "THAW_SHIM_SOCKET_DIR": str(self.base / "s"),
        }
        log = open(self.base / "containerd.log", "ab")  # noqa: SIM115 - the process holds it
        self.process = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=log, stderr=log, env=self.env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + CONTAINERD_START_TIMEOUT
        while self.ctr("version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        return (self.base / "containerd.log").read_text(errors="replace")

    def ctr(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ctr", "--address", str(self.address), *args],
            capture_output=True, text=True, timeout=timeout, env=self.env, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def shim_pids(self) -> list[int]:
        """The resident shim servers of this containerd (one per namespace), by their pid files."""
        pids = []
        for pid_file in (self.base / "s").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if Path(f"/proc/{pid}").exists():
                    pids.append(pid)
        return pids

    def stop_shims(self) -> None:
        """SIGTERM them (a server outlives its containers for THAW_SHIM_IDLE_TIMEOUT) and wait."""
        pids = self.shim_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        """Every task killed and deleted, every container and image removed, containerd stopped,
        its root unmounted and removed (the machine as it was)."""
        if self.process is not None and self.process.poll() is None:
            for line in self.ctr("task", "ls", "-q", check=False).stdout.split():
                self.ctr("task", "kill", "-s", "SIGKILL", line, check=False)
                time.sleep(0.2)
                self.ctr("task", "delete", "-f", line, check=False)
            for line in self.ctr("container", "ls", "-q", check=False).stdout.split():
                self.ctr("container", "rm", line, check=False)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stop_shims()
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            target = line.split()[4]
            if target.startswith(str(self.base) + "/"):
                with contextlib.suppress(subprocess.CalledProcessError):
                    subprocess.run(["umount", "-l", target], check=True, capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
        if self.made_run_containerd:
            shutil.rmtree("/run/containerd", ignore_errors=True)


@contextlib.contextmanager
def containerd(thawd_socket: Path) -> Iterator[Containerd]:
    base = Path(tempfile.mkdtemp(prefix="thaw-ctd-", dir="/tmp"))
    daemon = Containerd(base, thawd_socket)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def netns(name: str) -> Path:
    """A network namespace as CRI makes a pod's (`ip netns add`), its loopback up."""
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
    return Path("/run/netns") / name


def remove_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def http_in(ns: str, path: str = "/", data: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """An HTTP request to 127.0.0.1:8080 from inside network namespace `ns`."""
    script = (
        "import sys, urllib.request\n"
        "req = urllib.request.Request('http://127.0.0.1:8080' + sys.argv[1], data=sys.stdin.buffer.read() or None)\n"
        "try:\n"
        f"    r = urllib.request.urlopen(req, timeout={timeout})\n"
        "except urllib.error.HTTPError as e:\n"
        "    r = e\n"
        "sys.stdout.write(str(r.status) + '\\n'); sys.stdout.flush(); sys.stdout.buffer.write(r.read())\n"
    )
    result = subprocess.run(
        ["ip", "netns", "exec", ns, "python3", "-c", script, path],
        input=data or b"", capture_output=True, timeout=timeout + 10, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise ConnectionError(result.stderr.decode(errors="replace").strip().splitlines()[-1:])
    status, _, body = result.stdout.partition(b"\n")
    return int(status), body


def wait_http(ns: str, path: str = "/_/health", timeout: float = 20.0) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_in(ns, path, timeout=2.0)
        except (ConnectionError, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def read_json(text: str) -> Any:
    return json.loads(text)

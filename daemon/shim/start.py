"""`containerd-shim-thaw-v2 start`: the shim's hot path, which containerd waits for on every
container start, so it imports nothing but the interpreter's C modules (no site, no protobuf, no
`socket`/`enum`, no thaw package beyond this file).

One shim server per containerd and namespace, resident: containerd's runtime v2 lets `start`
"either start a new shim or return an address to an existing shim", and speaks to one address
for as many tasks as it is given (its pods group containers so). So `start` asks whether that
server answers on its socket; if so it prints the address and is done (about one interpreter
start); if not it binds the socket, leaves a server on it (`python -m daemon.shim.main ... serve`,
which pays for protobuf and thaw's imports once) and prints the address. A lock file keeps two
concurrent starts from both binding, and a server from leaving under a start that found it.
The server leaves when it has held no task and no connection for THAW_SHIM_IDLE_TIMEOUT
seconds, or on SIGTERM.

`delete` is here too: containerd runs it whenever a task's connection closes, which is after
every ordinary Delete as well as after a shim died (runtime/v2's cleanupAfterDeadShim), so it must
not cost a full interpreter with protobuf next to the next container's start. Here it asks
thawd to drop the container (over the raw socket: HTTP/1.1 is three lines) and writes the
DeleteResponse (three protobuf fields, by hand); a rootfs still mounted (the server died holding
it) takes the full path in daemon.shim.main, which can unmount.
Everything else (serve, -v, -h) runs in daemon.shim.main, with the venv's Python.
"""

from __future__ import annotations

import _socket  # socket.py imports enum and selectors: ~8 ms this path does not need
import os
import sys
import time

try:  # hashlib's own C module: hashlib proper imports OpenSSL first (~3 ms)
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # renamed in later Pythons
    from hashlib import sha256

NAME = "containerd-shim-thaw-v2"
THAWD_SOCKET = "/run/thaw/thaw.sock"  # THAW_SOCKET overrides (containerd's environment is the shim's)
DEAD_STATUS = 128 + 9  # what a container whose shim died reports: killed, as by SIGKILL
SOCKET_DIR = "/run/thaw/shim"  # THAW_SHIM_SOCKET_DIR overrides; unix socket paths must stay under 108 bytes
VALUED = ("namespace", "id", "address", "publish-binary", "bundle", "socket")


class UsageError(Exception):
    pass


class Flags:
    """containerd's flags, in Go's syntax: -name value (or --name, -name=value), then the action."""

    def __init__(self) -> None:
        self.namespace = self.id = self.address = self.publish_binary = self.bundle = self.action = ""
        self.debug = False

    def server_argv(self) -> list[str]:
        """The flags the resident server needs: it serves every container of its namespace."""
        out = ["-namespace", self.namespace, "-address", self.address, "-publish-binary", self.publish_binary]
        return out + (["-debug"] if self.debug else [])


def parse(argv: list[str]) -> Flags:
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            flags.action = arg
            if i + 1 < len(argv):
                raise UsageError(f"unexpected arguments after {arg!r}: {' '.join(argv[i + 1 :])}")
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in ("h", "help"):
            raise UsageError("")
        if name in ("debug", "v", "version"):
            flags.debug = flags.debug or name == "debug"
            flags.action = flags.action or ("version" if name in ("v", "version") else "")
        elif name in VALUED:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag -{name} needs a value")
                value = argv[i]
            if name != "socket":  # containerd 2's -socket: we choose our own socket
                setattr(flags, name.replace("-", "_"), value)
        else:
            raise UsageError(f"unknown flag -{name}")
        i += 1
    return flags


def socket_path(address: str, namespace: str) -> str:
    """The resident server's socket: one per containerd (its address) and namespace, named by a
    hash as containerd's own shims name theirs, so two containerds on a machine never share one."""
    digest = sha256(f"{address}/{namespace}".encode()).hexdigest()
    return os.path.join(os.environ.get("THAW_SHIM_SOCKET_DIR", SOCKET_DIR), digest[:32])


def serving(path: str) -> bool:
    """Whether a server accepts on `path` (a connection it counts as activity: see the idle rule)."""
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:  # ENOENT: none yet; ECONNREFUSED: one that died and left its socket
        return False
    finally:
        probe.close()


def start(flags: Flags, venv_python: str) -> int:
    """Print the resident server's address, leaving one there first if none answers.

    The lock file, shared here, makes a server that is leaving (it takes the lock exclusively,
    looks again whether it is idle, and only then removes its socket) wait until this start has
    printed; the probe's connection then counts as activity, and the server stays."""
    import fcntl

    path = socket_path(flags.address, flags.namespace)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_SH)
    pid = server_pid(path)
    if pid is None:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one start binds; the others find its server
        pid = server_pid(path) or _spawn_server(flags, path, venv_python)
    address = f"unix://{path}"
    bundle = flags.bundle or os.getcwd()
    _write_atomically(os.path.join(bundle, "address"), address)  # containerd reloads its shims from it
    _write_atomically(os.path.join(bundle, "shim.pid"), str(pid))
    os.write(1, address.encode())
    os.close(lock)
    return 0


def server_pid(path: str) -> int | None:
    """The pid of the server that accepts on `path`, or None (none does, or it is leaving)."""
    if not serving(path):
        return None
    try:
        with open(path + ".pid", "rb") as f:  # written before the socket was renamed into place
            return int(f.read())
    except (OSError, ValueError):
        return None


def _spawn_server(flags: Flags, path: str, venv_python: str) -> int:
    """Bind the socket here (connections queue in its backlog until the server accepts), leave
    the server on it in its own session (containerd reads start's output to its end and signals
    start's process group: neither is for the server), write its pid, and only then rename the
    socket into place, so that whoever finds the socket finds the pid file of its server."""
    import subprocess

    staging = path + ".new"
    if os.path.lexists(staging):
        os.unlink(staging)  # a start that died half-way
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.bind(staging)
    os.chmod(staging, 0o600)
    listener.listen(64)
    log = os.open(path + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        server = subprocess.Popen(
            [venv_python, "-m", "daemon.shim.main", *flags.server_argv(), "serve"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(listener.fileno(),),
            start_new_session=True, cwd="/",
            env={**os.environ, "THAW_SHIM_LISTEN_FD": str(listener.fileno())},
        )  # fmt: skip
    finally:
        os.close(log)
        listener.close()
    _write_atomically(path + ".pid", str(server.pid))
    os.rename(staging, path)  # replaces the socket of a server that died, if any
    return server.pid


def _write_atomically(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


# -- delete ----------------------------------------------------------------------------------------
def delete(flags: Flags, venv_python: str, argv: list[str]) -> int:
    """Clean up after a task whose connection closed: thawd drops what it holds of it, and a
    DeleteResponse (killed, now) goes to stdout."""
    bundle = flags.bundle or os.getcwd()
    if mounted(os.path.join(bundle, "rootfs")):
        os.execv(venv_python, [venv_python, "-m", "daemon.shim.main", *argv])  # unmounting needs native/
    try:
        status, body = thawd_delete(flags.namespace, flags.id)
        if status not in (200, 404):  # 404: the server deleted it already, the ordinary case
            os.write(2, f"{NAME} delete: thawd: {status} {body}\n".encode())
    except OSError as e:
        os.write(2, f"{NAME} delete: thawd: cannot reach thawd: {e}\n".encode())
    os.write(1, delete_response(DEAD_STATUS, time.time_ns()))
    return 0


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == path.encode() for line in f)


def thawd_delete(namespace: str, container_id: str) -> tuple[int, str]:
    """DELETE /containers/{namespace}/{id} on thawd's socket: (status, body)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(30.0)
        sock.connect(os.environ.get("THAW_SOCKET", THAWD_SOCKET))
        request = f"DELETE /containers/{namespace}/{container_id} HTTP/1.1\r\nHost: thawd\r\n"
        sock.sendall(f"{request}Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode(errors="replace").strip()


def delete_response(exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse {pid = 1, exit_status = 2, exited_at = 3 (Timestamp
    {seconds = 1, nanos = 2})} in protobuf's wire format; pid 0 is proto3's default, not written."""
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    timestamp = b"\x08" + _varint(seconds) + (b"\x10" + _varint(nanos) if nanos else b"")
    return b"\x10" + _varint(exit_status) + b"\x1a" + _varint(len(timestamp)) + timestamp


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def main(argv: list[str], venv_python: str) -> int:
    """`start` and `delete` here; every other action in daemon.shim.main, run by the venv's Python."""
    try:
        flags = parse(argv)
    except UsageError:
        flags = Flags()
    if flags.action in ("start", "delete") and flags.namespace and flags.id:
        return start(flags, venv_python) if flags.action == "start" else delete(flags, venv_python, argv)
    os.execv(venv_python, [venv_python, "-m", "daemon.shim.main", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.executable))

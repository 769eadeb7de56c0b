"""containerd-shim-thaw-v2: thaw as a containerd runtime (`io.containerd.thaw.v2`).

containerd runs the shim three ways (its runtime v2 convention, runtime/v2/binary.go):

    containerd-shim-thaw-v2 -namespace NS -id ID -address ADDR -publish-binary BIN start
        in the bundle directory: start a shim server for the container, print its socket
        address (unix://...) and exit. containerd then speaks ttrpc to that socket.
    containerd-shim-thaw-v2 -namespace NS -id ID -address ADDR -publish-binary BIN -bundle DIR delete
        clean up after a shim that is gone: print a protobuf DeleteResponse on stdout.
    (serve: the server `start` leaves behind, with the listening socket's fd in THAW_SHIM_LISTEN_FD.)

The server implements containerd's Task service (daemon/shim/service.py); each container is an
instance of a function that thawd thaws from a template (daemon/containers.py). `start` imports
nothing heavy: containerd waits for it on every container start.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NAME = "containerd-shim-thaw-v2"
SOCKET_DIR = "/run/thaw/shim"  # THAW_SHIM_SOCKET_DIR overrides; unix socket paths must stay under 108 bytes
THAWD_SOCKET = "/run/thaw/thaw.sock"  # THAW_SOCKET overrides (containerd's environment is the shim's)
USAGE = f"""usage: {NAME} [-namespace NS] [-id ID] [-address ADDR] [-publish-binary PATH] [-bundle DIR]
       [-debug] start|delete

containerd's runtime v2 shim for thaw (runtime_type "io.containerd.thaw.v2"). containerd runs it;
a container is a function instance thawed by the node's thawd (THAW_SOCKET, default {THAWD_SOCKET}).
  start    start the shim server for the container in the current (bundle) directory and print its address
  delete   clean up after a dead shim; prints a protobuf DeleteResponse
Environment: THAW_SOCKET (thawd's API socket), THAW_SHIM_SOCKET_DIR (where shim sockets go, default {SOCKET_DIR}).
"""


@dataclass
class Flags:
    namespace: str = ""
    id: str = ""
    address: str = ""
    publish_binary: str = ""
    bundle: str = ""
    debug: bool = False
    action: str = ""

    def argv(self) -> list[str]:
        """The flags again, for the server `start` leaves behind."""
        out = ["-namespace", self.namespace, "-id", self.id, "-address", self.address]
        out += ["-publish-binary", self.publish_binary, "-bundle", self.bundle]
        return out + (["-debug"] if self.debug else [])


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> Flags:
    """Go's flag syntax, as containerd writes it: -name value (or --name, -name=value), then the action."""
    flags = Flags()
    valued = {"namespace", "id", "address", "publish-binary", "bundle", "socket"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            flags.action = arg
            if i + 1 < len(argv):
                raise UsageError(f"unexpected arguments after {arg!r}: {' '.join(argv[i + 1 :])}")
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in ("debug", "v", "version", "h", "help"):
            if name in ("h", "help"):
                raise UsageError("")
            flags.debug = flags.debug or name == "debug"
            flags.action = flags.action or ("version" if name in ("v", "version") else "")
        elif name in valued:
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


def socket_dir() -> Path:
    return Path(os.environ.get("THAW_SHIM_SOCKET_DIR", SOCKET_DIR))


def socket_address(flags: Flags) -> tuple[Path, str]:
    """One socket per container, named by a hash of containerd's address, namespace and id (as
    containerd's own shims do), so two containerds on one machine never share one."""
    digest = hashlib.sha256(f"{flags.address}/{flags.namespace}/{flags.id}".encode()).hexdigest()
    path = socket_dir() / digest[:32]
    return path, f"unix://{path}"


def start(flags: Flags) -> int:
    """Listen, leave the server running in its own session, write the address files, print the address."""
    path, address = socket_address(flags)
    bundle = Path(flags.bundle or os.getcwd())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a shim of the same container that died: its socket would refuse us
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    flags.bundle = str(bundle)
    # containerd reads start's output until EOF: the server must not inherit our stdout. Its log
    # goes to the bundle's "log" fifo, which containerd opened already and copies into its own log.
    log_fifo = bundle / "log"
    log_target = str(log_fifo) if log_fifo.exists() else os.devnull
    with open(log_target, "wb", buffering=0) as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "daemon.shim.main", *flags.argv(), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(listener.fileno(),),
            start_new_session=True,  # containerd's signals to its process group are not for us
            cwd=bundle,
            env={**os.environ, "THAW_SHIM_LISTEN_FD": str(listener.fileno())},
        )
    listener.close()
    _write_atomically(bundle / "address", address)
    _write_atomically(bundle / "shim.pid", str(server.pid))
    sys.stdout.write(address)
    return 0


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}")
    tmp.write_text(text)
    tmp.rename(path)


def main(argv: list[str] | None = None) -> int:
    try:
        flags = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        sys.stderr.write((f"{NAME}: {e}\n" if str(e) else "") + USAGE)
        return 2 if str(e) else 0
    if flags.action == "version":
        print(f"{NAME} (thaw) runtime io.containerd.thaw.v2")
        return 0
    if flags.action not in ("start", "delete", "serve"):
        sys.stderr.write(f"{NAME}: the action must be start or delete, not {flags.action or 'none'}\n" + USAGE)
        return 2
    if not flags.namespace:
        sys.stderr.write(f"{NAME}: shim namespace cannot be empty (-namespace)\n")
        return 2
    if not flags.id:
        sys.stderr.write(f"{NAME}: the container id is missing (-id)\n")
        return 2
    if flags.action == "start":
        return start(flags)
    from daemon.shim import service  # protobuf and the rest: only the server and delete need them

    if flags.action == "delete":
        return service.delete_dead(flags.namespace, flags.id, Path(flags.bundle or os.getcwd()))
    return service.serve(flags, int(os.environ.pop("THAW_SHIM_LISTEN_FD", "3")))


if __name__ == "__main__":
    sys.exit(main())

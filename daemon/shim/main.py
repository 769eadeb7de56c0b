"""containerd-shim-thaw-v2: thaw as a containerd runtime (`io.containerd.thaw.v2`).

containerd runs the shim binary (daemon/shim/bin/containerd-shim-thaw-v2) three ways (its runtime
v2 convention, runtime/v2/binary.go):

    containerd-shim-thaw-v2 -namespace NS -id ID -address ADDR -publish-binary BIN start
        in the bundle directory: print the address (unix://...) of the shim server for this
        containerd and namespace, leaving one there first if none answers (daemon/shim/start.py,
        which runs without this module: containerd waits for it on every container start).
    containerd-shim-thaw-v2 -namespace NS -id ID -address ADDR -publish-binary BIN -bundle DIR delete
        clean up after a shim that is gone: print a protobuf DeleteResponse on stdout.
    (serve: the resident server `start` leaves behind, on the socket whose fd is THAW_SHIM_LISTEN_FD.)

The server implements containerd's Task service (daemon/shim/service.py) for every container of
its namespace; each container is an instance of a function that thawd thaws from a template
(daemon/containers.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from daemon.shim.start import NAME, SOCKET_DIR, THAWD_SOCKET, UsageError, parse, start

IDLE_TIMEOUT = 600.0  # THAW_SHIM_IDLE_TIMEOUT overrides: seconds without a task or a connection
USAGE = f"""usage: {NAME} [-namespace NS] [-id ID] [-address ADDR] [-publish-binary PATH] [-bundle DIR]
       [-debug] start|delete

containerd's runtime v2 shim for thaw (runtime_type "io.containerd.thaw.v2"). containerd runs it;
a container is a function instance thawed by the node's thawd (THAW_SOCKET, default {THAWD_SOCKET}).
  start    print the address of the shim server for this containerd and namespace (one server serves
           all their containers), starting it if none answers
  delete   clean up after a dead shim; prints a protobuf DeleteResponse
Environment: THAW_SOCKET (thawd's API socket), THAW_SHIM_SOCKET_DIR (where shim sockets and their
logs go, default {SOCKET_DIR}), THAW_SHIM_IDLE_TIMEOUT (seconds a server without containers stays,
default {IDLE_TIMEOUT:.0f}).
"""


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
    if not flags.id and flags.action != "serve":
        sys.stderr.write(f"{NAME}: the container id is missing (-id)\n")
        return 2
    if flags.action == "start":  # the shim binary runs start.py itself; this is `python -m daemon.shim.main`
        return start(flags, sys.executable)
    from daemon.shim import service  # protobuf and the rest: only the server and delete need them

    if flags.action == "delete":
        return service.delete_dead(flags.namespace, flags.id, Path(flags.bundle or os.getcwd()))
    idle = float(os.environ.get("THAW_SHIM_IDLE_TIMEOUT", IDLE_TIMEOUT))
    return service.serve(flags, int(os.environ.pop("THAW_SHIM_LISTEN_FD", "3")), idle)


if __name__ == "__main__":
    sys.exit(main())

"""What the shim reads from a container's OCI bundle: the function, and where the instance goes.

A thaw container image holds a function in thaw's layout: its rootfs has `/function`, the handler
module and the requirements installed beside it (`pip install --target function -r
requirements.txt` at image build; nothing is installed at container start). The handler
(`module:callable`) is named by the OCI annotation `com.thaw.handler`, else by `THAW_HANDLER` in
the process environment (an image's `Env`, which containerd copies into the spec), else it is
`handler:handle`. The spec's `process.args` are not run: the function is.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HANDLER_ANNOTATION = "com.thaw.handler"
IMAGE_ANNOTATION = "com.thaw.image"  # optional: the image's digest, when the caller knows it
CONTAINER_TYPE = "io.kubernetes.cri.container-type"  # "sandbox": the pod's pause container
DEFAULT_HANDLER = "handler:handle"
FUNCTION_DIR = "function"
# The image's environment becomes the function's; these describe the host, not the function.
HOST_ENV = frozenset({"PATH", "HOSTNAME", "HOME", "TERM", "THAW_HANDLER"})


class BundleError(Exception):
    """The bundle is not one thaw can run; the message says what is missing."""


@dataclass
class Container:
    """The parts of an OCI spec thaw uses."""

    bundle: Path
    handler: str
    env: dict[str, str]
    annotations: dict[str, str]
    netns: str | None  # a path to join; "" = a new one (thaw's own network); None = the host's
    cgroups_path: str
    memory: int | None = None
    cpu: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    @property
    def function_dir(self) -> Path:
        return self.rootfs / FUNCTION_DIR

    @property
    def is_pod_sandbox(self) -> bool:
        return self.annotations.get(CONTAINER_TYPE) == "sandbox"


def read(bundle: Path) -> Container:
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"bundle {bundle}: cannot read config.json: {e}") from e
    annotations = {str(k): str(v) for k, v in (spec.get("annotations") or {}).items()}
    env = dict(_env(spec.get("process", {}).get("env") or []))
    handler = annotations.get(HANDLER_ANNOTATION) or env.get("THAW_HANDLER") or DEFAULT_HANDLER
    linux = spec.get("linux") or {}
    netns: str | None = None
    for namespace in linux.get("namespaces") or []:
        if namespace.get("type") == "network":
            netns = namespace.get("path") or ""
    resources = linux.get("resources") or {}
    memory = (resources.get("memory") or {}).get("limit")
    cpu_spec = resources.get("cpu") or {}
    quota, period = cpu_spec.get("quota"), cpu_spec.get("period") or 100_000
    cpu = round(quota / period, 3) if quota and quota > 0 else None
    return Container(
        bundle=bundle,
        handler=handler,
        env={k: v for k, v in env.items() if k not in HOST_ENV},
        annotations=annotations,
        netns=netns,
        cgroups_path=str(linux.get("cgroupsPath") or ""),
        memory=int(memory) if memory and memory > 0 else None,
        cpu=cpu,
    )


def _env(entries: list[str]) -> list[tuple[str, str]]:
    return [(k, v) for k, _, v in (str(e).partition("=") for e in entries) if k]


def check_function(container: Container) -> None:
    """BundleError unless the rootfs holds a function the handler names."""
    directory = container.function_dir
    if not directory.is_dir():
        raise BundleError(
            f"the container's image has no function: {container.rootfs} has no /{FUNCTION_DIR} directory "
            f"(a thaw image holds the handler module and its installed requirements in /{FUNCTION_DIR})"
        )
    module = container.handler.partition(":")[0].split(".")[0]
    if not (directory / f"{module}.py").is_file() and not (directory / module / "__init__.py").is_file():
        raise BundleError(
            f"the container's image has no module {module!r} in /{FUNCTION_DIR} (handler {container.handler}, "
            f"named by the annotation {HANDLER_ANNOTATION} or THAW_HANDLER)"
        )


def image_key(container: Container, lowerdirs: str) -> str:
    """What identifies the image on this node, so that thawd deploys it once and thaws it after.

    The annotation com.thaw.image when given (an image digest); else the read-only layers of the
    container's overlay rootfs, which containerd's overlayfs snapshotter shares between every
    container of one image (committed snapshots, one per layer chain); else, with another
    snapshotter, the function directory's listing (paths, sizes, modes and mtimes, which an
    image's layers fix). The handler and the environment go in too: a template holds both.
    """
    h = hashlib.sha256()
    if IMAGE_ANNOTATION in container.annotations:
        h.update(b"annotation\0" + container.annotations[IMAGE_ANNOTATION].encode())
    elif lowerdirs:
        h.update(b"layers\0" + lowerdirs.encode())
    else:
        h.update(b"tree\0")
        for root, dirs, files in os.walk(container.function_dir):
            dirs.sort()
            for name in sorted(files):
                st = os.lstat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), container.function_dir)
                h.update(f"{rel}\0{st.st_size}\0{st.st_mode}\0{st.st_mtime_ns}\n".encode())
    h.update(b"\0handler\0" + container.handler.encode())
    for k, v in sorted(container.env.items()):
        h.update(f"\0{k}={v}".encode())
    return h.hexdigest()

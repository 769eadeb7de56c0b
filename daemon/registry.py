"""The function registry: what is deployed, on disk under the state directory.

    <state_dir>/functions/<name>/function.json     the FunctionSpec and the current revision
    <state_dir>/functions/<name>/rev-<N>/code/     a copy of the deployed directory
    <state_dir>/functions/<name>/rev-<N>/site/     its requirements.txt, installed once at deploy
    <state_dir>/functions/<name>/log               the instances' stdout and stderr

A revision directory is what a sandbox sees at /function. Its template in the pool is named
`fn.<name>.<N>`. function.json is replaced atomically (write, fsync, rename), so a crash during a
deploy leaves the previous revision in force; revision directories nothing points at are removed
at the next start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.errors import short_repr
from native.seccomp import BadOptOut, check_opt_outs
from sandbox.cgroups import MIN_MEMORY as CGROUP_MIN_MEMORY
from snapshot.template import MODES

# Matched with fullmatch: re.match with `$` also takes a trailing newline.
NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
HANDLER = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MIN_MEMORY, MAX_MEMORY = CGROUP_MIN_MEMORY, 1 << 50  # bytes
MIN_CPU, MAX_CPU = 0.01, 1024.0  # cores
MAX_SECONDS = 7 * 86400  # timeout and idle_timeout: a week
FUNCTION_MOUNT = "/function"
log = logging.getLogger("thawd")


class RegistryError(Exception):
    """A function cannot be deployed, found or removed; the message says why."""


class InvalidFunction(RegistryError):
    pass


class FunctionNotFound(RegistryError):
    pass


class RequirementsFailed(RegistryError):
    pass


@dataclass
class FunctionSpec:
    name: str
    handler: str = "handler:handle"
    memory: int | None = None  # bytes
    cpu: float | None = None  # cores
    timeout: float | None = None  # seconds per invocation (None: the daemon's default)
    env: dict[str, str] = field(default_factory=dict)
    mode: str = "cow"
    max_instances: int | None = None
    idle_timeout: float | None = None  # seconds an idle instance stays warm (None: the daemon's default)
    image: str = ""  # where it was deployed from (the OpenFaaS `image`)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    syscalls: list[str] = field(default_factory=list)  # seccomp deny-list entries it may call (opt-outs)
    layered: bool = True  # captured as a child of the runtime template (daemon/layering.py); False: cold

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FunctionSpec:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidFunction(f"unknown function field(s): {', '.join(unknown)}")
        try:
            return cls(**data).validate()
        except TypeError as e:
            raise InvalidFunction(f"bad function description: {e}") from e

    def validate(self) -> FunctionSpec:
        """Every field checked, each error naming its field: a spec that passes is one thawd can
        run, store and show back as standard JSON."""
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise InvalidFunction(
                f"function name {short_repr(self.name)} must be 1-63 lowercase letters, digits or '-', not starting or "
                "ending with '-'"
            )
        if not isinstance(self.handler, str) or not HANDLER.fullmatch(self.handler):
            raise InvalidFunction(f"handler {short_repr(self.handler)} must be module:callable, e.g. handler:handle")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise InvalidFunction(f"restore mode must be one of {', '.join(MODES)}, not {short_repr(self.mode)}")
        check_memory(self.memory, "memory")
        check_cpu(self.cpu, "cpu")
        _number(self.timeout, "timeout", 0, MAX_SECONDS, low_included=False)
        _number(self.idle_timeout, "idle_timeout", 0, MAX_SECONDS)
        if self.max_instances is not None and (not _is_int(self.max_instances) or self.max_instances < 1):
            raise InvalidFunction(f"max_instances must be an integer >= 1, not {short_repr(self.max_instances)}")
        if not isinstance(self.env, dict) or not all(
            ENV_NAME.fullmatch(k) and isinstance(v, str) and "\0" not in v for k, v in self.env.items()
        ):
            raise InvalidFunction("env must map variable names ([A-Za-z_][A-Za-z0-9_]*) to strings without NUL")
        if not isinstance(self.image, str):
            raise InvalidFunction(f"image must be a string, not {short_repr(self.image)}")
        check_strings(self.labels, "labels")
        check_strings(self.annotations, "annotations")
        check_syscalls(self.syscalls)
        if not isinstance(self.layered, bool):
            raise InvalidFunction(f"layered must be true or false, not {short_repr(self.layered)}")
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_syscalls(value: Any) -> None:
    """Seccomp opt-outs: a list of syscalls on thaw's deny-list (native.seccomp), each named."""
    if not isinstance(value, list):
        raise InvalidFunction(f"syscalls must be a list of syscall names, not {value!r:.80}")
    try:
        check_opt_outs(value)
    except BadOptOut as e:
        raise InvalidFunction(f"syscalls: {e}") from e


def check_memory(value: Any, what: str) -> None:
    """A memory limit in bytes, within what a sandbox's cgroup takes and a guest needs."""
    if value is not None and (not _is_int(value) or not MIN_MEMORY <= value <= MAX_MEMORY):
        raise InvalidFunction(
            f"{what} must be a number of bytes from {MIN_MEMORY} (4 MiB) to {MAX_MEMORY} (1 PiB), "
            f"not {short_repr(value)}"
        )


def check_cpu(value: Any, what: str) -> None:
    """A CPU limit in cores: the CFS quota cgroups take, 1 ms to 1024 CPUs per 100 ms period."""
    _number(value, what, MIN_CPU, MAX_CPU, unit=" cores")


def check_strings(value: Any, what: str) -> None:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidFunction(f"{what} must be an object of strings, not {short_repr(value)}")


def _number(value: Any, what: str, low: float, high: float, low_included: bool = True, unit: str = " s") -> None:
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low <= value if low_included else low < value) or not value <= high:
        bounds = f"from {low:g} to" if low_included else f"greater than {low:g} and at most"
        raise InvalidFunction(f"{what} must be a number {bounds} {high:g}{unit}, not {short_repr(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Deployed:
    spec: FunctionSpec
    revision: int
    created_at: float
    updated_at: float
    directory: Path  # the function's directory in the registry
    init_ms: float | None = None  # the guest's cold start at deploy: exec to READY
    # Kept with the function across restarts of thawd (faasd keeps them in its deployments):
    min_warm: int = 0  # the scale target (the gateway's scale-function)
    invocations: int = 0

    @property
    def revision_dir(self) -> Path:
        return self.directory / f"rev-{self.revision}"

    @property
    def template_name(self) -> str:
        return template_name(self.spec.name, self.revision)

    @property
    def log_path(self) -> Path:
        return self.directory / "log"


def template_name(name: str, revision: int) -> str:
    return f"fn.{name}.{revision}"


class Registry:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "functions"
        self.root.mkdir(parents=True, exist_ok=True)

    def load(self) -> list[Deployed]:
        """Every deployed function; unused revision directories (an interrupted deploy) go."""
        found = []
        for directory in sorted(self.root.iterdir()):
            record = directory / "function.json"
            if not record.exists():
                shutil.rmtree(directory, ignore_errors=True)  # a first deploy that never finished
                continue
            try:
                deployed = self._read(directory)
            except InvalidFunction as e:  # stored by an older thawd that checked less: kept, not served
                log.warning("%s: not loaded: %s (deploy it again)", record, e)
                continue
            for rev in directory.glob("rev-*"):
                if rev != deployed.revision_dir:
                    shutil.rmtree(rev, ignore_errors=True)
            found.append(deployed)
        return found

    def _read(self, directory: Path) -> Deployed:
        data = json.loads((directory / "function.json").read_text())
        spec = FunctionSpec.from_json(data["spec"])
        counts = (_count(data.get("min_warm")), _count(data.get("invocations")))
        return Deployed(
            spec, data["revision"], data["created_at"], data["updated_at"], directory, data.get("init_ms"), *counts
        )

    def get(self, name: str) -> Deployed:
        directory = self.root / name
        if not NAME.fullmatch(name) or not (directory / "function.json").exists():
            raise FunctionNotFound(f"no function named {name!r}")
        return self._read(directory)

    def exists(self, name: str) -> bool:
        return bool(NAME.fullmatch(name)) and (self.root / name / "function.json").exists()

    def stage(self, spec: FunctionSpec, source: Path, previous: Deployed | None) -> Deployed:
        """Copy `source` into a new revision and install its requirements; not yet in force."""
        if not source.is_absolute():
            raise InvalidFunction(f"the function's directory must be an absolute path, not {str(source)!r}")
        if not source.is_dir():
            raise InvalidFunction(f"function directory {source} does not exist or is not a directory")
        module = spec.handler.split(":")[0].split(".")[0]
        if not (source / f"{module}.py").exists() and not (source / module / "__init__.py").exists():
            raise InvalidFunction(f"{source} has no module {module!r} (handler {spec.handler})")
        directory = self.root / spec.name
        directory.mkdir(exist_ok=True)
        revision = previous.revision + 1 if previous else 1
        now = _now()
        staged = Deployed(spec, revision, previous.created_at if previous else now, now, directory)
        shutil.rmtree(staged.revision_dir, ignore_errors=True)
        try:
            shutil.copytree(source, staged.revision_dir / "code", symlinks=True)
            (staged.revision_dir / "site").mkdir()
            requirements = staged.revision_dir / "code" / "requirements.txt"
            if requirements.exists():
                install_requirements(requirements, staged.revision_dir / "site")
            _make_readable(staged.revision_dir)
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def commit(self, staged: Deployed) -> None:
        """Put `staged` in force (atomically). The previous revision's files stay until its last
        instance is gone (the daemon removes them with its template)."""
        self._write(staged)

    def save_counts(self, deployed: Deployed) -> None:
        """Store the function's scale target and invocation count (atomically, as a deploy does).
        A function deleted meanwhile is not brought back."""
        if (deployed.directory / "function.json").exists():
            self._write(deployed)

    def _write(self, deployed: Deployed) -> None:
        record = {
            "spec": deployed.spec.to_json(),
            "revision": deployed.revision,
            "created_at": deployed.created_at,
            "updated_at": deployed.updated_at,
            "init_ms": deployed.init_ms,
            "min_warm": deployed.min_warm,
            "invocations": deployed.invocations,
        }
        tmp = deployed.directory / f"function.json.{threading.get_ident()}.tmp"  # a write per thread: no clash
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(deployed.directory / "function.json")

    def discard(self, staged: Deployed) -> None:
        """Remove a revision that never came into force (and the function's directory if it was its first)."""
        shutil.rmtree(staged.revision_dir, ignore_errors=True)
        if not (staged.directory / "function.json").exists():
            shutil.rmtree(staged.directory, ignore_errors=True)

    def remove(self, name: str) -> None:
        shutil.rmtree(self.get(name).directory)


def _count(value: Any) -> int:
    """A stored count; what an older thawd did not store (or a damaged record) is 0."""
    return value if _is_int(value) and value >= 0 else 0


def install_requirements(requirements: Path, site: Path) -> None:
    """pip install -r requirements.txt into the function's own site directory, once, at deploy."""
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input"]
    argv += ["--target", str(site), "-r", str(requirements)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=requirements.parent, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise RequirementsFailed(f"installing {requirements.name} failed (pip exit {result.returncode}):\n{tail}")


def _make_readable(directory: Path) -> None:
    """The sandbox runs the function as an unprivileged uid: it must read what the daemon copied."""
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(mode | (0o555 if path.is_dir() else 0o444))


def _now() -> float:
    return time.time()

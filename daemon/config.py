"""thawd's settings: a TOML file (`--config`), every setting also a command-line flag.

A setting `x` of section `s` is `[s] x = ...` in the file and `--s-x` on the command line; a flag
given on the command line wins over the file, the file over the default. Sizes take K/M/G
suffixes. `daemon/thawd.example.toml` lists every setting with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sandbox.egress import parse_host_ports
from sandbox.errors import InvalidHostPorts
from shmpool.cli import parse_size
from snapshot.vocabulary import ColdCodec, choices

# What the bundled examples and common functions import (the standard library's usual stack):
# the runtime template holds it once for every function layered on it.
DEFAULT_PRELOAD = ",".join(
    [
        "asyncio", "base64", "collections", "csv", "dataclasses", "datetime", "decimal", "email.parser",
        "fractions", "hashlib", "http.client", "json", "logging", "random", "re", "sqlite3", "statistics",
        "string", "typing", "urllib.parse", "uuid", "xml.dom.minidom", "xml.etree.ElementTree",
    ]
)  # fmt: skip
NODE_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


class ConfigError(ValueError):
    """A setting is missing, unknown or has a bad value."""


def _setting(section: str, default: Any, help: str, size: bool = False) -> Any:
    return field(default=default, metadata={"section": section, "help": help, "size": size})


@dataclass
class DaemonConfig:
    # [daemon]
    state_dir: str = _setting("daemon", "/var/lib/thaw", "functions, their code and logs (survives restarts)")
    socket: str = _setting("daemon", "/run/thaw/thaw.sock", "the API's Unix socket (mode 0660)")
    socket_group: str = _setting("daemon", "", "group owning the API socket (default: root's)")
    drain_timeout: float = _setting("daemon", 20.0, "seconds SIGTERM waits for in-flight invocations")
    max_frame: int = _setting("daemon", 6 << 20, "largest request or response body in bytes", size=True)
    # [pool]
    pool_root: str = _setting("pool", "/var/lib/thaw/pool", "where the pool is mounted")
    pool_backend: str = _setting("pool", "tmpfs", "tmpfs | hugetlbfs | devdax | memfd (for a new pool)")
    pool_node: int = _setting("pool", 0, "NUMA node of a new pool (the 'CXL' node)")
    pool_size: int = _setting("pool", 8 << 30, "size of a new pool", size=True)
    pool_device: str = _setting("pool", "", "the /dev/daxX.Y of a devdax pool")
    # [integrity]
    integrity_scrub_interval: float = _setting(
        "integrity", 3600.0, "seconds between the scrubber's passes over the pool's checksums (0: off)"
    )
    integrity_scrub_bandwidth: int = _setting(
        "integrity", 32 << 20, "bytes per second the scrubber reads at most", size=True
    )
    # [sandboxes]
    sandboxes_prewarm: int = _setting("sandboxes", 4, "sandboxes built at start, and kept however long they idle")
    sandboxes_max: int = _setting("sandboxes", 64, "sandboxes at most (bounds instances in total)")
    sandboxes_bridge: str = _setting("sandboxes", "thaw0", "the bridge sandboxes attach to")
    sandboxes_subnet: str = _setting("sandboxes", "10.88.0.0/16", "addresses of sandboxes (first: the bridge)")
    sandboxes_network: bool = _setting("sandboxes", True, "give sandboxes a network interface")
    sandboxes_egress: bool = _setting("sandboxes", False, "let sandboxes reach beyond the host (masqueraded)")
    sandboxes_host_ports: str = _setting(
        "sandboxes",
        "",
        "host ports sandboxes reach at the bridge address, like tcp:53,udp:53,tcp:8000-8099 (else none)",
    )
    sandboxes_idle_timeout: float = _setting(
        "sandboxes", 120.0, "seconds an idle sandbox beyond the prewarmed ones is kept before it is taken down"
    )
    sandboxes_cgroup: str = _setting("sandboxes", "thaw", "cgroup directory under thawd's own cgroup")
    sandboxes_runtime_dir: str = _setting("sandboxes", "/run/thaw/sandboxes", "sandboxes' rootfs mount points")
    sandboxes_mems: str = _setting(
        "sandboxes", "pool", "NUMA nodes of instances' memory: pool (the pool's node), a list (0-1,3) or '' (thawd's)"
    )
    sandboxes_userns: bool = _setting("sandboxes", False, "give sandboxes a user namespace too (no lazy restores)")
    sandboxes_userns_root: int = _setting("sandboxes", 100000, "host uid and gid of root inside (with userns)")
    # [instances]
    instances_idle_timeout: float = _setting("instances", 300.0, "seconds an idle instance is kept warm")
    instances_max_per_function: int = _setting("instances", 32, "instances of one function at most")
    instances_max: int = _setting("instances", 64, "instances in total at most")
    instances_default_timeout: float = _setting("instances", 30.0, "invocation timeout of a function without one")
    instances_deploy_timeout: float = _setting("instances", 300.0, "seconds a function's init may take")
    # [layers]
    layers_enabled: bool = _setting(
        "layers", True, "capture functions as children of the runtime template (daemon/layering.py)"
    )
    layers_preload: str = _setting("layers", DEFAULT_PRELOAD, "modules the runtime template imports, comma-separated")
    # [keepalive]
    keepalive_policy: str = _setting(
        "keepalive", "fixed", "fixed (instances.idle_timeout) or hybrid (idle-time histograms, daemon/keepalive.py)"
    )
    keepalive_budget: int = _setting(
        "keepalive",
        0,
        "pool memory templates may hold; above it idle ones are compressed or evicted (0: off)",
        size=True,
    )
    keepalive_codec: str = _setting("keepalive", "zstd", "codec of compressed templates: lz4, zstd, deflate or iaa")
    keepalive_plan_interval: float = _setting("keepalive", 60.0, "seconds between plans of the templates' forms")
    keepalive_cache_ttl: float = _setting(
        "keepalive", 300.0, "seconds decompressed cold pages stay in the cache before they are punched out"
    )
    keepalive_restore_costs: str = _setting("keepalive", "", "JSON of scripts/bench_restore --json (the cost model)")
    keepalive_codec_costs: str = _setting("keepalive", "", "JSON of scripts/bench_codecs --json (the cost model)")
    # [gateway]
    gateway_listen: str = _setting("gateway", "", "HOST:PORT of the OpenFaaS provider API (empty: off)")
    gateway_user: str = _setting("gateway", "admin", "Basic auth user for /system/*")
    gateway_password_file: str = _setting("gateway", "", "file holding the Basic auth password")
    # [lora]
    lora_device: str = _setting("lora", "auto", "LoRA workers' device: auto (cuda if present), cpu, cuda[:N]")
    lora_max_batch: int = _setting("lora", 64, "sequences a LoRA worker decodes together at most")
    lora_slots: int = _setting("lora", 64, "adapters resident on a worker's device at once")
    lora_max_rank: int = _setting("lora", 64, "largest adapter rank accepted")
    lora_merge_after: int = _setting("lora", 4, "decode steps one adapter owns the batch before it is merged")
    lora_memory: int = _setting("lora", 0, "memory limit of a LoRA worker's sandbox (0: none)", size=True)
    lora_request_timeout: float = _setting("lora", 600.0, "seconds a completion may take (then 504)")

    def validate(self) -> DaemonConfig:
        if self.pool_backend not in ("tmpfs", "hugetlbfs", "devdax", "memfd"):
            raise ConfigError(f"pool.backend must be tmpfs, hugetlbfs, devdax or memfd, not {self.pool_backend!r}")
        positive = ("sandboxes_max", "instances_max", "instances_max_per_function", "max_frame", "pool_size")
        for name in (
            *positive,
            "integrity_scrub_bandwidth",
            "lora_max_batch",
            "lora_slots",
            "lora_max_rank",
            "lora_merge_after",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_dotted(name)} must be positive, not {getattr(self, name)}")
        non_negative = ("instances_idle_timeout", "instances_default_timeout", "drain_timeout", "sandboxes_prewarm")
        for name in (
            *non_negative,
            "sandboxes_idle_timeout",
            "integrity_scrub_interval",
            "lora_request_timeout",
            "keepalive_budget",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_dotted(name)} must not be negative, not {getattr(self, name)}")
        if self.keepalive_policy not in ("fixed", "hybrid"):
            raise ConfigError(f"keepalive.policy must be fixed or hybrid, not {self.keepalive_policy!r}")
        if self.keepalive_codec not in choices(ColdCodec):
            raise ConfigError(f"keepalive.codec must be {', '.join(choices(ColdCodec))}, not {self.keepalive_codec!r}")
        for name in ("keepalive_plan_interval", "keepalive_cache_ttl"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_dotted(name)} must be positive, not {getattr(self, name)}")
        if self.keepalive_budget and self.keepalive_policy != "hybrid":
            raise ConfigError("keepalive.budget needs keepalive.policy = hybrid (the cost model reads its histograms)")
        if self.keepalive_budget and not (self.keepalive_restore_costs and self.keepalive_codec_costs):
            raise ConfigError("keepalive.budget needs keepalive.restore_costs and keepalive.codec_costs (measured)")
        if self.sandboxes_mems not in ("pool", "") and not NODE_LIST.fullmatch(self.sandboxes_mems):
            raise ConfigError(f"sandboxes.mems must be pool, a node list like 0-1,3 or '', not {self.sandboxes_mems!r}")
        try:
            parse_host_ports(self.sandboxes_host_ports)
        except InvalidHostPorts as e:
            raise ConfigError(f"sandboxes.host_ports: {e}") from None
        if self.gateway_listen:
            host, _, port = self.gateway_listen.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"gateway.listen must be HOST:PORT, not {self.gateway_listen!r}")
            if not self.gateway_password_file:
                raise ConfigError("gateway.password_file is required when the gateway listens")
        return self

    @property
    def gateway_address(self) -> tuple[str, int]:
        host, _, port = self.gateway_listen.rpartition(":")
        return host, int(port)

    def gateway_password(self) -> str:
        try:
            return Path(self.gateway_password_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"reading gateway.password_file {self.gateway_password_file}: {e.strerror}") from e


def _section(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata["section"])


def _key(f: dataclasses.Field[Any]) -> str:
    """The name inside its section: `pool_root` is `root` of [pool]; [daemon] keys are whole."""
    section = _section(f)
    return f.name.removeprefix(section + "_") if f.name.startswith(section + "_") else f.name


def _dotted(name: str) -> str:
    f = next(f for f in fields(DaemonConfig) if f.name == name)
    return f"{_section(f)}.{_key(f)}"


def _flag(f: dataclasses.Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def _convert(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    kind: Any = type(f.default)
    try:
        if f.metadata["size"] and isinstance(value, str):
            return parse_size(value)
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"{where}: {value!r} is not a valid {kind.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; their defaults are None so the file's values show through."""
    parser.add_argument("--config", type=Path, help="TOML settings file (flags win over it)")
    for f in fields(DaemonConfig):
        suffix = " (K/M/G suffixes)" if f.metadata["size"] else ""
        parser.add_argument(_flag(f), dest=f.name, default=None, help=f"{f.metadata['help']}{suffix} [{f.default}]")


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> DaemonConfig:
    """Defaults, then the file, then the flags that were given."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_file(path))
    by_name = {f.name: f for f in fields(DaemonConfig)}
    for name, value in (overrides or {}).items():
        if value is not None and name in by_name:
            values[name] = _convert(by_name[name], value, _flag(by_name[name]))
    return DaemonConfig(**values).validate()


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"reading {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    known = {(_section(f), _key(f)): f for f in fields(DaemonConfig)}
    values: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section!r} must be a [section], settings live in sections")
        for key, value in table.items():
            f = known.get((section, key))
            if f is None:
                raise ConfigError(f"{path}: unknown setting {section}.{key}")
            values[f.name] = _convert(f, value, f"{path}: {section}.{key}")
    return values


def example() -> str:
    """The TOML file with every setting at its default (what daemon/thawd.example.toml holds)."""
    lines = ["# thawd settings; every one is also a flag: [pool] size = ... is --pool-size ...", ""]
    section = ""
    for f in fields(DaemonConfig):
        if _section(f) != section:
            section = _section(f)
            lines += ([""] if lines[-1] else []) + [f"[{section}]"]
        value = f.default
        text = str(value).lower() if isinstance(value, bool) else repr(value).replace("'", '"')
        lines.append(f"{_key(f)} = {text}  # {f.metadata['help']}")
    return "\n".join(lines) + "\n"

"""thawd: the thaw daemon.

Start: attach (or create) the pool, kill what a previous thawd left behind (its cgroups, hence its
sandboxes' agents and instances), build the sandbox pool, open every deployed function's template,
listen on the API socket (and the gateway's TCP port when configured), then tell systemd READY=1.
While serving, sandboxes idle beyond the prewarmed ones are given back after sandboxes.idle_timeout.
SIGTERM/SIGINT: STOPPING=1, stop accepting, let in-flight invocations finish (up to
daemon.drain_timeout), cut off what still runs after a short grace (HANDLER_GRACE), release every
instance and sandbox (taken down several at a time). Functions and templates stay: the pool and
the state directory live outside the runtime directory systemd wipes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from daemon import config as config_mod
from daemon import sdnotify
from daemon.config import ConfigError, DaemonConfig
from daemon.gateway import build_gateway
from daemon.instances import Manager
from daemon.lora.host import LoraHost, LoraSettings
from daemon.metrics import Metrics
from daemon.server import build_app
from sandbox.cgroups import CgroupTree
from sandbox.egress import parse_host_ports
from sandbox.errors import SandboxError
from sandbox.network import NetworkConfig
from sandbox.pool import PoolSettings, SandboxPool
from sandbox.sandbox import SandboxConfig
from shmpool import Pool
from shmpool.errors import PoolError

log = logging.getLogger("thawd")
LEASE_RENEW = 15.0
# Seconds a request handler still running after the drain (a deploy waiting for its guest's
# init, say) gets before it is cut off. aiohttp's default is 60, and it waits twice (for the
# handler, then for it once cancelled): one SIGTERM took 64 s that way.
HANDLER_GRACE = 1.0


class StartupError(Exception):
    pass


def open_pool(config: DaemonConfig) -> Pool:
    try:
        return Pool.open_or_create(
            config.pool_root,
            backend=config.pool_backend,
            node=config.pool_node,
            size=config.pool_size,
            device=config.pool_device or None,
        )
    except PoolError as e:
        raise StartupError(f"pool {config.pool_root}: {e}") from e


def reap_orphans(config: DaemonConfig) -> None:
    """What a thawd that died left: its cgroups (killing its agents and instances, whose netns
    and veths go with them) and the sandboxes' empty rootfs mount points."""
    tree = CgroupTree(config.sandboxes_cgroup)
    reaped = tree.reap_orphans()
    if reaped:
        log.info("killed and removed %d cgroups a previous thawd left", len(reaped))
    runtime = Path(config.sandboxes_runtime_dir)
    if runtime.is_dir():
        for leftover in runtime.iterdir():
            with contextlib.suppress(OSError):
                leftover.rmdir()


def build_sandboxes(config: DaemonConfig, pool_node: int) -> SandboxPool:
    """The sandbox pool; its instances allocate from `pool_node` (the memory pool's) by default."""
    mems = str(pool_node) if config.sandboxes_mems == "pool" else config.sandboxes_mems or None
    settings = PoolSettings(
        prewarm=config.sandboxes_prewarm,
        max_size=config.sandboxes_max,
        cgroup_tree=config.sandboxes_cgroup,
        network=config.sandboxes_network,
        cpuset_mems=mems,
        idle_timeout=config.sandboxes_idle_timeout,
        waiting_stubs=True,  # a thaw into an idle sandbox finds its stub there, stopped
    )
    try:
        network = NetworkConfig(
            bridge=config.sandboxes_bridge,
            subnet=config.sandboxes_subnet,
            egress=config.sandboxes_egress,
            host_ports=parse_host_ports(config.sandboxes_host_ports),
        )
        sandbox = SandboxConfig(
            runtime_dir=Path(config.sandboxes_runtime_dir),
            userns=config.sandboxes_userns,
            userns_root=config.sandboxes_userns_root,
        )
        return SandboxPool(settings, sandbox, network)
    except (SandboxError, OSError) as e:
        raise StartupError(f"building the sandbox pool: {e}") from e


def build_lora(config: DaemonConfig, pool: Pool, sandboxes: SandboxPool) -> LoraHost:
    settings = LoraSettings(
        device=config.lora_device,
        max_batch=config.lora_max_batch,
        slots=config.lora_slots,
        max_rank=config.lora_max_rank,
        merge_after=config.lora_merge_after,
        memory=config.lora_memory,
        request_timeout=config.lora_request_timeout,
        runtime_dir=Path(config.sandboxes_runtime_dir).parent / "lora",
        log_dir=Path(config.state_dir) / "lora",
    )
    return LoraHost(pool, sandboxes.tree, settings, sandboxes.config)


def listen_unix(path: Path, group: str) -> socket.socket:
    """The API socket, mode 0660; refuses to steal the socket of a thawd that is still serving."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise StartupError(f"another thawd is serving on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    if group:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except KeyError:
            raise StartupError(f"daemon.socket_group {group!r} is not a group") from None
    return sock


async def shrink_sandboxes(sandboxes: SandboxPool) -> None:
    """Give back sandboxes idle beyond the prewarmed ones, checked a few times per idle_timeout."""
    interval = min(max(sandboxes.settings.idle_timeout / 4, 0.25), 15.0)
    while True:
        await asyncio.sleep(interval)
        try:
            if gone := await asyncio.to_thread(sandboxes.shrink):
                log.info("took down %d idle sandboxes (%d left)", gone, sandboxes.size())
        except SandboxError as e:
            log.warning("%s", e)


async def renew_leases(pool: Pool) -> None:
    while True:
        await asyncio.sleep(LEASE_RENEW)
        with contextlib.suppress(PoolError, OSError):
            await asyncio.to_thread(pool.renew)


async def serve(config: DaemonConfig) -> None:
    pool = await asyncio.to_thread(open_pool, config)
    await asyncio.to_thread(reap_orphans, config)
    sandboxes = await asyncio.to_thread(build_sandboxes, config, pool.config.node)
    try:
        manager = Manager(config, pool, sandboxes, Metrics())
    except ConfigError as e:
        raise StartupError(str(e)) from e
    lora = build_lora(config, pool, sandboxes)
    runners: list[web.AppRunner] = []
    renewer = asyncio.ensure_future(renew_leases(pool))
    shrinker = asyncio.ensure_future(shrink_sandboxes(sandboxes))
    try:
        await manager.load()
        api = web.AppRunner(
            build_app(manager, lora), handle_signals=False, access_log=None, shutdown_timeout=HANDLER_GRACE
        )
        await api.setup()
        runners.append(api)
        sites: list[web.BaseSite] = [web.SockSite(api, listen_unix(Path(config.socket), config.socket_group))]
        if config.gateway_listen:
            gateway = web.AppRunner(
                build_gateway(manager, config.gateway_user, config.gateway_password()),
                access_log=None,
                shutdown_timeout=HANDLER_GRACE,
            )
            await gateway.setup()
            runners.append(gateway)
            host, port = config.gateway_address
            sites.append(web.TCPSite(gateway, host, port, reuse_address=True))
        for site in sites:
            await site.start()
        log.info("thawd serving on %s (%d functions)", config.socket, len(manager.functions))
        _notify("READY=1", f"STATUS=serving {len(manager.functions)} functions")
        await _until_signalled()
        _notify("STOPPING=1", "STATUS=draining in-flight invocations")
        log.info("stopping: draining %d in-flight invocations", manager.in_flight())
        for site in sites:
            await site.stop()  # no new connections; requests in flight go on
        await manager.close(config.drain_timeout)
    finally:
        await lora.close()
        renewer.cancel()
        shrinker.cancel()
        for runner in runners:
            await runner.cleanup()
        if not manager.closing:
            await manager.close(0)
        await asyncio.to_thread(sandboxes.destroy)
        with contextlib.suppress(SandboxError, OSError):
            CgroupTree(config.sandboxes_cgroup).remove()
        Path(config.socket).unlink(missing_ok=True)
        pool.close()
    log.info("thawd stopped")


def _notify(*states: str) -> None:
    try:
        sdnotify.notify(*states)
    except OSError as e:  # systemd's side is gone or misconfigured: serving (or stopping) goes on
        log.warning("%s", e)


async def _until_signalled() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def parse_args(argv: list[str] | None) -> DaemonConfig:
    parser = argparse.ArgumentParser(
        prog="thawd",
        description="The thaw daemon: serves functions thawed from templates in a shared memory pool.",
        epilog="Every setting can be given in the TOML file (--config) or as a flag; flags win.",
    )
    config_mod.add_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the settings in effect and exit")
    args = vars(parser.parse_args(argv))
    try:
        config = config_mod.load(args.pop("config"), args)
    except ConfigError as e:
        parser.exit(2, f"thawd: {e}\n")
    if args["print_config"]:
        for key, value in sorted(vars(config).items()):
            print(f"{key} = {value!r}")
        parser.exit(0)
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="thawd: %(levelname)s %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        print("thawd: needs root (namespaces, cgroups, ptrace, pool mounts)", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except StartupError as e:
        print(f"thawd: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sandbox networking with pyroute2: a bridge, and per sandbox a veth pair and an address.

    host:     bridge thaw0 (gateway, first address of the subnet) <- thv<id> (veth)
    sandbox:  lo up; eth0 (the veth's peer) with its own address; default route via the gateway

The sandbox side is configured through a NETLINK_ROUTE socket the sandbox's agent opens in its
network namespace and hands over (pyroute2 `IPRoute(fileno=...)`): the multi-threaded daemon
never enters another namespace, and pyroute2's netns helpers (which fork) are not used.

An nftables table of thaw's for the bridge (sandbox/egress.py) keeps the host out of reach:
nothing on it answers a sandbox but the `host_ports` the settings open at the gateway address.
Egress is off unless configured: a sandbox reaches nothing beyond the host either, even where
the host forwards packets, and a refused connect fails at once. With `egress=True` the table
lets the subnet out, masqueraded, and thaw turns on IPv4 forwarding (put back as it was at
teardown if thaw was the one that turned it on). Teardown removes the table.
"""

from __future__ import annotations

import errno
import ipaddress
import threading
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sandbox.egress import Egress, HostPort
from sandbox.errors import SandboxError, SubnetExhausted

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


BRIDGE_ALIAS = "made by thaw"  # marks a bridge thaw created, so a restarted thaw removes it in the end


@dataclass(frozen=True)
class NetworkConfig:
    bridge: str = "thaw0"
    subnet: str = "10.88.0.0/16"
    egress: bool = False
    host_ports: tuple[HostPort, ...] = ()  # host ports sandboxes may reach at the gateway (egress.py)

    def network(self) -> ipaddress.IPv4Network:
        try:
            net = ipaddress.IPv4Network(self.subnet)
        except ValueError as e:
            raise SandboxError(f"subnet {self.subnet!r} is not an IPv4 network: {e}") from e
        if net.num_addresses < 4:
            raise SandboxError(f"subnet {self.subnet} is too small: it needs the gateway and one sandbox address")
        if not 1 <= len(self.bridge) <= 15:
            raise SandboxError(f"bridge name {self.bridge!r} must be 1 to 15 characters")
        return net


@dataclass(frozen=True)
class Lease:
    host_ifname: str
    address: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    prefixlen: int


class Network:
    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self.net = config.network()
        self.gateway = next(self.net.hosts())
        self.in_use: set[ipaddress.IPv4Address] = set()
        self.lock = threading.Lock()
        self.created_bridge = False
        self.egress = Egress(config.bridge, self.net, self.gateway, config.host_ports)
        self.forwarding_was: str | None = None  # ip_forward before we turned it on
        self.ipr = IPRoute()

    def setup(self) -> None:
        """Create the bridge with the gateway address unless it exists, and the egress table.
        All or nothing: a failure takes down what was made (and closes this Network)."""
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise

    def _setup(self) -> None:
        name = self.config.bridge
        existing = self.ipr.link_lookup(ifname=name)
        if not existing:
            self.ipr.link("add", ifname=name, kind="bridge")
            index = self.ipr.link_lookup(ifname=name)[0]
            self.ipr.link("set", index=index, ifalias=BRIDGE_ALIAS)
            self.created_bridge = True
        else:  # ours if a thaw that died made it: its teardown is ours now
            index = existing[0]
            self.created_bridge = self.ipr.get_links(index)[0].get("IFLA_IFALIAS") == BRIDGE_ALIAS
        have = {a.get("IFA_ADDRESS") for a in self.ipr.get_addr(index=index)}
        if str(self.gateway) not in have:
            self.ipr.addr("add", index=index, address=str(self.gateway), prefixlen=self.net.prefixlen)
        self.egress.install(allow=self.config.egress)  # before the bridge is up: nothing slips out
        self.ipr.link("set", index=index, state="up")
        if self.config.egress and (before := IP_FORWARD.read_text().strip()) != "1":
            IP_FORWARD.write_text("1")
            self.forwarding_was = before

    def _allocate(self) -> ipaddress.IPv4Address:
        with self.lock:
            for address in self.net.hosts():
                if address != self.gateway and address not in self.in_use:
                    self.in_use.add(address)
                    return address
        raise SubnetExhausted(f"every address of subnet {self.config.subnet} is in use ({len(self.in_use)} sandboxes)")

    def _free(self, address: ipaddress.IPv4Address) -> None:
        with self.lock:
            self.in_use.discard(address)

    def attach(self, sandbox_id: str, agent_pid: int, netlink_fd: int) -> Lease:
        """Give the sandbox (its agent's network namespace) eth0 on the bridge. All or nothing.
        Takes ownership of `netlink_fd` (a NETLINK_ROUTE socket inside the sandbox)."""
        inside = IPRoute(fileno=netlink_fd)
        try:
            address = self._allocate()
            lease = Lease(f"thv{sandbox_id}"[:15], address, self.gateway, self.net.prefixlen)
            try:
                self._create_veth(lease, agent_pid)
                self._configure_inside(lease, inside)
            except BaseException:
                self.detach(lease)
                raise
            return lease
        finally:
            inside.close()

    def _create_veth(self, lease: Lease, agent_pid: int) -> None:
        ipr = self.ipr
        try:
            ipr.link("add", ifname=lease.host_ifname, kind="veth", peer={"ifname": "eth0", "net_ns_pid": agent_pid})
        except Exception as e:
            raise SandboxError(f"creating veth {lease.host_ifname} for the sandbox: {e}") from e
        index = ipr.link_lookup(ifname=lease.host_ifname)[0]
        bridge = ipr.link_lookup(ifname=self.config.bridge)
        if not bridge:
            raise SandboxError(f"bridge {self.config.bridge} is gone (was Network.setup() called?)")
        ipr.link("set", index=index, master=bridge[0], state="up")
        # An isolated port forwards only to non-isolated ones (the bridge itself): sandboxes never
        # reach each other, whatever egress and br_netfilter say.
        ipr.brport("set", index=index, isolated=1)

    @staticmethod
    def _configure_inside(lease: Lease, inside: IPRoute) -> None:
        try:
            inside.link("set", index=inside.link_lookup(ifname="lo")[0], state="up")
            eth0 = inside.link_lookup(ifname="eth0")[0]
            inside.addr("add", index=eth0, address=str(lease.address), prefixlen=lease.prefixlen)
            inside.link("set", index=eth0, state="up")
            inside.route("add", dst="default", gateway=str(lease.gateway))
        except Exception as e:
            raise SandboxError(f"configuring eth0 {lease.address} inside the sandbox: {e}") from e

    def detach(self, lease: Lease) -> None:
        """Delete the veth pair (its peer goes with it) and free the address."""
        try:
            for index in self.ipr.link_lookup(ifname=lease.host_ifname):
                try:
                    self.ipr.link("del", index=index)
                except NetlinkError as e:
                    if e.code != errno.ENODEV:  # gone with its namespace meanwhile: what we wanted
                        raise
        finally:
            self._free(lease.address)

    def teardown(self) -> None:
        """Delete the bridge if this Network created it and the egress table; put ip_forward back
        if we changed it; close the netlink socket."""
        try:
            if self.created_bridge:
                for index in self.ipr.link_lookup(ifname=self.config.bridge):
                    self.ipr.link("del", index=index)
                self.created_bridge = False
            self.egress.remove()
            if self.forwarding_was is not None:
                IP_FORWARD.write_text(self.forwarding_was)
                self.forwarding_was = None
        finally:
            self.ipr.close()

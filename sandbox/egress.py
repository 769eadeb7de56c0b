"""Egress control for the sandbox bridge: one nftables table of thaw's per bridge (`inet thaw-<bridge>`).

Nothing on the host answers a sandbox (in both modes), except the ports the settings open:
    input     iifname <bridge> ct state established,related accept
                                               replies to what the host opened, and their errors
              iifname <bridge> ip daddr <gateway> tcp dport {open tcp ports} accept
              iifname <bridge> ip daddr <gateway> udp dport {open udp ports} accept
              iifname <bridge> icmpv6 type {nd-neighbor-solicit, nd-neighbor-advert} accept
                                               so a connect to the bridge's link-local address
                                               is refused at once, not after neighbour discovery
              iifname <bridge> meta l4proto tcp reject with tcp reset
              iifname <bridge> reject          everything else, to any address of the host's
Egress off (the default): a sandbox reaches nothing beyond the host either.
    prerouting  iifname <bridge> fib daddr type != {local, broadcast, multicast} tcp: reset, else reject
    forward   iifname <bridge> reject          (never reached: prerouting refused it already)
              oifname <bridge> drop            nothing routed to a sandbox from elsewhere
Egress on: IPv4 forwarding is turned on and the subnet is masqueraded out.
    forward   iifname <bridge> accept
              oifname <bridge> ct state established,related accept
              oifname <bridge> drop            replies only: no connection into a sandbox
    postrouting (nat)  ip saddr <subnet> oifname != <bridge> masquerade

Nothing of thaw's own talks to a sandbox over the network (the daemon, guests and instances speak
over socketpairs and pipes): the network is the function's alone, and the host is not its to see.

Some facts about netfilter and the kernel this rests on.
- Every table's base chains on a hook see every packet, in priority order, and a packet goes on
  only if *every* one of them accepts it: our drop is final whatever other tables say, but our
  accept does not overrule another table's drop (a host firewall whose forward policy is drop
  must let the subnet through itself).
- With IPv4 forwarding off (`net.ipv4.ip_forward = 0`, the default, which thaw leaves alone when
  egress is off) the routing code drops a packet for an address beyond the host *silently*
  (ip_error() sends no ICMP unless the interface forwards), before the forward hook: a guest's
  connect then hangs until its own timeout. Hence the refusal in prerouting, before routing.
- ICMP errors are rate limited per peer (`net.ipv4.icmp_ratelimit`, 1 s, after a burst of 6):
  a guest that connects to refused addresses in a loop would see every connect after the sixth
  wait a second or more for its SYN's retransmission. A TCP reset is not rate limited, so TCP
  is refused with a reset (ECONNREFUSED at once) and only the rest with ICMP (admin-prohibited:
  EHOSTUNREACH, EACCES or nothing for UDP, which never waits for an answer).
- `ct state` needs conntrack, which the rules load; filter chains at priority 0 see packets
  after conntrack (-200) has classified them.
The table goes in one transaction (add, delete, add: a table a crashed thaw left is replaced
whole) and is deleted when the network is torn down.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from native.nftables import Nftables, NftablesError
from sandbox.errors import InvalidHostPorts, SandboxError

FAMILY = "inet"
PROTOCOLS = ("tcp", "udp")
REJECT: dict[str, Any] = {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}
RESET: dict[str, Any] = {"reject": {"type": "tcp reset"}}
_ENTRY = re.compile(r"(?P<protocol>[a-z]+):(?P<first>\d+)(-(?P<last>\d+))?")


@dataclass(frozen=True)
class HostPort:
    """Host ports a sandbox may reach at the gateway (the bridge's address): `tcp:53`, `udp:8000-8099`."""

    protocol: str
    first: int
    last: int

    def nft(self) -> int | dict[str, list[int]]:
        return self.first if self.first == self.last else {"range": [self.first, self.last]}

    def __str__(self) -> str:
        return f"{self.protocol}:{self.first}" + (f"-{self.last}" if self.last != self.first else "")


def parse_host_ports(text: str) -> tuple[HostPort, ...]:
    """`"tcp:53,udp:53,tcp:8000-8099"` (empty: none); InvalidHostPorts names the bad entry."""
    ports = []
    for entry in (e.strip() for e in text.split(",")) if text.strip() else ():
        match = _ENTRY.fullmatch(entry)
        if match is None:
            raise InvalidHostPorts(f"host port {entry!r} is not PROTOCOL:PORT or PROTOCOL:FIRST-LAST (tcp:53)")
        protocol, first = match["protocol"], int(match["first"])
        last = int(match["last"]) if match["last"] else first
        if protocol not in PROTOCOLS:
            raise InvalidHostPorts(f"host port {entry!r}: the protocol must be tcp or udp, not {protocol!r}")
        if not 1 <= first <= last <= 65535:
            raise InvalidHostPorts(f"host port {entry!r}: ports must be 1 to 65535, the first not above the last")
        ports.append(HostPort(protocol, first, last))
    return tuple(ports)


def table_name(bridge: str) -> str:
    return f"thaw-{bridge}"


def _is(key: str, value: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}}


def _field(protocol: str, field: str, value: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"payload": {"protocol": protocol, "field": field}}, "right": value}}


REPLIES = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}
BEYOND_THE_HOST = {
    "match": {
        "op": "!=",
        "left": {"fib": {"result": "type", "flags": ["daddr"]}},
        "right": {"set": ["local", "broadcast", "multicast"]},
    }
}
NEIGHBOUR_DISCOVERY = _field("icmpv6", "type", {"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]})


class Egress:
    """thaw's nftables table for one bridge and subnet."""

    def __init__(
        self,
        bridge: str,
        net: ipaddress.IPv4Network,
        gateway: ipaddress.IPv4Address,
        host_ports: tuple[HostPort, ...] = (),
    ) -> None:
        self.bridge, self.net, self.gateway, self.host_ports = bridge, net, gateway, host_ports
        self.table = {"family": FAMILY, "name": table_name(bridge)}

    def install(self, allow: bool) -> None:
        """Put the table in place (replacing one of the same name); SandboxError if nftables refuses."""
        commands = [{"add": {"table": self.table}}, {"delete": {"table": self.table}}, {"add": {"table": self.table}}]
        commands += self._host()
        commands += self._allowing() if allow else self._refusing()
        self._run(commands, "installing")

    def remove(self) -> None:
        """Delete the table (nothing happens if it is not there)."""
        self._run([{"add": {"table": self.table}}, {"delete": {"table": self.table}}], "removing")

    def _host(self) -> list[dict[str, Any]]:
        """The input chain: the host answers a sandbox only on the open ports, at the gateway."""
        from_bridge = _is("iifname", self.bridge)
        rules = [
            self._chain("input", "filter", "input", 0),
            self._rule("input", from_bridge, REPLIES, {"accept": None}),
        ]
        for protocol in PROTOCOLS:
            if ports := [p.nft() for p in self.host_ports if p.protocol == protocol]:
                to_open_port = (_field("ip", "daddr", str(self.gateway)), _field(protocol, "dport", {"set": ports}))
                rules.append(self._rule("input", from_bridge, *to_open_port, {"accept": None}))
        rules.append(self._rule("input", from_bridge, NEIGHBOUR_DISCOVERY, {"accept": None}))
        rules.append(self._rule("input", from_bridge, _is("l4proto", "tcp"), RESET))
        rules.append(self._rule("input", from_bridge, REJECT))
        return rules

    def _refusing(self) -> list[dict[str, Any]]:
        from_bridge = _is("iifname", self.bridge)
        return [
            self._chain("prerouting", "filter", "prerouting", 0),
            self._rule("prerouting", from_bridge, BEYOND_THE_HOST, _is("l4proto", "tcp"), RESET),
            self._rule("prerouting", from_bridge, BEYOND_THE_HOST, REJECT),
            self._chain("forward", "filter", "forward", 0),
            self._rule("forward", from_bridge, REJECT),
            self._rule("forward", _is("oifname", self.bridge), {"drop": None}),
        ]

    def _allowing(self) -> list[dict[str, Any]]:
        subnet = {"prefix": {"addr": str(self.net.network_address), "len": self.net.prefixlen}}
        return [
            self._chain("forward", "filter", "forward", 0),
            self._rule("forward", _is("iifname", self.bridge), {"accept": None}),
            self._rule("forward", _is("oifname", self.bridge), REPLIES, {"accept": None}),
            self._rule("forward", _is("oifname", self.bridge), {"drop": None}),
            self._chain("postrouting", "nat", "postrouting", 100),
            self._rule(
                "postrouting", _field("ip", "saddr", subnet), _is("oifname", self.bridge, "!="), {"masquerade": None}
            ),
        ]

    def _chain(self, name: str, kind: str, hook: str, priority: int) -> dict[str, Any]:
        chain = {**self.table, "table": self.table["name"], "name": name}
        return {"add": {"chain": {**chain, "type": kind, "hook": hook, "prio": priority, "policy": "accept"}}}

    def _rule(self, chain: str, *expressions: dict[str, Any]) -> dict[str, Any]:
        return {
            "add": {"rule": {"family": FAMILY, "table": self.table["name"], "chain": chain, "expr": list(expressions)}}
        }

    def _run(self, commands: list[dict[str, Any]], doing: str) -> None:
        try:
            with Nftables() as nft:
                nft.run(commands)
        except NftablesError as e:
            raise SandboxError(f"{doing} nftables table {FAMILY} {self.table['name']}: {e}") from e


def thaw_tables() -> list[str]:
    """Names of the nftables tables of thaw's that exist now (for leak checks and clean-up)."""
    with Nftables() as nft:
        listed = nft.run([{"list": {"tables": {}}}]).get("nftables", [])
    tables = [t["table"] for t in listed if "table" in t]
    return sorted(t["name"] for t in tables if t["family"] == FAMILY and t["name"].startswith("thaw-"))
